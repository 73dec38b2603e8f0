"""The example scripts end to end on a tiny synthetic problem: the files they write (the same
set and formats as the committed examples/results/), resuming, pretrain -> evaluate."""
import csv
import json
import os
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
                    "--batch-size", "8", "--embedding-points", "20", "--threads", "1"]
TINY_EVALUATION = ["--tasks", "thyroid", "--task-images", "12", "--folds", "3",
                   "--finetune-epochs", "1", "--probe-epochs", "2"]

pytestmark = pytest.mark.slow


def _run(script: str, *args, expect: int = 0, launcher=()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *launcher, str(ROOT / "examples" / script),
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == expect, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _header(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return next(csv.reader(fh))


def test_main_job_writes_the_committed_set_of_files_and_resumes(tmp_path):
    args = ["--run-dir", tmp_path / "run", "--results", tmp_path / "results",
            *TINY_PRETRAINING, *TINY_EVALUATION]
    first = _run("main_job.py", *args)
    results = tmp_path / "results"
    assert sorted(p.name for p in results.iterdir()) == sorted(p.name for p in RESULTS.iterdir())
    for name in ("fold_aucs.csv", "summary.csv", "pretraining.csv"):
        assert _header(results / name) == _header(RESULTS / name), name
    info = json.loads((results / "run_info.json").read_text())
    assert info.keys() == json.loads((RESULTS / "run_info.json").read_text()).keys()
    assert info["command"].startswith("main_job.py --run-dir") and info["synthetic_data"] is True
    assert "| modan > scratch |" in (results / "table.md").read_text()
    assert "== downstream evaluation ==" in first.stdout and "main job done" in first.stdout

    first_aucs = (results / "fold_aucs.csv").read_text()
    again = _run("main_job.py", *args)  # finished runs are resumed, not retrained
    assert again.stdout.count("after epoch 1") == 3
    assert "[modan] epoch" not in again.stdout
    assert (results / "fold_aucs.csv").read_text() == first_aucs  # seeded: the same AUCs


def test_pretrain_then_evaluate_its_checkpoint(tmp_path):
    run = tmp_path / "modan"
    done = _run("pretrain.py", "--loss", "modan", "--out", run, *TINY_PRETRAINING)
    assert "[modan] epoch 1/1" in done.stdout and "'epochs_done': 1" in done.stdout
    for name in ("checkpoint_last.pt", "metrics.csv", "config.json", "vocabulary.json",
                 "loss_curve.png", "embedding.png", "embedding.csv", "embedding_knn.json"):
        assert (run / name).is_file(), name
    out = tmp_path / "eval"
    done = _run("evaluate.py", "--checkpoint", f"modan={run / 'checkpoint_last.pt'}", "--out", out,
                *TINY_EVALUATION)
    assert "| modan |" in done.stdout and "| scratch |" in done.stdout
    for name in ("fold_aucs.csv", "summary.csv", "table.md", "auc_bars.png"):
        assert (out / name).is_file(), name
    with open(out / "fold_aucs.csv") as fh:
        models = {row["model"] for row in csv.DictReader(fh)}
    assert models == {"modan", "scratch"}


def test_bad_arguments_are_reported(tmp_path):
    done = _run("evaluate.py", "--checkpoint", "no_name.pt", "--out", tmp_path, expect=2)
    assert "expected NAME=PATH" in done.stderr
    done = _run("pretrain.py", "--out", tmp_path, "--field-columns", "modality", expect=2)
    assert "field=column pairs" in done.stderr


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_pretrain_under_torchrun_with_two_ranks(tmp_path):
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port()))
    done = _run("pretrain.py", "--out", tmp_path, *TINY_PRETRAINING, "--batch-size", "4",
                "--embedding-points", "0", launcher=launcher)
    assert done.stdout.count("generating the SYNTHETIC") == 1  # only rank 0 talks
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["batch_rows"] == "16"  # 2 views x 4 images x 2 ranks
    assert (tmp_path / "checkpoint_last.pt").is_file()
