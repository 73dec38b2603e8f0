"""The Triton backend (`backend="triton"`): fused forward and backward kernels of the loss, written
in Triton, for CUDA tensors; under Triton's interpreter (TRITON_INTERPRET=1) also for CPU tensors,
which is how the tests run every line of them without a GPU.

Layout (one job each): `labels.py` (popcounts, pair weights), `thresholds.py` (the exact
threshold table), `similarity.py` (S tiles, logits), `forward.py`, `backward.py` (kernels),
`config.py` (variants and tile sizes), `runtime.py` (compiled vs interpreted, launching),
`op.py` (the two ops, their checks, autograd), `codegen.py` (the sm_90 code-generation check).

Importing this package is cheap: Triton is imported (and interpretation fixed on or off) when a
function below first needs it.
"""
from __future__ import annotations

import importlib.util

import torch


def _constant_for_compile(fn):
    """torch.compiler.assume_constant_result(fn), without importing torch._dynamo (and with it
    triton) whenever modan_ext is imported: it only sets this marker, which
    tests/test_triton_backend.py checks against torch's own decorator."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_for_compile
def unavailable_reason(device: str) -> str | None:
    """Why backend='triton' cannot serve `device` (a device string such as "cuda:0"); None when it
    can. Constant for torch.compile (looked up when tracing, not traced)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        from . import runtime
    except ImportError as exc:
        return f"triton failed to import ({exc})"
    return runtime.unavailable_reason(device)


def available(device) -> bool:
    return unavailable_reason(str(torch.device(device))) is None


def forward_op():
    """torch.ops.modan_ext.triton_supcon_fwd (registered on first use)."""
    from . import op  # noqa: F401  (importing registers the two ops)
    return torch.ops.modan_ext.triton_supcon_fwd


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    from . import runtime
    return runtime.INTERPRETED
