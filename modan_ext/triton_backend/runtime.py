"""Where the kernels run: compiled for CUDA tensors, or by Triton's interpreter on CPU tensors.

Triton decides when a kernel module is imported: with TRITON_INTERPRET=1 in the environment,
`@triton.jit` gives interpreted functions (every device; CPU tensors included), otherwise
compiled ones (CUDA tensors only). `INTERPRETED` records which, from the kernels themselves.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
from torch._subclasses.fake_tensor import is_fake

from .forward import supcon_forward_kernel

INTERPRETED = not isinstance(supcon_forward_kernel, triton.runtime.jit.JITFunction)
MIN_CAPABILITY = (8, 0)  # tf32 / bf16 tensor cores (tl.dot lowers to mma.sync / wgmma)


def unavailable_reason(device) -> str | None:
    """Why the Triton kernels cannot serve `device`, or None."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (f"the GPU has compute capability {capability[0]}.{capability[1]}; the Triton "
                    f"kernels need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or later")
        return None
    if device.type == "cpu":
        if INTERPRETED:
            return None
        return ("the Triton kernels run on CUDA tensors; CPU tensors only under Triton's "
                "interpreter (set TRITON_INTERPRET=1 before modan_ext.triton_backend is imported; "
                "slow, for testing)")
    return f"the Triton kernels do not run on {device.type} tensors"


def check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type == "meta" or is_fake(tensor):
        return  # tracing (torch.compile, the codegen trace check): nothing runs here
    reason = unavailable_reason(tensor.device)
    if reason is not None:
        raise RuntimeError(f"modan_ext: backend='triton' cannot run on {tensor.device}: {reason}. "
                           "Use backend='auto' or 'kernel' instead.")


@contextlib.contextmanager
def _interpreter_bf16_dot():
    """Triton's interpreter runs tl.dot on bfloat16 blocks as their raw uint16 bit patterns
    (triton-lang/triton#11584): convert them exactly to float32 first, for the duration of one
    launch. (float16 is right there: numpy widens it.)"""
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    import triton.language as tl

    original = InterpreterBuilder.create_dot

    def widened(handle):
        if handle.dtype.scalar == tl.bfloat16:
            bits = handle.data.astype(np.uint32) << 16
            return TensorHandle(bits.view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        InterpreterBuilder.create_dot = original


def launch(kernel, grid, *args, **meta) -> None:
    """kernel[grid](*args, **meta): through `wrap_triton` when compiled (torch.compile traces it);
    in the interpreter directly, and not at all on fake tensors (the interpreted ops are opaque to
    torch.compile, and their fake kernel is the same Python with the launches skipped)."""
    if INTERPRETED:
        if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
            return
        # numpy warns where a GPU silently makes inf / nan (non-finite features do that: the op
        # then returns NaN everywhere by design).
        with _interpreter_bf16_dot(), np.errstate(invalid="ignore", over="ignore",
                                                  divide="ignore"):
            kernel[grid](*args, **meta)
    else:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
