"""Checkpoints of a pretraining run: written atomically at the end of every epoch, read with
``torch.load(weights_only=True)`` (tensors and plain Python values only: loading runs no code),
holding everything an exact resume needs (model, optimizer, scheduler, AMP scaler, epoch, RNG
states, config, history) and what the run was trained on (vocabulary, a digest of the data), so
that a resume under anything else is refused rather than silently mixed."""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..data.metadata import LabelVocabulary

CHECKPOINT_NAME = "checkpoint_last.pt"
# settings that may change between a run and its resumption: they do not alter past epochs
RESUMABLE_CHANGES = ("epochs", "embedding_points")
# what every checkpoint of `pretrain` holds; an encoder needs only the first two
ENCODER_KEYS = ("model", "config")
RESUME_KEYS = (*ENCODER_KEYS, "optimizer", "scheduler", "scaler", "epoch", "rng", "history",
               "vocabulary", "data")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or used, or a run folder that does not fit the run asked
    for; the message names the file."""


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


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether `run_dir` holds a pretraining checkpoint (a run to resume)."""
    return (Path(run_dir) / CHECKPOINT_NAME).is_file()


def load_checkpoint(path: str | os.PathLike, map_location="cpu",
                    required: tuple = ENCODER_KEYS) -> dict:
    """A checkpoint of this module: tensors and plain values only (``weights_only=True``), with
    the entries `required`. Anything else (a missing, truncated or corrupt file, a file that
    holds Python objects, another program's checkpoint) raises `CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises EOFError, OSError, RuntimeError, KeyError, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt, or "
                              f"holding objects that weights_only loading refuses "
                              f"({type(exc).__name__}: {reason})") from exc
    missing = [key for key in required if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a modan_ext pretraining checkpoint of this version "
                              f"(it lacks {missing})")
    return ckpt


def encoder_from_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(encoder state dict, run config dict) of a pretraining checkpoint."""
    ckpt = load_checkpoint(path)
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path}: its model holds no 'encoder.*' weights")
    return state, ckpt["config"]


def data_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes: identifies the data a run trains on."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_run_folder(path: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Before a run writes its checkpoint `path`: resuming needs one, and a fresh run must not
    replace one unless told to (`overwrite`)."""
    path = Path(path)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run in the "
                         "folder, or start again over it")
    if resume and not path.is_file():
        raise CheckpointError(f"nothing to resume: {str(path)!r} does not exist; start the run "
                              "without resume (--resume)")
    if not resume and not overwrite and path.exists():
        raise CheckpointError(f"{path} holds a run already: continue it with resume=True "
                              "(--resume), start again over it with overwrite=True "
                              "(--overwrite), or choose another folder")


def _config_differences(saved: dict, config: dict) -> dict:
    keys = [k for k in dict.fromkeys([*saved, *config]) if k not in RESUMABLE_CHANGES]
    return {k: (saved.get(k), config.get(k)) for k in keys
            if not _same_value(saved.get(k), config.get(k))}


def _same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # JSON/pickle round trips
        return list(a) == list(b)
    return a == b


def check_resumable(ckpt: dict, config: dict, vocabulary_json: str, data: dict,
                    path: str | os.PathLike) -> None:
    """Refuse to continue a run under another config (the whole config must agree, apart from
    `RESUMABLE_CHANGES`), another label vocabulary, or other data (`data`: image count, digest,
    world size, as `pretrain` records them)."""
    problems = []
    differs = _config_differences(dict(ckpt["config"]), config)
    if differs:
        problems.append(f"the config differs {differs} (saved, now)")
    if ckpt["vocabulary"] != vocabulary_json:
        saved, now = (LabelVocabulary.from_json(v) for v in (ckpt["vocabulary"], vocabulary_json))
        what = (f"columns {saved.columns} then, {now.columns} now" if saved.columns != now.columns
                else "same columns, other synonyms or unknown-value policy")
        problems.append(f"the label vocabulary differs ({what})")
    saved_data = dict(ckpt["data"])
    for key, meaning in (("images", "number of images"), ("world_size", "number of processes"),
                         ("sha256", "images or labels (data digest)")):
        if saved_data.get(key) != data.get(key):
            problems.append(f"the {meaning} differs ({saved_data.get(key)} then, "
                            f"{data.get(key)} now)")
    if problems:
        raise CheckpointError(f"cannot resume {path}: " + "; ".join(problems) +
                              ". Resume with what the run was started with, or start a new run "
                              "in another folder")


def restore_training_state(ckpt: dict, model, optimizer, scheduler, scaler) -> tuple[int, list]:
    """Load a checkpoint's states into the training objects and the global RNGs; returns
    (epochs done, history)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]), list(ckpt["history"])
