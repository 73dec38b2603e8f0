"""The results as markdown: a table of mean ± sd test AUC (models x task/protocol columns, the
layout of the paper's table of results), best mean in bold, and a table of the one-sided
Wilcoxon p-values of the method against each baseline."""
from __future__ import annotations

from ..evaluation import PROTOCOL_SHORT
from .summary import result_columns


def markdown_table(summary: list[dict], method: str, model_order: list[str]) -> str:
    columns = result_columns(summary)
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
