"""Downstream evaluation like the paper's (Takaya & Inamori 2025, arXiv 2508.18613), with its
protocol flaws fixed.

For every task, encoder and protocol: fixed k-fold splits (train / val / test), repeated R times
with different training seeds; AUC on the test part of every fold (`report.summary`: mean ± sd
and a one-sided Wilcoxon signed-rank test of the method against each baseline, paired on the
same splits and seeds). Fixed relative to the authors' code:

* a proper 2-way head (``Linear(512, 2)``) on the encoder, for every model;
* model selection: the epoch with the best validation AUC is the one tested;
* linear probing keeps the encoder frozen *including BatchNorm* (features computed in eval mode,
  once; no augmentation), and trains the head on standardised features.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.records import DownstreamTask
from .augment import flip_and_shift
from .checkpoint import encoder_from_checkpoint
from .model import Classifier, encode_images, encoder_with_weights, normalise_pixels
from .stats import roc_auc

PROTOCOLS = ("finetune", "linear")
PROTOCOL_SHORT = {"finetune": "FT", "linear": "LP"}


@dataclass
class ProtocolConfig:
    """Downstream protocol. The defaults fit the CPU main job; `paper()` is the paper's: 5 folds
    x 10 repeats, 10 epochs, batch 32, Adam 1e-4, StepLR(5, 0.1)."""

    repeats: int = 1
    finetune_epochs: int = 5
    finetune_batch_size: int = 16  # ~120 training images: batch 16 gives 8 steps per epoch
    finetune_lr: float = 1e-4
    step_size: int = 4
    gamma: float = 0.1
    probe_epochs: int = 100        # on cached features: cheap, so trained to convergence
    probe_lr: float = 1e-3
    probe_batch_size: int = 64
    probe_eval_every: int = 5
    augment: bool = True           # fine-tuning only: random flip + small shift
    test_unit: str = "fold"        # Wilcoxon pairs: "fold" (k x R) or "repeat" (R fold-means)
    seed: int = 0

    def __post_init__(self):
        if self.test_unit not in ("fold", "repeat"):
            raise ValueError(f"test_unit must be 'fold' or 'repeat'; got {self.test_unit!r}")

    @classmethod
    def paper(cls, **overrides) -> "ProtocolConfig":
        settings = dict(repeats=10, finetune_epochs=10, finetune_batch_size=32, step_size=5,
                        test_unit="repeat")
        settings.update(overrides)
        return cls(**settings)


@dataclass
class Encoder:
    """A model to evaluate: a name, its encoder weights (None: scratch), its stem, and the
    pretraining seed (None: scratch). Encoders of one name and several seeds are one model whose
    spread over pretraining seeds the report gives."""

    name: str
    state: dict | None
    stem: str = "7x7"
    seed: int | None = None


def encoders_from_checkpoints(checkpoints: list[tuple[str, str | os.PathLike]],
                              scratch: bool = True) -> tuple[list[Encoder], int | None]:
    """The encoders of pretraining checkpoints [(name, path)], plus a randomly initialised
    "scratch" encoder (with the checkpoints' stem); and the image size they were trained at
    (None without checkpoints). A name given several times is one model pretrained with
    several seeds. Checkpoints trained at different sizes, and two of one name and seed, are
    refused."""
    encoders, sizes, stems, seen = [], set(), set(), {}
    for name, path in checkpoints:
        state, config = encoder_from_checkpoint(path)
        key = (name, config.get("seed"))
        if key in seen:
            raise ValueError(f"checkpoints {seen[key]} and {path} are both {name!r} with "
                             f"pretraining seed {key[1]}: give them different names")
        seen[key] = path
        encoders.append(Encoder(name, state, config["stem"], config.get("seed")))
        sizes.add(config["image_size"])
        stems.add(config["stem"])
    if len(sizes) > 1:
        raise ValueError(f"checkpoints were trained at different image sizes {sorted(sizes)}")
    if scratch:
        encoders.append(Encoder("scratch", None, stems.pop() if len(stems) == 1 else "7x7"))
    return encoders, (sizes.pop() if sizes else None)


def model_names(encoders: list[Encoder]) -> list[str]:
    """The models among `encoders`, in order, each once (a model may have several seeds)."""
    return list(dict.fromkeys(e.name for e in encoders))


def _scores(logits: torch.Tensor) -> np.ndarray:
    return (logits[:, 1] - logits[:, 0]).float().cpu().numpy()  # log-odds of class 1


@torch.no_grad()
def _predict(model: nn.Module, images_uint8: torch.Tensor, device, batch: int = 256) -> np.ndarray:
    model.eval()
    return np.concatenate([_scores(model(normalise_pixels(images_uint8[i:i + batch].to(device))))
                           for i in range(0, len(images_uint8), batch)])


def finetune_fold(init_state: dict | None, stem: str, task: DownstreamTask, fold, cfg: ProtocolConfig,
                  seed: int, device) -> dict:
    """Fine-tune encoder + head on the fold's train part; return the test AUC of the epoch with
    the best validation AUC. `init_state` None: from scratch (a random init drawn from `seed`)."""
    train, val, test = fold
    torch.manual_seed(seed)
    model = Classifier(encoder_with_weights(stem, init_state)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.finetune_lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    generator = torch.Generator().manual_seed(seed)
    targets = torch.from_numpy(task.targets)
    best = (-1.0, None, -1)
    for epoch in range(cfg.finetune_epochs):
        model.train()
        order = torch.from_numpy(train)[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(order), cfg.finetune_batch_size):
            idx = order[start:start + cfg.finetune_batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = normalise_pixels(task.images[idx]).to(device)
            if cfg.augment:
                x = flip_and_shift(x, generator)
            loss = F.cross_entropy(model(x), targets[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        val_auc = roc_auc(task.targets[val], _predict(model, task.images[val], device))
        if val_auc > best[0]:
            best = (val_auc, {k: v.detach().clone() for k, v in model.state_dict().items()}, epoch + 1)
    model.load_state_dict(best[1])
    test_auc = roc_auc(task.targets[test], _predict(model, task.images[test], device))
    return {"auc": test_auc, "val_auc": best[0], "best_epoch": best[2]}


def linear_probe_fold(features: torch.Tensor, task: DownstreamTask, fold, cfg: ProtocolConfig,
                      seed: int) -> dict:
    """Train a 2-way linear head on frozen features (standardised with the train part's mean
    and sd); test the checkpoint with the best validation AUC."""
    train, val, test = fold
    mean, std = features[train].mean(0), features[train].std(0).clamp_min(1e-6)
    z = (features - mean) / std
    targets = torch.from_numpy(task.targets)
    torch.manual_seed(seed)
    head = nn.Linear(z.shape[1], 2)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.probe_lr)
    generator = torch.Generator().manual_seed(seed)
    best = (-1.0, None, -1)
    for epoch in range(cfg.probe_epochs):
        order = torch.from_numpy(train)[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(order), cfg.probe_batch_size):
            idx = order[start:start + cfg.probe_batch_size]
            loss = F.cross_entropy(head(z[idx]), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if (epoch + 1) % cfg.probe_eval_every == 0 or epoch + 1 == cfg.probe_epochs:
            with torch.no_grad():
                val_auc = roc_auc(task.targets[val], _scores(head(z[val])))
            if val_auc > best[0]:
                best = (val_auc, {k: v.clone() for k, v in head.state_dict().items()}, epoch + 1)
    head.load_state_dict(best[1])
    with torch.no_grad():
        test_auc = roc_auc(task.targets[test], _scores(head(z[test])))
    return {"auc": test_auc, "val_auc": best[0], "best_epoch": best[2]}


def fold_seed(base: int, repeat: int, fold: int) -> int:
    """Shared by every model on a (repeat, fold): the comparisons are paired."""
    return base * 100_003 + repeat * 1_009 + fold


def evaluate(encoders: list[Encoder], tasks: list[DownstreamTask], cfg: ProtocolConfig,
             protocols=PROTOCOLS, device=None, log=print) -> list[dict]:
    """AUC of every (task, protocol, encoder, repeat, fold); one row each."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for task in tasks:
        for protocol in protocols:
            for enc in encoders:
                started = time.perf_counter()
                aucs = []
                for repeat in range(cfg.repeats):
                    features = None
                    if protocol == "linear":
                        torch.manual_seed(fold_seed(cfg.seed, repeat, -1))  # scratch: a fresh init
                        encoder = encoder_with_weights(enc.stem, enc.state)
                        features = encode_images(encoder.to(device), task.images)
                    for k, fold in enumerate(task.folds):
                        seed = fold_seed(cfg.seed, repeat, k)
                        if protocol == "linear":
                            result = linear_probe_fold(features, task, fold, cfg, seed)
                        else:
                            result = finetune_fold(enc.state, enc.stem, task, fold, cfg, seed, device)
                        aucs.append(result["auc"])
                        rows.append({"task": task.name, "protocol": protocol, "model": enc.name,
                                     "seed": "" if enc.seed is None else enc.seed,
                                     "repeat": repeat, "fold": k, "auc": round(result["auc"], 6),
                                     "val_auc": round(result["val_auc"], 6),
                                     "best_epoch": result["best_epoch"]})
                of_seed = "" if enc.seed is None else f" seed {enc.seed}"
                log(f"{task.name:>8} {PROTOCOL_SHORT[protocol]} {enc.name:>8}{of_seed}: AUC "
                    f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1) if len(aucs) > 1 else 0:.3f} "
                    f"({len(aucs)} folds, {time.perf_counter() - started:.0f} s)")
    return rows
