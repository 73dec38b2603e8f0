"""Random views of uint8 images, drawn from explicit generators so that every view is
reproducible: SimCLR-style views for pretraining, flip-and-shift for fine-tuning."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The source of an epoch's augmentations: a function of (seed, epoch, rank) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + rank * 104_729 + 17)


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


def two_views(images_uint8: torch.Tensor, generator: torch.Generator, crop_scale=(0.35, 1.0),
              jitter: float = 0.4) -> torch.Tensor:
    """[B, 1, H, W] uint8 -> [2B, 1, H, W] float: view 0 of every image, then view 1."""
    return torch.cat([augment(images_uint8, generator, crop_scale, jitter) for _ in range(2)])


def flip_and_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fine-tuning augmentation: horizontal flip and a shift of up to 1/16 of the side."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)
    pad = max(1, h // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]
