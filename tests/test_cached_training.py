"""`cached_contrastive_backward` (gradient caching) against the plain step it replaces.

The oracle is the step with a graph: ``model`` run on the same chunks with autograd on (for one
chunk of every row, the plain step), the same loss, one backward. Gradient caching must give the
same parameter gradients (float64: 1e-10), the same loss, the same BatchNorm running statistics
(updated once per chunk) and leave the random number generators where the oracle leaves them.
DDP runs with 2 gloo ranks in subprocesses, compared with one process on the concatenated batch;
AMP runs with CPU autocast (bf16 and fp16) and a CPU GradScaler. CUDA variants run where a GPU is
present (CUDA generators, CUDA autocast); on a CPU-only machine they are skipped.
"""
from __future__ import annotations

import copy
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from modan_ext import JaccardSupConLoss
from modan_ext.training import cached_contrastive_backward  # the public API (issue 10)
from modan_ext.training.launch import shutdown_distributed

IN_DIM, HIDDEN, DIM, NUM_LABELS = 6, 16, 5, 7
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="no CUDA device"))
DEVICES = ["cpu", CUDA]


class Encoder(nn.Module):
    """Linear -> [BatchNorm] -> tanh -> [Dropout] -> Linear -> L2-normalise: [n, IN] -> [n, D]."""

    def __init__(self, batchnorm: bool = False, dropout: float = 0.0, momentum=0.1):
        super().__init__()
        self.inner = nn.Linear(IN_DIM, HIDDEN)
        self.norm = nn.BatchNorm1d(HIDDEN, momentum=momentum) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.outer = nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        return F.normalize(self.outer(self.drop(torch.tanh(self.norm(self.inner(x))))), dim=-1)


def make_encoder(seed: int = 0, dtype=torch.float64, device="cpu", **layers) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(**layers).to(device=device, dtype=dtype)


def make_batch(images: int, views: int = 2, seed: int = 1, dtype=torch.float64, device="cpu",
               labels: str = "multi"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(images, views, IN_DIM, generator=gen, dtype=dtype)
    if labels == "multi":
        y = torch.rand(images, NUM_LABELS, generator=gen) < 0.35
    elif labels == "ids":
        y = torch.randint(0, 3, (images,), generator=gen)
    else:
        y = None
    return x.to(device), None if y is None else y.to(device)


def loss_fn(**options):
    return JaccardSupConLoss(temperature=0.2, **options)


def chunked_step(model, views, labels, fn, chunk_size, scaler=None, autocast=None):
    """The oracle: every chunk through `model` with a graph, one loss, one backward."""
    images, per_image = views.shape[:2]
    rows = views.flatten(0, 1)
    with autocast or torch.autocast("cpu", enabled=False):
        z = torch.cat([model(rows[s:s + chunk_size]) for s in range(0, len(rows), chunk_size)])
        loss = fn(z.view(images, per_image, -1), labels)
    (loss if scaler is None else scaler.scale(loss)).backward()
    return loss.detach()


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def buffers(model) -> dict:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def close(actual, expected, tol, what):
    err = float((actual.double() - expected.double()).abs().max())
    scale = max(float(expected.double().abs().max()), 1e-3)
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.0e} x {scale:.3e}"


def next_random(device) -> torch.Tensor:
    """The next numbers of the CPU generator and of `device`'s: where a step left them."""
    return torch.cat([torch.rand(4), torch.rand(4, device=device).cpu()])


def run_both(make, views, labels, fn, chunk_size, seed=5, **kwargs):
    """(oracle model, cached model, oracle loss, cached loss, next random numbers after each):
    two copies of one model, the generators seeded alike before each step."""
    oracle_model, cached_model = make(), make()
    torch.manual_seed(seed)
    expected = chunked_step(oracle_model, views, labels, fn, chunk_size)
    after_oracle = next_random(views.device)
    torch.manual_seed(seed)
    got = cached_contrastive_backward(cached_model, views, labels, fn, chunk_size, **kwargs)
    after_cached = next_random(views.device)
    return oracle_model, cached_model, expected, got, after_oracle, after_cached


# ---- no batch-dependent layers: the plain (whole-batch) step ------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 3, 5, 7, 14, 100])
@pytest.mark.parametrize("labels", ["multi", "ids", "none"])
def test_gradients_equal_the_plain_step(chunk_size, labels):
    """B = 7 images x 2 views = 14 rows: chunks 3 and 5 leave an uneven last chunk, 7 divides,
    14 and 100 are one chunk, 1 is one row at a time."""
    views, y = make_batch(7, labels=labels)
    plain_model, model = make_encoder(), make_encoder()
    expected = chunked_step(plain_model, views, y, loss_fn(), chunk_size=len(views) * 2)
    loss = cached_contrastive_backward(model, views, y, loss_fn(), chunk_size)
    assert loss.dtype == torch.float64 and not loss.requires_grad
    close(loss, expected, 1e-12, "loss")
    close(grads(model), grads(plain_model), 1e-10, f"parameter gradients, chunk {chunk_size}")


def test_gradients_accumulate_like_backward():
    """Existing .grad is added to, and views that require grad receive their gradient."""
    views, y = make_batch(5, views=3)
    plain_model, model = make_encoder(), make_encoder()
    plain_views, cached_views = views.clone().requires_grad_(), views.clone().requires_grad_()
    for _ in range(2):
        chunked_step(plain_model, plain_views, y, loss_fn(), chunk_size=15)
        cached_contrastive_backward(model, cached_views, y, loss_fn(), chunk_size=4)
    close(grads(model), grads(plain_model), 1e-10, "parameter gradients after two steps")
    close(cached_views.grad, plain_views.grad, 1e-10, "views' gradient")


def test_views_whose_batch_dims_do_not_merge():
    """A view-major batch transposed to [B, V, ...] cannot be flattened without a copy: chunks are
    gathered row by row instead, in image-major order."""
    views, y = make_batch(5)
    transposed = views.transpose(0, 1).contiguous().transpose(0, 1)  # same values, [V, B] memory
    plain_model, model = make_encoder(), make_encoder()
    chunked_step(plain_model, views, y, loss_fn(), chunk_size=10)
    cached_contrastive_backward(model, transposed, y, loss_fn(), chunk_size=3)
    close(grads(model), grads(plain_model), 1e-10, "parameter gradients")


# ---- BatchNorm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("chunk_size", [4, 6])
def test_batchnorm_per_chunk_statistics_and_one_update_per_chunk(chunk_size, momentum):
    """14 rows in chunks of 4 (4, 4, 4, 2) or 6 (6, 6, 2): each chunk normalised by its own
    statistics; running statistics updated once per chunk, in order (num_batches_tracked counts
    chunks; with momentum=None the running average weighs each chunk by it)."""
    views, y = make_batch(7)
    oracle, model, expected, loss, _, _ = run_both(
        lambda: make_encoder(batchnorm=True, momentum=momentum), views, y, loss_fn(), chunk_size)
    close(loss, expected, 1e-12, "loss")
    close(grads(model), grads(oracle), 1e-10, "parameter gradients")
    chunks = -(-14 // chunk_size)
    assert int(model.norm.num_batches_tracked) == chunks
    for name, value in buffers(oracle).items():
        close(buffers(model)[name], value, 1e-12, name)
    # The per-chunk statistics matter: the whole-batch step is a different step.
    whole = make_encoder(batchnorm=True, momentum=momentum)
    chunked_step(whole, views, y, loss_fn(), chunk_size=14)
    assert float((grads(whole) - grads(model)).abs().max()) > 1e-6


@pytest.mark.parametrize("chunk_size", [14, 1000])
def test_batchnorm_one_chunk_is_exactly_the_plain_step(chunk_size):
    views, y = make_batch(7)
    plain, model, expected, loss, after_plain, after_cached = run_both(
        lambda: make_encoder(batchnorm=True, dropout=0.3), views, y, loss_fn(), chunk_size)
    assert torch.equal(loss, expected)
    assert torch.equal(grads(model), grads(plain))
    for name, value in buffers(plain).items():
        assert torch.equal(buffers(model)[name], value), name
    assert int(model.norm.num_batches_tracked) == 1
    assert torch.equal(after_cached, after_plain)


def test_batchnorm_in_eval_mode_is_left_alone():
    """Frozen BatchNorm (eval mode) normalises with its running statistics and never updates
    them, in both passes."""
    views, y = make_batch(6)

    def frozen():
        model = make_encoder(batchnorm=True)
        model.norm.running_mean.fill_(0.2)
        model.norm.eval()
        return model
    oracle, model, _, _, _, _ = run_both(frozen, views, y, loss_fn(), chunk_size=5)
    close(grads(model), grads(oracle), 1e-10, "parameter gradients")
    assert torch.equal(model.norm.running_mean, torch.full((HIDDEN,), 0.2, dtype=torch.float64))
    assert int(model.norm.num_batches_tracked) == 0


# ---- random layers --------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batchnorm", [False, True], ids=["dropout", "dropout+bn"])
def test_dropout_sees_the_same_random_numbers_in_both_passes(batchnorm, device):
    views, y = make_batch(7, device=device)
    oracle, model, expected, loss, after_oracle, after_cached = run_both(
        lambda: make_encoder(batchnorm=batchnorm, dropout=0.5, device=device), views, y,
        loss_fn(), chunk_size=4)
    close(loss, expected, 1e-12, "loss")
    close(grads(model), grads(oracle), 1e-10, "parameter gradients")
    assert torch.equal(after_cached, after_oracle), "generator state after the step"


def test_random_numbers_drawn_by_the_loss_are_not_replayed():
    """The second pass replays the chunks' random numbers, then the generator must go back to
    where the loss left it: numbers the loss drew are not handed out again by the next step."""
    views, y = make_batch(6)

    def noisy_loss(f, labels):
        return loss_fn()(f, labels) + 0 * torch.rand(5, dtype=f.dtype).sum()
    oracle, model, expected, loss, after_oracle, after_cached = run_both(
        lambda: make_encoder(dropout=0.5), views, y, noisy_loss, chunk_size=5)
    close(grads(model), grads(oracle), 1e-10, "parameter gradients")
    assert torch.equal(after_cached, after_oracle), "generator state after the step"


# ---- AMP ------------------------------------------------------------------------------------------

AMP_DEVICES = [("cpu", torch.bfloat16), ("cpu", torch.float16),
               pytest.param("cuda", torch.float16, marks=CUDA.marks),
               pytest.param("cuda", torch.bfloat16, marks=CUDA.marks)]


AMP_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3}  # a few units of the last place


def amp_step(model, views, labels, chunk_size, device, amp_dtype, scale, cached):
    """One step under autocast with a GradScaler (None: no scaler); returns (loss, gradients,
    parameters after scaler.step or opt.step)."""
    scaler = torch.amp.GradScaler(device, init_scale=scale) if scale else None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(3)
    if cached:
        with torch.autocast(device, dtype=amp_dtype):
            loss = cached_contrastive_backward(model, views, labels, loss_fn(), chunk_size,
                                               scaler=scaler)
    else:
        loss = chunked_step(model, views, labels, loss_fn(), chunk_size, scaler=scaler,
                            autocast=torch.autocast(device, dtype=amp_dtype))
    g = grads(model).clone()
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    return loss, g, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("device,amp_dtype", AMP_DEVICES)
def test_autocast_with_grad_scaler(device, amp_dtype):
    """One chunk: exactly the plain AMP step, scaler.step included. Several chunks: the oracle to
    AMP precision (each chunk's gradient is rounded to the half type on its own, where the
    oracle's single graph sums the chunks first), and the scaled gradients are exactly the
    unscaled ones times the scale (a power of two): the cached gradient carries the scale."""
    views, y = make_batch(9, dtype=torch.float32, device=device)
    base = make_encoder(dtype=torch.float32, device=device, dropout=0.2)
    scale = 2.0 ** 12

    def step(chunk_size, cached, scale=scale):
        return amp_step(copy.deepcopy(base), views, y, chunk_size, device, amp_dtype, scale,
                        cached)
    plain, one_chunk = step(18, False), step(18, True)
    for a, b, what in zip(one_chunk, plain, ("loss", "scaled gradients", "parameters")):
        assert torch.equal(a, b), f"one chunk: {what} differ from the plain step"
    oracle, chunked, unscaled = step(5, False), step(5, True), step(5, True, scale=None)
    assert chunked[0].dtype == torch.float32
    close(chunked[0], oracle[0], 1e-6, "loss")
    close(chunked[1], oracle[1], AMP_TOLERANCE[amp_dtype], "scaled gradients")
    assert torch.equal(chunked[1], unscaled[1] * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_overflow_skips_the_step(device):
    """fp16 embeddings and a huge scale: the embeddings' gradient overflows; the inf must reach
    the parameters' gradients so that scaler.step skips the step and update() backs off, as for
    the oracle."""
    views, y = make_batch(6, dtype=torch.float32, device=device)
    for cached in (False, True):
        model = make_encoder(dtype=torch.float32, device=device)
        before = [p.detach().clone() for p in model.parameters()]
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 40)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if cached:
            with torch.autocast(device, dtype=torch.float16):
                cached_contrastive_backward(model, views, y, loss_fn(), 4, scaler=scaler)
        else:
            chunked_step(model, views, y, loss_fn(), 4, scaler=scaler,
                         autocast=torch.autocast(device, dtype=torch.float16))
        assert not torch.isfinite(grads(model)).all(), f"cached={cached}: no overflow"
        scaler.step(opt)
        scaler.update()
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert scaler.get_scale() == 2.0 ** 39


# ---- torch.compile --------------------------------------------------------------------------------

def test_compiled_model():
    """Inductor draws dropout's random numbers from its own seeds, taken from the global generator:
    replaying that generator must give the no-graph pass (an inference graph) and the graph pass
    (a training graph) the same masks; BatchNorm's switch must reach the compiled graphs."""
    views, y = make_batch(8, dtype=torch.float32)
    base = make_encoder(dtype=torch.float32, batchnorm=True, dropout=0.3)
    oracle, model = copy.deepcopy(base), copy.deepcopy(base)
    compiled_oracle, compiled = torch.compile(oracle), torch.compile(model)
    torch.manual_seed(5)
    expected = chunked_step(compiled_oracle, views, y, loss_fn(), 8)
    torch.manual_seed(5)
    loss = cached_contrastive_backward(compiled, views, y, loss_fn(), 8)
    close(loss, expected, 1e-6, "loss")
    close(grads(model), grads(oracle), 1e-5, "parameter gradients")
    for name, value in buffers(oracle).items():
        close(buffers(model)[name], value, 1e-6, name)
    assert int(model.norm.num_batches_tracked) == 2


# ---- degenerate models and losses -----------------------------------------------------------------

def test_model_without_trainable_parameters():
    """One pass (BatchNorm updated once per chunk, as the plain step would); the loss's own
    parameters still get their gradient."""
    views, y = make_batch(6)
    weight_plain = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    weight_cached = weight_plain.detach().clone().requires_grad_()
    runs = []
    for weight, cached in ((weight_plain, False), (weight_cached, True)):
        model = make_encoder(batchnorm=True).requires_grad_(False)
        calls = []
        model.register_forward_hook(lambda *_: calls.append(1))
        fn = lambda f, labels, w=weight: w * loss_fn()(f, labels)  # noqa: E731
        step = cached_contrastive_backward if cached else chunked_step
        runs.append((step(model, views, y, fn, 5), buffers(model), len(calls)))
    (l0, b0, _), (l1, b1, calls) = runs
    assert calls == 3, "one pass of 3 chunks"
    close(l1, l0, 1e-12, "loss")
    close(weight_cached.grad, weight_plain.grad, 1e-12, "the loss's parameter")
    for name, value in b0.items():
        assert torch.equal(b1[name], value), name


# ---- bad arguments --------------------------------------------------------------------------------

class _Returns(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.fn = fn

    def forward(self, x):
        return self.fn(x * self.weight)


BAD_MODELS = {
    "1-d": (lambda x: x.flatten(1).sum(1), "model must map \\[n, ...\\] to embeddings \\[n, D\\]"),
    "3-d": (lambda x: x[..., None], "returned shape \\(3, 6, 1\\)"),
    "drops a row": (lambda x: x[1:], "for a chunk of 3 rows it returned shape \\(2, 6\\)"),
    "tuple": (lambda x: (x, x), "model must return a tensor \\[n, D\\]; got tuple"),
    "integer": (lambda x: x.long(), "floating-point embeddings"),
}


@pytest.mark.parametrize("name", list(BAD_MODELS))
def test_model_output_that_is_not_n_by_d(name):
    fn, message = BAD_MODELS[name]
    views, y = make_batch(4)
    with pytest.raises((ValueError, TypeError), match=message):
        cached_contrastive_backward(_Returns(fn), views, y, loss_fn(), 3)


def test_model_output_that_changes_width():
    widths = iter([5, 4])
    model = _Returns(lambda x: x[:, :next(widths)])
    views, y = make_batch(3)
    with pytest.raises(ValueError, match="\\[n, 4\\] .* for one chunk and \\[n, 5\\]"):
        cached_contrastive_backward(model, views, y, loss_fn(), 4)


BAD_ARGUMENTS = [
    ("chunk_size", 0, ValueError, "chunk_size must be a positive int; got 0"),
    ("chunk_size", -3, ValueError, "chunk_size must be a positive int; got -3"),
    ("chunk_size", 2.0, TypeError, "chunk_size must be a positive int; got 2.0"),
    ("chunk_size", True, TypeError, "chunk_size must be a positive int; got True"),
    ("chunk_size", None, TypeError, "chunk_size must be a positive int; got None"),
    ("views", torch.zeros(8, IN_DIM), ValueError, "views must be \\[B, V, ...\\].*shape \\(8, 6\\)"),
    ("views", [[0.0]], TypeError, "views must be a tensor"),
    ("views", torch.zeros(0, 2, IN_DIM), ValueError, "empty batch \\(B = 0 images"),
    ("views", torch.zeros(4, 0, IN_DIM), ValueError, "empty batch \\(B = 4 images, V = 0"),
    ("labels", torch.zeros(5, NUM_LABELS), ValueError, "one entry per image.*B = 4.*\\(5, 7\\)"),
    ("labels", torch.tensor(1), ValueError, "one entry per image"),
    ("loss_fn", "supcon", TypeError, "loss_fn must be callable"),
    ("loss_fn", loss_fn(reduction="none"), ValueError, "loss_fn must return a scalar; got "
                                                       "shape \\(4, 2\\)"),
    ("loss_fn", lambda f, y: 1.0, TypeError, "loss_fn must return a tensor; got float"),
    ("loss_fn", lambda f, y: torch.ones(()), ValueError, "does not depend on the features"),
    ("loss_fn", lambda f, y, w=torch.ones((), requires_grad=True): 2 * w, ValueError,
     "does not depend on the features"),
]


@pytest.mark.parametrize("argument,value,error,message", BAD_ARGUMENTS,
                         ids=[f"{a[0]}-{i}" for i, a in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments(argument, value, error, message):
    views, y = make_batch(4)
    model = make_encoder()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    kwargs = dict(model=model, views=views, labels=y, loss_fn=loss_fn(), chunk_size=3)
    kwargs[argument] = value
    with pytest.raises(error, match=message):
        cached_contrastive_backward(**kwargs)
    if argument != "loss_fn":
        assert not calls, "arguments are checked before the model runs"
    assert all(p.grad is None for p in model.parameters()), "a failed call leaves no gradient"


# ---- DDP: 2 gloo ranks against one process --------------------------------------------------------

DDP_CASES = {  # name: (images per rank, chunk size, BatchNorm)
    "even_chunks": ((4, 4), 3, False),    # 8 rows each: 3 chunks on both ranks
    "uneven_chunks": ((5, 3), 3, False),  # 10 and 6 rows: 4 and 2 chunks
    "batchnorm": ((5, 3), 4, True),       # chunks (4, 4, 2) and (4, 2)
}
DDP_STEPS = 2


def _ddp_batch(case: str, step: int):
    sizes = DDP_CASES[case][0]
    return make_batch(sum(sizes), seed=10 * step + len(case))


def _ddp_worker(rank: int, world: int, out_dir: str):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))
    results = {}
    try:
        for case, (sizes, chunk_size, batchnorm) in DDP_CASES.items():
            own = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
            model = DistributedDataParallel(make_encoder(batchnorm=batchnorm))
            all_reduces = []

            def counting_hook(state, bucket, calls=all_reduces):
                calls[-1] += 1
                return default_hooks.allreduce_hook(None, bucket)
            model.register_comm_hook(None, counting_hook)
            steps = []
            for step in range(DDP_STEPS):
                views, y = _ddp_batch(case, step)
                model.zero_grad()
                all_reduces.append(0)
                loss = cached_contrastive_backward(model, views[own], y[own],
                                                   loss_fn(gather_distributed=True), chunk_size)
                steps.append(dict(loss=loss, grads=grads(model.module),
                                  buffers=buffers(model.module)))
            results[case] = dict(steps=steps, all_reduces=all_reduces)
            del model
    except Exception as exc:  # noqa: BLE001 -- reported by the tests of the missing cases
        results["__crash__"] = f"{type(exc).__name__}: {exc}"
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown_distributed()  # frees the DDP models' reference cycles before the group


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import multiprocessing
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":  # a server that imported torch once forks both ranks
        multiprocessing.get_context(method).set_forkserver_preload([__name__])
    out = tmp_path_factory.mktemp("cached_ddp")
    ctx = mp.start_processes(_ddp_worker, args=(2, str(out)), nprocs=2,
                             join=False, start_method=method)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2 gloo processes did not finish within 120 s")
    return [torch.load(Path(out) / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", list(DDP_CASES))
def test_ddp_two_ranks_equal_one_process(case, ddp_results):
    """Gradients (DDP's average) equal one process's plain step on the concatenated batch, each
    rank's chunks normalised on their own; one all-reduce per step whatever the chunk counts;
    running statistics as plain DDP leaves them: rank 0's broadcast at the step's first forward,
    then each rank's own chunks."""
    sizes, chunk_size, batchnorm = DDP_CASES[case]
    for r, res in enumerate(ddp_results):  # a crash ends the rank's later cases, not earlier ones
        assert case in res, f"rank {r}: no result for {case}: {res.get('__crash__')}"
    state = [buffers(make_encoder(batchnorm=batchnorm)) for _ in sizes]  # each rank's buffers
    for step in range(DDP_STEPS):
        views, y = _ddp_batch(case, step)
        model = make_encoder(batchnorm=batchnorm)  # parameters are never stepped here
        offsets = [0, sizes[0], sum(sizes)]
        z = []
        for r in range(len(sizes)):  # rank r's chunks, from rank r's buffers (updated in place)
            state[r] = {name: b.clone() for name, b in state[r].items()}
            rows = views[offsets[r]:offsets[r + 1]].flatten(0, 1)
            z += [torch.func.functional_call(model, state[r], (rows[s:s + chunk_size],))
                  for s in range(0, len(rows), chunk_size)]
        loss = loss_fn()(torch.cat(z).view(sum(sizes), 2, -1), y)
        loss.backward()
        for r, res in enumerate(ddp_results):
            got = res[case]["steps"][step]
            close(got["grads"], grads(model), 1e-10, f"step {step}, rank {r}: DDP gradients")
            for name, value in state[r].items():
                close(got["buffers"][name], value, 1e-12, f"step {step}, rank {r}: {name}")
        close(torch.stack([res[case]["steps"][step]["loss"] for res in ddp_results]).mean(),
              loss.detach(), 1e-12, f"step {step}: mean of the ranks' losses")
        state = [state[0] for _ in sizes]  # the next step's first forward broadcasts rank 0's
    for r, res in enumerate(ddp_results):
        assert res[case]["all_reduces"] == [1] * DDP_STEPS, \
            f"rank {r}: all-reduces per step {res[case]['all_reduces']}"
