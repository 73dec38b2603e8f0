"""The pretraining optimizer: SGD with momentum, weight decay on weights only, and a per-step
learning-rate schedule (linear warm-up, then cosine to 0 or constant)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: pretraining imports this module
    from .pretraining import PretrainConfig


def make_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.SGD:
    # No decay on BatchNorm and biases (SupContrast decays all; the difference is negligible
    # and this is the common choice).
    params = [{"params": [p for p in model.parameters() if p.ndim > 1],
               "weight_decay": cfg.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)


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


def make_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                   cfg: PretrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` per optimizer step (call `step()` after every batch)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
