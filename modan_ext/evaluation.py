"""Downstream evaluation like the paper's §3, with its protocol flaws fixed.

For every task, encoder and protocol: fixed k-fold splits (train / val / test), repeated R times
with different training seeds; AUC on the test part of every fold; mean ± sd; a one-sided
Wilcoxon signed-rank test of the method against each baseline, paired on the same splits and
seeds. Fixed relative to the authors' code:

* a proper 2-way head (``Linear(512, 2)``) on the encoder, for every model;
* model selection: the epoch with the best validation AUC is the one tested;
* linear probing keeps the encoder frozen *including BatchNorm* (features computed in eval mode,
  once; no augmentation), and trains the head on standardised features.

AUC and the Wilcoxon test are implemented here (rank-based AUC with tie handling; exact
signed-rank distribution for n <= 25, normal approximation with tie correction above).
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .pretraining import build_encoder, encode_images, import_pyplot, normalise_pixels
from .readers import DownstreamTask

PROTOCOLS = ("finetune", "linear")
PROTOCOL_SHORT = {"finetune": "FT", "linear": "LP"}


# ---- statistics -------------------------------------------------------------------------------

def average_ranks(values) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop + 1]] = 0.5 * (start + stop) + 1.0
        start = stop + 1
    return ranks


def roc_auc(targets, scores) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative) + 0.5 P(tie),
    from the Mann-Whitney rank sum."""
    targets = np.asarray(targets).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if targets.shape != scores.shape:
        raise ValueError(f"{targets.shape[0]} targets but {scores.shape[0]} scores")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or Inf")
    n_pos, n_neg = int(targets.sum()), int((~targets).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes among the targets")
    ranks = average_ranks(scores)
    return float((ranks[targets].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class WilcoxonResult:
    statistic: float   # W+ : sum of the ranks of the positive differences
    p_value: float
    n: int             # non-zero differences used
    method: str        # "exact" or "normal"


def wilcoxon_signed_rank(x, y=None, alternative: str = "greater",
                         exact_max_n: int = 25) -> WilcoxonResult:
    """Wilcoxon signed-rank test of the paired differences d = x - y (or d = x).

    alternative "greater": H1 is that d tends to be positive (x better than y); "less", or
    "two-sided". Zero differences are dropped (Wilcoxon's convention). For n <= `exact_max_n`
    the p-value is exact: the null distribution of W+ is enumerated over all 2^n sign patterns
    (by dynamic programming on doubled ranks, so tied half-ranks stay integers). Above that, a
    normal approximation with tie correction and continuity correction.
    """
    d = np.asarray(x, dtype=np.float64) - (0.0 if y is None else np.asarray(y, dtype=np.float64))
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided'; got {alternative!r}")
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return WilcoxonResult(0.0, 1.0, 0, "exact")
    ranks = average_ranks(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    if n <= exact_max_n:
        doubled = np.round(2 * ranks).astype(np.int64)
        counts = np.zeros(int(doubled.sum()) + 1, dtype=np.float64)
        counts[0] = 1.0
        for r in doubled:  # each rank is either in W+ or not
            shifted = np.zeros_like(counts)
            shifted[r:] = counts[:-r] if r > 0 else counts
            counts = counts + shifted
        probs = counts / counts.sum()
        w2 = int(round(2 * w_plus))
        p_ge, p_le = float(probs[w2:].sum()), float(probs[:w2 + 1].sum())
        p = {"greater": p_ge, "less": p_le, "two-sided": min(1.0, 2 * min(p_ge, p_le))}[alternative]
        return WilcoxonResult(w_plus, p, n, "exact")
    mean = n * (n + 1) / 4
    _, tie_counts = np.unique(ranks, return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - (tie_counts ** 3 - tie_counts).sum() / 48
    sd = math.sqrt(var)

    def upper(w):  # P(W+ >= w)
        return 0.5 * math.erfc((w - 0.5 - mean) / sd / math.sqrt(2))

    def lower(w):  # P(W+ <= w)
        return 0.5 * math.erfc((mean - w - 0.5) / sd / math.sqrt(2))
    p = {"greater": upper(w_plus), "less": lower(w_plus),
         "two-sided": min(1.0, 2 * min(upper(w_plus), lower(w_plus)))}[alternative]
    return WilcoxonResult(w_plus, float(p), n, "normal")


# ---- training on one fold ---------------------------------------------------------------------

@dataclass
class ProtocolConfig:
    """Downstream protocol. The defaults fit the CPU main job; `paper()` is the paper's: 5 folds
    x 10 repeats, 10 epochs, batch 32, Adam 1e-4, StepLR(5, 0.1)."""

    repeats: int = 1
    finetune_epochs: int = 5
    finetune_batch_size: int = 16  # ~120 training images: batch 16 gives 8 steps per epoch
    finetune_lr: float = 1e-4
    step_size: int = 4
    gamma: float = 0.1
    probe_epochs: int = 100        # on cached features: cheap, so trained to convergence
    probe_lr: float = 1e-3
    probe_batch_size: int = 64
    probe_eval_every: int = 5
    augment: bool = True           # fine-tuning only: random flip + small shift
    test_unit: str = "fold"        # Wilcoxon pairs: "fold" (k x R) or "repeat" (R fold-means)
    seed: int = 0

    def __post_init__(self):
        if self.test_unit not in ("fold", "repeat"):
            raise ValueError(f"test_unit must be 'fold' or 'repeat'; got {self.test_unit!r}")

    @classmethod
    def paper(cls, **overrides) -> "ProtocolConfig":
        settings = dict(repeats=10, finetune_epochs=10, finetune_batch_size=32, step_size=5,
                        test_unit="repeat")
        settings.update(overrides)
        return cls(**settings)


class Classifier(nn.Module):
    """Encoder + 2-way linear head (the paper's code fed 512-d features to cross-entropy)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(512, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


def _scores(logits: torch.Tensor) -> np.ndarray:
    return (logits[:, 1] - logits[:, 0]).float().cpu().numpy()  # log-odds of class 1


def _light_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fine-tuning augmentation: horizontal flip and a shift of up to 1/16 of the side."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)
    pad = max(1, h // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]


@torch.no_grad()
def _predict(model: nn.Module, images_uint8: torch.Tensor, device, batch: int = 256) -> np.ndarray:
    model.eval()
    return np.concatenate([_scores(model(normalise_pixels(images_uint8[i:i + batch].to(device))))
                           for i in range(0, len(images_uint8), batch)])


def finetune_fold(init_state: dict | None, stem: str, task: DownstreamTask, fold, cfg: ProtocolConfig,
                  seed: int, device) -> dict:
    """Fine-tune encoder + head on the fold's train part; return the test AUC of the epoch with
    the best validation AUC. `init_state` None: from scratch (a random init drawn from `seed`)."""
    train, val, test = fold
    torch.manual_seed(seed)
    encoder = build_encoder(stem)
    if init_state is not None:
        encoder.load_state_dict(init_state)
    model = Classifier(encoder).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.finetune_lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    generator = torch.Generator().manual_seed(seed)
    targets = torch.from_numpy(task.targets)
    best = (-1.0, None, -1)
    for epoch in range(cfg.finetune_epochs):
        model.train()
        order = torch.from_numpy(train)[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(order), cfg.finetune_batch_size):
            idx = order[start:start + cfg.finetune_batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = normalise_pixels(task.images[idx]).to(device)
            if cfg.augment:
                x = _light_augment(x, generator)
            loss = F.cross_entropy(model(x), targets[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        val_auc = roc_auc(task.targets[val], _predict(model, task.images[val], device))
        if val_auc > best[0]:
            best = (val_auc, {k: v.detach().clone() for k, v in model.state_dict().items()}, epoch + 1)
    model.load_state_dict(best[1])
    test_auc = roc_auc(task.targets[test], _predict(model, task.images[test], device))
    return {"auc": test_auc, "val_auc": best[0], "best_epoch": best[2]}


def linear_probe_fold(features: torch.Tensor, task: DownstreamTask, fold, cfg: ProtocolConfig,
                      seed: int) -> dict:
    """Train a 2-way linear head on frozen features (standardised with the train part's mean
    and sd); test the checkpoint with the best validation AUC."""
    train, val, test = fold
    mean, std = features[train].mean(0), features[train].std(0).clamp_min(1e-6)
    z = (features - mean) / std
    targets = torch.from_numpy(task.targets)
    torch.manual_seed(seed)
    head = nn.Linear(z.shape[1], 2)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.probe_lr)
    generator = torch.Generator().manual_seed(seed)
    best = (-1.0, None, -1)
    for epoch in range(cfg.probe_epochs):
        order = torch.from_numpy(train)[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(order), cfg.probe_batch_size):
            idx = order[start:start + cfg.probe_batch_size]
            loss = F.cross_entropy(head(z[idx]), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if (epoch + 1) % cfg.probe_eval_every == 0 or epoch + 1 == cfg.probe_epochs:
            with torch.no_grad():
                val_auc = roc_auc(task.targets[val], _scores(head(z[val])))
            if val_auc > best[0]:
                best = (val_auc, {k: v.clone() for k, v in head.state_dict().items()}, epoch + 1)
    head.load_state_dict(best[1])
    with torch.no_grad():
        test_auc = roc_auc(task.targets[test], _scores(head(z[test])))
    return {"auc": test_auc, "val_auc": best[0], "best_epoch": best[2]}


# ---- the whole grid ---------------------------------------------------------------------------

@dataclass
class Encoder:
    """A model to evaluate: a name, its encoder weights (None: scratch) and its stem."""

    name: str
    state: dict | None
    stem: str = "7x7"


def fold_seed(base: int, repeat: int, fold: int) -> int:
    """Shared by every model on a (repeat, fold): the comparisons are paired."""
    return base * 100_003 + repeat * 1_009 + fold


def evaluate(encoders: list[Encoder], tasks: list[DownstreamTask], cfg: ProtocolConfig,
             protocols=PROTOCOLS, device=None, log=print) -> list[dict]:
    """AUC of every (task, protocol, encoder, repeat, fold); one row each."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for task in tasks:
        for protocol in protocols:
            for enc in encoders:
                started = time.perf_counter()
                aucs = []
                for repeat in range(cfg.repeats):
                    features = None
                    if protocol == "linear":
                        torch.manual_seed(fold_seed(cfg.seed, repeat, -1))  # scratch: a fresh init
                        encoder = build_encoder(enc.stem)
                        if enc.state is not None:
                            encoder.load_state_dict(enc.state)
                        features = encode_images(encoder.to(device), task.images)
                    for k, fold in enumerate(task.folds):
                        seed = fold_seed(cfg.seed, repeat, k)
                        if protocol == "linear":
                            result = linear_probe_fold(features, task, fold, cfg, seed)
                        else:
                            result = finetune_fold(enc.state, enc.stem, task, fold, cfg, seed, device)
                        aucs.append(result["auc"])
                        rows.append({"task": task.name, "protocol": protocol, "model": enc.name,
                                     "repeat": repeat, "fold": k, "auc": round(result["auc"], 6),
                                     "val_auc": round(result["val_auc"], 6),
                                     "best_epoch": result["best_epoch"]})
                log(f"{task.name:>8} {PROTOCOL_SHORT[protocol]} {enc.name:>8}: AUC "
                    f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1) if len(aucs) > 1 else 0:.3f} "
                    f"({len(aucs)} folds, {time.perf_counter() - started:.0f} s)")
    return rows


# ---- summaries and tables ---------------------------------------------------------------------

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


def _columns(summary):
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    protocols = [p for p in PROTOCOLS if any(s["protocol"] == p for s in summary)]
    return [(t, p) for p in protocols for t in tasks]


def markdown_table(summary: list[dict], method: str, model_order: list[str]) -> str:
    """Rows = models, columns = task x protocol (paper-notes §3 layout); best mean in bold;
    a second table with the one-sided p-values of `method` against each baseline."""
    columns = _columns(summary)
    cell = {(s["task"], s["protocol"], s["model"]): s for s in summary}
    head = "| AUC (mean ± sd) | " + " | ".join(f"{t} {PROTOCOL_SHORT[p]}" for t, p in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    best = {c: max(cell[(*c, m)]["mean_auc"] for m in model_order if (*c, m) in cell) for c in columns}
    for model in model_order:
        cells = []
        for c in columns:
            s = cell.get((*c, model))
            if s is None:
                cells.append("–")
                continue
            text = f"{s['mean_auc']:.3f} ± {s['sd_auc']:.3f}"
            cells.append(f"**{text}**" if s["mean_auc"] == best[c] else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    tests = [s for s in summary if s["p_method_greater"] != ""]
    if tests:
        lines += ["", f"One-sided Wilcoxon signed-rank p-values, H1: {method} > baseline "
                      f"({tests[0]['test']}, {tests[0]['test_pairs']} pairs):", "",
                  "| p | " + " | ".join(f"{t} {PROTOCOL_SHORT[p]}" for t, p in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for model in model_order:
            if model == method:
                continue
            ps = [cell.get((*c, model), {}).get("p_method_greater", "") for c in columns]
            lines.append(f"| {method} > {model} | " +
                         " | ".join(f"{p:.4f}" if p != "" else "–" for p in ps) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def bar_plot(summary: list[dict], model_order: list[str], path: Path, log=print) -> str | None:
    plt = import_pyplot(log)
    if plt is None:
        return None
    columns = _columns(summary)
    cell = {(s["task"], s["protocol"], s["model"]): s for s in summary}
    width = 0.8 / max(len(model_order), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(columns), 3.6))
    for i, model in enumerate(model_order):
        xs = [j + (i - (len(model_order) - 1) / 2) * width for j in range(len(columns))]
        means = [cell[(*c, model)]["mean_auc"] if (*c, model) in cell else np.nan for c in columns]
        sds = [cell[(*c, model)]["sd_auc"] if (*c, model) in cell else 0 for c in columns]
        ax.bar(xs, means, width, yerr=sds, capsize=2, label=model)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([f"{t}\n{PROTOCOL_SHORT[p]}" for t, p in columns])
    ax.set_ylabel("test AUC (mean ± sd over folds)")
    lowest = min((s["mean_auc"] - s["sd_auc"] for s in summary), default=0.4)
    ax.set_ylim(min(0.4, max(0.0, lowest - 0.05)), 1.0)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8, ncol=len(model_order), loc="upper center", bbox_to_anchor=(0.5, 1.15),
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_results(rows: list[dict], out_dir, method: str, model_order: list[str],
                  unit: str = "fold", log=print) -> dict:
    """fold_aucs.csv, summary.csv, table.md and auc_bars.png in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows, method, unit)
    write_csv(rows, out / "fold_aucs.csv")
    write_csv(summary, out / "summary.csv")
    table = markdown_table(summary, method, model_order)
    (out / "table.md").write_text(table, encoding="utf-8")
    plot = bar_plot(summary, model_order, out / "auc_bars.png", log)
    return {"summary": summary, "table": table, "plot": plot}
