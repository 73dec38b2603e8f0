"""From one row per (task, protocol, model, pretraining seed, repeat, fold) to one row per
(task, protocol, model): mean ± sd of the test AUC over folds and, for a model pretrained with
several seeds, sd over those seeds; and the one-sided Wilcoxon p-value of the method against
each baseline, paired on the same splits and fine-tuning seeds (each fold's AUC averaged over the
pretraining seeds first). Also the summary of pretraining runs."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..evaluation import PROTOCOLS
from ..stats import wilcoxon_signed_rank

# what each pretraining run reports in pretraining.csv (from `pretrain`'s summary)
PRETRAINING_KEYS = ("epochs_done", "final_loss", "seconds", "images_per_s", "knn5_modality",
                    "knn5_anatomy", "knn5_leaf")


def _cell(rows: list[dict], task: str, protocol: str, model: str) -> list[dict]:
    return [r for r in rows if r["task"] == task and r["protocol"] == protocol and r["model"] == model]


def paired_values(rows: list[dict], task: str, protocol: str, model: str, unit: str) -> np.ndarray:
    """AUCs of one cell, ordered by (repeat, fold), each the mean over the model's pretraining
    seeds (rows without a "seed" are one seed); averaged over folds too when unit == "repeat"."""
    per_split = defaultdict(list)
    for r in _cell(rows, task, protocol, model):
        per_split[(r["repeat"], r["fold"])].append(r["auc"])
    splits = sorted(per_split)
    values = {split: float(np.mean(per_split[split])) for split in splits}
    if unit == "fold":
        return np.array([values[split] for split in splits])
    repeats = sorted({repeat for repeat, _ in splits})
    return np.array([np.mean([v for (rep, _), v in values.items() if rep == repeat])
                     for repeat in repeats])


def seed_means(rows: list[dict], task: str, protocol: str, model: str) -> np.ndarray:
    """Per pretraining seed of the model, the mean AUC over its repeats and folds."""
    per_seed = defaultdict(list)
    for r in _cell(rows, task, protocol, model):
        per_seed[r.get("seed", "")].append(r["auc"])
    return np.array([np.mean(aucs) for aucs in per_seed.values()])


def summarise(rows: list[dict], method: str, unit: str = "fold") -> list[dict]:
    """Mean ± sd of every (task, protocol, model) over folds, sd over pretraining seeds where
    there are several, and the one-sided Wilcoxon p-value of `method` > model (paired over folds
    or repeats)."""
    keys = sorted({(r["task"], r["protocol"], r["model"]) for r in rows},
                  key=lambda k: (k[0], PROTOCOLS.index(k[1]) if k[1] in PROTOCOLS else 9, k[2]))
    out = []
    for task, protocol, model in keys:
        aucs = paired_values(rows, task, protocol, model, "fold")
        seeds = seed_means(rows, task, protocol, model)
        entry = {"task": task, "protocol": protocol, "model": model,
                 "mean_auc": round(float(aucs.mean()), 4),
                 "sd_auc": round(float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0, 4),
                 "n_folds": len(aucs), "n_seeds": len(seeds),
                 "sd_seeds": round(float(seeds.std(ddof=1)), 4) if len(seeds) > 1 else "",
                 "p_method_greater": "", "test_pairs": "", "test": ""}
        if model != method and any(r["model"] == method for r in rows):
            mine = paired_values(rows, task, protocol, method, unit)
            theirs = paired_values(rows, task, protocol, model, unit)
            if len(mine) == len(theirs) and len(mine) > 0:
                test = wilcoxon_signed_rank(mine, theirs, "greater")
                entry.update(p_method_greater=round(test.p_value, 6), test_pairs=len(mine),
                             test=f"Wilcoxon one-sided, {test.method}, pairs per {unit}")
        out.append(entry)
    return out


def spread(entry: dict, seeds: int) -> float | None:
    """The ± of a summary cell in tables and plots of a run with `seeds` pretraining seeds: the
    sd over folds in a single-seed run, else the sd over seeds, and None for a model that was not
    pretrained (scratch: nothing to spread over)."""
    if seeds == 1:
        return entry["sd_auc"]
    return entry["sd_seeds"] if entry["n_seeds"] > 1 else None


def seed_count(summary: list[dict]) -> int:
    """The most pretraining seeds of any model in `summary` (1: a single-seed run)."""
    return max((s["n_seeds"] for s in summary), default=1)


def result_columns(summary: list[dict]) -> list[tuple[str, str]]:
    """The (task, protocol) columns of tables and plots: protocols outer, tasks inner, in the
    order they first appear."""
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    protocols = [p for p in PROTOCOLS if any(s["protocol"] == p for s in summary)]
    return [(t, p) for p in protocols for t in tasks]


def pretraining_rows(summaries: dict[tuple[str, int], dict]) -> list[dict]:
    """One row per pretraining run ({(loss, seed): `pretrain`'s summary}) for pretraining.csv."""
    return [{"loss": loss, "seed": seed, **{k: summary.get(k, "") for k in PRETRAINING_KEYS}}
            for (loss, seed), summary in summaries.items()]
