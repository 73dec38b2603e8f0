"""The project's main job: pretrain ModAn-MulSupCon and its baselines, then evaluate them.

    python examples/main_job.py                      # SYNTHETIC data, ~10 min on a 2-core CPU
    python examples/main_job.py --paper --data-root /data/radimagenet \
        --task-dir data/acl --task-dir data/breast --task-dir data/thyroid   # a GPU job

Steps: (1) pretraining data (synthetic mini-RadImageNet unless --data-root); (2) pretrain with
--losses (default modan, supcon, simclr) into RUN/<loss>/, resuming any finished or interrupted
run (rerun the same command after Ctrl-C); (3) fine-tuning and linear probing of every encoder
and a scratch baseline on the downstream tasks; (4) tables, plots and a comparison with the
paper's numbers in --results.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import evaluate as evaluate_script
import pretrain as pretrain_script
from modan_ext import evaluation, pretraining, synthetic

# paper-notes §3 (Takaya & Inamori 2025, Table): test AUC, mean over 5 folds x 10 repeats
PAPER_AUC = {
    "ModAn-MulSupCon": {"acl FT": 0.964, "breast FT": 0.926, "thyroid FT": 0.763,
                        "acl LP": 0.681, "breast LP": 0.717, "thyroid LP": 0.639},
    "SimCLR (miniRIN)": {"acl FT": 0.951, "breast FT": 0.940, "thyroid FT": 0.685,
                         "acl LP": 0.844, "breast LP": 0.805, "thyroid LP": 0.657},
    "supervised 165-class": {"acl FT": 0.630, "breast FT": 0.666, "thyroid FT": 0.558,
                             "acl LP": 0.796, "breast LP": 0.723, "thyroid LP": 0.630},
    "ImageNet weights": {"acl FT": 0.876, "breast FT": 0.884, "thyroid FT": 0.696,
                         "acl LP": 0.824, "breast LP": 0.781, "thyroid LP": 0.609},
    "scratch": {"acl FT": 0.907, "breast FT": 0.884, "thyroid FT": 0.677,
                "acl LP": 0.697, "breast LP": 0.724, "thyroid LP": 0.557},
}
# our model -> the paper's row it stands in for
PAPER_ROW = {"modan": "ModAn-MulSupCon", "simclr": "SimCLR (miniRIN)",
             "supcon": "supervised 165-class", "scratch": "scratch"}


def save_png(array: np.ndarray, path: Path, scale: int = 2) -> None:
    from PIL import Image
    image = Image.fromarray(array)
    image.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST).save(path)


def task_sheet(tasks, per_class: int = 6) -> np.ndarray:
    """Rows: per task, `per_class` negatives then `per_class` positives."""
    rows = []
    for task in tasks:
        picks = [np.flatnonzero(task.targets == c)[:per_class] for c in (0, 1)]
        rows.append(np.concatenate([task.images[i, 0].numpy() for i in np.concatenate(picks)], 1))
    return np.concatenate(rows, 0)


def plot_loss_curves(histories: dict, path: Path, log=print) -> None:
    plt = pretraining.import_pyplot(log)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, rows in histories.items():
        first = rows[0]["loss"]
        ax.plot([r["epoch"] for r in rows], [r["loss"] / first for r in rows], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss / epoch-1 loss")
    ax.set_title("pretraining loss (each relative to its first epoch)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_markdown(summary: list[dict]) -> str:
    """Ours next to the paper's numbers, and which model wins each column in both."""
    ours = {(s["model"], f"{s['task']} {evaluation.PROTOCOL_SHORT[s['protocol']]}"): s["mean_auc"]
            for s in summary}
    columns = [c for c in PAPER_AUC["scratch"] if any(k[1] == c for k in ours)]
    models = [m for m in PAPER_ROW if any(k[0] == m for k in ours)]
    lines = ["| model (ours → paper row) | " + " | ".join(f"{c} ours / paper" for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for model in models:
        cells = [f"{ours[(model, c)]:.3f} / {PAPER_AUC[PAPER_ROW[model]][c]:.3f}"
                 if (model, c) in ours else "–" for c in columns]
        lines.append(f"| {model} → {PAPER_ROW[model]} | " + " | ".join(cells) + " |")
    lines += ["", "| column | best here | best in the paper (same model set) | modan vs simclr here | "
                  "ModAn vs SimCLR in the paper |", "|---|---|---|---|---|"]
    for c in columns:
        present = [m for m in models if (m, c) in ours]
        best_ours = max(present, key=lambda m: ours[(m, c)])
        best_paper = max(present, key=lambda m: PAPER_AUC[PAPER_ROW[m]][c])
        vs_ours = vs_paper = "–"
        if ("modan", c) in ours and ("simclr", c) in ours:
            vs_ours = f"{ours[('modan', c)] - ours[('simclr', c)]:+.3f}"
            vs_paper = f"{PAPER_AUC['ModAn-MulSupCon'][c] - PAPER_AUC['SimCLR (miniRIN)'][c]:+.3f}"
        lines.append(f"| {c} | {best_ours} | {best_paper} → {PAPER_ROW[best_paper]} | {vs_ours} | {vs_paper} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/main_job", help="checkpoints and per-run outputs")
    parser.add_argument("--results", default="examples/results", help="tables and figures")
    parser.add_argument("--losses", default="modan,supcon,simclr")
    pretrain_script.add_data_arguments(parser)
    pretrain_script.add_training_arguments(parser)
    evaluate_script.add_protocol_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run_dir, results = Path(args.run_dir), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    timings = {}
    losses = [name for name in args.losses.split(",") if name]

    # 1. data
    t = time.perf_counter()
    configs = {loss: pretrain_script.pretrain_config(args, loss) for loss in losses}
    size = next(iter(configs.values())).image_size
    vocabulary = pretrain_script.load_vocabulary(args)
    image_set = pretrain_script.load_data(args, size, vocabulary)
    if not args.data_root:
        save_png(synthetic.contact_sheet(image_set), results / "samples.png")
    timings["pretraining_data_s"] = round(time.perf_counter() - t, 1)

    # 2. pretraining
    summaries, histories = {}, {}
    for loss in losses:
        t = time.perf_counter()
        print(f"\n== pretraining: {loss} ==", flush=True)
        try:
            summaries[loss] = pretraining.pretrain(image_set, vocabulary, configs[loss], run_dir / loss,
                                                   resume=True)
        except KeyboardInterrupt:
            print(f"\ninterrupted: rerun the same command to continue from {run_dir / loss}",
                  file=sys.stderr)
            return 130
        timings[f"pretrain_{loss}_s"] = round(time.perf_counter() - t, 1)
        with open(run_dir / loss / "metrics.csv") as fh:
            histories[loss] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
        if (run_dir / loss / "embedding.png").exists():
            shutil.copy(run_dir / loss / "embedding.png", results / f"embedding_{loss}.png")
    del image_set
    plot_loss_curves(histories, results / "loss_curves.png")
    keys = ("epochs_done", "final_loss", "seconds", "images_per_s", "knn5_modality",
            "knn5_anatomy", "knn5_leaf")
    evaluation.write_csv([{"loss": loss, **{k: summaries[loss].get(k, "") for k in keys}}
                          for loss in losses], results / "pretraining.csv")

    # 3. evaluation
    print("\n== downstream evaluation ==", flush=True)
    t = time.perf_counter()
    args.checkpoint = [f"{loss}={run_dir / loss / pretraining.CHECKPOINT_NAME}" for loss in losses]
    args.no_scratch, args.method, args.out, args.image_size = False, "modan" if "modan" in losses else None, \
        str(results), None
    encoders, _ = evaluate_script.load_encoders(args.checkpoint, True)
    tasks = evaluate_script.load_tasks(args, size)
    if not args.task_dir:
        save_png(task_sheet(tasks), results / "task_samples.png")
    del encoders, tasks  # evaluate_script.run loads them again; the cost is small
    outcome = evaluate_script.run(args)
    timings["evaluation_s"] = round(time.perf_counter() - t, 1)

    # 4. comparison and run information
    if "modan" in losses:
        (results / "comparison.md").write_text(comparison_markdown(outcome["summary"]), encoding="utf-8")
    timings["total_s"] = round(time.perf_counter() - started, 1)
    info = {"command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
            "synthetic_data": not args.data_root and not args.task_dir,
            "timings": timings, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
            "pretrain_configs": {k: vars(v) for k, v in configs.items()},
            "protocol": vars(evaluate_script.protocol_config(args))}
    (results / "run_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nmain job done in {timings['total_s']:.0f} s; results in {results}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
