#!/usr/bin/env python
"""Weak scaling of `gather_distributed=True`: every rank holds the same number of images, the
loss gathers them from all ranks; time per step (forward+backward of the loss) and peak memory
per rank, for 1, 2, ... ranks.

    python benchmarks/bench_scaling.py                  # CPU, gloo, 1 and 2 ranks, M = 4096/rank
    python benchmarks/bench_scaling.py --quick          # smoke run: M = 512 per rank, 3 steps
    python benchmarks/bench_scaling.py --device cuda    # NCCL, 1 .. number of GPUs ranks

Problem per rank: _common.make_inputs (V = 2, unit-norm float32 features, D = 128, L = 12 paper-like
labels), a different batch on every rank. A rank's work is (local M) x (global M) pairs, those
among its own rows computed once (the kernel serves both ends of a pair from one tile), i.e.
M_local^2 (ranks - 1/2) pairs: in weak scaling the ideal step time grows like 2 ranks - 1
("ideal"); "efficiency" is a rank's pair throughput relative to the first row's (1.0: the gather,
the all-reduce and any contention between ranks cost nothing).

CPU: every rank gets --threads threads (default: cores // the largest number of ranks), the same
in every row, so the rows compare like with like. Time per step: median over the timed steps of
(barrier, forward+backward, barrier), i.e. the slowest rank's step. Peak memory per rank: CPU --
VmHWM (RSS high-water mark) during the timed steps minus VmRSS before the inputs were made, the
largest over ranks; CUDA -- torch.cuda.max_memory_allocated during the timed steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

from _common import MIB, cpu_name, free_port, make_inputs, reset_peak, status_bytes


def rank_main(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    import modan_ext

    cuda = cfg["device"] == "cuda"
    torch.set_num_threads(cfg["threads"])
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=600))

    def step(features, labels):
        features.grad = None
        dist.barrier()
        t = time.perf_counter()
        loss = modan_ext.jaccard_supcon_loss(features, labels, backend=cfg["backend"],
                                             gather_distributed=True)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        return time.perf_counter() - t, float(loss.detach())

    f, y = make_inputs(256, cfg["dim"], cfg["views"], 1000 + rank, device)  # load code paths
    step(f.requires_grad_(True), y)
    del f, y
    rss0 = status_bytes("VmRSS")
    features, labels = make_inputs(cfg["rows"], cfg["dim"], cfg["views"], rank, device)
    features.requires_grad_(True)
    for _ in range(cfg["warmup"]):
        step(features, labels)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    reset = reset_peak()
    times, losses = [], []
    for _ in range(cfg["steps"]):
        t, loss = step(features, labels)
        times.append(t)
        losses.append(loss)
    out = dict(rank=rank, times=times, loss=losses[-1], peak_reset=reset,
               peak_growth=status_bytes("VmHWM") - rss0)
    if cuda:
        out["cuda_peak_extra"] = torch.cuda.max_memory_allocated() - base_cuda
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(out, fh)
    dist.destroy_process_group()


def run_world(world: int, cfg: dict) -> list[dict]:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(rank_main, args=(world, free_port(), cfg, out), nprocs=world,
                           join=True, start_method="spawn")
        return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", help="world sizes (default: 1 2 on CPU, "
                   "1 .. number of GPUs on CUDA)")
    p.add_argument("--rows", type=int, default=4096, help="M = B * V per rank (default 4096)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch threads per rank (CPU; default: cores // "
                   "the largest number of ranks)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backend", choices=("kernel", "reference", "auto"), default="kernel")
    p.add_argument("--quick", action="store_true", help="smoke run: M = 512 per rank, 3 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.steps = 512, 3

    import torch
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda but no GPU is visible")
        ranks = args.ranks or list(range(1, torch.cuda.device_count() + 1))
        if max(ranks) > torch.cuda.device_count():
            sys.exit(f"{max(ranks)} ranks need as many GPUs; {torch.cuda.device_count()} visible")
    else:
        ranks = args.ranks or [1, 2]
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(ranks))
    cfg = dict(rows=args.rows, dim=args.dim, views=args.views, steps=args.steps,
               warmup=args.warmup, threads=threads, device=args.device, backend=args.backend)

    results = {}
    for world in ranks:
        print(f"# {world} rank(s) ...", file=sys.stderr, flush=True)
        results[world] = run_world(world, cfg)

    machine = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"\n## weak scaling of gather_distributed, {args.device} "
          f"({'NCCL' if args.device == 'cuda' else 'gloo'})\n")
    print(f"torch {torch.__version__}, {machine}, {threads} thread(s) per rank, M = {args.rows} "
          f"rows per rank, D = {args.dim}, V = {args.views}, L = 12, float32, backend "
          f"{args.backend!r}; median of {args.steps} timed steps after {args.warmup} warm-up.\n")
    mem_col = "CUDA peak MiB / rank" if args.device == "cuda" else "peak RSS growth MiB / rank"
    print(f"| ranks | global M | step s (median) | step s (min) | vs first row | ideal | "
          f"efficiency | {mem_col} |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    first = None
    for world, per_rank in results.items():
        step_times = [max(ts) for ts in zip(*(r["times"] for r in per_rank))]  # slowest rank
        med, best = statistics.median(step_times), min(step_times)
        pairs_per_s = args.rows * args.rows * (world - 0.5) / med  # one rank's unique pairs
        first = first or (world, med, pairs_per_s)
        mem = max(r.get("cuda_peak_extra", r["peak_growth"]) for r in per_rank)
        print(f"| {world} | {args.rows * world} | {med:.4f} | {best:.4f} | "
              f"{med / first[1]:.2f}× | {(world - 0.5) / (first[0] - 0.5):.2f}× | "
              f"{pairs_per_s / first[2]:.2f} "
              f"| {mem / MIB:,.1f} |")
    print("\n'ideal': the growth of a rank's work, (local M) x (global M) pairs of which the "
          "pairs among its own rows are computed once (one tile serves both ends), i.e. "
          "M_local^2 (ranks - 1/2): 3x for 2 ranks over 1. 'efficiency': a rank's pairs per "
          "second relative to the first row (1.0: communication and contention are free).")
    if not all(r["peak_reset"] for rs in results.values() for r in rs):
        print("\nThe RSS peak could not be reset after the warm-up here: it includes it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
