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

Every rank validates its own options and inputs, then the ranks exchange a small header (sizes,
shapes, options, nan_policy included, "my input or option is bad"), so a bad input or option on
one rank raises on every rank instead of leaving the others blocked in a collective, and ranks
that were given different options all raise rather than compute a loss no one asked for.
"""
from __future__ import annotations

import struct
from typing import Callable

import torch
import torch.distributed as dist

from ._anchors import anchor_losses, reduce
from ._validation import LearnableTemperatures, check_inputs, label_kind
from .options import (CONTRAST_MODES, FEATURE_DTYPES, LABEL_KINDS, NAN_POLICIES, NORMALIZATIONS,
                      REDUCTIONS, WEIGHTINGS, LossOptions)

__all__ = ["is_active", "gathered_loss", "all_gather_rows"]

# What a rank tells the others before the gather: its batch size, its feature shape, kind of labels
# and options (names as their index in the tuples of `options`), and whether its input or options
# were bad.
_HEADER = ("images", "views", "dim", "label kind", "label columns", "dtype", "contrast_mode",
           "reduction", "weighting", "normalization", "nan_policy", "temperature",
           "base_temperature", "threshold", "error")
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
    kind = label_kind(labels)
    return [features.shape[0], features.shape[1] if features.dim() == 3 else 0,
            features.shape[-1], LABEL_KINDS.index(kind),
            labels.shape[1] if kind == "multi_hot" else 0,
            FEATURE_DTYPES.index(features.dtype), CONTRAST_MODES.index(opts.contrast_mode),
            REDUCTIONS.index(opts.reduction), WEIGHTINGS.index(opts.weighting),
            NORMALIZATIONS.index(opts.normalization), NAN_POLICIES.index(opts.nan_policy),
            _float_bits(opts.temperature),
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
        raise RuntimeError(f"modan_ext (gather_distributed): the inputs or options of rank(s) "
                           f"{bad} were rejected (see the error raised there); every rank stops "
                           "so that no rank waits in a collective")
    for k, name in enumerate(_HEADER[1:_ERROR], start=1):
        values = [h[k] for h in headers]
        if len(set(values)) > 1:
            if name == "dtype":
                values = [FEATURE_DTYPES[v] for v in values]
            elif name.endswith("temperature") or name == "threshold":
                values = [_bits_float(v) for v in values]
            elif name == "nan_policy":
                values = [NAN_POLICIES[v] for v in values]
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


def _sum_over_ranks(count: torch.Tensor, device, group) -> torch.Tensor:
    total = count.to(device=device, dtype=torch.int64).reshape(1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.squeeze(0)


def gathered_loss(features, labels,
                  options: Callable[[], tuple[LossOptions, LearnableTemperatures | None]],
                  resolve_backend: Callable[[torch.device], str], group=None) -> torch.Tensor:
    """The loss of this rank's anchors against the batch of all ranks (module docstring).
    `options()` checks the loss options (raising on a bad one) and says which temperatures get a
    gradient; it runs here, so that its error reaches every rank."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    error, backend, opts, learnable = None, "reference", None, None
    try:
        opts, learnable = options()
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
    losses, counted = anchor_losses(everyone, everyone_labels, opts, backend, begin,
                                    sizes[rank], learnable)
    counted_total = None
    if opts.reduction == "mean":  # the same on every rank: all or none of them all-reduce
        counted_total = _sum_over_ranks(counted.sum(), device, group)
    return reduce(losses, counted_total, opts.reduction, scale=world)
