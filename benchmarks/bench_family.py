#!/usr/bin/env python
"""Cost of each label weighting ("dice", "cosine", "overlap", "binary") relative to "jaccard":
forward+backward of the fused kernel on one problem. Target: every mode within 5% of jaccard.

    python benchmarks/bench_family.py             # M = 8192, D = 128, L = 12, all cores
    python benchmarks/bench_family.py --quick     # smoke run: M = 1024, 3 rounds
    python benchmarks/bench_family.py --device cuda

Problem: _common.make_inputs (V = 2, B = M / 2, unit-norm float32 features, L = 12 paper-like
labels: 1 of 3 modalities + 1 of 9 anatomies), threshold 0.3, T = T_base = 0.07, reduction "mean".
Timing: one warm-up pass per mode, then `--rounds` rounds; each round times every mode once, in a
rotated order, so that a slow spell of a shared machine hits every mode alike. Reported: median
and min per mode, and each mode's median (and min) over jaccard's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from _common import cpu_name, make_inputs
from modan_ext.options import WEIGHTINGS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192, help="M = B * V (default 8192)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (every mode once each)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu")
    p.add_argument("--pattern", choices=("paper", "random"), default="paper",
                   help="labels: paper-like (every image 2 of 12 labels, so dice = cosine = "
                   "overlap) or random (each of 12 labels with probability 0.3)")
    p.add_argument("--quick", action="store_true", help="smoke run: M = 1024, 3 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.rounds = 1024, 3

    import torch
    import modan_ext
    torch.set_num_threads(args.threads)
    if not modan_ext.kernel_available(args.device):
        sys.exit(f"no compiled modan_ext kernel for {args.device}: build it first")
    cuda = args.device.startswith("cuda")
    features, labels = make_inputs(args.rows, args.dim, args.views, 0, args.device)
    if args.pattern == "random":
        gen = torch.Generator().manual_seed(1)
        labels = (torch.rand(labels.shape, generator=gen) < 0.3).to(args.device)
    features.requires_grad_(True)

    def step(mode: str) -> float:
        features.grad = None
        loss = modan_ext.jaccard_supcon_loss(features, labels, weighting=mode, backend="kernel")
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return float(loss.detach())

    losses = {mode: step(mode) for mode in WEIGHTINGS}  # warm-up, and the values (sanity)
    times = {mode: [] for mode in WEIGHTINGS}
    for r in range(args.rounds):
        for k in range(len(WEIGHTINGS)):
            mode = WEIGHTINGS[(k + r) % len(WEIGHTINGS)]
            t = time.perf_counter()
            step(mode)
            times[mode].append(time.perf_counter() - t)
        print(f"# round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    base_med = statistics.median(times["jaccard"])
    base_min = min(times["jaccard"])
    print(f"\n## label weightings, forward+backward, {args.device}, {args.threads} thread(s)\n")
    print(f"torch {torch.__version__}, {cpu_name() if not cuda else torch.cuda.get_device_name()}"
          f", M = {args.rows}, D = {args.dim}, V = {args.views}, L = 12 ({args.pattern} "
          f"labels), float32; "
          f"{args.rounds} rounds.\n")
    print("| weighting | loss | median s | min s | median / jaccard | min / jaccard | "
          "within 5% |")
    print("|---|---:|---:|---:|---:|---:|:---:|")
    for mode in WEIGHTINGS:
        med, best = statistics.median(times[mode]), min(times[mode])
        ok = "yes" if med / base_med <= 1.05 else "no"
        print(f"| {mode} | {losses[mode]:.4f} | {med:.4f} | {best:.4f} | {med / base_med:.3f} | "
              f"{best / base_min:.3f} | {ok} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
