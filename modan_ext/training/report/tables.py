"""The results as markdown: a table of mean ± sd test AUC (models x task/protocol columns, the
layout of the paper's table of results), best mean in bold, and a table of the one-sided
Wilcoxon p-values of the method against each baseline. The ± is the sd over folds, or over
pretraining seeds when the run had several (`summary.spread`)."""
from __future__ import annotations

from ..evaluation import PROTOCOL_SHORT
from .summary import result_columns, seed_count, spread


def markdown_table(summary: list[dict], method: str, model_order: list[str]) -> str:
    columns = result_columns(summary)
    cell = {(s["task"], s["protocol"], s["model"]): s for s in summary}
    seeds = seed_count(summary)
    over = f"sd over {seeds} pretraining seeds" if seeds > 1 else "sd"
    head = f"| AUC (mean ± {over}) | " + " | ".join(f"{t} {PROTOCOL_SHORT[p]}" for t, p in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    best = {c: max(cell[(*c, m)]["mean_auc"] for m in model_order if (*c, m) in cell) for c in columns}
    single = set()
    for model in model_order:
        cells = []
        for c in columns:
            s = cell.get((*c, model))
            if s is None:
                cells.append("–")
                continue
            sd = spread(s, seeds)
            if sd is None:
                single.add(model)
                text = f"{s['mean_auc']:.3f}"
            else:
                text = f"{s['mean_auc']:.3f} ± {sd:.3f}"
            cells.append(f"**{text}**" if s["mean_auc"] == best[c] else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if seeds > 1:
        n_folds = max(s["n_folds"] for s in summary)
        lines += ["", f"Each seed's value is its mean over {n_folds} folds (× repeats); the ± is "
                      f"the sd of those means over the pretraining seeds"
                  + (f"; {', '.join(sorted(single))}: one encoder per fold, no seeds (sd over "
                     "folds in summary.csv)" if single else "") + "."]
    tests = [s for s in summary if s["p_method_greater"] != ""]
    if tests:
        averaged = "; a pretrained model's AUC per split is its mean over the seeds" \
            if seeds > 1 else ""
        lines += ["", f"One-sided Wilcoxon signed-rank p-values, H1: {method} > baseline "
                      f"({tests[0]['test']}, {tests[0]['test_pairs']} pairs{averaged}):", "",
                  "| p | " + " | ".join(f"{t} {PROTOCOL_SHORT[p]}" for t, p in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for model in model_order:
            if model == method:
                continue
            ps = [cell.get((*c, model), {}).get("p_method_greater", "") for c in columns]
            lines.append(f"| {method} > {model} | " +
                         " | ".join(f"{p:.4f}" if p != "" else "–" for p in ps) + " |")
    return "\n".join(lines) + "\n"
