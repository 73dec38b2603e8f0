#!/usr/bin/env python
"""GPU benchmark of the fused CUDA kernel: forward+backward vs the eager reference, vs
torch.compile(reference), and vs cuBLAS doing the same matrix work, at the same precision.

    python benchmarks/bench_gpu.py                 # the issue's table (H200: about 2 minutes)
    python benchmarks/bench_gpu.py --quick         # smoke run (small sizes)
    python benchmarks/bench_gpu.py --json out.json --markdown out.md

Problem (paper-like, _common.make_inputs): V = 2 views, B = M / 2 images, D = 128
unit-norm features, L = 12 labels (1 of 3 modalities + 1 of 9 anatomies), threshold 0.3,
T = T_base = 0.07, reduction "mean".

Precisions (one table section each):
  fp32   float32 features, torch.backends.cuda.matmul.allow_tf32 = False: the kernel runs 3xTF32
         (float32-FMA accuracy); cuBLAS runs SGEMM.
  tf32   float32 features, allow_tf32 = True: TF32 tensor cores in both.
  bf16   bfloat16 features: bf16 tensor cores (float32 accumulation) in both.

Methods, each timed as forward + backward (torch.autograd.grad of the loss):
  fused     modan_ext.jaccard_supcon_loss(..., backend="kernel")
  eager     modan_ext.jaccard_supcon_loss(..., backend="reference") (computes in float32 for
            float32 / bfloat16 inputs); fp32 section only, where it fits in memory
  compiled  torch.compile(the same reference call, dynamic=True: one compilation for all sizes;
            compile time reported separately, not timed); fp32 section only
  cuBLAS    two torch.mm of [M, D] x [D, M] (4·M²·D flops, what the fused kernel's forward and
            backward minimally multiply), same precision, into a preallocated output

Timing: CUDA events around each call, after warm-up; the median of --repeats runs.
Memory: torch.cuda.max_memory_allocated() during one forward+backward minus what was allocated
before it (the inputs); it includes the gradient (M x D) and, for cuBLAS, the M x M output.
Also: the fused peak at M = --memory-rows (default 262144; target < 1 GiB over the inputs), a
bit-for-bit determinism check and the error against the float64 reference at M = 4096.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from _common import MIB, make_inputs
PRECISIONS = ("fp32", "tf32", "bf16")


class Precision:
    """Sets torch's TF32 switch for the duration of a section and names the feature dtype."""

    def __init__(self, name: str):
        import torch
        self.name = name
        self.dtype = torch.bfloat16 if name == "bf16" else torch.float32
        self.tf32 = name == "tf32"

    def __enter__(self):
        import torch
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        return self

    def __exit__(self, *exc):
        import torch
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def loss_fn(method: str, compiled_cache: dict):
    import torch
    import modan_ext

    def fused(f, y):
        return modan_ext.jaccard_supcon_loss(f, y, backend="kernel")

    def reference(f, y):
        return modan_ext.jaccard_supcon_loss(f, y, backend="reference")

    if method == "fused":
        return fused
    if method == "eager":
        return reference
    if method == "compiled":
        if "fn" not in compiled_cache:
            compiled_cache["fn"] = torch.compile(reference, dynamic=True)
        return compiled_cache["fn"]
    raise ValueError(method)


def time_calls(fn, warmup: int, repeats: int, device) -> list:
    """Milliseconds per call: CUDA events on a GPU (a CPU clock for --device cpu dry runs)."""
    import torch
    for _ in range(warmup):
        fn()
    times = []
    if device.type != "cuda":
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    torch.cuda.synchronize()
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return times


def peak_over(fn, device) -> float:
    """Peak bytes allocated by one call of fn beyond what was allocated before it (0 off GPU)."""
    import torch
    if device.type != "cuda":
        fn()
        return 0.0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def empty_cache(device):
    import torch
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_of(method, features, labels, cache):
    import torch
    fn = loss_fn(method, cache)
    f = features.detach().requires_grad_(True)

    def step():
        loss = fn(f, labels)
        (grad,) = torch.autograd.grad(loss, f)
        return loss, grad
    return step


def cublas_step(features):
    import torch
    z = features.reshape(-1, features.shape[-1]).detach()
    out = torch.empty(z.shape[0], z.shape[0], dtype=z.dtype, device=z.device)

    def step():
        torch.mm(z, z.t(), out=out)  # 2 M^2 D
        torch.mm(z, z.t(), out=out)  # 2 M^2 D
    return step, out


def is_oom(exc: BaseException) -> bool:
    import torch
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def run(args) -> dict:
    import torch
    import modan_ext

    device = torch.device(args.device)
    results = {"cases": [], "memory": [], "checks": [], "notes": []}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        results["device"] = f"{props.name}, {props.multi_processor_count} SMs, " \
                            f"{props.total_memory / 2**30:.0f} GiB"
    else:
        results["device"] = f"{device} (dry run: CPU clock, no memory figures)"
    results["torch"] = torch.__version__
    results["cuda"] = torch.version.cuda
    if not modan_ext.kernel_available(device):
        from modan_ext import ops
        raise SystemExit(f"no {device.type} kernel: {ops.missing_kernel_reason(device)}")
    deadline = time.monotonic() + args.budget_s
    cache: dict = {}

    for prec_name in args.precisions:
        with Precision(prec_name) as prec:
            # Correctness and determinism at a small size first (cheap, and the table says so).
            f, y = make_inputs(4096, args.dim, 2, 1, device, prec.dtype)
            loss1, grad1 = step_of("fused", f, y, cache)()
            loss2, grad2 = step_of("fused", f, y, cache)()
            deterministic = bool(torch.equal(loss1, loss2) and torch.equal(grad1, grad2))
            f64 = f.double().detach().requires_grad_(True)
            ref = modan_ext.jaccard_supcon_loss(f64, y, backend="reference")
            (rgrad,) = torch.autograd.grad(ref, f64)
            loss_err = float((loss1.double() - ref).abs() / ref.abs().clamp_min(1e-30))
            grad_err = float((grad1.double() - rgrad).abs().max() / rgrad.abs().max())
            results["checks"].append(dict(precision=prec_name, rows=4096,
                                          deterministic=deterministic,
                                          loss_rel_err=loss_err, grad_rel_err=grad_err))
            del f, y, loss1, loss2, grad1, grad2, f64, ref, rgrad

            for rows in args.sizes:
                features, labels = make_inputs(rows, args.dim, 2, 0, device, prec.dtype)
                case = dict(precision=prec_name, rows=rows)
                methods = ["fused", "cublas"]
                if prec_name == "fp32" and not args.no_reference:
                    methods += ["eager", "compiled"]
                for method in methods:
                    if time.monotonic() > deadline and method != "fused":
                        case[method] = "skipped (time budget)"
                        continue
                    try:
                        if method == "cublas":
                            step, out = cublas_step(features)
                        else:
                            if method == "compiled" and "compile_s" not in results:
                                t0 = time.monotonic()
                                step_of(method, features, labels, cache)()
                                if device.type == "cuda":
                                    torch.cuda.synchronize()
                                results["compile_s"] = time.monotonic() - t0
                            step = step_of(method, features, labels, cache)
                        mem = peak_over(step, device)
                        times = time_calls(step, args.warmup, args.repeats, device)
                        case[method] = dict(ms=statistics.median(times), min_ms=min(times),
                                            peak_mib=mem / MIB)
                        if method == "cublas":
                            del out
                    except Exception as exc:  # noqa: BLE001 - report and carry on
                        if not is_oom(exc):
                            raise
                        case[method] = "OOM"
                    finally:
                        step = None
                        empty_cache(device)
                results["cases"].append(case)
                print(json.dumps(case), flush=True)
                del features, labels
                empty_cache(device)

            if args.memory_rows and prec_name in ("fp32", "bf16"):
                features, labels = make_inputs(args.memory_rows, args.dim, 2, 0, device,
                                               prec.dtype)
                inputs = features.numel() * features.element_size() + labels.numel()
                step = step_of("fused", features, labels, cache)
                t0 = time.monotonic()
                mem = peak_over(step, device)
                results["memory"].append(dict(precision=prec_name, rows=args.memory_rows,
                                              peak_over_inputs_mib=mem / MIB,
                                              inputs_mib=inputs / MIB,
                                              seconds=time.monotonic() - t0))
                print(json.dumps(results["memory"][-1]), flush=True)
                del features, labels, step
                empty_cache(device)
    return results


def fmt_ms(entry) -> str:
    return f"{entry['ms']:.2f}" if isinstance(entry, dict) else str(entry)


def ratio(a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict) and b["ms"] > 0:
        return f"{a['ms'] / b['ms']:.2f}x"
    return "-"


def markdown(results: dict, args) -> str:
    lines = [f"GPU benchmark: {results['device']}; torch {results['torch']}, CUDA "
             f"{results['cuda']}. Forward+backward, D = {args.dim}, V = 2, L = 12 paper-like "
             f"labels, median of {args.repeats} runs after {args.warmup} warm-ups (ms).", ""]
    lines.append("| precision | M | fused ms | cuBLAS 4·M²·D ms | fused / cuBLAS | eager ms | "
                 "eager / fused | compiled ms | compiled / fused | fused MiB over inputs | "
                 "eager MiB |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in results["cases"]:
        fused, cublas = c.get("fused"), c.get("cublas")
        eager, comp = c.get("eager", "-"), c.get("compiled", "-")
        fused_mib = f"{fused['peak_mib']:.0f}" if isinstance(fused, dict) else "-"
        eager_mib = f"{eager['peak_mib']:.0f}" if isinstance(eager, dict) else "-"
        lines.append(
            f"| {c['precision']} | {c['rows']} | {fmt_ms(fused)} | {fmt_ms(cublas)} | "
            f"{ratio(fused, cublas)} | {fmt_ms(eager)} | {ratio(eager, fused)} | "
            f"{fmt_ms(comp)} | {ratio(comp, fused)} | {fused_mib} | {eager_mib} |")
    if "compile_s" in results:
        lines += ["", f"torch.compile time (first call, not timed above): "
                      f"{results['compile_s']:.1f} s"]
    if results["memory"]:
        lines += ["", "| precision | M | fused peak over inputs (MiB) | inputs (MiB) | target |",
                  "|---|---|---|---|---|"]
        for m in results["memory"]:
            ok = "< 1 GiB: yes" if m["peak_over_inputs_mib"] < 1024 else "< 1 GiB: NO"
            lines.append(f"| {m['precision']} | {m['rows']} | {m['peak_over_inputs_mib']:.0f} | "
                         f"{m['inputs_mib']:.0f} | {ok} |")
    if results["checks"]:
        lines += ["", "| precision | M | bit-identical rerun | loss rel. err vs float64 | "
                      "grad max err / max abs grad |", "|---|---|---|---|---|"]
        for k in results["checks"]:
            lines.append(f"| {k['precision']} | {k['rows']} | {k['deterministic']} | "
                         f"{k['loss_rel_err']:.1e} | {k['grad_rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[4096, 16384, 32768])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--precisions", type=lambda s: s.split(","), default=list(PRECISIONS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-rows", type=int, default=262144)
    parser.add_argument("--no-reference", action="store_true", help="skip eager / compiled")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="after this many seconds only the fused kernel is timed")
    parser.add_argument("--quick", action="store_true", help="M in {1024, 4096}, no M=262144")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default); cpu only to dry-run this script's logic")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--markdown", help="write the table here too")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.memory_rows, args.repeats = [1024, 4096], 0, 3
    for p in args.precisions:
        if p not in PRECISIONS:
            parser.error(f"unknown precision {p!r}; choose from {PRECISIONS}")

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing to do")
        return 0
    results = run(args)
    table = markdown(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
