#!/usr/bin/env python
"""Memory of the fused CPU kernel: the peak of one forward+backward beyond its inputs and
gradient, and what stays resident after the call.

    python benchmarks/bench_scratch.py             # the default shapes, 1 and 2 threads
    python benchmarks/bench_scratch.py --help

The kernel's scratch (tiles of logits and weights, per-slot statistics, the H·Z product) must
scale with the problem and be freed when the call returns: a few rows of very wide features
(M = 8, D = 2^18) need megabytes, not a 256 x D buffer per thread kept for the process's life.

Each (M, D, threads) runs in a fresh process (float32 unit-norm features [M / 2, 2, D], paper
labels), after a small warm-up call:
  peak over inputs = VmHWM during one forward+backward - VmRSS before the inputs were made
                     - the features - the gradient (both M x D float32);
  retained         = VmRSS after the call (inputs, gradient and loss freed) - VmRSS before,
                     after glibc's malloc_trim(0), so that memory freed to the allocator and
                     cached there does not count (Linux/glibc only; "n/a" elsewhere);
  retained untrimmed = the same without malloc_trim.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys

from _common import MIB, cpu_name, make_inputs, reset_peak, status_bytes

SHAPES = ((8, 2 ** 18), (64, 2 ** 16), (1024, 128), (8192, 128))


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except OSError:
        return None


def worker(cfg: dict) -> dict:
    import torch
    import modan_ext
    torch.set_num_threads(cfg["threads"])
    trim = _malloc_trim()

    def call(rows, dim, seed):
        features, labels = make_inputs(rows, dim, 2, seed, "cpu")
        features.requires_grad_(True)
        modan_ext.jaccard_supcon_loss(features, labels, backend="kernel").backward()
        return features.numel() * features.element_size()

    call(64, 16, 1)  # libraries and thread pool loaded before the baseline
    gc.collect()
    if trim:
        trim(0)
    rss0 = status_bytes("VmRSS")
    reset = reset_peak()
    features_bytes = call(cfg["rows"], cfg["dim"], 0)
    peak = status_bytes("VmHWM")
    gc.collect()
    untrimmed = status_bytes("VmRSS") - rss0
    retained = None
    if trim:
        trim(0)
        retained = status_bytes("VmRSS") - rss0
    return dict(cfg, peak_over_inputs=peak - rss0 - 2 * features_bytes, peak_reset=reset,
                retained=retained, retained_untrimmed=untrimmed, features=features_bytes)


def run_case(cfg: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                           json.dumps(cfg)], capture_output=True, text=True, env=env,
                          timeout=600)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return dict(cfg, error=(proc.stderr or proc.stdout).strip().splitlines()[-1:])


def mib(x) -> str:
    return "n/a" if x is None else f"{x / MIB:,.1f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=[f"{m}x{d}" for m, d in SHAPES],
                   help="MxD rows x feature dimension (default: %(default)s)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch
    print(f"### CPU kernel memory, forward+backward\n\ntorch {torch.__version__}, {cpu_name()}, "
          "float32, V = 2, L = 12 (paper labels); one fresh process per row.\n")
    print("| M | D | threads | features MiB | peak over inputs + gradient MiB | retained MiB | "
          "retained untrimmed MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        rows, dim = map(int, shape.split("x"))
        for threads in args.threads:
            r = run_case(dict(rows=rows, dim=dim, threads=threads))
            if "error" in r:
                print(f"| {rows} | {dim} | {threads} | error: {r['error']} | | | |")
                continue
            note = "" if r["peak_reset"] else " (peak includes the warm-up)"
            print(f"| {rows} | {dim} | {threads} | {mib(r['features'])} | "
                  f"{mib(r['peak_over_inputs'])}{note} | {mib(r['retained'])} | "
                  f"{mib(r['retained_untrimmed'])} |")
    print("\n'retained': resident memory after the call minus before, after glibc's "
          "malloc_trim(0); 'untrimmed': without it (memory cached by the allocator).")


if __name__ == "__main__":
    main()
