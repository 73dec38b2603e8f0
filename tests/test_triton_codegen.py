"""The Hopper code-generation check of the Triton kernels, in CI without a GPU.

`python -m modan_ext.triton_backend.codegen` compiles every kernel variant for sm_90 and checks
what the compiler made of it (tensor cores, spills, shared memory, POPC, atomics; see its
docstring), then traces the ops as torch.compile does. Compiling needs a process without
TRITON_INTERPRET (the interpreter tests set it in this one), so the check runs in a subprocess;
it reuses Triton's kernel cache (--cache), so a second run costs seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("triton")


def test_hopper_codegen(tmp_path):
    out = tmp_path / "codegen.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "modan_ext.triton_backend.codegen", "--cache",
                           "--jobs", "2", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    print(proc.stdout)  # the table (pytest -rP or -s shows it)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    rows = report["rows"]
    kinds = {(r["kernel"], r["precision"]) for r in rows}
    assert kinds == {(k, p) for k in ("forward", "backward")
                     for p in ("tf32", "tf32x3", "fp16", "bf16", "fp64")}
    assert all(r["target"] == "sm_90a" for r in rows)
    main = [r for r in rows if r["main"]]
    assert len(main) == 20  # D = 128: every kernel, precision and label-word specialisation
    assert "torch.compile trace (fake CUDA tensors): ok" in proc.stdout
