"""`gather_distributed=True`: each rank's anchors against the batch gathered from every rank.

Under torch.distributed (DDP, torchrun) rank r holds b_r images. Features and labels are
all-gathered (uneven b_r allowed) and concatenated in rank order, which is the batch one process
would see. Rows are image-major, so rank r's own rows are the contiguous range
[offset_r * V, (offset_r + b_r) * V) of the global rows: the op's anchor range, with every global
row as a contrast. A rank's cost is (local M) x (global M); nothing global-M x global-M exists on
the kernel path.

Scaling (so that DDP's gradient average yields the single-process gradient):
  * "mean": loss_r = world_size * sum of rank r's anchor losses / n, where n is the number of
    anchors with a positive, summed over all ranks. The mean of the ranks' losses is the
    single-process loss.
  * "sum":  loss_r = world_size * sum of rank r's anchor losses.
  * "none": rank r's own per-anchor losses, unscaled; their concatenation in rank order is the
    single-process output. Reduce them yourself and multiply by world_size, as "sum" does, if
    DDP averages the gradients.
The gather's backward all-reduces (SUM) the gradient of the gathered features and keeps the
rank's own rows: every rank's loss reaches every rank's features, and with the world_size factor
the DDP average over ranks is exactly the gradient of the single-process loss.

Every rank validates its own inputs, then the ranks exchange a small header (sizes, shapes,
options, "my input is bad"), so a bad input on one rank raises on every rank instead of leaving
the others blocked in a collective.
"""
from __future__ import annotations

import struct
from typing import Callable

import torch
import torch.distributed as dist

from . import ops
from ._validation import (CONTRAST_MODES, NORMALIZATIONS, REDUCTIONS, WEIGHTINGS, LossOptions,
                          check_inputs)
from .reference import jaccard_supcon_loss_reference, label_similarity, positive_weights

__all__ = ["is_active", "gathered_loss", "all_gather_rows"]

_NO_LABELS, _CLASS_IDS, _MULTI_HOT = 0, 1, 2
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HEADER = ("images", "views", "dim", "label kind", "label columns", "dtype", "contrast_mode",
           "reduction", "weighting", "normalization", "temperature", "base_temperature",
           "threshold", "error")
_ERROR = len(_HEADER) - 1


def is_active(group=None) -> bool:
    """Whether a process group with more than one rank is initialised."""
    return (dist.is_available() and dist.is_initialized()
            and dist.get_world_size(group) > 1)


# ---- collectives ---------------------------------------------------------------------------------

def _gather_padded(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's `x` ([sizes[r], ...]) along dim 0, in rank order."""
    longest = max(sizes)
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _AllGatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient over ranks and keeps own rows."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd owns `grad`
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        begin = sum(ctx.sizes[: ctx.rank])
        return grad[begin: begin + ctx.sizes[ctx.rank]], None, None, None


def all_gather_rows(x: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Autograd-aware all_gather of `x` [sizes[rank], ...] along dim 0 (uneven sizes allowed).
    The gradient of rank r's input is the sum over ranks of the gradient of its rows."""
    return _AllGatherRows.apply(x, list(sizes), dist.get_rank(group), group)


# ---- header exchange -----------------------------------------------------------------------------

def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _header(features, labels, opts: LossOptions, error) -> list[int]:
    if error is not None:
        return [0] * _ERROR + [1]
    kind = _NO_LABELS if labels is None else _CLASS_IDS if labels.dim() == 1 else _MULTI_HOT
    return [features.shape[0], features.shape[1] if features.dim() == 3 else 0,
            features.shape[-1], kind, labels.shape[1] if kind == _MULTI_HOT else 0,
            _DTYPES.index(features.dtype), CONTRAST_MODES.index(opts.contrast_mode),
            REDUCTIONS.index(opts.reduction), WEIGHTINGS.index(opts.weighting),
            NORMALIZATIONS.index(opts.normalization), _float_bits(opts.temperature),
            _float_bits(opts.base_temperature), _float_bits(opts.threshold), 0]


def _comm_device(features, group) -> torch.device:
    device = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _exchange_headers(local: list[int], device, group) -> list[list[int]]:
    mine = torch.tensor(local, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).cpu().tolist()


def _check_agreement(headers: list[list[int]], rank: int, error) -> None:
    bad = [r for r, h in enumerate(headers) if h[_ERROR]]
    if error is not None:
        raise error
    if bad:
        raise RuntimeError(f"modan_ext (gather_distributed): the inputs of rank(s) {bad} were "
                           "rejected (see the error raised there); every rank stops so that no "
                           "rank waits in a collective")
    for k, name in enumerate(_HEADER[1:_ERROR], start=1):
        values = [h[k] for h in headers]
        if len(set(values)) > 1:
            if name == "dtype":
                values = [_DTYPES[v] for v in values]
            elif name.endswith("temperature") or name == "threshold":
                values = [_bits_float(v) for v in values]
            raise ValueError(f"modan_ext (gather_distributed): the ranks disagree on {name} "
                             f"(by rank: {values}; this is rank {rank}); every rank must pass the "
                             "same feature shape except the batch size, the same kind of labels "
                             "and the same loss options")


# ---- the loss ------------------------------------------------------------------------------------

def _gather_labels(labels, sizes, group):
    if labels is None:
        return None  # the op / reference number the global images 0..B-1: global image ids
    if labels.dim() == 1:
        return _gather_padded(labels.to(torch.int64), sizes, group)
    return _gather_padded((labels != 0).to(torch.uint8), sizes, group)


def _local_kernel_losses(features, labels, opts, begin, images, backend="kernel"):
    """Own anchors' losses and 'has a positive' flags from the fused op of `backend` ("kernel" or
    "triton"; anchors: own rows)."""
    views = features.shape[1] if features.dim() == 3 else 1
    which = {} if backend == "kernel" else {"backend": backend}  # (supcon_rows' default)
    row_loss, stats = ops.supcon_rows(features, labels, opts, begin * views,
                                      (begin + images) * views, **which)
    return ops.per_anchor(row_loss, stats, features[begin: begin + images], opts)


def _local_reference_losses(features, labels, opts, begin, images):
    """Same as `_local_kernel_losses` from the reference on the whole gathered batch (O(M^2))."""
    compute_dtype = torch.promote_types(features.dtype, torch.float32)
    options = dict(opts.__dict__, reduction="none")
    per_anchor = jaccard_supcon_loss_reference(features, labels, **options,
                                               compute_dtype=compute_dtype)
    own = per_anchor[begin: begin + images]
    # An image's anchors have a positive iff it has another view or a positive other image.
    weight = positive_weights(label_similarity(labels, features.shape[0], opts.weighting,
                                               torch.float64, features.device),
                              opts.threshold, opts.weighting)
    others = (weight > 0).sum(1) > 1  # the diagonal (own image) is always 1
    views = features.shape[1] if features.dim() == 3 else 1
    counted = (others | (views > 1))[begin: begin + images]
    if own.dim() == 2:
        counted = counted[:, None].expand_as(own)
    return own, counted


def gathered_loss(features, labels, opts: LossOptions,
                  resolve_backend: Callable[[torch.device], str], group=None) -> torch.Tensor:
    """The loss of this rank's anchors against the batch of all ranks (module docstring)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    error, backend = None, "reference"
    try:
        features, labels = check_inputs(features, labels, opts)
        if dist.get_backend(group) == "nccl" and features.device.type != "cuda":
            raise ValueError("gather_distributed with the NCCL backend needs CUDA features; got "
                             f"features on {features.device}")
        backend = resolve_backend(features.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    device = _comm_device(features, group)
    headers = _exchange_headers(_header(features, labels, opts, error), device, group)
    _check_agreement(headers, rank, error)

    sizes = [h[0] for h in headers]
    begin = sum(sizes[:rank])
    everyone = all_gather_rows(features, sizes, group)
    everyone_labels = _gather_labels(labels, sizes, group)
    if backend == "reference":
        losses, counted = _local_reference_losses(everyone, everyone_labels, opts, begin,
                                                  sizes[rank])
    else:
        losses, counted = _local_kernel_losses(everyone, everyone_labels, opts, begin,
                                               sizes[rank], backend)
    if opts.reduction == "none":
        return losses
    total = losses.sum()  # NaN propagates under nan_policy="propagate"
    if opts.reduction == "sum":
        return total * world
    n = counted.sum().to(device=device, dtype=torch.int64).reshape(1)
    dist.all_reduce(n, op=dist.ReduceOp.SUM, group=group)
    return total * world / n.to(total.device).clamp_min(1).to(total.dtype).squeeze(0)
