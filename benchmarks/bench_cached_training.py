#!/usr/bin/env python
"""Training steps of the example's ResNet-18 at growing batch sizes: peak memory and time per step
of a SupContrast-style step, the same step with the fused loss, and the gradient-cached step.

    python benchmarks/bench_cached_training.py           # B = 64 ... 8192 images (long: see below)
    python benchmarks/bench_cached_training.py --quick   # a smoke run, about a minute

Model and data: `ContrastiveModel` (ResNet-18, one input channel, 7x7 stem, 512 -> 512 -> 128
projection, L2-normalised), 64 x 64 px random images, V = 2 views (M = 2B rows), paper-like labels
(_common.paper_labels: one of 3 modalities + one of 9 anatomies), SGD with momentum; a step is
zero_grad, forward, loss, backward, optimizer step.

Methods:
  supcon  plain step, naive loss: the plain-PyTorch reference (every M x M matrix, float32 as
          SupContrast computes), whole batch at once
  fused   plain step, fused loss (`jaccard_supcon_loss(backend="kernel")`), whole batch at once
  cached  `cached_contrastive_backward` with the fused loss, --chunk-size rows at a time

Each (method, B) runs in a fresh process: after a tiny warm-up step (code paths, optimizer state)
its RSS is the baseline; then the inputs are made, the peak is reset (/proc/self/clear_refs) and
the timed steps run. peak growth = VmHWM - baseline (inputs included); over inputs = peak growth -
the inputs' size. A point whose estimate (a fit to the method's smaller points: linear in M, plus
M^2 for supcon) exceeds --max-gib (and 75% of the memory available when it would start) is not
run: its memory is reported as extrapolated. A watchdog kills a point that grows past the limit.
Timings are wall-clock on all cores (2 here); the load average at start and end is recorded,
since a shared machine slows every method.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import subprocess
import sys
import time

from _common import (GIB, MIB, available_bytes, cpu_name, load_average, paper_labels, reset_peak,
                     status_bytes, total_bytes)

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("supcon", "fused", "cached")
LABELS = {"supcon": "SupContrast-style (M×M loss)", "fused": "plain step, fused loss",
          "cached": "cached step, fused loss"}


# ---- the worker: one (method, B) in this process -------------------------------------------------

def make_batch(images: int, size: int, seed: int = 0):
    """Random views [B, 2, 1, size, size] and paper-like multi-hot labels [B, 12]."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    views = torch.randn(images, 2, 1, size, size, generator=gen)
    return views, paper_labels(images, gen)


def make_step(method: str, model, chunk_size: int):
    import torch
    from modan_ext import jaccard_supcon_loss
    from modan_ext.reference import jaccard_supcon_loss_reference
    from modan_ext.training import cached_contrastive_backward

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if method == "supcon":
        def loss_fn(f, y):
            return jaccard_supcon_loss_reference(f, y, compute_dtype=torch.float32)
    else:
        def loss_fn(f, y):
            return jaccard_supcon_loss(f, y, backend="kernel")

    def step(views, labels):
        opt.zero_grad(set_to_none=True)
        if method == "cached":
            loss = cached_contrastive_backward(model, views, labels, loss_fn, chunk_size)
        else:
            images, per_image = views.shape[:2]
            z = model(views.flatten(0, 1)).view(images, per_image, -1)
            loss = loss_fn(z, labels)
            loss.backward()
        opt.step()
        return float(loss)
    return step


def worker(cfg: dict) -> dict:
    import torch
    from modan_ext.training.model import ContrastiveModel
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model = ContrastiveModel("7x7", 128)
    step = make_step(cfg["method"], model, cfg["chunk_size"])
    step(*make_batch(4, cfg["size"], seed=1))  # code paths, gradients, momentum buffers
    gc.collect()
    rss0 = status_bytes("VmRSS")
    views, labels = make_batch(cfg["images"], cfg["size"])
    inputs = views.numel() * views.element_size() + labels.numel() * labels.element_size()
    reset = reset_peak()
    times, cpu_times, loss = [], [], None
    for _ in range(cfg["repeats"]):
        t, cpu = time.perf_counter(), time.process_time()
        loss = step(views, labels)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - cpu)
    peak = status_bytes("VmHWM")
    return dict(cfg, times=times, cpu_times=cpu_times, peak_growth=peak - rss0, inputs=inputs,
                peak_reset=reset, loss=loss)


# ---- the driver ----------------------------------------------------------------------------------

def run_point(cfg: dict, limit: float, timeout: float) -> dict:
    """Run one point in a fresh process; kill it if its RSS passes `limit` bytes."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                             json.dumps(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    start, killed = time.monotonic(), None
    while proc.poll() is None:
        try:
            rss = status_bytes("VmRSS", proc.pid)
        except (OSError, RuntimeError):
            rss = 0
        if rss > limit:
            killed = f"killed: RSS {rss / GIB:.1f} GiB passed the {limit / GIB:.1f} GiB limit"
        elif time.monotonic() - start > timeout:
            killed = f"killed: ran past {timeout:.0f} s"
        if killed:
            proc.kill()
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    if killed:
        return dict(cfg, error=killed)
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = " | ".join(err.strip().splitlines()[-3:])
    return dict(cfg, error=f"rc {proc.returncode}: {tail}")


def _measured(method: str, points: list[dict]) -> list[tuple[int, int]]:
    return [(2 * p["images"], p["peak_growth"]) for p in points
            if p["method"] == method and "peak_growth" in p]


def fit_memory(method: str, points: list[dict]):
    """Peak growth as a function of M, from the measured points (None without enough): a + bM
    (least squares) for the plain and cached steps; for supcon, the fused step's a + bM (the same
    activations) plus cM², c >= 0 fitted to supcon's excess over fused at equal M (its M x M
    matrices). A plain fit of a + bM + cM² to supcon's few small points extrapolates badly."""
    import numpy as np
    done = _measured("fused" if method == "supcon" else method, points)
    if len(done) < 2:
        return None
    b, a = np.polyfit(*np.array(done, dtype=float).T, 1)
    if method != "supcon":
        return lambda rows: float(a + b * rows)
    fused = dict(done)
    excess = [(m, peak - fused[m]) for m, peak in _measured("supcon", points) if m in fused]
    if not excess:
        return None
    c = max(0.0, sum(d * m ** 2 for m, d in excess) / sum(m ** 4 for m, _ in excess))
    return lambda rows: float(a + b * rows + c * rows ** 2)


def plot(points: list[dict], path: str, total_memory: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, color in zip(METHODS, ("tab:red", "tab:blue", "tab:green")):
        rows = sorted((p for p in points if p["method"] == method), key=lambda p: p["images"])
        measured = [(p["images"], p["peak_growth"] / GIB) for p in rows if "peak_growth" in p]
        guessed = [(p["images"], p["estimate"] / GIB) for p in rows if "estimate" in p]
        if measured:
            ax.plot(*zip(*measured), "o-", color=color, label=LABELS[method])
        if guessed:
            link = measured[-1:] + guessed
            ax.plot(*zip(*link), "--", color=color)
            ax.plot(*zip(*guessed), "o", mfc="none", color=color,
                    label=f"{LABELS[method]}, extrapolated")
    if total_memory:
        ax.axhline(total_memory / GIB, color="grey", lw=0.8, ls=":")
        ax.text(0.02, total_memory / GIB * 1.08, f"machine memory ({total_memory / GIB:.0f} GiB)",
                transform=ax.get_yaxis_transform(), fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({p["images"] for p in points}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yscale("log")
    ax.set_xlabel("batch size B (images; M = 2B views)")
    ax.set_ylabel("peak memory growth (GiB)")
    ax.set_title("ResNet-18 training step, 64 px, CPU", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(points: list[dict]) -> list[str]:
    fused = {p["images"]: p for p in points if p["method"] == "fused" and "times" in p}
    lines = ["| B | M | method | step s | CPU s | ms / image | vs fused: time | vs fused: CPU | "
             "peak growth MiB | over inputs MiB | notes |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in sorted(points, key=lambda p: (p["images"], METHODS.index(p["method"]))):
        b, notes = p["images"], p.get("error", "")
        cells = ["—"] * 7
        if "times" in p:
            wall, cpu = min(p["times"]), min(p["cpu_times"])
            ratios = ["—", "—"]
            if b in fused:
                ratios = [f"{wall / min(fused[b]['times']):.2f}×",
                          f"{cpu / min(fused[b]['cpu_times']):.2f}×"]
            cells = [f"{wall:.2f}", f"{cpu:.2f}", f"{1000 * wall / b:.1f}", *ratios,
                     f"{p['peak_growth'] / MIB:,.0f}",
                     f"{(p['peak_growth'] - p['inputs']) / MIB:,.0f}"]
            if len(p["times"]) > 1:
                notes = f"min of {len(p['times'])} steps (max {max(p['times']):.2f} s)"
        elif "estimate" in p:
            cells[5] = f"~{p['estimate'] / MIB:,.0f} (extrapolated)"
        lines.append(f"| {b} | {2 * b} | {p['method']} | {' | '.join(cells)} | {notes} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[64, 256, 1024, 4096, 8192],
                        help="batch sizes B (images; M = 2B rows)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--chunk-size", type=int, default=512, help="rows per cached chunk")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed steps per point (1 above 1024 images)")
    parser.add_argument("--max-gib", type=float, default=20.0,
                        help="never start a point estimated above this (nor above 75%% of the "
                             "memory available then); kill one that grows past it")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per point")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--quick", action="store_true", help="B in {16, 64}, chunk 32")
    parser.add_argument("--from-json", metavar="PATH",
                        help="only re-make the table and plot of a previous run's .json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            run = json.load(f)
        run.setdefault("total_memory", total_bytes())
        write_results(run, args.out)
        return
    if args.quick:
        args.images, args.chunk_size, args.repeats = [16, 64], 32, 1

    import torch
    total = total_bytes()
    started, load_start = datetime.datetime.now(), load_average()
    points: list[dict] = []
    for images in sorted(args.images):
        for method in args.methods:
            cfg = dict(method=method, images=images, size=args.size, threads=args.threads,
                       chunk_size=args.chunk_size,
                       repeats=1 if images > 1024 else args.repeats)
            limit = min(args.max_gib * GIB, 0.75 * available_bytes())
            fit = fit_memory(method, points)
            estimate = fit(2 * images) if fit else None
            if estimate is not None and estimate > limit:
                points.append(dict(cfg, error=f"not run: estimated over the memory limit "
                                               f"{limit / GIB:.1f} GiB"))
            else:
                points.append(run_point(cfg, limit, args.timeout))
            p = points[-1]
            shown = (f"{min(p['times']):.2f} s, peak growth {p['peak_growth'] / MIB:,.0f} MiB"
                     if "times" in p else p["error"])
            print(f"B={images:6d} {method:7s} {shown}", flush=True)

    header = (f"{started:%Y-%m-%d}, {cpu_name()}, "
              f"{args.threads} threads, {total / GIB:.0f} GiB, torch {torch.__version__}; "
              f"{args.size} px, chunk {args.chunk_size} rows; load average at start "
              f"{load_start}, at end {load_average()} (1, 5, 15 min).")
    write_results(dict(header=header, total_memory=total, points=points), args.out)


def write_results(run: dict, out: str) -> None:
    """The table (printed and .md), the raw points (.json) and the plot (.png) of a run; points
    not measured get the extrapolation of the final fits."""
    points = run["points"]
    for p in points:
        fit = fit_memory(p["method"], points)
        if "peak_growth" not in p and fit:
            p["estimate"] = fit(2 * p["images"])
        limit = re.search(r"limit ([\d.]+ GiB)", p.get("error", ""))
        if p.get("error", "").startswith("not run") and limit:  # the final fit decides the figure
            p["error"] = f"not run: estimated over the memory limit {limit.group(1)}"
    notes = ("Step s: wall-clock seconds of one step (the fastest timed one); CPU s: the "
             "process's CPU seconds (all threads) in it, less sensitive to other processes on a "
             "shared machine. 'vs fused': the same over the plain fused step at the same B (per "
             "image, the same ratio). Peak growth: VmHWM during the timed steps minus RSS before "
             "the inputs existed (fresh process per row); 'over inputs' subtracts the views and "
             "labels. Extrapolated (rows not run, or killed, at the memory limit): fused and "
             "cached a + bM fitted to their measured rows; supcon the fused fit + cM², c fitted "
             "to supcon's excess over fused at equal M.")
    lines = [run["header"], ""] + table(points) + ["", notes]
    print("\n".join(lines))
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, "cached_training")
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(run, f, indent=1)
    plot(points, base + ".png", run["total_memory"])
    print(f"wrote {base}.md, .json, .png")


if __name__ == "__main__":
    main()
