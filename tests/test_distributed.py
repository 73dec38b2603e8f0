"""`gather_distributed=True` against one process on the concatenated batch, with gloo on CPU.

Each world size (2, 3) is ONE start of that many processes, which runs every case below and saves
its results; the tests here compare them with the float64 reference on the concatenated batch.
In each case the features are `normalize(x_r @ P)` with a shared matrix P, so the parameter
gradient, averaged over ranks as DDP does, is checked as well as the features' gradient:

* "mean"/"sum": mean over ranks of the losses == single-process loss; rank r's gradient of x_r ==
  world_size x (single-process gradient of x_r), so that the DDP average of P's gradient ==
  the single-process gradient of P.
* "none": the ranks' losses concatenated == the single-process output; x's gradients are the
  single-process ones (nothing scaled) and P's DDP average is 1/world_size of it.

A last test runs tests/ddp_step.py under torchrun with DDP and compares the parameters after one
SGD step with a single-process step.
"""
from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import ddp_step
import modan_ext
from loss_cases import Spec, assert_close, build, reference_fn, run_loss, upstream_like
from modan_ext import distributed, ops
from modan_ext._validation import check_options
from modan_ext.options import CONTRAST_MODES, NORMALIZATIONS, REDUCTIONS, WEIGHTINGS

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

HERE = Path(__file__).resolve().parent
IN_DIM, DIM, NUM_LABELS = 6, 5, 7
SPLITS = {2: {"even": (3, 3), "uneven": (4, 1)}, 3: {"even": (2, 2, 2), "uneven": (3, 1, 2)}}
LABEL_PATTERNS = {"none": "none", "ids": "class_ids", "multi": "random"}  # loss_cases patterns


@dataclass(frozen=True)
class DCase:
    """One distributed problem: `sizes` images per rank (rows, for 2-D features: views == 0)."""
    world: int
    sizes: tuple
    views: int = 2
    labels: str = "multi"  # "none" (SimCLR) | "ids" (class ids) | "multi" (multi-hot)
    contrast_mode: str = "all"
    reduction: str = "mean"
    backend: str = "kernel"
    weighting: str = "jaccard"
    normalization: str = "count"
    dtype: str = "float64"  # dtype of the features handed to the loss
    seed: int = 0
    error: str = ""  # an error case: which rank-inconsistency to inject

    @property
    def name(self) -> str:
        if self.error:
            return f"w{self.world}-error-{self.error}"
        shape = f"3d_v{self.views}" if self.views else "2d"
        return (f"w{self.world}-{shape}-{self.labels}-{self.contrast_mode}-{self.reduction}-"
                f"{self.backend}-{self.weighting}-{self.normalization}-{self.dtype}-"
                f"{'x'.join(map(str, self.sizes))}")

    def options(self) -> dict:
        return dict(temperature=0.1, base_temperature=0.07, threshold=0.3,
                    contrast_mode=self.contrast_mode, reduction=self.reduction,
                    weighting=self.weighting, normalization=self.normalization)


def _cases(world: int) -> list[DCase]:
    out = []
    grid = itertools.product((2, 0), tuple(LABEL_PATTERNS), CONTRAST_MODES, REDUCTIONS,
                             ("kernel", "reference"), ("even", "uneven"))
    for k, (views, labels, mode, reduction, backend, split) in enumerate(grid):
        if views == 0 and labels == "none":
            continue  # SimCLR needs views
        if backend == "reference" and split == "even":
            continue  # the fallback shares the gather and scaling code: uneven batches suffice
        sizes = SPLITS[world][split]
        if views == 0:
            sizes = tuple(2 * s for s in sizes)
        out.append(DCase(world, sizes, views, labels, mode, reduction, backend,
                         WEIGHTINGS[k % len(WEIGHTINGS)], NORMALIZATIONS[k % len(NORMALIZATIONS)],
                         seed=100 * world + k))
    uneven = SPLITS[world]["uneven"]
    out += [DCase(world, uneven, views=3, labels="multi", backend=b, seed=7) for b in
            ("kernel", "reference")]
    out += [DCase(world, uneven, dtype=d, backend=b, reduction=r, seed=8)
            for d in ("float32", "bfloat16") for b in ("kernel", "reference")
            for r in ("mean", "none")]
    return out


def _error_cases(world: int) -> list[DCase]:
    base = DCase(world, SPLITS[world]["even"])
    return [replace(base, error=e) for e in ("nan", "label_columns", "views", "empty",
                                              "temperature")]


CASES = {w: _cases(w) for w in SPLITS}
ERROR_CASES = {w: _error_cases(w) for w in SPLITS}


# ---- building a case (the same on every rank and in the oracle) ----------------------------------

def make_global(case: DCase):
    """(x [B, V, IN] or [M, IN], P [IN, D], labels of the B images or None, upstream for 'none')."""
    total = sum(case.sizes)
    spec = Spec(images=total, views=case.views, dim=IN_DIM, pattern=LABEL_PATTERNS[case.labels],
                num_labels=NUM_LABELS, density=0.35, seed=case.seed)
    batch = build(spec)
    proj = torch.randn(IN_DIM, DIM, generator=torch.Generator().manual_seed(case.seed),
                       dtype=torch.float64)
    out_shape = (total, case.views) if case.views and case.contrast_mode == "all" else (total,)
    upstream = upstream_like(torch.zeros(out_shape, dtype=torch.float64), case.seed)
    return batch.features, proj, batch.labels, upstream


def features_of(x, proj, dtype: str):
    return F.normalize(x @ proj, dim=-1).to(getattr(torch, dtype))


def _run_case(case: DCase, rank: int, world: int, seen: list):
    x, proj, labels, upstream = make_global(case)
    begin = sum(case.sizes[:rank])
    own = slice(begin, begin + case.sizes[rank])
    x = x[own].clone().requires_grad_(True)
    proj = proj.clone().requires_grad_(True)
    seen.clear()
    loss = modan_ext.jaccard_supcon_loss(
        features_of(x, proj, case.dtype), None if labels is None else labels[own],
        backend=case.backend, gather_distributed=True, **case.options())
    loss.backward(upstream[own] if case.reduction == "none" else torch.ones(()))
    grad_p = proj.grad.clone()
    dist.all_reduce(grad_p)  # what DDP does to a parameter's gradient: the mean over ranks
    return dict(loss=loss.detach(), grad_x=x.grad, grad_p=grad_p / world, ranges=list(seen))


def _run_error_case(case: DCase, rank: int, world: int):
    x, proj, labels, _ = make_global(case)
    begin = sum(case.sizes[:rank])
    own = slice(begin, begin + case.sizes[rank])
    f, lab, opts = features_of(x[own], proj, "float64"), labels[own], case.options()
    last = rank == world - 1
    if case.error == "nan" and last:
        f[0, 0, 0] = float("nan")
    elif case.error == "label_columns" and last:
        lab = torch.cat([lab, lab[:, :1]], dim=1)
    elif case.error == "views" and last:
        f = torch.cat([f, f[:, :1]], dim=1)
    elif case.error == "empty" and last:
        f, lab = f[:0], lab[:0]
    elif case.error == "temperature" and last:
        opts["temperature"] = 0.5
    try:
        modan_ext.jaccard_supcon_loss(f, lab, gather_distributed=True, **opts)
    except Exception as exc:  # noqa: BLE001 -- the test inspects it
        return dict(error=type(exc).__name__, message=str(exc))
    return dict(error=None, message="")


def _worker(rank: int, world: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))
    seen = []
    supcon_rows = ops.supcon_rows

    def spy(features, labels, opts, anchor_begin=0, anchor_end=None, **kwargs):
        rows = features.shape[0] * (features.shape[1] if features.dim() == 3 else 1)
        seen.append((anchor_begin, rows if anchor_end is None else anchor_end, rows))
        return supcon_rows(features, labels, opts, anchor_begin, anchor_end, **kwargs)

    ops.supcon_rows = spy
    results = {}
    try:
        for case in ERROR_CASES[world] + CASES[world]:  # normal cases after the errors: in sync?
            run = _run_error_case if case.error else _run_case
            results[case.name] = run(case, rank, world, *(() if case.error else (seen,)))
    except Exception as exc:  # noqa: BLE001 -- reported by every test of the missing cases
        results["__crash__"] = f"rank {rank}: {type(exc).__name__}: {exc}"
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SPAWNED: dict = {}


def _start_method() -> str:
    """forkserver where there is one: a server that imported torch and this module once forks
    every rank (seconds faster than "spawn", which imports torch again in each process)."""
    import multiprocessing
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.get_context("forkserver").set_forkserver_preload([__name__])
    return "forkserver"


def spawned(world: int, tmp_root: Path) -> list[dict]:
    """Every rank's results for `world` ranks (one spawn per world size per session)."""
    if world not in _SPAWNED:
        out = tmp_root / f"world{world}"
        out.mkdir()
        ctx = mp.start_processes(_worker, args=(world, free_port(), str(out)), nprocs=world,
                                 join=False, start_method=_start_method())
        deadline = time.monotonic() + 120
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {world} gloo processes did not finish within 120 s")
        _SPAWNED[world] = [torch.load(out / f"rank{r}.pt", weights_only=True)
                           for r in range(world)]
    return _SPAWNED[world]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


def results_of(case: DCase, tmp_root: Path) -> list[dict]:
    ranks = spawned(case.world, tmp_root)
    for r, res in enumerate(ranks):
        assert "__crash__" not in res, res["__crash__"]
        assert case.name in res, f"rank {r} has no result for {case.name}"
    return [res[case.name] for res in ranks]


# ---- the oracle: one process, float64 reference, the concatenated batch --------------------------

def oracle(case: DCase):
    x, proj, labels, upstream = make_global(case)
    x.requires_grad_(True)
    proj.requires_grad_(True)
    f = features_of(x, proj, case.dtype)  # the oracle: the same (rounded) values, float64 math
    loss = reference_fn(f, labels, **case.options())
    loss.backward(upstream if case.reduction == "none" else torch.ones((), dtype=torch.float64))
    return loss.detach(), x.grad, proj.grad


def close(actual, expected, rtol, what):
    """max |actual - expected| <= rtol * max(max |expected|, 1e-3)."""
    assert_close(actual, expected, rtol, what, floor=1e-3)


TOLERANCES = {"float64": (1e-10, 1e-10), "float32": (2e-5, 2e-5), "bfloat16": (2e-5, 2e-2)}


def _check(case: DCase, tmp_root: Path):
    ranks = results_of(case, tmp_root)
    world = case.world
    loss, grad_x, grad_p = oracle(case)
    rtol_loss, rtol_grad = TOLERANCES[case.dtype]
    expected_dtype = torch.float64 if case.dtype == "float64" else torch.float32
    for r, res in enumerate(ranks):
        assert res["loss"].dtype == expected_dtype, f"rank {r}: loss dtype {res['loss'].dtype}"
    if case.reduction == "none":
        close(torch.cat([res["loss"] for res in ranks]), loss, rtol_loss, "per-anchor losses")
        close(torch.cat([res["grad_x"] for res in ranks]), grad_x, rtol_grad, "x gradient")
        p_expected = grad_p / world
    else:
        close(torch.stack([res["loss"] for res in ranks]).double().mean(), loss, rtol_loss,
              "mean of the ranks' losses")
        close(torch.cat([res["grad_x"] for res in ranks]) / world, grad_x, rtol_grad,
              "x gradient / world_size")
        p_expected = grad_p
    for r, res in enumerate(ranks):
        close(res["grad_p"], p_expected, rtol_grad, f"rank {r}: DDP-averaged P gradient")
    if case.backend == "kernel":  # own rows as anchors, all rows as contrasts: (local M) x (M)
        views = max(case.views, 1)
        total = sum(case.sizes) * views
        for r, res in enumerate(ranks):
            begin = sum(case.sizes[:r]) * views
            assert res["ranges"] == [(begin, begin + case.sizes[r] * views, total)], \
                f"rank {r}: op called with (anchor_begin, anchor_end, rows) = {res['ranges']}"


@pytest.mark.parametrize("case", CASES[2], ids=lambda c: c.name)
def test_two_ranks_match_one_process(case, tmp_root):
    _check(case, tmp_root)


@pytest.mark.parametrize("case", CASES[3], ids=lambda c: c.name)
def test_three_ranks_match_one_process(case, tmp_root):
    _check(case, tmp_root)


@pytest.mark.parametrize("case", ERROR_CASES[2] + ERROR_CASES[3], ids=lambda c: c.name)
def test_inconsistent_or_bad_input_raises_on_every_rank(case, tmp_root):
    ranks = results_of(case, tmp_root)
    last = case.world - 1
    for r, res in enumerate(ranks):
        assert res["error"] is not None, f"rank {r} did not raise for {case.error}"
    if case.error in ("nan", "empty"):  # one rank's own input is bad: it says why, others follow
        assert ranks[last]["error"] == "ValueError"
        assert ("non-finite" if case.error == "nan" else "empty batch") in ranks[last]["message"]
        for res in ranks[:last]:
            assert res["error"] == "RuntimeError" and f"rank(s) [{last}]" in res["message"]
    else:  # the ranks disagree: every rank says on what
        what = {"label_columns": "label columns", "views": "views",
                "temperature": "temperature"}[case.error]
        for res in ranks:
            assert res["error"] == "ValueError" and f"disagree on {what}" in res["message"]


# ---- one process: gather_distributed=True is gather_distributed=False ----------------------------

@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _small_problem():
    return build(Spec(images=5, views=2, dim=8, pattern="random", num_labels=NUM_LABELS,
                      density=0.4, seed=3)).on()


@pytest.mark.parametrize("initialised", [False, True], ids=["no_group", "world_1"])
def test_gather_flag_without_other_ranks_is_a_no_op(initialised, request):
    if initialised:
        request.getfixturevalue("one_rank_group")
    assert not distributed.is_active()
    f, labels = _small_problem()
    for reduction in REDUCTIONS:
        a = run_loss(modan_ext.jaccard_supcon_loss, f, labels, reduction=reduction,
                     gather_distributed=True)
        b = run_loss(modan_ext.jaccard_supcon_loss, f, labels, reduction=reduction,
                     gather_distributed=False)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_gathered_path_on_one_rank_matches_one_process(backend, one_rank_group):
    """The gather/anchor-range/scaling code itself, run with world_size 1 (in this process)."""
    def gathered(features, labels, **options):
        return distributed.gathered_loss(features, labels, check_options(**options),
                                         lambda device: backend)
    f, labels = _small_problem()
    for reduction in REDUCTIONS:
        for mode in CONTRAST_MODES:
            options = dict(reduction=reduction, contrast_mode=mode)
            loss, grad = run_loss(gathered, f, labels, **options)
            expected, expected_grad = run_loss(modan_ext.jaccard_supcon_loss, f, labels,
                                               backend="reference", **options)
            close(loss, expected, 1e-10, f"{reduction}/{mode} loss")
            close(grad, expected_grad, 1e-10, f"{reduction}/{mode} gradient")


def test_gather_flag_must_be_a_bool():
    with pytest.raises(TypeError, match="gather_distributed"):
        modan_ext.JaccardSupConLoss(gather_distributed="yes")
    with pytest.raises(TypeError, match="gather_distributed"):
        modan_ext.jaccard_supcon_loss(torch.randn(2, 2, 3), gather_distributed=1)


# ---- torchrun + DDP: parameters after one SGD step ----------------------------------------------

def test_torchrun_ddp_step_matches_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(HERE / "ddp_step.py"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    got = torch.load(out, weights_only=True)
    for backend in ddp_step.BACKENDS:
        expected_loss, expected_params = ddp_step.one_process_step(backend)
        result = got[backend]
        close(result["loss_mean"], expected_loss, 1e-10, f"{backend}: mean loss over ranks")
        for rank_params in result["params"]:
            for name, value in expected_params.items():
                close(rank_params[name], value, 1e-10, f"{backend}: parameter {name}")
