"""The report: summaries, markdown tables and the comparison with the paper reproduce the
committed results of the main job from its fold AUCs; CSV round trips; figures."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from modan_ext.data.records import DownstreamTask
from modan_ext.training.report import figures, files, paper, summary, tables

RESULTS = Path(__file__).resolve().parents[1] / "examples" / "results"
MODELS = ["modan", "supcon", "simclr", "scratch"]  # main_job's order: its losses, then scratch


def _committed_fold_rows() -> list[dict]:
    rows = files.read_csv(RESULTS / "fold_aucs.csv")
    for row in rows:
        row.update(repeat=int(row["repeat"]), fold=int(row["fold"]), auc=float(row["auc"]),
                   val_auc=float(row["val_auc"]), best_epoch=int(row["best_epoch"]),
                   seed=int(row["seed"]) if row["seed"] else "")
    return rows


def _rows(method_auc, baseline_auc):
    rows = []
    for model, base in (("modan", method_auc), ("scratch", baseline_auc)):
        for repeat in range(2):
            for fold in range(3):
                rows.append({"task": "acl", "protocol": "finetune", "model": model, "repeat": repeat,
                             "fold": fold, "auc": base + 0.01 * fold + 0.001 * repeat})
    return rows


def test_summary_table_and_files(tmp_path):
    rows = _rows(0.8, 0.7)
    cells = summary.summarise(rows, method="modan", unit="fold")
    cell = {s["model"]: s for s in cells}
    assert cell["modan"]["mean_auc"] == pytest.approx(0.8105, abs=1e-4)
    assert cell["scratch"]["p_method_greater"] == pytest.approx(1 / 64, abs=1e-6)  # 6 positive pairs
    by_repeat = {s["model"]: s for s in summary.summarise(rows, "modan", unit="repeat")}
    assert by_repeat["scratch"]["p_method_greater"] == pytest.approx(1 / 4, abs=1e-6)
    written = files.write_results(rows, tmp_path, "modan", ["modan", "scratch"], log=lambda *_: None)
    assert "| modan | **0.810 ± " in written["table"] and "modan > scratch" in written["table"]
    for name in ("fold_aucs.csv", "summary.csv", "table.md"):
        assert (tmp_path / name).is_file()


def test_committed_summary_and_tables_are_reproduced_from_the_fold_aucs(tmp_path):
    rows = _committed_fold_rows()
    written = files.write_results(rows, tmp_path, "modan", MODELS, log=lambda *_: None)
    assert (tmp_path / "summary.csv").read_bytes() == (RESULTS / "summary.csv").read_bytes()
    assert written["table"] == (RESULTS / "table.md").read_text()
    assert (tmp_path / "fold_aucs.csv").read_bytes() == (RESULTS / "fold_aucs.csv").read_bytes()
    comparison = paper.comparison_markdown(written["summary"])
    assert comparison == (RESULTS / "comparison.md").read_text()


def _seeded_rows():
    """modan pretrained with seeds 0 and 1 (AUC 0.8 and 0.7 + 0.01 fold), scratch without seeds."""
    rows = []
    for fold in range(5):
        for seed, base in ((0, 0.8), (1, 0.7)):
            rows.append({"task": "acl", "protocol": "finetune", "model": "modan", "seed": seed,
                         "repeat": 0, "fold": fold, "auc": base + 0.01 * fold})
        rows.append({"task": "acl", "protocol": "finetune", "model": "scratch", "seed": "",
                     "repeat": 0, "fold": fold, "auc": 0.6 + 0.02 * fold})
    return rows


def test_seeds_give_mean_and_sd_over_seeds_and_pairs_averaged_over_seeds():
    cells = {s["model"]: s for s in summary.summarise(_seeded_rows(), "modan")}
    modan, scratch = cells["modan"], cells["scratch"]
    assert modan["mean_auc"] == pytest.approx(0.77) and modan["n_seeds"] == 2
    assert modan["sd_seeds"] == pytest.approx(0.1 / np.sqrt(2), abs=1e-4)  # sd of (0.82, 0.72)
    assert modan["n_folds"] == 5 and modan["sd_auc"] == pytest.approx(np.std([0.75, 0.76, 0.77, 0.78, 0.79], ddof=1), abs=1e-4)
    assert scratch["n_seeds"] == 1 and scratch["sd_seeds"] == ""
    # pairs per fold of the seed means: 0.75 + 0.01k vs 0.6 + 0.02k, all positive: p = 1/32
    assert scratch["test_pairs"] == 5 and scratch["p_method_greater"] == pytest.approx(1 / 32)
    table = tables.markdown_table(list(cells.values()), "modan", ["modan", "scratch"])
    assert "| AUC (mean ± sd over 2 pretraining seeds) | acl FT |" in table
    assert "| modan | **0.770 ± 0.071** |" in table and "| scratch | 0.640 |" in table
    assert "scratch: one encoder per fold, no seeds" in table
    assert "5 pairs; a pretrained model's AUC per split is its mean over the seeds):" in table


def test_one_seed_keeps_the_fold_sd_in_the_table():
    rows = [r for r in _seeded_rows() if r["seed"] != 1]
    cells = summary.summarise(rows, "modan")
    table = tables.markdown_table(cells, "modan", ["modan", "scratch"])
    assert "| AUC (mean ± sd) |" in table and "| modan | **0.820 ± 0.016** |" in table
    assert "| scratch | 0.640 ± 0.032 |" in table and "seeds" not in table


def test_comparison_uses_the_papers_rows_and_only_present_columns():
    cells = summary.summarise(_rows(0.8, 0.7), "modan")
    text = paper.comparison_markdown(cells)
    assert "| modan → ModAn-MulSupCon | 0.810 / 0.964 |" in text
    assert "| scratch → scratch | 0.711 / 0.907 |" in text
    assert "breast" not in text and "LP" not in text
    assert "| acl FT | modan | modan → ModAn-MulSupCon | – | – |" in text


def test_result_columns_put_protocols_outside_tasks():
    cells = [{"task": t, "protocol": p} for p in ("linear", "finetune") for t in ("b", "a")]
    assert summary.result_columns(cells) == [("b", "finetune"), ("a", "finetune"),
                                             ("b", "linear"), ("a", "linear")]


def test_markdown_table_marks_missing_cells_and_bolds_the_best():
    cells = summary.summarise(_rows(0.8, 0.7), "modan")
    text = tables.markdown_table(cells, "modan", ["modan", "supcon", "scratch"])
    assert "| supcon | – |" in text and "| modan | **0.810 ± 0.009** |" in text
    assert "| modan > supcon | – |" in text and "| modan > scratch | 0.0156 |" in text


def test_pretraining_rows_keep_run_order_and_blank_missing_values():
    rows = summary.pretraining_rows({("simclr", 0): {"epochs_done": 2, "final_loss": 1.5, "knn5_leaf": 0.3},
                                     ("modan", 3): {"epochs_done": 2}})
    assert [(r["loss"], r["seed"]) for r in rows] == [("simclr", 0), ("modan", 3)]
    assert list(rows[0]) == ["loss", "seed", *summary.PRETRAINING_KEYS]
    assert rows[0]["knn5_leaf"] == 0.3 and rows[1]["final_loss"] == ""


def test_csv_round_trip_and_empty_rows(tmp_path):
    rows = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    files.write_csv(rows, tmp_path / "m.csv")
    assert (tmp_path / "m.csv").read_bytes() == b"epoch,loss\r\n1,0.5\r\n2,0.25\r\n"
    assert files.read_csv(tmp_path / "m.csv", float) == [{"epoch": 1.0, "loss": 0.5},
                                                           {"epoch": 2.0, "loss": 0.25}]
    with pytest.raises(ValueError, match="no rows"):
        files.write_csv([], tmp_path / "empty.csv")


def test_run_info_records_settings_and_machine(tmp_path):
    from modan_ext.training.evaluation import ProtocolConfig
    from modan_ext.training.pretraining import PretrainConfig
    files.write_run_info(tmp_path / "run_info.json", "main_job.py --epochs 1", True, {"total_s": 1.0},
                         {"modan": PretrainConfig(epochs=1)}, ProtocolConfig(), [0, 1, 2])
    import json
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["command"] == "main_job.py --epochs 1" and info["synthetic_data"] is True
    assert info["pretrain_configs"]["modan"]["epochs"] == 1 and info["protocol"]["repeats"] == 1
    assert info["torch"] == torch.__version__ and info["torch_threads"] == torch.get_num_threads()
    # what bit-identical results depend on: the CPU's kernels and the thread count
    assert info["cpu"] and info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["pretraining_seeds"] == [0, 1, 2]


def test_task_sheet_rows_are_negatives_then_positives():
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    task = DownstreamTask("t", images, np.array([1, 0, 1, 0, 0, 1]), [])
    sheet = figures.task_sheet([task, task], per_class=2)
    assert sheet.shape == (4, 8) and sheet[0, ::2].tolist() == [1, 3, 0, 2]


def test_figures_are_written_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    history = [{"epoch": 1, "loss": 4.0}, {"epoch": 2, "loss": 3.0}]
    assert figures.plot_loss_curves({"modan": history}, tmp_path / "one.png") == str(tmp_path / "one.png")
    figures.plot_loss_curves({"modan": history, "simclr": history}, tmp_path / "two.png", relative=True)
    cells = summary.summarise(_rows(0.8, 0.7), "modan")
    figures.bar_plot(cells, ["modan", "scratch"], tmp_path / "bars.png")
    coords = np.random.default_rng(0).normal(size=(10, 2))
    figures.plot_embedding(coords, {"modality": np.array([0, 1] * 5)}, {"modality": ("CT", "MR")},
                           {"modality": "by modality"}, tmp_path / "map.png")
    for name in ("one.png", "two.png", "bars.png", "map.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_skipped_with_a_message_without_matplotlib(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    messages = []
    assert figures.plot_loss_curves({"m": [{"epoch": 1, "loss": 1.0}]}, tmp_path / "x.png",
                                    log=messages.append) is None
    assert "matplotlib is not installed" in messages[0] and not (tmp_path / "x.png").exists()


def test_committed_fold_file_has_the_documented_columns():
    with open(RESULTS / "fold_aucs.csv") as fh:
        header = next(csv.reader(fh))
    assert header == ["task", "protocol", "model", "seed", "repeat", "fold", "auc", "val_auc",
                      "best_epoch"]
