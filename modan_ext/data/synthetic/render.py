"""Modality renderers: a tissue map becomes a CT, MR or ultrasound image (tissue values, blur,
bias field, speckle, attenuation shadows, the ultrasound fan)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .canvas import AIR, BONE, CALCIFICATION, N_TISSUES, OVERSAMPLE


@lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """Row-normalised Gaussian smoothing matrix: blur(img) = G @ img @ G.T (edges renormalised)."""
    if sigma <= 0:
        return np.eye(n, dtype=np.float32)
    idx = np.arange(n)
    g = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    return (g / g.sum(1, keepdims=True)).astype(np.float32)


def blur(image: np.ndarray, sigma_y: float, sigma_x: float | None = None) -> np.ndarray:
    sigma_x = sigma_y if sigma_x is None else sigma_x
    n_y, n_x = image.shape
    return _blur_matrix(n_y, round(float(sigma_y), 2)) @ image @ _blur_matrix(n_x, round(float(sigma_x), 2)).T


def downsample(image: np.ndarray) -> np.ndarray:
    n = image.shape[0] // OVERSAMPLE
    return image.reshape(n, OVERSAMPLE, n, OVERSAMPLE).mean(axis=(1, 3))


#                      AIR   SOFT  FAT   ORGAN FLUID BONE  LESION LIG  CALC  DENSE
# (a mass enhances on CT and is bright on MR, so that the pathology leaves are visible at all)
CT_VALUES = np.array([0.00, 0.45, 0.28, 0.52, 0.38, 0.95, 0.72, 0.50, 1.00, 0.72], dtype=np.float32)
MR_T1 = np.array([0.03, 0.40, 0.85, 0.50, 0.15, 0.08, 0.68, 0.06, 0.05, 0.68], dtype=np.float32)
MR_T2 = np.array([0.03, 0.35, 0.60, 0.45, 0.92, 0.08, 0.80, 0.06, 0.05, 0.80], dtype=np.float32)
US_ECHO = np.array([0.90, 0.55, 0.35, 0.65, 0.03, 1.00, 0.22, 0.85, 1.00, 0.22], dtype=np.float32)
# how much each tissue attenuates the beam per unit depth (bone and air: a shadow behind them)
US_ATTENUATION = np.array([6.0, 0.25, 0.3, 0.25, 0.02, 6.0, 0.5, 0.3, 4.0, 2.5], dtype=np.float32)


def render_ct(labels: np.ndarray, rng) -> np.ndarray:
    values = CT_VALUES + rng.normal(0, 0.015, size=N_TISSUES).astype(np.float32)
    image = values[labels]
    image = image + rng.normal(0, rng.uniform(0.01, 0.03), size=image.shape)
    return downsample(image)


def render_mr(labels: np.ndarray, rng, weighting: str | None = None) -> np.ndarray:
    weighting = weighting or ("T1" if rng.random() < 0.5 else "T2")
    table = MR_T1 if weighting == "T1" else MR_T2
    image = (table + rng.normal(0, 0.03, size=N_TISSUES).astype(np.float32))[labels]
    image = blur(image, rng.uniform(1.0, 2.0))  # smooth tissue boundaries
    n = image.shape[0]
    coords = np.linspace(-1, 1, n, dtype=np.float32)
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    b = rng.normal(0, 0.25, size=4)
    image = image * np.exp(b[0] * gx + b[1] * gy + b[2] * gx * gy - abs(b[3]) * (gx ** 2 + gy ** 2))
    sigma = rng.uniform(0.015, 0.04)  # Rician noise: magnitude of a complex signal
    image = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    return downsample(image)


def render_us(labels: np.ndarray, rng) -> np.ndarray:
    n = labels.shape[0]
    echo = (US_ECHO + rng.normal(0, 0.04, size=N_TISSUES).astype(np.float32))[labels]
    # attenuation accumulates with depth (down the image): shadows behind bone, air, calcium
    loss = np.cumsum(US_ATTENUATION[labels], axis=0) / n
    shadow = np.exp(-loss * rng.uniform(1.5, 2.5))
    # bright interface where the beam first meets bone or air
    strong = np.isin(labels, (BONE, AIR, CALCIFICATION)).astype(np.float32)
    first = np.clip(strong - np.vstack([np.zeros((1, n), np.float32), strong[:-1]]), 0, 1)
    echo = echo * (1 - 0.6 * strong) + 0.9 * first
    # speckle: magnitude of smoothed complex noise, stretched sideways (lateral resolution)
    noise = rng.normal(size=(2, n, n)).astype(np.float32)
    sx, sy = rng.uniform(1.6, 2.6), rng.uniform(0.7, 1.1)
    speckle = np.hypot(blur(noise[0], sy, sx), blur(noise[1], sy, sx))
    speckle /= speckle.mean() + 1e-6
    # partly averaged speckle (compounding): organ boundaries stay visible at small sizes
    image = blur(echo * shadow, 0.8) * (0.45 + 0.55 * speckle)
    # fan-shaped sector with its apex above the image; depth-dependent gain
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    apex_y, half_angle = -0.18 * n, np.deg2rad(rng.uniform(30, 38))
    dx, dy = cols - n / 2, rows - apex_y
    radius, angle = np.hypot(dx, dy), np.arctan2(dx, dy)
    fan = (np.abs(angle) <= half_angle) & (radius >= 0.25 * n) & (radius <= 1.12 * n)
    gain = np.exp(-rng.uniform(0.2, 0.6) * rows / n)
    image = np.where(fan, np.log1p(3 * image * gain) / np.log1p(3 * 1.5), 0.0)
    return downsample(image.astype(np.float32))


def render(modality: str, labels: np.ndarray, rng) -> np.ndarray:
    image = {"CT": render_ct, "MR": render_mr, "US": render_us}[modality](labels, rng)
    return np.clip(image, 0.0, 1.0)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
