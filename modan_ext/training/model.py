"""The networks: torchvision's ResNet-18 for one-channel images (the encoder), SupContrast's
projection head for pretraining, the 2-way head of the downstream protocol; the pixel scaling
every network input goes through, and the encoder's features of a set of images."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_DIM = 512  # ResNet-18's feature width
STEMS = ("7x7", "3x3")


def build_encoder(stem: str = "7x7") -> nn.Module:
    """torchvision ResNet-18 for one-channel images, from scratch, returning 512-d features."""
    from torchvision.models import resnet18  # optional extra 'examples'
    net = resnet18(weights=None)
    if stem == "7x7":
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        net.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return net


def encoder_with_weights(stem: str, state: dict | None) -> nn.Module:
    """An encoder with pretrained weights `state`; None: a random init (from the global RNG)."""
    encoder = build_encoder(stem)
    if state is not None:
        encoder.load_state_dict(state)
    return encoder


class ContrastiveModel(nn.Module):
    """Encoder + SupContrast's projection head (512 -> 512 -> dim); `forward` returns
    L2-normalised projections in float32."""

    def __init__(self, stem: str = "7x7", projection_dim: int = 128):
        super().__init__()
        self.encoder = build_encoder(stem)
        self.head = nn.Sequential(nn.Linear(ENCODER_DIM, ENCODER_DIM), nn.ReLU(inplace=True),
                                  nn.Linear(ENCODER_DIM, projection_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.encoder(images)).float(), dim=-1)


class Classifier(nn.Module):
    """Encoder + 2-way linear head (the paper's code fed 512-d features to cross-entropy)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(ENCODER_DIM, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


def normalise_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float in [-1, 1] (mean 0.5 / std 0.5, as the authors)."""
    return images_uint8.float().div(127.5).sub(1.0)


@torch.no_grad()
def encode_images(encoder: nn.Module, images_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """512-d encoder features (eval mode: BatchNorm uses its running statistics), float32 CPU."""
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = [encoder(normalise_pixels(images_uint8[i:i + batch_size].to(device))).float().cpu()
           for i in range(0, len(images_uint8), batch_size)]
    encoder.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, ENCODER_DIM)
