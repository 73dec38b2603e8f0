"""The first-use check of the GPU kernels, and `python -m modan_ext.selftest`.

The first time a GPU kernel (the Triton kernels, or the compiled CUDA kernel) serves a device and
dtype in a process, the loss and gradient of one small fixed problem are compared with the float64
reference on that device (milliseconds; under Triton's interpreter a second or so). A mismatch
raises a RuntimeError that names the backend and how to switch; MODAN_EXT_FIRST_USE_CHECK=0 turns
the check off. Inside torch.compile the check cannot run (it would be traced): there it runs at
the first eager call, or run `python -m modan_ext.selftest` once on the machine.

    python -m modan_ext.selftest          # every device and backend here; a table; exit 1 on a
                                          # mismatch
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

ENV = "MODAN_EXT_FIRST_USE_CHECK"
OPTIONS = dict(temperature=0.1, base_temperature=0.07, threshold=0.3, weighting="jaccard",
               normalization="count", contrast_mode="all")
IMAGES, VIEWS, DIM, LABELS = 40, 2, 72, 70  # 80 rows: several 32- and 64-row tiles; 2 label words
# Relative errors a correct kernel stays below; a wrong one is off by O(1). The gradient comes back
# in the features' dtype: float16 rounds it to 11 bits, bfloat16 to 8 (Triton's interpreter
# truncates: up to 2^-7); TF32 rounds the products to 11 bits.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-3,
             torch.bfloat16: 1e-2}
TF32_TOLERANCE = 2e-2

_checked: set = set()
_running: set = set()


def _is_gpu_kernel(backend: str, device: torch.device) -> bool:
    return backend == "triton" or (backend == "kernel" and device.type == "cuda")


def _tf32(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype == torch.float32 and \
        torch.backends.cuda.matmul.allow_tf32


@dataclass
class Result:
    backend: str
    device: str
    dtype: torch.dtype
    tf32: bool
    loss_error: float = float("nan")
    grad_error: float = float("nan")
    tolerance: float = float("nan")
    milliseconds: float = float("nan")
    deterministic: bool | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.loss_error <= self.tolerance
                and self.grad_error <= self.tolerance)

    def message(self) -> str:
        what = (f"raised {self.error}" if self.error else
                f"its loss differs from the float64 reference by {self.loss_error:.1e} and its "
                f"gradient by {self.grad_error:.1e} (relative; tolerance {self.tolerance:.0e})")
        others = [b for b in ("triton", "kernel") if b != self.backend]
        return (f"modan_ext: the first-use check of backend={self.backend!r} on {self.device} "
                f"failed: on a small fixed problem ({self.dtype}"
                f"{', TF32' if self.tf32 else ''}) {what}. Do not trust this kernel on this "
                f"device: pass backend='reference' (exact; O(M^2) memory) or "
                f"backend={others[0]!r} if it passes `python -m modan_ext.selftest`, and please "
                f"report this with that command's output. {ENV}=0 skips the check.")


def problem(device, dtype):
    """The fixed problem: features [B, V, D] (unit rows, in `dtype`), multi-hot labels [B, L],
    and the upstream gradient of the per-anchor losses [B, V]."""
    gen = torch.Generator().manual_seed(20251129)
    z = torch.randn(IMAGES, VIEWS, DIM, generator=gen, dtype=torch.float64)
    z = torch.nn.functional.normalize(z, dim=-1)
    labels = torch.rand(IMAGES, LABELS, generator=gen) < 0.06
    labels[torch.arange(IMAGES), torch.randint(0, 3, (IMAGES,), generator=gen)] = True
    upstream = torch.rand(IMAGES, VIEWS, generator=gen, dtype=torch.float64)
    return z.to(device=device, dtype=dtype), labels.to(device), upstream.to(device)


def _loss_and_grad(features, labels, upstream, backend: str):
    from .loss import jaccard_supcon_loss
    from .reference import jaccard_supcon_loss_reference
    f = features.detach().clone().requires_grad_(True)
    if backend == "reference":
        loss = jaccard_supcon_loss_reference(f, labels, reduction="none", **OPTIONS)
    else:
        loss = jaccard_supcon_loss(f, labels, reduction="none", backend=backend, **OPTIONS)
    (grad,) = torch.autograd.grad((loss.double() * upstream).sum(), f)
    return loss.detach(), grad


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.abs().max().clamp_min(1e-30))
    return float((actual.double() - expected).abs().max()) / scale


def check(backend: str, device, dtype: torch.dtype, repeat: bool = False) -> Result:
    """Run `backend` on the fixed problem and compare with the float64 reference."""
    device = torch.device(device)
    result = Result(backend, str(device), dtype, _tf32(device, dtype))
    result.tolerance = TF32_TOLERANCE if result.tf32 else TOLERANCE[dtype]
    key = (backend, str(device), dtype, result.tf32)
    _running.add(key)  # the loss called below must not check itself again
    try:
        with torch.inference_mode(False), torch.enable_grad():
            features, labels, upstream = problem(device, dtype)
            start = time.perf_counter()
            loss, grad = _loss_and_grad(features, labels, upstream, backend)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.milliseconds = 1e3 * (time.perf_counter() - start)
            ref_loss, ref_grad = _loss_and_grad(features.double(), labels, upstream,
                                                "reference")
            result.loss_error = _relative(loss, ref_loss)
            result.grad_error = _relative(grad, ref_grad)
            if repeat:
                again = _loss_and_grad(features, labels, upstream, backend)
                result.deterministic = bool(torch.equal(loss, again[0]) and
                                            torch.equal(grad, again[1]))
    except Exception as exc:  # noqa: BLE001 - a kernel that fails is reported, not hidden
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        _running.discard(key)
    return result


def first_use_check(backend: str, features: torch.Tensor) -> None:
    """Before a GPU kernel first serves (device, dtype) in this process: `check`, and raise a
    RuntimeError naming the backend if it disagrees with the reference."""
    device = features.device
    if device.type == "meta" or not _is_gpu_kernel(backend, device):
        return
    if os.environ.get(ENV, "1").strip() == "0":
        return
    key = (backend, str(device), features.dtype, _tf32(device, features.dtype))
    if key in _checked or key in _running:
        return
    result = check(backend, device, features.dtype)
    if not result.ok:
        raise RuntimeError(result.message())
    _checked.add(key)


# ---- python -m modan_ext.selftest --------------------------------------------------------------

def _cases(quick: bool = False):
    """(backend, device, dtype, tf32) for every kernel this installation has, on every device
    (quick: float32 only)."""
    from . import ops, triton_backend
    cases = []
    if ops.kernel_available("cpu"):
        cases += [("kernel", "cpu", dt, False) for dt in (torch.float32, torch.float64)]
    if triton_backend.available("cpu"):
        cases += [("triton", "cpu", dt, False) for dt in (torch.float32, torch.float64,
                                                         torch.float16, torch.bfloat16)]
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        device = f"cuda:{index}"
        for backend in ("triton", "kernel"):
            if backend == "triton" and not triton_backend.available(device):
                continue
            if backend == "kernel" and not ops.kernel_available(device):
                continue
            cases += [(backend, device, torch.float32, False), (backend, device, torch.float32, True),
                      (backend, device, torch.float64, False),
                      (backend, device, torch.float16, False),
                      (backend, device, torch.bfloat16, False)]
    return [c for c in cases if c[2] == torch.float32] if quick else cases


def _unavailable():
    from . import ops, triton_backend
    lines = []
    for device in ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]:
        if not ops.kernel_available(device):
            lines.append(f"kernel on {device}: {ops.missing_kernel_reason(device)}")
        reason = triton_backend.unavailable_reason(device)
        if reason is not None:
            lines.append(f"triton on {device}: {reason}")
    return lines


def run_all(quick: bool = False) -> list[Result]:
    results = []
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for backend, device, dtype, tf32 in _cases(quick):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            results.append(check(backend, device, dtype, repeat=True))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return results


def table(results: list[Result]) -> str:
    from . import resolve_backend
    lines = ["| device | backend | dtype | loss rel. error | grad rel. error | tolerance | "
             "first call ms | bit-identical rerun | result |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        dtype = str(r.dtype).replace("torch.", "") + (" (TF32)" if r.tf32 else "")
        status = "ok" if r.ok else ("ERROR " + r.error if r.error else "MISMATCH")
        lines.append(f"| {r.device} | {r.backend} | {dtype} | {r.loss_error:.1e} | "
                     f"{r.grad_error:.1e} | {r.tolerance:.0e} | {r.milliseconds:.0f} | "
                     f"{'-' if r.deterministic is None else r.deterministic} | {status} |")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    lines.append("")
    lines.append("backend='auto' runs: " + ", ".join(
        f"{d}: {resolve_backend('auto', d)}" for d in devices))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="float32 only")
    args = parser.parse_args(argv)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)  # Triton's interpreter: numpy's threaded BLAS on tiny blocks crawls
    except ImportError:
        pass
    import warnings
    warnings.filterwarnings("ignore", message="modan_ext: no compiled kernel")
    results = run_all(args.quick)
    print(f"modan_ext self-test: torch {torch.__version__}; each kernel against the float64 "
          f"reference on one fixed problem ({IMAGES} images x {VIEWS} views, D = {DIM}, "
          f"{LABELS} labels)")
    print(table(results))
    for line in _unavailable():
        print("not available:", line)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(r.message())
    return 1 if failed else 0


if __name__ == "__main__":
    # `python -m` runs this file as __main__, a second copy of the module: use the one that the
    # loss imports, so that the check's bookkeeping is shared.
    from modan_ext import selftest
    sys.exit(selftest.main())
