"""The Triton backend in the package: backend choice, errors, the first-use check and
`python -m modan_ext.selftest`, and gather_distributed=True with Triton kernels."""
from __future__ import annotations

import triton_setup  # noqa: F401  (first: decides where the kernels run)

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import modan_ext
from loss_cases import Spec, assert_close, build, reference_fn, run_loss
from modan_ext import distributed, loss as loss_module, ops, selftest
from modan_ext._validation import check_options
from triton_setup import DEVICE, INTERPRETED, requires_device, triton_fn

ROOT = Path(__file__).resolve().parent.parent
interpreter_only = pytest.mark.skipif(not INTERPRETED,
                                      reason="needs the Triton interpreter (CPU tensors)")


def _env(**changes):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


# ---- backend choice -----------------------------------------------------------------------------

@requires_device
def test_explicit_triton_backend_is_reported():
    assert modan_ext.resolve_backend("triton", DEVICE) == "triton"
    assert modan_ext.JaccardSupConLoss(backend="triton").backend_for(DEVICE) == "triton"


def test_auto_prefers_triton_on_cuda(monkeypatch):
    """"auto" on CUDA: Triton when it can serve the device, else the CUDA C++ kernel, else the
    reference (with the usual warning). CPU: the C++ kernel, never the interpreter."""
    monkeypatch.setattr(loss_module.triton_backend, "unavailable_reason", lambda device: None)
    assert modan_ext.resolve_backend("auto", "cuda:0") == "triton"
    monkeypatch.setattr(loss_module.triton_backend, "unavailable_reason",
                        lambda device: "no GPU here")
    monkeypatch.setattr(ops, "kernel_available", lambda device: True)
    assert modan_ext.resolve_backend("auto", "cuda:0") == "kernel"
    monkeypatch.setattr(ops, "kernel_available", lambda device: False)
    assert modan_ext.resolve_backend("auto", "cuda:0") == "reference"
    with pytest.raises(RuntimeError, match="backend='triton' cannot serve cuda:0: no GPU here"):
        modan_ext.resolve_backend("triton", "cuda:0")
    monkeypatch.undo()
    if modan_ext.kernel_available("cpu"):
        assert modan_ext.resolve_backend("auto", "cpu") == "kernel"


def test_cpu_tensors_without_the_interpreter_raise_a_clear_error():
    """In a process without TRITON_INTERPRET, backend='triton' on CPU tensors says what to do."""
    code = ("import torch, modan_ext\n"
            "try:\n"
            "    modan_ext.jaccard_supcon_loss(torch.randn(4, 2, 3), backend='triton')\n"
            "except RuntimeError as e:\n"
            "    print('ERROR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(TRITON_INTERPRET=None),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERROR backend='triton' cannot serve cpu" in proc.stdout, proc.stdout
    assert "TRITON_INTERPRET=1" in proc.stdout and "CUDA" in proc.stdout, proc.stdout


# ---- raw-op checks ------------------------------------------------------------------------------

@requires_device
def test_raw_op_rejects_bad_problems():
    from modan_ext.triton_backend import op
    z = torch.randn(8, 4, device=DEVICE)
    y = torch.zeros(4, 1, dtype=torch.int64, device=DEVICE)
    good = dict(label_kind=1, views=2, anchor_begin=0, anchor_end=8, first_view_only=False,
                temperature=0.1, base_temperature=0.07, threshold=0.3, weighting=0,
                normalization=0, allow_tf32=False)
    bad = [(dict(views=3), "must be labels.size"), (dict(views=0), "views must be >= 1"),
           (dict(anchor_end=9), "anchor range"), (dict(anchor_begin=5, anchor_end=4),
                                                   "anchor range"),
           (dict(temperature=0.0), "temperature must be finite and > 0"),
           (dict(base_temperature=float("inf")), "base_temperature"),
           (dict(weighting=5), "weighting must be in 0..4"),
           (dict(normalization=2), "normalization must be"), (dict(label_kind=2), "label_kind")]
    for change, message in bad:
        with pytest.raises(RuntimeError, match=message):
            op.triton_supcon_fwd(z, y, **dict(good, **change))
    with pytest.raises(RuntimeError, match="int64"):
        op.triton_supcon_fwd(z, y.int(), **good)
    with pytest.raises(RuntimeError, match="contiguous"):
        op.triton_supcon_fwd(torch.randn(4, 8, device=DEVICE).T, y, **good)
    with pytest.raises(RuntimeError, match=r"\[B, 1\] for class ids"):
        op.triton_supcon_fwd(z, torch.zeros(4, 2, dtype=torch.int64, device=DEVICE), **good)
    with pytest.raises(RuntimeError, match="stats must be"):
        op.triton_supcon_bwd(torch.ones(8, device=DEVICE), z, y,
                             torch.zeros(8, 4, dtype=torch.float64, device=DEVICE),
                             *good.values())


# ---- first-use check ------------------------------------------------------------------------------

@requires_device
def test_first_use_check_passes_and_runs_once(monkeypatch):
    calls = []
    real = selftest.check
    monkeypatch.setattr(selftest, "check", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(selftest, "_checked", set())
    case = build(Spec(images=6, views=2, dim=8, seed=1))
    features, labels = case.on(DEVICE, torch.float32)
    for _ in range(3):
        triton_fn(features, labels)
    assert len(calls) == 1 and calls[0][0] == "triton"
    result = real("triton", DEVICE, torch.float32)
    assert result.ok and result.grad_error < 1e-5, result


@requires_device
def test_first_use_check_catches_a_wrong_kernel(monkeypatch):
    """A kernel that gets the statistics wrong (here: its sums doubled, so every lse is off by
    log 2) is caught before it serves, with an error naming the backend and how to switch; the
    environment variable turns the check off."""
    from modan_ext.triton_backend import runtime
    real_launch = runtime.launch

    def wrong_launch(kernel, grid, *args, **meta):
        real_launch(kernel, grid, *args, **meta)
        if kernel.__name__ == "supcon_forward_kernel":
            raw = args[5]  # (z, z_lo, labels, limits, params, raw accumulators, ...)
            raw[:, 1] *= 2  # l, the sum of exponentials
    monkeypatch.setattr(runtime, "launch", wrong_launch)
    monkeypatch.setattr(selftest, "_checked", set())
    features, labels = build(Spec(images=6, views=2, dim=8, seed=1)).on(DEVICE, torch.float64)
    with pytest.raises(RuntimeError) as info:
        triton_fn(features, labels)
    message = str(info.value)
    assert "first-use check of backend='triton'" in message
    assert "backend='reference'" in message and "MODAN_EXT_FIRST_USE_CHECK=0" in message
    monkeypatch.setenv("MODAN_EXT_FIRST_USE_CHECK", "0")
    loss = triton_fn(features, labels)  # unchecked: the wrong kernel's (wrong) loss
    assert abs(float(loss) - float(reference_fn(features, labels))) > 1e-3


def test_check_reports_a_mismatch_of_any_backend(monkeypatch):
    """The same check serves the CUDA C++ kernel ("kernel" on CUDA); exercised here through the
    CPU kernel, with a wrong per-row loss injected behind the op."""
    if not modan_ext.kernel_available("cpu"):
        pytest.skip("no compiled CPU kernel")
    assert selftest.check("kernel", "cpu", torch.float64).ok
    real_rows = ops.supcon_rows

    def wrong_rows(*args, **kwargs):
        row_loss, stats = real_rows(*args, **kwargs)
        return row_loss * 1.01, stats
    monkeypatch.setattr(ops, "supcon_rows", wrong_rows)
    result = selftest.check("kernel", "cpu", torch.float64)
    assert not result.ok and result.loss_error > 1e-3
    assert "backend='kernel'" in result.message() and "backend='triton'" in result.message()


@interpreter_only
def test_selftest_command():
    """`python -m modan_ext.selftest` under the interpreter: a table with the CPU kernel and the
    Triton kernels (float32 only here: --quick), exit status 0."""
    proc = subprocess.run([sys.executable, "-m", "modan_ext.selftest", "--quick"],
                          env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| cpu |")]
    backends = {line.split("|")[2].strip() for line in rows}
    assert {"triton"} <= backends and all(line.rstrip().endswith("| ok |") for line in rows), \
        proc.stdout


# ---- gather_distributed=True with the Triton kernels ----------------------------------------------

@requires_device
def test_gathered_path_on_one_rank():
    """The gather / anchor-range / scaling code with the Triton op, world size 1, in-process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        case = build(Spec(images=9, views=2, dim=8, pattern="mixed", seed=3))
        features, labels = case.on(DEVICE, torch.float64)
        for reduction in ("mean", "none"):
            for mode in ("all", "one"):
                opts = check_options(reduction=reduction, contrast_mode=mode)
                got = run_loss(lambda f, y: distributed.gathered_loss(
                    f, y, lambda: (opts, None), lambda device: "triton"), features, labels)
                expected = run_loss(reference_fn, features, labels, reduction=reduction,
                                    contrast_mode=mode)
                assert_close(got[0], expected[0], 1e-10, "loss", 1.0)
                assert_close(got[1], expected[1], 1e-10, "gradient", 1.0)
    finally:
        dist.destroy_process_group()


def _rank(rank, world, port, sizes, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        case = build(Spec(images=sum(sizes), views=2, dim=10, pattern="paper", seed=7))
        begin = sum(sizes[:rank])
        own = slice(begin, begin + sizes[rank])
        results = {}
        for reduction in ("mean", "none"):
            f = case.features[own].to(DEVICE).clone().requires_grad_(True)
            loss = modan_ext.jaccard_supcon_loss(f, case.labels[own].to(DEVICE),
                                                 reduction=reduction, backend="triton",
                                                 gather_distributed=True)
            loss.backward(torch.ones_like(loss))
            results[reduction] = (loss.detach().cpu(), f.grad.cpu())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@requires_device
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_ranks_match_one_process(tmp_path):
    """Two gloo ranks (uneven batches: 5 and 3 images) with backend='triton': the mean of the
    ranks' losses and the ranks' gradients (x world size for "mean", as DDP averages) are the
    single-process ones."""
    sizes = (5, 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a parent that has run autograd (earlier tests) cannot fork safely.
    mp.start_processes(_rank, args=(2, port, sizes, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    case = build(Spec(images=8, views=2, dim=10, pattern="paper", seed=7))
    for reduction in ("mean", "none"):
        f = case.features.clone().requires_grad_(True)
        expected = reference_fn(f, case.labels, reduction=reduction)
        (expected_grad,) = torch.autograd.grad(expected.sum(), f)
        losses = [r[reduction][0] for r in ranks]
        grads = torch.cat([r[reduction][1] for r in ranks])
        if reduction == "mean":  # each rank: world_size x its share; gradients likewise
            got_loss, got_grad = sum(losses) / 2, grads / 2
        else:  # own anchors' losses, unscaled; the gradient of their total reaches every rank
            got_loss, got_grad = torch.cat(losses), grads
        assert_close(got_loss, expected.detach(), 1e-10, f"{reduction} loss", 1.0)
        assert_close(got_grad, expected_grad, 1e-10, f"{reduction} gradient", 1.0)


def test_importing_modan_ext_stays_light():
    """`import modan_ext` imports neither triton nor torch._dynamo (the Triton backend is loaded
    when first needed), and the backend's compile-constant marker is the one torch sets."""
    code = ("import sys, modan_ext\n"
            "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(TRITON_INTERPRET=None),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr

    def probe():
        return 0
    torch.compiler.assume_constant_result(probe)
    from modan_ext.triton_backend import unavailable_reason
    assert set(vars(probe)) == {"_dynamo_marked_constant"}
    assert unavailable_reason._dynamo_marked_constant is True
