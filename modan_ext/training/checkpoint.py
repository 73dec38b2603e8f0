"""Checkpoints of a pretraining run: written atomically at the end of every epoch, read with
``torch.load(weights_only=True)`` (tensors and plain Python values only: loading runs no code),
holding everything an exact resume needs (model, optimizer, scheduler, AMP scaler, epoch, RNG
states, config, history)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint_last.pt"
# settings that may change between a run and its resumption: they do not alter past epochs
RESUMABLE_CHANGES = ("epochs", "embedding_points")


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


def check_resumable(saved: dict, config: dict, path: str | os.PathLike) -> None:
    """Refuse to continue a run under another config (apart from `RESUMABLE_CHANGES`)."""
    differs = {k: (saved.get(k), v) for k, v in config.items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v and
               not (isinstance(v, tuple) and tuple(saved.get(k) or ()) == v)}
    if differs:
        raise ValueError(f"cannot resume {path}: config differs {differs} (saved, now); "
                         "use another output folder or delete this one")


def restore_training_state(ckpt: dict, model, optimizer, scheduler, scaler) -> tuple[int, list]:
    """Load a checkpoint's states into the training objects and the global RNGs; returns
    (epochs done, history)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]), list(ckpt["history"])
