#!/usr/bin/env python
"""GPU benchmark of both GPU backends, the Triton kernels and the CUDA C++ kernel: their agreement
with each other and the float64 reference on the same inputs, then forward+backward time against
cuBLAS doing the same matrix work and against torch's fused attention.

    python benchmarks/bench_gpu.py                 # the issue's tables (H200: about 2-3 minutes)
    python benchmarks/bench_gpu.py --quick         # smoke run (small sizes)
    python benchmarks/bench_gpu.py --json out.json --markdown out.md
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --device cpu --quick   # dry run, no GPU

Problem (paper-like, _common.make_inputs): V = 2 views, B = M / 2 images, D = 128
unit-norm features, L = 12 labels (1 of 3 modalities + 1 of 9 anatomies), threshold 0.3,
T = T_base = 0.07, reduction "mean".

1. Agreement, M = 4096 (--agree-rows), every precision: loss and gradient of each backend against
   the float64 reference on the same (rounded) inputs, the two backends against each other, and a
   bit-for-bit rerun of each. A second problem covers other options (class ids, contrast mode
   "one", normalization "weight", cosine weighting).
2. Time, per precision:
     fp32  float32 features, torch.backends.cuda.matmul.allow_tf32 = False: Triton and the CUDA
           kernel run 3xTF32 (float32-FMA accuracy); cuBLAS SGEMM.
     tf32  float32 features, allow_tf32 = True: TF32 tensor cores everywhere.
     bf16  bfloat16 features: bf16 tensor cores, float32 accumulation.
   Methods, each timed as forward + backward (torch.autograd.grad of the loss):
     triton    jaccard_supcon_loss(..., backend="triton")
     cuda      jaccard_supcon_loss(..., backend="kernel") (the CUDA C++ kernel)
     cuBLAS    two torch.mm of [M, D] x [D, M] into a preallocated output: 4·M²·D flops, S = Z Zᵀ
               once and H Z once, the least a forward+backward multiplies (the fused kernels
               recompute S in the backward: 6·M²·D)
     SDPA      F.scaled_dot_product_attention(q, k, v) forward + backward with q = k = v = Z as
               one head (scale 1/T): the nearest fused kernel of the same arithmetic (softmax of
               Z Zᵀ), which the loss should beat (it skips the P·V product)
     eager, compiled   the reference (fp32 section only, where it fits)
   Timing: CUDA events after warm-up; median of --repeats runs.
3. Memory: peak allocation of one forward+backward at M = --memory-rows (default 262144) beyond
   the inputs, for both backends (target < 1 GiB).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from _common import MIB, make_inputs
PRECISIONS = ("fp32", "tf32", "bf16")
AGREE_PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "fp64")
BACKENDS = ("triton", "cuda")
BACKEND_ARG = {"triton": "triton", "cuda": "kernel"}


class Precision:
    """Sets torch's TF32 switch for the duration of a section and names the feature dtype."""

    def __init__(self, name: str):
        import torch
        self.name = name
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16,
                      "fp64": torch.float64}.get(name, torch.float32)
        self.tf32 = name == "tf32"

    def __enter__(self):
        import torch
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        return self

    def __exit__(self, *exc):
        import torch
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def is_oom(exc: BaseException) -> bool:
    import torch
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


# ---- the methods ---------------------------------------------------------------------------------

def loss_step(method, features, labels, cache, **options):
    """A forward+backward closure returning (loss, grad of the features)."""
    import torch
    import modan_ext
    if method in BACKEND_ARG:
        def fn(f, y):
            return modan_ext.jaccard_supcon_loss(f, y, backend=BACKEND_ARG[method], **options)
    elif method == "eager":
        def fn(f, y):
            return modan_ext.jaccard_supcon_loss(f, y, backend="reference", **options)
    elif method == "compiled":
        if "compiled" not in cache:
            def reference(f, y):
                return modan_ext.jaccard_supcon_loss(f, y, backend="reference")
            cache["compiled"] = torch.compile(reference, dynamic=True)
        fn = cache["compiled"]
    else:
        raise ValueError(method)
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
    return step


def sdpa_step(features, temperature=0.07):
    import torch
    import torch.nn.functional as F
    z = features.reshape(1, 1, -1, features.shape[-1]).detach().requires_grad_(True)

    def step():
        out = F.scaled_dot_product_attention(z, z, z, scale=1.0 / temperature)
        (grad,) = torch.autograd.grad(out, z, grad_outputs=torch.ones_like(out))
        return grad
    return step


def available_backends(device) -> list:
    import modan_ext
    from modan_ext import triton_backend
    out = []
    if triton_backend.available(device):
        out.append("triton")
    if modan_ext.kernel_available(device):
        out.append("cuda")
    return out


# ---- 1. agreement ------------------------------------------------------------------------------

OTHER_OPTIONS = dict(contrast_mode="one", normalization="weight", weighting="cosine",
                     threshold=0.2, temperature=0.1)


def agreement(args, device, backends, results):
    import torch
    import modan_ext
    for prec_name in AGREE_PRECISIONS:
        with Precision(prec_name) as prec:
            for problem in ("paper", "other"):
                f, y = make_inputs(args.agree_rows, args.dim, 2, 1, device, prec.dtype)
                options = {}
                if problem == "other":
                    y = torch.randint(0, 7, (f.shape[0],), device=device)  # class ids
                    options = OTHER_OPTIONS
                f64 = f.double().detach().requires_grad_(True)
                ref = modan_ext.jaccard_supcon_loss(f64, y, backend="reference", **options)
                (ref_grad,) = torch.autograd.grad(ref, f64)
                outputs = {}
                row = dict(precision=prec_name, problem=problem, rows=args.agree_rows)
                for backend in backends:
                    try:
                        step = loss_step(backend, f, y, {}, **options)
                        loss, grad = (t.detach() for t in step())
                        again = step()
                        outputs[backend] = (loss.double(), grad.double())
                        row[backend] = dict(
                            loss_err=float((loss.double() - ref).abs() / ref.abs().clamp_min(1e-30)),
                            grad_err=float((grad.double() - ref_grad).abs().max()
                                           / ref_grad.abs().max().clamp_min(1e-30)),
                            deterministic=bool(torch.equal(loss, again[0])
                                               and torch.equal(grad, again[1])))
                    except Exception as exc:  # noqa: BLE001 - reported in the table
                        row[backend] = f"{type(exc).__name__}: {str(exc)[:200]}"
                if len(outputs) == 2:
                    (la, ga), (lb, gb) = outputs.values()
                    row["between"] = dict(
                        loss_err=float((la - lb).abs() / lb.abs().clamp_min(1e-30)),
                        grad_err=float((ga - gb).abs().max() / gb.abs().max().clamp_min(1e-30)))
                results["agreement"].append(row)
                print(json.dumps(row), flush=True)
                del f, y, f64, ref, ref_grad, outputs
                empty_cache(device)


# ---- 2. time, 3. memory --------------------------------------------------------------------------

def timing(args, device, backends, results, deadline):
    cache: dict = {}
    for prec_name in args.precisions:
        with Precision(prec_name) as prec:
            for rows in args.sizes:
                features, labels = make_inputs(rows, args.dim, 2, 0, device, prec.dtype)
                case = dict(precision=prec_name, rows=rows)
                methods = list(backends) + ["cublas", "sdpa"]
                if prec_name == "fp32" and not args.no_reference:
                    methods += ["eager", "compiled"]
                for method in methods:
                    if time.monotonic() > deadline and method not in backends:
                        case[method] = "skipped (time budget)"
                        continue
                    try:
                        if method == "cublas":
                            step = cublas_step(features)
                        elif method == "sdpa":
                            step = sdpa_step(features)
                        else:
                            if method == "compiled" and "compile_s" not in results:
                                t0 = time.monotonic()
                                loss_step(method, features, labels, cache)()
                                synchronize(device)
                                results["compile_s"] = time.monotonic() - t0
                            step = loss_step(method, features, labels, cache)
                        mem = peak_over(step, device)
                        times = time_calls(step, args.warmup, args.repeats, device)
                        case[method] = dict(ms=statistics.median(times), min_ms=min(times),
                                            peak_mib=mem / MIB)
                    except Exception as exc:  # noqa: BLE001 - report and carry on
                        case[method] = "OOM" if is_oom(exc) else \
                            f"{type(exc).__name__}: {str(exc)[:120]}"
                    finally:
                        step = None
                        empty_cache(device)
                results["cases"].append(case)
                print(json.dumps(case), flush=True)
                del features, labels
                empty_cache(device)


def memory(args, device, backends, results):
    for prec_name in ("fp32", "bf16"):
        with Precision(prec_name) as prec:
            features, labels = make_inputs(args.memory_rows, args.dim, 2, 0, device, prec.dtype)
            inputs = features.numel() * features.element_size() + labels.numel()
            for backend in backends:
                try:
                    step = loss_step(backend, features, labels, {})
                    t0 = time.monotonic()
                    mem = peak_over(step, device)
                    row = dict(precision=prec_name, backend=backend, rows=args.memory_rows,
                               peak_over_inputs_mib=mem / MIB, inputs_mib=inputs / MIB,
                               seconds=time.monotonic() - t0)
                except Exception as exc:  # noqa: BLE001
                    row = dict(precision=prec_name, backend=backend, rows=args.memory_rows,
                               error=f"{type(exc).__name__}: {str(exc)[:120]}")
                results["memory"].append(row)
                print(json.dumps(row), flush=True)
                step = None
                empty_cache(device)
            del features, labels
            empty_cache(device)


def run(args) -> dict:
    import torch
    device = torch.device(args.device)
    results = {"agreement": [], "cases": [], "memory": []}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        results["device"] = f"{props.name}, {props.multi_processor_count} SMs, " \
                            f"{props.total_memory / 2**30:.0f} GiB"
    else:
        results["device"] = f"{device} (dry run: CPU clock, no memory figures)"
    results["torch"] = torch.__version__
    results["cuda"] = torch.version.cuda
    backends = available_backends(device)
    results["backends"] = backends
    if not backends:
        raise SystemExit(f"no GPU backend serves {device}")
    deadline = time.monotonic() + args.budget_s
    agreement(args, device, backends, results)
    timing(args, device, backends, results, deadline)
    if args.memory_rows:
        memory(args, device, backends, results)
    return results


# ---- tables --------------------------------------------------------------------------------------

def fmt_ms(entry) -> str:
    return f"{entry['ms']:.2f}" if isinstance(entry, dict) else str(entry or "-")


def ratio(a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict) and b["ms"] > 0:
        return f"{a['ms'] / b['ms']:.2f}x"
    return "-"


def fmt_err(entry) -> str:
    if not isinstance(entry, dict):
        return str(entry or "-")
    out = f"{entry['loss_err']:.1e} / {entry['grad_err']:.1e}"
    if "deterministic" in entry:
        out += "" if entry["deterministic"] else " (NOT bit-identical on rerun)"
    return out


def markdown(results: dict, args) -> str:
    lines = [f"GPU benchmark: {results['device']}; torch {results['torch']}, CUDA "
             f"{results['cuda']}; backends {', '.join(results['backends'])}.", "",
             "Agreement (relative error of loss / max gradient entry; float64 reference on the "
             "same inputs):", "",
             "| precision | problem | M | triton vs reference | cuda vs reference | "
             "triton vs cuda |", "|---|---|---|---|---|---|"]
    for r in results["agreement"]:
        lines.append(f"| {r['precision']} | {r['problem']} | {r['rows']} | "
                     f"{fmt_err(r.get('triton'))} | {fmt_err(r.get('cuda'))} | "
                     f"{fmt_err(r.get('between'))} |")
    lines += ["", f"Forward+backward, D = {args.dim}, V = 2, L = 12 paper-like labels, median of "
                  f"{args.repeats} runs after {args.warmup} warm-ups (ms). cuBLAS: 4·M²·D flops "
                  "in two GEMMs; SDPA: fused attention forward+backward with q = k = v = Z.", "",
              "| precision | M | triton | cuda | triton / cuda | cuBLAS | triton / cuBLAS | "
              "SDPA | SDPA / triton | eager | compiled | triton MiB | cuda MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def mib(entry):
        return f"{entry['peak_mib']:.0f}" if isinstance(entry, dict) else "-"

    for c in results["cases"]:
        t, k = c.get("triton"), c.get("cuda")
        lines.append(
            f"| {c['precision']} | {c['rows']} | {fmt_ms(t)} | {fmt_ms(k)} | {ratio(t, k)} | "
            f"{fmt_ms(c.get('cublas'))} | {ratio(t, c.get('cublas'))} | "
            f"{fmt_ms(c.get('sdpa'))} | {ratio(c.get('sdpa'), t)} | {fmt_ms(c.get('eager'))} | "
            f"{fmt_ms(c.get('compiled'))} | {mib(t)} | {mib(k)} |")
    if "compile_s" in results:
        lines += ["", f"torch.compile of the reference (first call, not timed above): "
                      f"{results['compile_s']:.1f} s"]
    if results["memory"]:
        lines += ["", "| precision | backend | M | peak over inputs (MiB) | inputs (MiB) | "
                      "< 1 GiB |", "|---|---|---|---|---|---|"]
        for m in results["memory"]:
            if "error" in m:
                lines.append(f"| {m['precision']} | {m['backend']} | {m['rows']} | "
                             f"{m['error']} | - | - |")
                continue
            ok = "yes" if m["peak_over_inputs_mib"] < 1024 else "NO"
            lines.append(f"| {m['precision']} | {m['backend']} | {m['rows']} | "
                         f"{m['peak_over_inputs_mib']:.0f} | {m['inputs_mib']:.0f} | {ok} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        help="rows M to time (default 4096,16384,32768; --quick 1024,4096)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--precisions", type=lambda s: s.split(","), default=list(PRECISIONS))
    parser.add_argument("--agree-rows", type=int, help="default 4096 (--quick 1024)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="default 5 (--quick 3)")
    parser.add_argument("--memory-rows", type=int, help="default 262144 (--quick 0: skipped)")
    parser.add_argument("--no-reference", action="store_true", help="skip eager / compiled")
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="after this many seconds only the two GPU backends are timed")
    parser.add_argument("--quick", action="store_true",
                        help="M in {1024, 4096}, agreement at M = 1024, no M = 262144")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default); cpu only to dry-run this script's logic")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--markdown", help="write the tables here too")
    args = parser.parse_args(argv)
    defaults = dict(sizes=[1024, 4096], memory_rows=0, repeats=3, agree_rows=1024) if args.quick \
        else dict(sizes=[4096, 16384, 32768], memory_rows=262144, repeats=5, agree_rows=4096)
    for name, value in defaults.items():  # what was given explicitly stands
        if getattr(args, name) is None:
            setattr(args, name, value)
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
