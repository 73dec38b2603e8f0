"""The example scripts end to end on a tiny synthetic problem: the files they write (the same
set and formats as the committed examples/results/), resuming, pretrain -> evaluate, torchrun.
The scripts run in this process (their `main(argv)`), except under torchrun."""
import csv
import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision", reason="the encoder is torchvision's ResNet-18 (extra 'examples')")
pytest.importorskip("matplotlib", reason="the scripts' figures (extra 'examples')")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "examples" / "results"
TINY_PRETRAINING = ["--epochs", "1", "--images-per-leaf", "1", "--image-size", "24",
                    "--batch-size", "8", "--embedding-points", "20"]
TINY_EVALUATION = ["--tasks", "thyroid", "--task-images", "12", "--folds", "3",
                   "--finetune-epochs", "1", "--probe-epochs", "2"]

pytestmark = pytest.mark.slow


def _main(script: str, *args) -> int:
    """Run examples/<script> as `python examples/<script> args...` would, in this process."""
    namespace = runpy.run_path(str(ROOT / "examples" / script), run_name="example_under_test")
    return namespace["main"]([str(a) for a in args])


def _header(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return next(csv.reader(fh))


def test_main_job_with_seeds_writes_the_committed_set_of_files_into_its_run_folder_and_resumes(
        tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the defaults are relative: runs/main_job/, never examples/
    args = ["--seeds", "2", *TINY_PRETRAINING, *TINY_EVALUATION]
    assert _main("main_job.py", *args) == 0
    first = capsys.readouterr().out
    results = tmp_path / "runs" / "main_job" / "results"
    assert not (tmp_path / "examples").exists()
    assert sorted(p.name for p in results.iterdir()) == sorted(p.name for p in RESULTS.iterdir())
    for name in ("fold_aucs.csv", "summary.csv", "pretraining.csv"):
        assert _header(results / name) == _header(RESULTS / name), name
    info = json.loads((results / "run_info.json").read_text())
    assert info.keys() == json.loads((RESULTS / "run_info.json").read_text()).keys()
    assert "--seeds" in info["command"] and info["synthetic_data"] is True
    assert info["pretraining_seeds"] == [0, 1]
    table = (results / "table.md").read_text()
    assert "| AUC (mean ± sd over 2 pretraining seeds) |" in table and "| modan > scratch |" in table
    assert "== downstream evaluation ==" in first and "main job done" in first
    with open(results / "fold_aucs.csv", newline="") as fh:
        seeds = {(row["model"], row["seed"]) for row in csv.DictReader(fh)}
    assert seeds == {(loss, seed) for loss in ("modan", "supcon", "simclr") for seed in "01"} | \
        {("scratch", "")}
    for loss in ("modan", "supcon", "simclr"):
        for seed in (0, 1):
            assert (tmp_path / "runs" / "main_job" / loss / f"seed{seed}" / "checkpoint_last.pt").is_file()

    first_aucs = (results / "fold_aucs.csv").read_text()
    assert _main("main_job.py", *args) == 0  # finished runs are resumed, not retrained
    again = capsys.readouterr().out
    assert again.count("after epoch 1") == 6 and "[modan] epoch" not in again
    assert (results / "fold_aucs.csv").read_text() == first_aucs  # seeded: the same AUCs
    with pytest.raises(SystemExit, match=r"main_job\.py: cannot resume .*number of images differs"):
        _main("main_job.py", *args, "--images-per-leaf", "2")  # other data into those runs


def test_pretrain_then_evaluate_its_checkpoint(tmp_path, capsys):
    run = tmp_path / "modan"
    assert _main("pretrain.py", "--loss", "modan", "--out", run, *TINY_PRETRAINING) == 0
    shown = capsys.readouterr().out
    assert "[modan] epoch 1/1" in shown and "'epochs_done': 1" in shown
    with pytest.raises(SystemExit, match=r"holds a run already: .*--resume.*--overwrite"):
        _main("pretrain.py", "--loss", "modan", "--out", run, *TINY_PRETRAINING)
    with pytest.raises(SystemExit, match=r"pretrain\.py: nothing to resume"):
        _main("pretrain.py", "--out", tmp_path / "empty", "--resume", *TINY_PRETRAINING)
    for name in ("checkpoint_last.pt", "metrics.csv", "config.json", "vocabulary.json",
                 "loss_curve.png", "embedding.png", "embedding.csv", "embedding_knn.json"):
        assert (run / name).is_file(), name
    out = tmp_path / "eval"
    assert _main("evaluate.py", "--checkpoint", f"modan={run / 'checkpoint_last.pt'}", "--out", out,
                 *TINY_EVALUATION) == 0
    shown = capsys.readouterr().out
    assert "| modan |" in shown and "| scratch |" in shown
    for name in ("fold_aucs.csv", "summary.csv", "table.md", "auc_bars.png"):
        assert (out / name).is_file(), name
    with open(out / "fold_aucs.csv") as fh:
        models = {row["model"] for row in csv.DictReader(fh)}
    assert models == {"modan", "scratch"}
    with pytest.raises(SystemExit, match="are both 'modan' with pretraining seed 0"):
        _main("evaluate.py", "--checkpoint", f"modan={run / 'checkpoint_last.pt'}",
              "--checkpoint", f"modan={run / 'checkpoint_last.pt'}", "--out", out, *TINY_EVALUATION)


@pytest.mark.parametrize("script, args, message", [
    ("evaluate.py", ["--checkpoint", "no_name.pt"], "expected NAME=PATH"),
    ("pretrain.py", ["--field-columns", "modality"], "field=column pairs"),
    ("main_job.py", ["--stem", "5x5"], "invalid choice"),
    ("main_job.py", ["--seeds", "0"], "--seeds must be at least 1"),
    ("pretrain.py", ["--resume", "--overwrite"], "not allowed with argument"),
])
def test_bad_arguments_are_usage_errors(tmp_path, capsys, script, args, message):
    with pytest.raises(SystemExit) as exit_info:
        _main(script, "--out", tmp_path, *args) if script != "main_job.py" else \
            _main(script, "--results", tmp_path, *args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("chunk_size", [0, 4], ids=["plain", "cached"])
def test_pretrain_under_torchrun_with_two_ranks(tmp_path, chunk_size):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(ROOT / "examples" / "pretrain.py"), "--out", str(tmp_path), *TINY_PRETRAINING,
               "--batch-size", "4", "--embedding-points", "0", "--threads", "1",
               "--chunk-size", str(chunk_size)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("generating the SYNTHETIC") == 1  # only rank 0 talks
    batch = "batch 4 images x 2 views x 2 ranks = 16 rows a step"
    assert batch + ("; gradient caching: chunks of 4 rows, 2 a rank a step" if chunk_size else
                    " (plain step: 8 rows a rank at once)") in done.stdout
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["batch_rows"] == "16"  # 2 views x 4 images x 2 ranks
    assert rows[0]["chunk_rows"] == str(chunk_size)
    assert (tmp_path / "checkpoint_last.pt").is_file()
