"""Shared setup of the Triton tests (tests/test_triton_*.py): where the kernels run, and helpers.

Without CUDA the Triton kernels run in Triton's interpreter, on CPU tensors. Triton decides
interpretation when a jit function is defined, its own library (tl.zeros, tl.sum, ...) included,
that is when triton is first imported: this module sets TRITON_INTERPRET=1 for the session before
that (test modules import it first; pytest imports every test module before running any test). If
something imported triton earlier, compiled, it says so at collection. With CUDA the compiled
kernels run on CUDA tensors (the GPU check), unless MODAN_EXT_TEST_INTERPRET=1 asks for the
interpreter there too.

The interpreter runs numpy underneath: BLAS threads are pinned to one (threaded BLAS on tiny
blocks is orders of magnitude slower).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

WANT_INTERPRETER = (not torch.cuda.is_available()
                    or os.environ.get("MODAN_EXT_TEST_INTERPRET") == "1")
if WANT_INTERPRETER:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton was imported (compiled mode) before tests/triton_setup.py could enable its "
            "interpreter; the Triton tests need TRITON_INTERPRET=1 before the first import of "
            "triton (set it in the environment, or import triton_setup earlier)")
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401
except ImportError:
    INTERPRETED, HAVE_TRITON = False, False
else:
    HAVE_TRITON = True
    from modan_ext.triton_backend import op, runtime  # noqa: F401  (registers the ops)
    INTERPRETED = runtime.INTERPRETED
    if INTERPRETED:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)

requires_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

# The device the Triton kernels are tested on in this session.
DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)
requires_device = pytest.mark.skipif(
    DEVICE is None, reason="no device for the Triton kernels: no CUDA, and the kernels were "
                           "imported compiled (set MODAN_EXT_TEST_INTERPRET=1 or import "
                           "tests/triton_setup.py first)")


def triton_fn(features, labels=None, **options):
    import modan_ext
    return modan_ext.jaccard_supcon_loss(features, labels, backend="triton", **options)


# Relative tolerances of the Triton kernels against the float64 reference on the same input
# values (loss_cases.tolerance gives float64 and float32). The gradient of 16-bit features is
# returned in their dtype: float16 keeps 11 bits; bfloat16 8, and Triton's interpreter truncates
# instead of rounding (GPU: round to nearest).
HALF_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
