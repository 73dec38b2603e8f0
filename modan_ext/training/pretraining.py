"""Contrastive pretraining of a ResNet-18 on labelled metadata: ModAn-MulSupCon and baselines
(`objective`): the run's config and its loop.

Training state is checkpointed at the end of every epoch (`checkpoint`), and `resume=True`
continues exactly: data order and augmentations of epoch e are drawn from a generator seeded by
(seed, epoch, rank), so they do not depend on what ran before. A crash or Ctrl-C therefore loses
at most the epoch in progress.

Multi-GPU: run under ``torchrun``; when WORLD_SIZE > 1 the loop joins the process group, shards
the data like `DistributedSampler`, wraps the model in DDP and contrasts against the negatives
of every rank (``gather_distributed=True``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data.metadata import LabelVocabulary
from ..data.records import ImageSet
from ..options import DEFAULTS
from .augment import epoch_generator, two_views
from .cached import cached_contrastive_backward
from .checkpoint import (CHECKPOINT_NAME, RESUME_KEYS, check_resumable, check_run_folder,
                         data_digest, load_checkpoint, restore_training_state, rng_state,
                         save_checkpoint)
from .embedding import embedding_map
from .launch import barrier, init_distributed, mean_over_ranks, shard_indices
from .model import STEMS, ContrastiveModel
from .objective import LOSSES, batch_labels, encode_labels, make_loss, mean_positives
from .optim import make_optimizer, make_scheduler
from .report.figures import plot_loss_curves
from .report.files import write_csv


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run (saved in its checkpoint)."""

    loss: str = "modan"
    epochs: int = 8                  # CPU defaults: the main job in ~10 min on 2 cores
    batch_size: int = 64             # small batches: more SGD steps in few epochs
    chunk_size: int = 0              # gradient caching: rows embedded at once (0: the plain step)
    lr: float = 0.05                 # paper: SGD 0.05, momentum 0.9, wd 1e-4, batch 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0       # paper: 3 (of 200)
    schedule: str = "cosine"         # after warm-up: "cosine" to 0 or "constant"
    temperature: float = DEFAULTS.temperature  # T = T_base, the paper's (as the loss's defaults)
    threshold: float = DEFAULTS.threshold
    image_size: int = 40             # paper: 224
    stem: str = "7x7"                # "7x7" (stride 2, authors' code) or "3x3" (stride 1, paper text)
    projection_dim: int = 128
    crop_scale: tuple = (0.35, 1.0)  # RandomResizedCrop area range
    jitter: float = 0.4              # brightness/contrast jitter strength, applied with p = 0.8
    seed: int = 0
    amp: bool = True                 # CUDA only; bfloat16 where supported, else float16
    loss_backend: str = "auto"
    embedding_points: int = 1200     # images in the 2-D embedding map (0: no map)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}; got {self.loss!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be '7x7' or '3x3'; got {self.stem!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant'; got {self.schedule!r}")
        self.crop_scale = tuple(self.crop_scale)
        # even: a chunk holds both views of whole images and is never a single row, which
        # BatchNorm cannot normalise (every batch has 2 * batch_size rows)
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) \
                or self.chunk_size < 0 or self.chunk_size % 2:
            raise ValueError(f"chunk_size must be 0 (the plain step) or an even number of rows "
                             f"(images x 2 views) to embed at once; got {self.chunk_size!r}")

    @classmethod
    def paper(cls, **overrides) -> "PretrainConfig":
        """The paper's settings (needs a GPU): 224 px, batch 256, 200 epochs, 3 warm-up epochs."""
        settings = dict(epochs=200, batch_size=256, warmup_epochs=3.0, image_size=224,
                        crop_scale=(0.2, 1.0), embedding_points=2000)
        settings.update(overrides)
        return cls(**settings)


def batch_description(cfg: PretrainConfig, world_size: int) -> str:
    """The effective batch of a step and, with gradient caching, its chunks."""
    rows = 2 * cfg.batch_size
    text = (f"batch {cfg.batch_size} images x 2 views x {world_size} "
            f"rank{'s' if world_size > 1 else ''} = {rows * world_size} rows a step")
    if not cfg.chunk_size:
        return text + f" (plain step: {rows} rows a rank at once)"
    chunks = -(-rows // cfg.chunk_size)
    return text + (f"; gradient caching: chunks of {min(cfg.chunk_size, rows)} rows, "
                   f"{chunks} a rank a step")


def pretrain(image_set: ImageSet, vocabulary: LabelVocabulary, cfg: PretrainConfig,
             out_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False,
             device: str | None = None, stop_after_epochs: int | None = None, log=print,
             progress: bool = True) -> dict:
    """Pretrain on `image_set`; write checkpoints, ``metrics.csv``, plots into `out_dir`.

    Args:
        resume: continue from ``out_dir/checkpoint_last.pt``, which must exist and come from the
            same config (apart from `checkpoint.RESUMABLE_CHANGES`), vocabulary and data.
        overwrite: start afresh in a folder that holds a checkpoint (its checkpoint is deleted
            first); without it (or `resume`) such a folder is refused.
        stop_after_epochs: stop after this many epochs *of this call* (tests; a planned stop).
        progress: a progress bar on a terminal; elsewhere (a CI log) one line per epoch.
    Returns:
        a summary: final loss, epochs done, seconds, images/s, paths of the outputs.
    """
    out = Path(out_dir)
    dist = init_distributed()
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or (f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    labels = encode_labels(image_set, vocabulary)
    model = ContrastiveModel(cfg.stem, cfg.projection_dim).to(device)
    optimizer = make_optimizer(model, cfg)
    batches_per_epoch = len(shard_indices(len(image_set), cfg.batch_size, cfg.seed, 0, dist))
    scheduler = make_scheduler(optimizer, batches_per_epoch, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    loss_fn = make_loss(cfg.temperature, cfg.threshold, cfg.loss_backend, dist.world_size > 1)

    start_epoch, history = 0, []
    ckpt_path = out / CHECKPOINT_NAME
    config_dict = asdict(cfg)
    # what the run trains on: a resume under other data or another vocabulary is refused
    data = {"images": len(image_set), "world_size": dist.world_size,
            "sha256": data_digest(image_set.images, labels.multi_hot, labels.leaf_ids)}
    check_run_folder(ckpt_path, resume, overwrite)
    if resume:
        ckpt = load_checkpoint(ckpt_path, map_location=device, required=RESUME_KEYS)
        check_resumable(ckpt, config_dict, vocabulary.to_json(), data, ckpt_path)
        start_epoch, history = restore_training_state(ckpt, model, optimizer, scheduler, scaler)
        if dist.main:
            log(f"resumed {ckpt_path} after epoch {start_epoch}")
    barrier(dist)  # every rank has checked the folder before rank 0 changes it
    if dist.main:
        if overwrite:
            ckpt_path.unlink(missing_ok=True)  # a crash before epoch 1 must not resurrect it
        vocabulary.save(out / "vocabulary.json")
        with open(out / "config.json", "w", encoding="utf-8") as fh:
            json.dump(config_dict, fh, indent=2)

    train_model = model
    if dist.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    images_on_device = image_set.images.to(device)
    last_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, start_epoch + stop_after_epochs)
    if dist.main and start_epoch < last_epoch:
        log(f"[{cfg.loss}] {batch_description(cfg, dist.world_size)}")
    for epoch in range(start_epoch, last_epoch):
        train_model.train()
        generator = epoch_generator(cfg.seed, epoch, dist.rank)
        batches = shard_indices(len(image_set), cfg.batch_size, cfg.seed, epoch, dist)
        title = f"[{cfg.loss}] epoch {epoch + 1}/{cfg.epochs}"
        # disable=None: tqdm turns itself off when stderr is not a terminal (a CI log)
        bar = tqdm(total=len(batches), desc=title, unit="batch", file=sys.stderr,
                   disable=None if progress and dist.main else True)
        log_epoch = progress and dist.main and bar.disable  # instead of the bar
        started, loss_sum, images_seen, positives = time.perf_counter(), 0.0, 0, []
        for index in batches:
            views = two_views(images_on_device[index.to(device)], generator, cfg.crop_scale,
                              cfg.jitter)
            target = batch_labels(cfg.loss, labels, index)
            target = target.to(device) if target is not None else None
            b = index.numel()
            if cfg.chunk_size:
                optimizer.zero_grad(set_to_none=True)
                # views are view-major [2B, ...]; the cached step takes [B, 2, ...] (no copy)
                per_image = views.view(2, b, *views.shape[1:]).transpose(0, 1)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    loss = cached_contrastive_backward(train_model, per_image, target, loss_fn,
                                                       cfg.chunk_size, scaler=scaler)
            else:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    z = train_model(views)
                features = torch.stack([z[:b], z[b:]], dim=1)  # [B, 2, D]
                loss = loss_fn(features, target)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss.detach())
            images_seen += b * 2 * dist.world_size
            positives.append(mean_positives(target, b, cfg.threshold))
            bar.set_postfix(loss=f"{loss_sum / len(positives):.4f}", refresh=False)
            bar.update()
        bar.close()
        epoch_loss = mean_over_ranks(loss_sum / max(len(batches), 1), dist, device)
        seconds = time.perf_counter() - started
        rate = images_seen / max(seconds, 1e-9)
        if log_epoch:
            log(f"{title}: loss {epoch_loss:.4f}, {rate:.0f} img/s, {seconds:.1f} s")
        history.append({"epoch": epoch + 1, "loss": round(epoch_loss, 6),
                        "lr": round(scheduler.get_last_lr()[0], 8), "seconds": round(seconds, 3),
                        "images_per_s": round(rate, 1),
                        "positives_per_anchor": round(float(np.mean(positives)), 2),
                        "batch_rows": 2 * cfg.batch_size * dist.world_size,
                        "chunk_rows": cfg.chunk_size})
        if dist.main:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "epoch": epoch + 1, "rng": rng_state(), "config": config_dict,
                             "history": history, "vocabulary": vocabulary.to_json(),
                             "data": data, "leaf_names": labels.leaf_names}, ckpt_path)
            write_csv(history, out / "metrics.csv")
        barrier(dist)

    summary = {"loss": cfg.loss, "epochs_done": len(history), "checkpoint": str(ckpt_path),
               "final_loss": history[-1]["loss"] if history else None,
               "seconds": round(sum(h["seconds"] for h in history), 2),
               "images_per_s": history[-1]["images_per_s"] if history else None}
    if dist.main and history:
        summary["loss_plot"] = plot_loss_curves({cfg.loss: history}, out / "loss_curve.png",
                                                log=log)
        if len(history) == cfg.epochs and cfg.embedding_points > 0:
            summary.update(embedding_map(model.encoder, image_set, vocabulary, out,
                                         cfg.embedding_points, cfg.seed, log, title=cfg.loss))
    return summary
