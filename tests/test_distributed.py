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
    learnable: bool = False  # T and T_base as float64 tensors that require grad

    @property
    def name(self) -> str:
        if self.error:
            return f"w{self.world}-error-{self.error}"
        shape = f"3d_v{self.views}" if self.views else "2d"
        return (f"w{self.world}-{shape}-{self.labels}-{self.contrast_mode}-{self.reduction}-"
                f"{self.backend}-{self.weighting}-{self.normalization}-{self.dtype}-"
                f"{'x'.join(map(str, self.sizes))}{'-learnable' if self.learnable else ''}")

    def options(self) -> dict:
        return dict(temperature=0.1, base_temperature=0.07, threshold=0.3,
                    contrast_mode=self.contrast_mode, reduction=self.reduction,
                    weighting=self.weighting, normalization=self.normalization)

    def temperatures(self) -> dict:
        """Fresh leaf tensors for T and T_base when `learnable` (else nothing)."""
        if not self.learnable:
            return {}
        return {name: torch.tensor(value, dtype=torch.float64, requires_grad=True)
                for name, value in self.options().items() if name.endswith("temperature")}


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
    out += [DCase(world, uneven, backend=b, reduction=r, normalization=n, seed=9,
                  learnable=True)
            for b in ("kernel", "reference") for r, n in (("mean", "weight"), ("none", "count"))]
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
    temperatures = case.temperatures()
    seen.clear()
    loss = modan_ext.jaccard_supcon_loss(
        features_of(x, proj, case.dtype), None if labels is None else labels[own],
        backend=case.backend, gather_distributed=True,
        **{**case.options(), **temperatures})
    loss.backward(upstream[own] if case.reduction == "none" else torch.ones(()))
    # What DDP does to a parameter's gradient: the mean over ranks. P, and T, T_base if learnable.
    params = torch.cat([proj.grad.reshape(-1)] + [t.grad.reshape(1) for t in
                                                   temperatures.values()])
    dist.all_reduce(params)
    return dict(loss=loss.detach(), grad_x=x.grad, grad_p=params / world, ranges=list(seen))


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
    temperatures = case.temperatures()
    f = features_of(x, proj, case.dtype)  # the oracle: the same (rounded) values, float64 math
    loss = reference_fn(f, labels, **{**case.options(), **temperatures})
    loss.backward(upstream if case.reduction == "none" else torch.ones((), dtype=torch.float64))
    params = torch.cat([proj.grad.reshape(-1)] + [t.grad.reshape(1) for t in
                                                   temperatures.values()])
    return loss.detach(), x.grad, params


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
        close(res["grad_p"], p_expected, rtol_grad,
              f"rank {r}: DDP-averaged gradient of P (and of T, T_base when learnable)")
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


# ---- a bad or different option on one rank: every rank raises, at once ----------------------------

# Options given to the functional form on the last rank only (the others pass good ones). Before
# the options went through the header exchange, the last rank raised alone and the others waited
# in all_gather until the process group's timeout: a short one here, so that such a regression
# fails in seconds instead of hanging the suite.
AGREEMENT_CASES = {
    "temperature_zero": (dict(temperature=0.0), "ValueError",
                         "temperature must be a finite number > 0"),
    "threshold_nan": (dict(threshold=float("nan")), "ValueError", "threshold must be in [0, 1]"),
    "weighting_unknown": (dict(weighting="jacard"), "ValueError", "weighting must be one of"),
    "backend_unknown": (dict(backend="cuda"), "ValueError", "backend must be one of"),
    # rank 0: "raise" and clean features; the last rank: "propagate" and a NaN
    "nan_policy": (dict(nan_policy="propagate"), "ValueError", "disagree on nan_policy"),
}
AGREEMENT_WORLD, AGREEMENT_TIMEOUT_S = 2, 10


def _agreement_call(rank: int, world: int, name: str) -> dict:
    """One call of the functional form with gather_distributed=True (the last rank gets case
    `name`'s option), then a barrier: a rank that raised alone goes on to another collective,
    as a training loop would, instead of exiting (which would fail the others' gather at once)."""
    features, labels = build(Spec(images=3, views=2, dim=5, pattern="random",
                                  num_labels=NUM_LABELS, seed=rank)).on()
    options = dict(temperature=0.1, threshold=0.3, weighting="jaccard", nan_policy="raise",
                   backend="auto")
    if rank == world - 1:
        options.update(AGREEMENT_CASES[name][0])
        if name == "nan_policy":
            features[0, 0, 0] = float("nan")
    start = time.monotonic()
    try:
        modan_ext.jaccard_supcon_loss(features, labels, gather_distributed=True, **options)
        result = dict(error=None, message="")
    except Exception as exc:  # noqa: BLE001 -- the test inspects it
        result = dict(error=type(exc).__name__, message=str(exc))
    result["seconds"] = time.monotonic() - start
    try:
        dist.barrier()
    except RuntimeError as exc:
        result["barrier"] = str(exc)
    return result


def _agreement_worker(rank: int, world: int, port: int, out_dir: str):
    """Every case in a process group of its own (one store, a prefix per case), so that ranks
    left out of step by one case meet again at the next one's rendezvous."""
    torch.set_num_threads(1)
    timeout = timedelta(seconds=AGREEMENT_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=4 * timeout)
    results = {}
    for name in AGREEMENT_CASES:
        dist.init_process_group("gloo", store=dist.PrefixStore(name, store), rank=rank,
                                world_size=world, timeout=timeout)
        results[name] = _agreement_call(rank, world, name)
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def agreement_results(tmp_root) -> list[dict]:
    """Every rank's outcome of each AGREEMENT_CASES call (one start of AGREEMENT_WORLD ranks)."""
    out = tmp_root / "agreement"
    out.mkdir()
    ctx = mp.start_processes(_agreement_worker, args=(AGREEMENT_WORLD, free_port(), str(out)),
                             nprocs=AGREEMENT_WORLD, join=False, start_method=_start_method())
    limit = 60 + 3 * AGREEMENT_TIMEOUT_S * len(AGREEMENT_CASES)
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {AGREEMENT_WORLD} ranks did not finish within {limit} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(AGREEMENT_WORLD)]


@pytest.mark.parametrize("name", list(AGREEMENT_CASES))
def test_a_bad_or_different_option_on_one_rank_raises_on_every_rank(name, agreement_results):
    _, error, message = AGREEMENT_CASES[name]
    last = AGREEMENT_WORLD - 1
    for r, results in enumerate(agreement_results):
        outcome = results[name]
        assert outcome["error"] is not None, f"rank {r} did not raise ({outcome})"
        assert outcome["seconds"] < AGREEMENT_TIMEOUT_S / 2, \
            f"rank {r} waited {outcome['seconds']:.1f} s: a collective timed out ({outcome})"
        if r == last or name == "nan_policy":  # the bad rank says why; disagreement: everyone
            assert outcome["error"] == error and message in outcome["message"], outcome
        else:
            assert outcome["error"] == "RuntimeError", outcome
            assert f"rank(s) [{last}]" in outcome["message"], outcome


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
        return distributed.gathered_loss(features, labels,
                                         lambda: (check_options(**options), None),
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
