"""The paper's results and ours next to them.

The figures are the paper's own: Takaya & Inamori 2025, "ModAn-MulSupCon" (arXiv 2508.18613),
table of results: test AUC, mean over 5 folds x 10 repeats, fine-tuning (FT) and linear probing
(LP) on ACL tear (MRNet), breast (BUSI) and thyroid ultrasound.
"""
from __future__ import annotations

from ..evaluation import PROTOCOL_SHORT

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


def comparison_markdown(summary: list[dict]) -> str:
    """Ours next to the paper's numbers, and which model wins each column in both."""
    ours = {(s["model"], f"{s['task']} {PROTOCOL_SHORT[s['protocol']]}"): s["mean_auc"]
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
