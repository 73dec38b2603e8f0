"""From one row per (task, protocol, model, repeat, fold) to one row per (task, protocol,
model): mean ± sd of the test AUC and the one-sided Wilcoxon p-value of the method against each
baseline, paired on the same splits and seeds; and the summary of pretraining runs."""
from __future__ import annotations

import numpy as np

from ..evaluation import PROTOCOLS
from ..stats import wilcoxon_signed_rank

# what each pretraining run reports in pretraining.csv (from `pretrain`'s summary)
PRETRAINING_KEYS = ("epochs_done", "final_loss", "seconds", "images_per_s", "knn5_modality",
                    "knn5_anatomy", "knn5_leaf")


def paired_values(rows: list[dict], task: str, protocol: str, model: str, unit: str) -> np.ndarray:
    """AUCs of one cell, ordered by (repeat, fold); averaged over folds when unit == "repeat"."""
    cell = sorted((r["repeat"], r["fold"], r["auc"]) for r in rows
                  if r["task"] == task and r["protocol"] == protocol and r["model"] == model)
    if unit == "fold":
        return np.array([a for _, _, a in cell])
    repeats = sorted({r for r, _, _ in cell})
    return np.array([np.mean([a for r, _, a in cell if r == rep]) for rep in repeats])


def summarise(rows: list[dict], method: str, unit: str = "fold") -> list[dict]:
    """Mean ± sd of every (task, protocol, model) and the one-sided Wilcoxon p-value of
    `method` > model (paired over folds or repeats)."""
    keys = sorted({(r["task"], r["protocol"], r["model"]) for r in rows},
                  key=lambda k: (k[0], PROTOCOLS.index(k[1]) if k[1] in PROTOCOLS else 9, k[2]))
    out = []
    for task, protocol, model in keys:
        aucs = paired_values(rows, task, protocol, model, "fold")
        entry = {"task": task, "protocol": protocol, "model": model,
                 "mean_auc": round(float(aucs.mean()), 4),
                 "sd_auc": round(float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0, 4),
                 "n_folds": len(aucs), "p_method_greater": "", "test_pairs": "", "test": ""}
        if model != method and any(r["model"] == method for r in rows):
            mine = paired_values(rows, task, protocol, method, unit)
            theirs = paired_values(rows, task, protocol, model, unit)
            if len(mine) == len(theirs) and len(mine) > 0:
                test = wilcoxon_signed_rank(mine, theirs, "greater")
                entry.update(p_method_greater=round(test.p_value, 6), test_pairs=len(mine),
                             test=f"Wilcoxon one-sided, {test.method}, pairs per {unit}")
        out.append(entry)
    return out


def result_columns(summary: list[dict]) -> list[tuple[str, str]]:
    """The (task, protocol) columns of tables and plots: protocols outer, tasks inner, in the
    order they first appear."""
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    protocols = [p for p in PROTOCOLS if any(s["protocol"] == p for s in summary)]
    return [(t, p) for p in protocols for t in tasks]


def pretraining_rows(summaries: dict[str, dict]) -> list[dict]:
    """One row per pretraining run ({loss: `pretrain`'s summary}) for pretraining.csv."""
    return [{"loss": loss, **{k: summary.get(k, "") for k in PRETRAINING_KEYS}}
            for loss, summary in summaries.items()]
