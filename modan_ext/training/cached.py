"""Gradient caching for contrastive training: batches whose encoder activations do not fit.

A plain contrastive step keeps every image's activations until backward, so the encoder, not the
O(M) loss, limits the batch. Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup") splits the step in three:

1. first pass: embed the batch chunk by chunk without a graph (only the [M, D] embeddings stay);
2. loss step: the loss on all embeddings at once and its gradient with respect to them (the loss
   sees every negative of the batch, across ranks with ``gather_distributed=True``);
3. second pass: embed each chunk again, now with a graph, and backpropagate its rows of that
   cached gradient.

Peak memory is one chunk's activations plus O(M·D); the price is one extra forward pass.
Exactness rests on the second pass reproducing the first, which is why random layers replay their
random numbers and BatchNorm updates its running statistics in the second pass only (see
`cached_contrastive_backward`).
"""
from __future__ import annotations

import contextlib
import operator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["cached_contrastive_backward"]


def cached_contrastive_backward(model: nn.Module, views: torch.Tensor, labels, loss_fn,
                                chunk_size: int = 256, *, scaler=None,
                                preserve_rng_state: bool = True) -> torch.Tensor:
    """Backpropagate a contrastive loss over a batch larger than the encoder can hold at once.

    The parameters' ``.grad`` accumulate what the plain step would give::

        B, V = views.shape[:2]
        z = model(views.flatten(0, 1)).view(B, V, -1)      # rows image-major
        loss = loss_fn(z, labels)
        (scaler.scale(loss) if scaler else loss).backward()

    but only `chunk_size` rows of activations exist at a time. Zero the gradients before the call
    and step the optimizer (``scaler.step(opt); scaler.update()`` with AMP) after it.

    Args:
        model: maps images ``[n, ...]`` to embeddings ``[n, D]`` (e.g. L2-normalised
            projections). May be wrapped in ``DistributedDataParallel`` and/or ``torch.compile``.
        views: ``[B, V, ...]``: B images, V augmented views each.
        labels: whatever `loss_fn` takes for the B images (multi-hot ``[B, L]``, class ids
            ``[B]``, or None); a tensor's first dimension must be B.
        loss_fn: ``loss_fn(features [B, V, D], labels) -> scalar``, e.g. a `JaccardSupConLoss`
            (with ``gather_distributed=True`` under DDP, for negatives from every rank).
        chunk_size: rows (images x views) embedded at once; it bounds the activation memory.
        scaler: an optional ``torch.amp.GradScaler``: the loss is scaled before its backward, so
            the cached gradient and the parameters' gradients carry the scale, and an overflow
            (inf/NaN in the embeddings' gradient) reaches the parameters' gradients, where
            ``scaler.step`` finds it and skips the step, exactly as in the plain step.
        preserve_rng_state: replay the CPU and CUDA random number generators per chunk, so that
            dropout and other random layers draw the same numbers in both passes (on by default;
            turn off only for a model without random layers, to save the state copies).

    Returns:
        the loss, detached.

    Semantics:
        * Chunks are consecutive rows of ``views.flatten(0, 1)``; the last may be shorter.
        * Random layers: each chunk draws its own numbers (as if the chunks were separate
          batches), the same in both passes; afterwards the generators are where one forward
          pass over the chunks and the loss would leave them.
        * BatchNorm in training mode normalises each chunk with the chunk's own statistics (as
          DDP without SyncBatchNorm normalises each rank's batch) and updates its running
          statistics once per chunk (in the second pass; the first runs with
          ``track_running_stats`` switched off). With ``chunk_size >= B*V`` the step is the
          plain step, running statistics included. As for any batch, BatchNorm1d rejects a
          chunk of one row: mind the last chunk (B*V % chunk_size == 1). Other layers that change their own state in forward (InstanceNorm
          with ``track_running_stats=True``, ``spectral_norm``'s power iteration) do so in both
          passes: not supported.
        * Autocast: the forwards and the loss run under the caller's autocast (call this inside
          ``torch.autocast``); the backwards run with autocast off, as recommended.
        * DDP: the first pass runs through the DDP wrapper without a graph, so DDP broadcasts
          the buffers once, at the step's first forward, as in the plain step, and nothing else
          is communicated; the second pass runs every chunk but the last under ``no_sync()``, so
          the gradients are all-reduced once per step and ranks may have different numbers of
          chunks. The loss's own exchange (``gather_distributed``) happens once, in the loss
          step. DDP(model) and torch.compile(DDP(model)) are recognised (the latter untested).
          SyncBatchNorm communicates in every forward: then every rank needs the same number of
          chunks.
        * A model without parameters that require grad (and views that do not) needs no second
          pass: one pass, with running statistics updated as in the plain step, then the loss's
          backward (for parameters of `loss_fn`, e.g. a learnable temperature).
        * A loss that is not a scalar, or that does not depend on the features, raises a
          ValueError (the plain ``loss.backward()`` would raise too); an empty batch (B or V = 0)
          raises a ValueError before anything runs.
    """
    chunk_size = _check_chunk_size(chunk_size)
    images, per_image = _check_views(views)
    _check_labels(labels, images)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (features, labels) -> loss; got "
                        f"{type(loss_fn).__name__}")
    flat = _Rows(views)
    bounds = [(s, min(s + chunk_size, flat.count)) for s in range(0, flat.count, chunk_size)]
    trainable = views.requires_grad or any(p.requires_grad for p in model.parameters())

    rng_before = [] if trainable and preserve_rng_state else None
    freeze = _running_stats_frozen(model) if trainable else contextlib.nullcontext()
    with freeze:
        features = _embed_without_graph(model, flat, bounds, rng_before)
    features.requires_grad_(True)
    loss = loss_fn(features.view(images, per_image, -1), labels)
    _check_loss(loss)
    with _autocast_off():
        (loss if scaler is None else scaler.scale(loss)).backward()
    if features.grad is None:
        raise ValueError("loss_fn's result does not depend on the features it was given")
    if trainable:
        rng_after = _RngState() if preserve_rng_state else None
        _backward_chunks(model, flat, bounds, features.grad, rng_before)
        if rng_after is not None:
            rng_after.restore()
    return loss.detach()


# ---- the two passes ------------------------------------------------------------------------------

def _embed_without_graph(model, flat: "_Rows", bounds, rng_before: list | None) -> torch.Tensor:
    """First pass: the [M, D] embeddings, chunk by chunk, no graph; records each chunk's RNG
    state."""
    features = None
    with torch.no_grad():
        for begin, end in bounds:
            if rng_before is not None:
                rng_before.append(_RngState())
            z = _check_embeddings(model(flat[begin:end]), end - begin, features)
            if features is None:
                features = z.new_empty((flat.count, z.shape[1]))
            features[begin:end] = z
    return features


def _backward_chunks(model, flat: "_Rows", bounds, grad: torch.Tensor,
                     rng_before: list | None) -> None:
    """Second pass: re-embed each chunk with a graph and backpropagate its rows of `grad`; under
    DDP only the last chunk's backward all-reduces (every gradient is accumulated by then)."""
    ddp = _ddp_of(model)
    for k, (begin, end) in enumerate(bounds):
        last = k == len(bounds) - 1
        with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
            if rng_before is not None:
                rng_before[k].restore()
            z = model(flat[begin:end])
            with _autocast_off():
                z.backward(grad[begin:end])


class _Rows:
    """Rows of ``views.flatten(0, 1)`` (image-major) without copying the whole batch."""

    def __init__(self, views: torch.Tensor):
        self.views = views
        self.per_image = views.shape[1]
        self.count = views.shape[0] * views.shape[1]
        try:
            self.flat = views.view(self.count, *views.shape[2:])
        except RuntimeError:  # dims 0 and 1 cannot merge (e.g. a transposed [V, B] batch)
            self.flat = None

    def __getitem__(self, span: slice) -> torch.Tensor:
        if self.flat is not None:
            return self.flat[span]
        rows = torch.arange(span.start, span.stop, device=self.views.device)
        return self.views[rows // self.per_image, rows % self.per_image]


# ---- state that must be the same in both passes --------------------------------------------------

class _RngState:
    """The CPU generator's state and, once CUDA is in use, every CUDA device's."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@contextlib.contextmanager
def _running_stats_frozen(model: nn.Module):
    """BatchNorm layers in training mode normalise with the batch's statistics whether or not they
    track running ones; switching tracking off keeps the first pass from updating running_mean,
    running_var and num_batches_tracked, which the second pass then updates once per chunk.
    (A snapshot and restore of the buffers would also undo DDP's buffer broadcast, which the
    first pass's first forward performs.)"""
    switched = [m for m in model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                and m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


def _autocast_off():
    """Backward passes run outside autocast (PyTorch's advice), whatever the caller's context."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _ddp_of(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper of `model`, also under torch.compile (OptimizedModule._orig_mod)."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, DistributedDataParallel) else None


# ---- argument checks -----------------------------------------------------------------------------

def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be a positive int; got {chunk_size!r}")
    try:
        value = operator.index(chunk_size)
    except TypeError:
        raise TypeError(f"chunk_size must be a positive int; got {chunk_size!r} "
                        f"({type(chunk_size).__name__})") from None
    if value <= 0:
        raise ValueError(f"chunk_size must be a positive int; got {value}")
    return value


def _check_views(views) -> tuple[int, int]:
    if not isinstance(views, torch.Tensor):
        raise TypeError(f"views must be a tensor [B, V, ...]; got {type(views).__name__}")
    if views.dim() < 3:
        raise ValueError(f"views must be [B, V, ...] (B images x V views, then the model's input "
                         f"dims); got shape {tuple(views.shape)}")
    images, per_image = views.shape[:2]
    if images == 0 or per_image == 0:
        raise ValueError(f"views is an empty batch (B = {images} images, V = {per_image} views)")
    return images, per_image


def _check_labels(labels, images: int) -> None:
    if isinstance(labels, torch.Tensor) and (labels.dim() == 0 or labels.shape[0] != images):
        raise ValueError(f"labels must have one entry per image along dim 0 (B = {images}); got "
                         f"shape {tuple(labels.shape)}")


def _check_embeddings(z, rows: int, features: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"model must return a tensor [n, D]; got {type(z).__name__}")
    if z.dim() != 2 or z.shape[0] != rows:
        raise ValueError(f"model must map [n, ...] to embeddings [n, D]; for a chunk of {rows} "
                         f"rows it returned shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"model must return floating-point embeddings; got {z.dtype}")
    if features is not None and (z.shape[1] != features.shape[1] or z.dtype != features.dtype):
        raise ValueError(f"model returned [n, {z.shape[1]}] {z.dtype} for one chunk and "
                         f"[n, {features.shape[1]}] {features.dtype} for another")
    return z


def _check_loss(loss) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor; got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar; got shape {tuple(loss.shape)} (with "
                         "reduction='none', reduce it first, e.g. lambda f, y: loss(f, y).mean())")
    if loss.grad_fn is None:
        raise ValueError("loss_fn's result does not depend on the features it was given "
                         "(it has no grad_fn)")
