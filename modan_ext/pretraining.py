"""Contrastive pretraining of a ResNet-18 on labelled metadata: ModAn-MulSupCon and baselines.

One loop serves the three losses, so the baselines differ from the method only in their labels:

* ``modan``: `JaccardSupConLoss` with multi-hot metadata labels (modality + anatomy, ...);
* ``supcon``: the same loss with leaf-class ids (RadImageNet's MOD/ANATOMY/PATHOLOGY): SupCon;
* ``simclr``: no labels: only the other view of an image is a positive (NT-Xent).

Training state is checkpointed at the end of every epoch (atomically: a crash while saving keeps
the previous file), together with the optimizer, scheduler, AMP scaler, epoch and RNG states, and
`resume=True` continues exactly: data order and augmentations of epoch e are drawn from a
generator seeded by (seed, epoch, rank), so they do not depend on what ran before. A crash or
Ctrl-C therefore loses at most the epoch in progress. Checkpoints hold only tensors and plain
Python values and are read with ``torch.load(weights_only=True)``.

Multi-GPU: run under ``torchrun``; when WORLD_SIZE > 1 the loop joins the process group, shards
the data like `DistributedSampler`, wraps the model in DDP and, if the loss accepts
``gather_distributed=True``, contrasts against the negatives of every rank.
"""
from __future__ import annotations

import csv
import inspect
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metadata import LabelVocabulary
from .readers import ImageSet

LOSSES = ("simclr", "supcon", "modan")
CHECKPOINT_NAME = "checkpoint_last.pt"


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run (saved in its checkpoint)."""

    loss: str = "modan"
    epochs: int = 8                  # CPU defaults: the main job in ~10 min on 2 cores
    batch_size: int = 64             # small batches: more SGD steps in few epochs
    lr: float = 0.05                 # paper: SGD 0.05, momentum 0.9, wd 1e-4, batch 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0       # paper: 3 (of 200)
    schedule: str = "cosine"         # after warm-up: "cosine" to 0 or "constant"
    temperature: float = 0.07        # paper: T = T_base = 0.07, threshold 0.3
    threshold: float = 0.3
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
        if self.stem not in ("7x7", "3x3"):
            raise ValueError(f"stem must be '7x7' or '3x3'; got {self.stem!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant'; got {self.schedule!r}")
        self.crop_scale = tuple(self.crop_scale)

    @classmethod
    def paper(cls, **overrides) -> "PretrainConfig":
        """The paper's settings (needs a GPU): 224 px, batch 256, 200 epochs, 3 warm-up epochs."""
        settings = dict(epochs=200, batch_size=256, warmup_epochs=3.0, image_size=224,
                        crop_scale=(0.2, 1.0), embedding_points=2000)
        settings.update(overrides)
        return cls(**settings)


# ---- model ------------------------------------------------------------------------------------

def build_encoder(stem: str = "7x7") -> nn.Module:
    """torchvision ResNet-18 for one-channel images, from scratch, returning 512-d features."""
    from torchvision.models import resnet18
    net = resnet18(weights=None)
    if stem == "7x7":
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        net.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return net


class ContrastiveModel(nn.Module):
    """Encoder + SupContrast's projection head (512 -> 512 -> dim); `forward` returns
    L2-normalised projections in float32."""

    def __init__(self, stem: str = "7x7", projection_dim: int = 128):
        super().__init__()
        self.encoder = build_encoder(stem)
        self.head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True),
                                  nn.Linear(512, projection_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.encoder(images)).float(), dim=-1)


def normalise_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float in [-1, 1] (mean 0.5 / std 0.5, as the authors)."""
    return images_uint8.float().div(127.5).sub(1.0)


# ---- views ------------------------------------------------------------------------------------

def augment(images_uint8: torch.Tensor, generator: torch.Generator, crop_scale=(0.35, 1.0),
            jitter: float = 0.4) -> torch.Tensor:
    """One SimCLR-style view per image, for a whole batch at once: random resized crop
    (area `crop_scale`, aspect 3/4..4/3), horizontal flip, and with p = 0.8 brightness and
    contrast jitter. Random numbers come from `generator` (CPU), so views are reproducible."""
    b = images_uint8.shape[0]
    device = images_uint8.device
    u = torch.rand(b, 7, generator=generator)
    area = crop_scale[0] + (crop_scale[1] - crop_scale[0]) * u[:, 0]
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = (1 - width) * (2 * u[:, 2] - 1)
    cy = (1 - height) * (2 * u[:, 3] - 1)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    x = images_uint8.float().div(255.0)
    grid = F.affine_grid(theta.to(device), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    apply = (u[:, 5] < 0.8).float()
    factors = 1 + jitter * (2 * torch.rand(b, 2, generator=generator) - 1)
    brightness = (1 + apply * (factors[:, 0] - 1)).to(device).view(b, 1, 1, 1)
    contrast = (1 + apply * (factors[:, 1] - 1)).to(device).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * brightness
    return x.clamp(0, 1).mul(2).sub(1)


def two_views(images_uint8, generator, cfg: PretrainConfig) -> torch.Tensor:
    """[B, 1, H, W] uint8 -> [2B, 1, H, W] float: view 0 of every image, then view 1."""
    return torch.cat([augment(images_uint8, generator, cfg.crop_scale, cfg.jitter)
                      for _ in range(2)])


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The source of an epoch's augmentations: a function of (seed, epoch, rank) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + rank * 104_729 + 17)


# ---- labels -----------------------------------------------------------------------------------

@dataclass
class EncodedLabels:
    """Per-image labels for every loss: multi-hot [N, L] and leaf-class ids [N]."""

    multi_hot: torch.Tensor
    leaf_ids: torch.Tensor
    leaf_names: list


def encode_labels(image_set: ImageSet, vocabulary: LabelVocabulary) -> EncodedLabels:
    where = [f"image {i} ({leaf})" for i, leaf in enumerate(image_set.leaves)]
    multi_hot = torch.from_numpy(vocabulary.encode_many(image_set.fields, where))
    names = sorted(set(image_set.leaves))
    lookup = {name: i for i, name in enumerate(names)}
    leaf_ids = torch.tensor([lookup[leaf] for leaf in image_set.leaves], dtype=torch.int64)
    return EncodedLabels(multi_hot, leaf_ids, names)


def batch_labels(loss: str, labels: EncodedLabels, index: torch.Tensor):
    if loss == "modan":
        return labels.multi_hot[index]
    if loss == "supcon":
        return labels.leaf_ids[index]
    return None  # simclr


def mean_positives(loss: str, batch, threshold: float) -> float:
    """Average number of positives per anchor row among the 2B - 1 others (paper: ~330 of 511
    at batch 256): a check that the labels mean what they should."""
    if batch is None:
        return 1.0
    if batch.dim() == 1:
        same = (batch[:, None] == batch[None, :]).float()
    else:
        y = batch.float()
        inter = y @ y.T
        union = y.sum(1)[:, None] + y.sum(1)[None, :] - inter
        jaccard = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
        same = ((jaccard >= threshold) & (jaccard > 0)).float()
    same.fill_diagonal_(1.0)  # the other view of the same image is always positive
    return float((2 * same.sum(1) - 1).mean())  # both views of each similar image, minus self


# ---- schedule, checkpoints, RNG ---------------------------------------------------------------

def lr_factor(step: int, steps_per_epoch: int, cfg: PretrainConfig) -> float:
    """Linear warm-up over `warmup_epochs`, then cosine to 0 (or constant)."""
    warmup = max(1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    total = max(warmup + 1, cfg.epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def rng_state() -> dict:
    """Global RNG states as tensors / plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write atomically: a partial file never replaces a good one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint of this module: tensors and plain values only (``weights_only=True``)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def encoder_from_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(encoder state dict, run config dict) of a pretraining checkpoint."""
    ckpt = load_checkpoint(path)
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    return state, ckpt["config"]


# ---- progress ---------------------------------------------------------------------------------

class Progress:
    """A dependency-free progress line: batches, running loss, images/s. Redraws in place on a
    terminal (at most 4 times a second); elsewhere prints one line per epoch."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done, self.images, self.loss_sum = 0, 0, 0.0
        self.start = self.last_draw = time.perf_counter()

    @property
    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.done, 1)

    def update(self, images: int, loss: float) -> None:
        self.done += 1
        self.images += images
        self.loss_sum += loss
        now = time.perf_counter()
        if self.enabled and self.tty and (now - self.last_draw > 0.25 or self.done == self.total):
            self.last_draw = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def line(self) -> str:
        width = 20
        filled = int(width * self.done / max(self.total, 1))
        return (f"{self.label} |{'#' * filled}{'-' * (width - filled)}| {self.done}/{self.total} "
                f"loss {self.mean_loss:.4f}  {self.rate:.0f} img/s")

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + self.line() + "\n")
            self.stream.flush()


# ---- distributed ------------------------------------------------------------------------------

@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(dist.get_rank(), world, local)


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined (end of a torchrun job)."""
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def shard_indices(n: int, batch_size: int, seed: int, epoch: int, dist: Distributed) -> list:
    """This rank's batches of one epoch: `DistributedSampler(shuffle=True, drop_last=True)`
    order (a permutation seeded by seed + epoch), cut into full batches."""
    from torch.utils.data import DistributedSampler
    sampler = DistributedSampler(range(n), num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.int64)
    usable = len(order) // batch_size * batch_size
    if usable == 0:
        raise ValueError(f"batch size {batch_size} is larger than this rank's {len(order)} images")
    return list(order[:usable].view(-1, batch_size))


def make_loss(cfg: PretrainConfig, dist: Distributed) -> nn.Module:
    from . import JaccardSupConLoss
    kwargs = dict(temperature=cfg.temperature, base_temperature=cfg.temperature,
                  threshold=cfg.threshold, backend=cfg.loss_backend)
    if dist.world_size > 1:
        if "gather_distributed" in inspect.signature(JaccardSupConLoss).parameters:
            kwargs["gather_distributed"] = True
        elif dist.main:
            print("warning: this JaccardSupConLoss has no gather_distributed; each rank contrasts "
                  "only its own batch", file=sys.stderr)
    return JaccardSupConLoss(**kwargs)


# ---- the loop ---------------------------------------------------------------------------------

def _write_metrics(rows: list, path: Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def pretrain(image_set: ImageSet, vocabulary: LabelVocabulary, cfg: PretrainConfig,
             out_dir: str | os.PathLike, resume: bool = False, device: str | None = None,
             stop_after_epochs: int | None = None, log=print, progress: bool = True) -> dict:
    """Pretrain on `image_set`; write checkpoints, ``metrics.csv``, plots into `out_dir`.

    Args:
        resume: continue from ``out_dir/checkpoint_last.pt`` if it exists (the config must match).
        stop_after_epochs: stop after this many epochs *of this call* (tests; a planned stop).
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
    params = [{"params": [p for n, p in model.named_parameters() if p.ndim > 1],
               "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in model.named_parameters() if p.ndim <= 1],
               "weight_decay": 0.0}]  # no decay on BatchNorm and biases (SupContrast decays all;
    #                                  the difference is negligible and this is the common choice)
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    batches_per_epoch = len(shard_indices(len(image_set), cfg.batch_size, cfg.seed, 0, dist))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, batches_per_epoch, cfg))
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    loss_fn = make_loss(cfg, dist)

    start_epoch, history = 0, []
    ckpt_path = out / CHECKPOINT_NAME
    config_dict = asdict(cfg)
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        saved = dict(ckpt["config"])
        differs = {k: (saved.get(k), v) for k, v in config_dict.items()
                   if k not in ("epochs", "embedding_points") and saved.get(k) != v and
                   not (isinstance(v, tuple) and tuple(saved.get(k) or ()) == v)}
        if differs:
            raise ValueError(f"cannot resume {ckpt_path}: config differs {differs} (saved, now); "
                             "use another output folder or delete this one")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        if dist.main:
            log(f"resumed {ckpt_path} after epoch {start_epoch}")
    if dist.main:
        vocabulary.save(out / "vocabulary.json")
        with open(out / "config.json", "w", encoding="utf-8") as fh:
            json.dump(config_dict, fh, indent=2)

    train_model = model
    if dist.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    images_on_device = image_set.images.to(device)
    last_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, start_epoch + stop_after_epochs)
    for epoch in range(start_epoch, last_epoch):
        train_model.train()
        generator = epoch_generator(cfg.seed, epoch, dist.rank)
        batches = shard_indices(len(image_set), cfg.batch_size, cfg.seed, epoch, dist)
        bar = Progress(len(batches), f"[{cfg.loss}] epoch {epoch + 1}/{cfg.epochs}",
                       enabled=progress and dist.main)
        positives = []
        for index in batches:
            views = two_views(images_on_device[index.to(device)], generator, cfg)
            target = batch_labels(cfg.loss, labels, index)
            target = target.to(device) if target is not None else None
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                z = train_model(views)
            b = index.numel()
            features = torch.stack([z[:b], z[b:]], dim=1)  # [B, 2, D]
            loss = loss_fn(features, target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            bar.update(b * 2 * dist.world_size, float(loss.detach()))
            positives.append(mean_positives(cfg.loss, target, cfg.threshold))
        epoch_loss = bar.mean_loss
        if dist.world_size > 1:
            import torch.distributed as tdist
            t = torch.tensor([epoch_loss], device=device)
            tdist.all_reduce(t)
            epoch_loss = float(t) / dist.world_size
        bar.close()
        history.append({"epoch": epoch + 1, "loss": round(epoch_loss, 6),
                        "lr": round(scheduler.get_last_lr()[0], 8),
                        "seconds": round(time.perf_counter() - bar.start, 3),
                        "images_per_s": round(bar.rate, 1),
                        "positives_per_anchor": round(float(np.mean(positives)), 2),
                        "batch_rows": 2 * cfg.batch_size * dist.world_size})
        if dist.main:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "epoch": epoch + 1, "rng": rng_state(), "config": config_dict,
                             "history": history, "vocabulary": vocabulary.to_json(),
                             "leaf_names": labels.leaf_names}, ckpt_path)
            _write_metrics(history, out / "metrics.csv")
        if dist.world_size > 1:
            import torch.distributed as tdist
            tdist.barrier()

    summary = {"loss": cfg.loss, "epochs_done": len(history), "checkpoint": str(ckpt_path),
               "final_loss": history[-1]["loss"] if history else None,
               "seconds": round(sum(h["seconds"] for h in history), 2),
               "images_per_s": history[-1]["images_per_s"] if history else None}
    if dist.main and history:
        summary["loss_plot"] = plot_loss_curve(history, out / "loss_curve.png", cfg.loss, log)
        if len(history) == cfg.epochs and cfg.embedding_points > 0:
            summary.update(embedding_map(model.encoder, image_set, vocabulary, out,
                                         cfg.embedding_points, cfg.seed, log, title=cfg.loss))
    return summary


# ---- plots and the embedding map --------------------------------------------------------------

def import_pyplot(log=print):
    """matplotlib's pyplot (non-interactive backend), or None with a message: plots are optional
    (``pip install 'modan_ext[examples]'``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping plots (pip install matplotlib)")
        return None
    return plt


def plot_loss_curve(history: list, path: Path, title: str, log=print) -> str | None:
    plt = import_pyplot(log)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(f"{title}: loss per epoch")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


@torch.no_grad()
def encode_images(encoder: nn.Module, images_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """512-d encoder features (eval mode: BatchNorm uses its running statistics), float32 CPU."""
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = [encoder(normalise_pixels(images_uint8[i:i + batch_size].to(device))).float().cpu()
           for i in range(0, len(images_uint8), batch_size)]
    encoder.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 512)


def knn_accuracy(features: torch.Tensor, classes: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy (cosine similarity, majority vote): how well the embedding
    separates a label, without training anything."""
    z = F.normalize(features.double(), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(-float("inf"))
    neighbours = sim.topk(min(k, len(z) - 1), dim=1).indices.numpy()
    votes = classes[neighbours]
    predicted = np.array([np.bincount(v[v >= 0], minlength=classes.max() + 1).argmax()
                          if (v >= 0).any() else -1 for v in votes])
    return float((predicted == classes).mean())


def project_2d(features: torch.Tensor, seed: int, log=print) -> tuple[np.ndarray, str]:
    """t-SNE (scikit-learn) when importable, else PCA."""
    x = features.double().numpy()
    try:
        from sklearn.manifold import TSNE
        perplexity = float(min(30, max(5, (len(x) - 1) // 3)))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x), "t-SNE"
    except ImportError:
        log("scikit-learn is not installed: embedding map with PCA instead of t-SNE")
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T, "PCA"


def embedding_map(encoder: nn.Module, image_set: ImageSet, vocabulary: LabelVocabulary,
                  out_dir: Path, points: int, seed: int, log=print, title: str = "") -> dict:
    """The paper's qualitative figure: a 2-D map of encoder features coloured by modality and by
    anatomy, plus leave-one-out 5-NN accuracy of each field (``embedding_knn.json``)."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(image_set))[:points])
    features = encode_images(encoder, image_set.images[torch.from_numpy(chosen)])
    multi_hot = vocabulary.encode_many([image_set.fields[i] for i in chosen])
    fields = [f for f in ("modality", "anatomy") if f in vocabulary.fields] or list(vocabulary.fields)[:2]
    classes = {f: vocabulary.field_index(multi_hot, f) for f in fields}
    leaves = sorted(set(image_set.leaves))
    classes["leaf"] = np.array([leaves.index(image_set.leaves[i]) for i in chosen])
    knn = {f"knn5_{name}": round(knn_accuracy(features, c), 4) for name, c in classes.items()}
    with open(out_dir / "embedding_knn.json", "w", encoding="utf-8") as fh:
        json.dump(knn, fh, indent=2)
    result = {**knn}
    coords, method = project_2d(features, seed, log)
    with open(out_dir / "embedding.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["x", "y", *fields, "leaf"])
        for row, i in enumerate(chosen):
            values = [vocabulary.values_of(f)[classes[f][row]] if classes[f][row] >= 0 else ""
                      for f in fields]
            writer.writerow([f"{coords[row, 0]:.4f}", f"{coords[row, 1]:.4f}", *values,
                             image_set.leaves[i]])
    plt = import_pyplot(log)
    if plt is None:
        return result
    fig, axes = plt.subplots(1, len(fields), figsize=(5.2 * len(fields), 4.4))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, fields):
        values = vocabulary.values_of(name)
        cmap = plt.get_cmap("tab10" if len(values) <= 10 else "tab20")
        for k, value in enumerate(values):
            sel = classes[name] == k
            if sel.any():
                ax.scatter(coords[sel, 0], coords[sel, 1], s=6, color=cmap(k % cmap.N), label=value)
        ax.set_title(f"{title} encoder, {method}: by {name} (5-NN acc {knn[f'knn5_{name}']:.2f})",
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=2, loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(out_dir / "embedding.png", dpi=110)
    plt.close(fig)
    result["embedding_plot"] = str(out_dir / "embedding.png")
    return result
