"""The files a run writes: every CSV (one writer, one reader), the evaluation's result files, and
the run information of a job."""
from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path

import torch

from .figures import bar_plot
from .summary import summarise
from .tables import markdown_table


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
    """Rows of equal keys as a CSV with a header (the first row's keys, in order)."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | os.PathLike, convert=str) -> list[dict]:
    """The rows of a CSV written by `write_csv`, each value passed through `convert`."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: convert(v) for k, v in row.items()} for row in csv.DictReader(fh)]


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


def write_run_info(path: str | os.PathLike, command: str, synthetic_data: bool, timings: dict,
                   pretrain_configs: dict, protocol, seeds: list[int] | None = None) -> None:
    """run_info.json: the command, its timings, every setting (`pretrain_configs` per loss, run
    with each of the pretraining `seeds`), and the machine it ran on: the results are
    bit-identical only on the same CPU, thread count and build."""
    info = {"command": command, "synthetic_data": synthetic_data, "timings": timings,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
            "pretraining_seeds": seeds if seeds is not None else
            sorted({v.seed for v in pretrain_configs.values()}),
            "pretrain_configs": {k: vars(v) for k, v in pretrain_configs.items()},
            "protocol": vars(protocol)}
    Path(path).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what `platform` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
