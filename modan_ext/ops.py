"""The custom ops `modan_ext::supcon_fwd` / `supcon_bwd`: Python side of the registration.

The schemas and kernels are C++ (csrc/); here live the fake (meta) kernels that let
`torch.compile` trace the ops, the autograd formula, and `supcon_rows`, which turns a validated
user input into the canonical op arguments (ARCHITECTURE.md, "The op contract").
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

from . import triton_backend
from ._cuda_arch import unserved_reason
from ._validation import label_kind
from .options import LABEL_KIND_CODES, NORMALIZATION_CODES, WEIGHTING_CODES, LossOptions


def _load(module: str, missing: str) -> str | None:
    """Import a compiled library of this package (its import runs the C++ registrations);
    the reason it is unusable, or None."""
    if importlib.util.find_spec(f"{__package__}.{module}") is None:
        return missing
    try:
        importlib.import_module(f"{__package__}.{module}")
    except ImportError as exc:
        return f"{module} failed to load: {exc}"
    return None


LOAD_ERROR = _load("_C", "the compiled library modan_ext._C is not built "
                         "(pip install --no-build-isolation .)")
CUDA_LOAD_ERROR = LOAD_ERROR or _load(
    "_cuda", "modan_ext was built without its CUDA kernel (no CUDA toolkit at build time, "
             "or MODAN_EXT_CUDA=0)")


# Device types with a compiled kernel, looked up once: torch.compile cannot trace the lookup.
KERNEL_DEVICE_TYPES = frozenset() if LOAD_ERROR is not None else frozenset(
    device_type for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if torch._C._dispatch_has_kernel_for_dispatch_key("modan_ext::supcon_fwd", key))


def kernel_available(device) -> bool:
    """Whether a compiled kernel serves `device` ("cpu", "cuda", torch.device, ...): for a GPU,
    whether the CUDA library holds machine code or PTX that runs on its architecture."""
    device = torch.device(device)
    if device.type not in KERNEL_DEVICE_TYPES:
        return False
    return device.type != "cuda" or unserved_reason(device) is None


def missing_kernel_reason(device) -> str:
    device = torch.device(device)
    if LOAD_ERROR is not None:
        return LOAD_ERROR
    if device.type == "cuda" and CUDA_LOAD_ERROR is not None:
        return CUDA_LOAD_ERROR
    if device.type == "cuda" and device.type in KERNEL_DEVICE_TYPES:
        return unserved_reason(device) or "the CUDA kernel serves this GPU"
    return f"the extension has no {device.type} kernel"


def pack_labels(multi_hot: torch.Tensor) -> torch.Tensor:
    """Bit-pack a [B, L] multi-hot matrix into int64 words [B, ceil(L/64)]: label k is bit k % 64
    of word k // 64. Summing distinct powers of two cannot overflow (bit 63 is -2**63 in int64).
    One word at a time, so the int64 temporary is at most [B, 64]."""
    images, labels = multi_hot.shape
    words = []
    for start in range(0, labels, 64):
        bits = (multi_hot[:, start:start + 64] != 0).to(torch.int64)
        shifts = torch.arange(bits.shape[1], dtype=torch.int64, device=multi_hot.device)
        words.append((bits << shifts).sum(-1))
    return torch.stack(words, dim=1)


# ---- fake kernels: shapes and dtypes only -------------------------------------------------------

# The columns of the op's per-row statistics, float64 whatever the features' dtype (ARCHITECTURE.md,
# "The op contract"; csrc/supcon_problem.h, StatsColumn).
STATS_COLUMNS = ("lse", "count", "omega", "norm", "entropy")
STATS = {name: k for k, name in enumerate(STATS_COLUMNS)}
STATS_DTYPE = torch.float64


def loss_dtype(features: torch.Tensor) -> torch.dtype:
    """dtype of the op's per-row loss (and of its upstream gradient)."""
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _supcon_fwd_fake(features, labels, label_kind, views, anchor_begin, anchor_end,
                     first_view_only, temperature, base_temperature, threshold, weighting,
                     normalization, allow_tf32):
    anchors = anchor_end - anchor_begin
    return (features.new_empty(anchors, dtype=loss_dtype(features)),
            features.new_empty(anchors, len(STATS_COLUMNS), dtype=STATS_DTYPE))


def _supcon_bwd_fake(grad_loss, features, labels, stats, *args):
    return torch.empty_like(features)


# ---- autograd ------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    features, labels, *scalars = inputs
    _, stats = output
    ctx.save_for_backward(features, labels, stats)
    ctx.scalars = scalars
    ctx.mark_non_differentiable(stats)


def backward_formula(backward_op_name: str):
    """The autograd formula of a forward op whose features' gradient the op
    `torch.ops.modan_ext.<backward_op_name>` computes (same arguments for every backend)."""
    def backward(ctx, grad_loss, _grad_stats):
        features, labels, stats = ctx.saved_tensors
        grad_features = None
        if ctx.needs_input_grad[0]:
            backward_op = getattr(torch.ops.modan_ext, backward_op_name)
            grad_features = backward_op(grad_loss.contiguous(), features, labels, stats,
                                        *ctx.scalars)
        return (grad_features, None) + (None,) * len(ctx.scalars)
    return backward


_backward = backward_formula("supcon_bwd")


def _no_double_backward(ctx, grad):
    raise NotImplementedError("modan_ext: double backward (a gradient of the loss's gradient) is "
                              "not supported by the fused kernels; use backend='reference'")


def _remember_nothing(ctx, inputs, output):
    pass


if LOAD_ERROR is None:
    torch.library.register_fake("modan_ext::supcon_fwd", _supcon_fwd_fake)
    torch.library.register_fake("modan_ext::supcon_bwd", _supcon_bwd_fake)
    torch.library.register_autograd("modan_ext::supcon_fwd", _backward,
                                    setup_context=_setup_context)
    torch.library.register_autograd("modan_ext::supcon_bwd", _no_double_backward,
                                    setup_context=_remember_nothing)


# ---- canonical arguments -------------------------------------------------------------------------

def canonical_labels(labels: torch.Tensor | None, images: int, device) -> tuple[torch.Tensor, int]:
    """(int64 labels for the op, its label_kind code) from validated labels of `images` images."""
    kind = label_kind(labels)
    if kind == "none":  # SimCLR: every image its own class
        ids = torch.arange(images, dtype=torch.int64, device=device)
        return ids[:, None], LABEL_KIND_CODES["class_ids"]
    if kind == "class_ids":
        return labels.to(torch.int64).contiguous()[:, None], LABEL_KIND_CODES["class_ids"]
    return pack_labels(labels), LABEL_KIND_CODES["multi_hot"]


def supcon_rows(features: torch.Tensor, labels: torch.Tensor | None, opts: LossOptions,
                anchor_begin: int = 0, anchor_end: int | None = None, backend: str = "kernel"):
    """Per-row loss and statistics from the fused op of `backend` ("kernel": supcon_fwd,
    "triton": triton_supcon_fwd), for validated `features` [B, V, D] or [M, D] (rows image-major)
    and labels of the B images. Returns (loss [Ma], stats [Ma, 5]), stats' columns named by
    `STATS_COLUMNS` (op contract v2, both backends)."""
    views = features.shape[1] if features.dim() == 3 else 1
    z = features.reshape(-1, features.shape[-1])
    if backend == "kernel" and z.device.type == "cpu" and z.dtype in (torch.float16,
                                                                       torch.bfloat16):
        z = z.float()  # the CPU kernel accumulates in float32 from float32 inputs
    z = z.contiguous()
    packed, kind = canonical_labels(labels, features.shape[0], z.device)
    rows = z.shape[0]
    anchor_end = rows if anchor_end is None else anchor_end
    allow_tf32 = bool(z.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    if not torch.compiler.is_compiling():
        from .selftest import first_use_check  # a GPU kernel's first use: compare with reference
        first_use_check(backend, z)
    op = triton_backend.forward_op() if backend == "triton" else torch.ops.modan_ext.supcon_fwd
    return op(
        z, packed, kind, views, anchor_begin, anchor_end, opts.contrast_mode == "one",
        opts.temperature, opts.base_temperature, opts.threshold,
        WEIGHTING_CODES[opts.weighting], NORMALIZATION_CODES[opts.normalization], allow_tf32)
