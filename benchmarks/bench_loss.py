#!/usr/bin/env python
"""Forward+backward of JaccardSupConLoss: fused kernel vs the eager reference vs
torch.compile(reference), time and peak memory, in one run.

    python benchmarks/bench_loss.py            # the issue's table: M in {1024, 4096, 8192, 16384}
    python benchmarks/bench_loss.py --quick    # a smoke run (small sizes, 2 repeats)

Problem (paper-like): V = 2 views, B = M / 2 images, D = 128 unit-norm float32 features,
L = 12 labels (one of 3 modalities + one of 9 anatomies per image, so w in {0, 1/3, 1}),
threshold 0.3, T = T_base = 0.07, reduction "mean".

Methods:
  fused     modan_ext.jaccard_supcon_loss(backend="kernel")
  eager     modan_ext.reference.jaccard_supcon_loss_reference(compute_dtype=torch.float32):
            the reference computes in float64 by default (it is the test oracle); float32 here so
            that it does the same arithmetic work as the kernel (fair comparison)
  compiled  torch.compile(the same float32 reference), default inductor mode; its compile
            time is reported separately and not counted in the timings

Each (method, M) runs in a fresh subprocess, so peak memory is that case's alone:
  peak growth = VmHWM during the timed forward+backward passes - VmRSS before the inputs were
  made (after importing torch and a tiny warm-up that loads the code paths); the peak is reset
  (/proc/self/clear_refs) after the full-size warm-up, so torch.compile's compiler memory is not
  in it (where the reset is not permitted, the warm-up is included and the table says so).
  over inputs = peak growth - the inputs' own size (features + labels); it includes the
  gradient (M x D, the size of the features).
Cases whose estimated peak exceeds --max-gib (default 16 GiB, and never more than 80% of the
available memory) are skipped and listed; the estimate scales the largest measured smaller case
of the same method by (M / M_measured)^2 (quadratic methods) or uses 64 bytes x M^2 before any.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

from _common import MIB, available_bytes, cpu_name, make_inputs, reset_peak, status_bytes

METHODS = ("fused", "eager", "compiled")


# ---- the worker: one (method, M) in this process ------------------------------------------------

def loss_function(method: str):
    import torch
    import modan_ext
    from modan_ext.reference import jaccard_supcon_loss_reference

    if method == "fused":
        return lambda f, y: modan_ext.jaccard_supcon_loss(f, y, backend="kernel")

    def reference(f, y):
        return jaccard_supcon_loss_reference(f, y, compute_dtype=torch.float32)
    if method == "eager":
        return reference
    if method == "compiled":
        return torch.compile(reference)
    raise ValueError(method)


def worker(cfg: dict) -> dict:
    import torch
    torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    cuda = device.startswith("cuda")
    fn = loss_function(cfg["method"])

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(features, labels):
        features.grad = None
        loss = fn(features, labels)
        loss.backward()
        sync()
        return loss

    # tiny warm-up: libraries, thread pool, kernels loaded before the baseline
    f, y = make_inputs(256, cfg["dim"], cfg["views"], 1, device)
    step(f.requires_grad_(True), y)
    del f, y
    gc.collect()
    rss0 = status_bytes("VmRSS")

    features, labels = make_inputs(cfg["rows"], cfg["dim"], cfg["views"], 0, device)
    features.requires_grad_(True)
    inputs = features.numel() * features.element_size() + labels.numel() * labels.element_size()

    t0 = time.perf_counter()
    for _ in range(cfg["warmup"]):
        step(features, labels)
    warmup_s = time.perf_counter() - t0
    features.grad = None
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    reset = reset_peak()

    times = []
    loss = None
    for _ in range(cfg["repeats"]):
        t = time.perf_counter()
        loss = step(features, labels)
        times.append(time.perf_counter() - t)
    peak = status_bytes("VmHWM")
    out = dict(cfg, times=times, warmup_s=warmup_s, rss0=rss0, peak=peak,
               peak_growth=peak - rss0, inputs=inputs, peak_reset=reset,
               loss=float(loss.detach()))
    if cuda:
        out["cuda_peak_extra"] = torch.cuda.max_memory_allocated() - base_cuda
    return out


# ---- the driver --------------------------------------------------------------------------------

def run_case(cfg: dict, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]),
               MKL_NUM_THREADS=str(cfg["threads"]))
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                               json.dumps(cfg)], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(cfg, error=f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"rc {proc.returncode}"
    return dict(cfg, error=f"{why}: {' | '.join(tail)}")


def estimate_peak(method: str, rows: int, measured: dict) -> float:
    """Bytes a quadratic (reference) method will need at `rows`, from its largest measured M."""
    done = [(m, r["peak_growth"]) for (meth, m), r in measured.items()
            if meth == method and "error" not in r]
    if done:
        m, peak = max(done)
        return peak * (rows / m) ** 2 * 1.1
    return 64.0 * rows * rows  # ~16 float32 M x M buffers: what the eager reference showed


def fmt_mib(x: float) -> str:
    return f"{x / MIB:,.1f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 16384],
                   help="rows M = B * V (default: 1024 4096 8192 16384)")
    p.add_argument("--big", type=int, default=65536,
                   help="one extra fused-only size to show it completes (0: none)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed forward+backward passes")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first (compiles)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-gib", type=float, default=16.0,
                   help="skip cases whose estimated peak exceeds this (default 16)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: M in {512, 1024}, 2 repeats, big M = 4096")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.sizes, args.repeats, args.big = [512, 1024], 2, 4096

    import torch
    import modan_ext
    if "fused" in args.methods and not modan_ext.kernel_available(args.device):
        sys.exit(f"no compiled modan_ext kernel for {args.device}: build it first "
                 "(pip install --no-build-isolation -e .)")

    limit = min(args.max_gib * 2 ** 30, 0.8 * available_bytes())
    cases = [(m, rows) for rows in args.sizes for m in args.methods]
    if args.big and "fused" in args.methods:
        cases.append(("fused", args.big))
    measured, skipped = {}, []
    for method, rows in cases:
        if rows % args.views:
            sys.exit(f"M = {rows} is not a multiple of V = {args.views}")
        if method != "fused":
            need = estimate_peak(method, rows, measured)
            if need > limit:
                skipped.append(f"{method} at M = {rows}: estimated peak "
                               f"{need / 2 ** 30:.1f} GiB > {limit / 2 ** 30:.1f} GiB")
                continue
        big_only = rows == args.big and rows not in args.sizes  # once, to show it completes
        cfg = dict(method=method, rows=rows, dim=args.dim, views=args.views,
                   repeats=1 if big_only else args.repeats, warmup=0 if big_only else args.warmup,
                   threads=args.threads, device=args.device)
        print(f"# {method:8s} M = {rows:6d} ...", file=sys.stderr, flush=True)
        measured[(method, rows)] = r = run_case(cfg, args.timeout)
        if "error" in r:
            print(f"#   failed: {r['error']}", file=sys.stderr, flush=True)
        else:
            print(f"#   median {statistics.median(r['times']):.4f} s, peak growth "
                  f"{fmt_mib(r['peak_growth'])} MiB", file=sys.stderr, flush=True)

    print_table(args, measured, skipped, torch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r, key=list(k)) for k, r in measured.items()], f, indent=1)
    return 0


def print_table(args, measured, skipped, torch):
    print(f"\n## forward+backward, {args.device}, {args.threads} thread(s)\n")
    print(f"torch {torch.__version__}, {cpu_name()}, D = {args.dim}, V = {args.views}, L = 12 "
          f"(1 of 3 modalities + 1 of 9 anatomies), float32, reduction mean; median of "
          f"{args.repeats} timed passes after {args.warmup} warm-up.\n")
    print("| M | method | median s | min s | vs fused | peak growth MiB | inputs MiB "
          "| over inputs MiB | notes |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    reset_everywhere = True
    for (method, rows), r in measured.items():
        if "error" in r:
            print(f"| {rows} | {method} | – | – | – | – | – | – | {r['error']} |")
            continue
        med, best = statistics.median(r["times"]), min(r["times"])
        fused = measured.get(("fused", rows))
        ratio = "1.0×" if method == "fused" else (
            f"{med / statistics.median(fused['times']):.1f}×"
            if fused and "error" not in fused else "–")
        notes = []
        if method == "compiled":
            notes.append(f"compile+warm-up {r['warmup_s']:.1f} s (inductor's cache may apply)")
        if len(r["times"]) == 1:
            notes.append("1 pass")
        if "cuda_peak_extra" in r:
            notes.append(f"CUDA peak extra {fmt_mib(r['cuda_peak_extra'])} MiB")
        reset_everywhere &= bool(r["peak_reset"])
        print(f"| {rows} | {method} | {med:.4f} | {best:.4f} | {ratio} | "
              f"{fmt_mib(r['peak_growth'])} | {fmt_mib(r['inputs'])} | "
              f"{fmt_mib(r['peak_growth'] - r['inputs'])} | {'; '.join(notes)} |")
    print("\n'vs fused': median time / the fused kernel's median time at the same M. "
          "'eager' and 'compiled' run the reference with compute_dtype=float32 (its default is "
          "float64). Peak growth: VmHWM during the timed passes minus RSS before the inputs "
          "existed (fresh process per row); 'over inputs' subtracts the inputs' size and "
          "includes the gradient.")
    if not reset_everywhere:
        print("\nThe peak could not be reset after the warm-up here (/proc/self/clear_refs): "
              "the peaks include the warm-up pass (and, for 'compiled', compilation).")
    if skipped:
        print("\nSkipped (memory estimate):\n" + "\n".join(f"- {s}" for s in skipped))


if __name__ == "__main__":
    sys.exit(main())
