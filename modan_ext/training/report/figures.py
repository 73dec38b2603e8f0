"""Figures: the loss curves of pretraining runs, AUC bars, the embedding map, and a sheet of
downstream task images. Plots are optional (matplotlib, extra 'examples'): without it each plot
function logs why and returns None."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..evaluation import PROTOCOL_SHORT
from .summary import result_columns, seed_count, spread


def import_pyplot(log=print):
    """matplotlib's pyplot (non-interactive backend), or None with a message: plots are optional
    (``pip install 'modan_ext[examples]'``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping plots (pip install matplotlib)")
        return None
    return plt


def plot_loss_curves(histories: dict, path: Path, relative: bool = False, log=print) -> str | None:
    """Training loss per epoch of each run in `histories` ({name: metrics rows}); `relative`
    divides each curve by its first epoch's loss, so that runs of different losses compare."""
    plt = import_pyplot(log)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, rows in histories.items():
        scale = rows[0]["loss"] if relative else 1.0
        ax.plot([r["epoch"] for r in rows], [r["loss"] / scale for r in rows], marker="o",
                label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss / epoch-1 loss" if relative else "training loss")
    if relative:
        ax.set_title("pretraining loss (each relative to its first epoch)", fontsize=9)
    else:
        ax.set_title(f"{', '.join(histories)}: loss per epoch")
    ax.grid(alpha=0.3)
    if len(histories) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def bar_plot(summary: list[dict], model_order: list[str], path: Path, log=print) -> str | None:
    """Mean ± sd test AUC per task and protocol column, one bar per model."""
    plt = import_pyplot(log)
    if plt is None:
        return None
    columns = result_columns(summary)
    cell = {(s["task"], s["protocol"], s["model"]): s for s in summary}
    seeds = seed_count(summary)
    width = 0.8 / max(len(model_order), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(columns), 3.6))
    for i, model in enumerate(model_order):
        xs = [j + (i - (len(model_order) - 1) / 2) * width for j in range(len(columns))]
        means = [cell[(*c, model)]["mean_auc"] if (*c, model) in cell else np.nan for c in columns]
        sds = [(spread(cell[(*c, model)], seeds) or 0) if (*c, model) in cell else 0
               for c in columns]
        ax.bar(xs, means, width, yerr=sds, capsize=2, label=model)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([f"{t}\n{PROTOCOL_SHORT[p]}" for t, p in columns])
    ax.set_ylabel(f"test AUC (mean ± sd over {seeds} seeds)" if seeds > 1 else
                  "test AUC (mean ± sd over folds)")
    lowest = min((s["mean_auc"] - (spread(s, seeds) or 0) for s in summary), default=0.4)
    ax.set_ylim(min(0.4, max(0.0, lowest - 0.05)), 1.0)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8, ncol=len(model_order), loc="upper center", bbox_to_anchor=(0.5, 1.15),
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_embedding(coords: np.ndarray, classes: dict, values: dict, titles: dict, path: Path,
                   log=print) -> str | None:
    """One scatter panel per field: `coords` [N, 2] coloured by `classes[field]` (indices into
    `values[field]`, -1: none), titled `titles[field]`."""
    plt = import_pyplot(log)
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(classes), figsize=(5.2 * len(classes), 4.4))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, classes):
        cmap = plt.get_cmap("tab10" if len(values[name]) <= 10 else "tab20")
        for k, value in enumerate(values[name]):
            sel = classes[name] == k
            if sel.any():
                ax.scatter(coords[sel, 0], coords[sel, 1], s=6, color=cmap(k % cmap.N), label=value)
        ax.set_title(titles[name], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=2, loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def task_sheet(tasks, per_class: int = 6) -> np.ndarray:
    """uint8 mosaic of downstream tasks: per task one row, `per_class` negatives then
    `per_class` positives."""
    rows = []
    for task in tasks:
        picks = [np.flatnonzero(task.targets == c)[:per_class] for c in (0, 1)]
        rows.append(np.concatenate([task.images[i, 0].numpy() for i in np.concatenate(picks)], 1))
    return np.concatenate(rows, 0)
