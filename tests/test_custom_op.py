"""The raw custom ops `modan_ext::supcon_fwd` / `supcon_bwd` and their registration.

opcheck (schema, fake kernels, autograd registration, AOT dispatch), gradcheck in float64 through
the kernel, torch.compile(fullgraph=True), a clear error on double backward, and the op contract
of ARCHITECTURE.md read directly: image-major rows, anchor ranges, per-row statistics, NaN, and
the integer codes of `modan_ext.options` against the compiled enums.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch._functorch.config
import torch._inductor.config
import torch.nn.functional as F

import modan_ext
from loss_cases import DEVICES, Spec, assert_close, build, reference_fn, require_kernel, run_loss
from modan_ext import ops
from modan_ext._validation import check_options
from modan_ext.options import (CONTRAST_MODES, LABEL_KIND_CODES, NORMALIZATION_CODES,
                               WEIGHTING_CODES, WEIGHTINGS)
from naive_oracle import label_sim, naive_loss

fwd = torch.ops.modan_ext.supcon_fwd
bwd = torch.ops.modan_ext.supcon_bwd


@pytest.fixture(params=DEVICES)
def device(request):
    require_kernel(request.param)
    return request.param


def op_args(case, device, dtype, anchor_begin=0, anchor_end=None, allow_tf32=False):
    """The canonical supcon_fwd arguments for `case`, built from the contract in ARCHITECTURE.md
    (the op-argument helpers of modan_ext.ops for the labels)."""
    opts = check_options(**case.options)
    features, labels = case.on(device, dtype)
    views = features.shape[1] if features.dim() == 3 else 1
    z = features.reshape(-1, features.shape[-1]).contiguous()  # image-major rows
    packed, kind = ops.canonical_labels(labels, features.shape[0], z.device)
    end = z.shape[0] if anchor_end is None else anchor_end
    return (z, packed, kind, views, anchor_begin, end, opts.contrast_mode == "one",
            opts.temperature, opts.base_temperature, opts.threshold,
            WEIGHTING_CODES[opts.weighting], NORMALIZATION_CODES[opts.normalization], allow_tf32)


def bwd_args(args, grad_loss, stats):
    z, packed, *scalars = args
    return (grad_loss, z, packed, stats, *scalars)


OP_CASES = [
    pytest.param(Spec(images=5, views=2, dim=8, pattern="mixed", num_labels=70, seed=1),
                 dict(), id="multi-hot"),
    pytest.param(Spec(images=4, views=3, dim=6, pattern="class_ids", seed=2),
                 dict(contrast_mode="one", normalization="weight"), id="class-ids-one"),
    pytest.param(Spec(images=7, views=1, dim=5, pattern="paper", seed=3),
                 dict(weighting="cosine", normalization="weight", threshold=0.5), id="paper"),
    pytest.param(Spec(images=3, views=2, dim=4, pattern="none", seed=4),
                 dict(weighting="binary"), id="simclr"),
]


# ---- registration ------------------------------------------------------------------------------

def test_kernel_available():
    assert modan_ext.kernel_available("cpu") == (ops.LOAD_ERROR is None)
    assert modan_ext.kernel_available("meta") is False
    assert modan_ext.kernel_available(torch.device("cpu")) == modan_ext.kernel_available("cpu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("spec,options", OP_CASES)
def test_opcheck_fwd(device, spec, options, dtype):
    case = build(spec, **options)
    args = op_args(case, device, dtype)
    args = (args[0].requires_grad_(True),) + args[1:]
    torch.library.opcheck(fwd, args)
    # an anchor range (a distributed rank's rows) through the same checks
    rows = args[0].shape[0]
    ranged = op_args(case, device, dtype, anchor_begin=1, anchor_end=rows - 1)
    torch.library.opcheck(fwd, (ranged[0].requires_grad_(True),) + ranged[1:])


@pytest.mark.parametrize("spec,options", OP_CASES[:2])
def test_opcheck_bwd(device, spec, options):
    case = build(spec, **options)
    args = op_args(case, device, torch.float64)
    loss, stats = fwd(*args)
    grad_loss = torch.randn_like(loss)
    torch.library.opcheck(bwd, bwd_args(args, grad_loss, stats))


# ---- the contract, read directly ---------------------------------------------------------------

@pytest.mark.parametrize("spec,options", OP_CASES)
def test_rows_are_image_major_and_stats_are_the_contract(device, spec, options):
    """loss[r] is the naive per-anchor loss of row r = image * V + view; stats[r] is
    (lse, |P|, Σw, norm, entropy) computed here from the formula, float64 whatever the features'
    dtype; non-anchors are all zero."""
    case = build(spec, **options)
    args = op_args(case, device, torch.float64)
    loss, stats = fwd(*args)
    z = args[0].cpu()
    M = z.shape[0]
    views = args[3]
    B = M // views
    assert ops.STATS_COLUMNS == ("lse", "count", "omega", "norm", "entropy")
    assert loss.shape == (M,) and stats.shape == (M, 5)
    assert loss.dtype == stats.dtype == torch.float64
    loss32, stats32 = fwd(*op_args(case, device, torch.float32))
    assert loss32.dtype == torch.float32 and stats32.dtype == torch.float64
    assert_close(stats32.cpu(), stats.cpu(), 1e-5, "stats from float32 features")
    o = case.options
    naive = naive_loss(case.features, case.labels, **dict(o, reduction="none",
                                                          contrast_mode="all"))
    labels = case.labels
    for r in range(M):
        anchor = not (o["contrast_mode"] == "one" and r % views)
        if not anchor:
            assert float(loss[r]) == 0 and torch.all(stats[r] == 0), (r, loss[r], stats[r])
            continue
        i = r // views
        weights = []
        for b in range(M):
            j = b // views
            if b == r:
                continue
            if i == j:
                weights.append(1.0)
                continue
            s = label_sim(labels, i, j, o["weighting"])
            if s >= o["threshold"] and s > 0:
                weights.append(1.0 if o["weighting"] == "binary" else s)
        count, omega = len(weights), math.fsum(weights)
        others = torch.cat([z[:r], z[r + 1:]]) @ z[r] / o["temperature"]
        lse = float(torch.logsumexp(others, 0)) if M > 1 else 0.0
        entropy = float(lse - (torch.softmax(others, 0) * others).sum()) if M > 1 else 0.0
        norm = count if o["normalization"] == "count" else omega
        expected = torch.tensor([lse, count, omega, norm, entropy], dtype=torch.float64)
        if count == 0:
            expected = torch.tensor([lse, 0.0, 0.0, 0.0, entropy], dtype=torch.float64)
        assert_close(stats[r, 1:4].cpu(), expected[1:4], 1e-12,
                     f"stats (count, Σw, norm) row {r}")
        assert_close(stats[r, :1].cpu(), expected[:1], 1e-12, f"stats lse row {r}")
        assert_close(stats[r, 4:].cpu(), expected[4:], 1e-10, f"stats entropy row {r}")
        expected_loss = naive.reshape(-1)[r]
        assert_close(loss[r:r + 1].cpu(), expected_loss.reshape(1), 1e-10, f"loss row {r}")


def _count_and_omega(labels, weighting: str, threshold: float):
    """|P(a)| and Σ w over P(a) of every anchor of a one-view batch, from the formula."""
    count, omega = [], []
    for i in range(labels.shape[0]):
        sims = [label_sim(labels, i, j, weighting) for j in range(labels.shape[0]) if j != i]
        weights = [1.0 if weighting == "binary" else s for s in sims if s >= threshold and s > 0]
        count.append(len(weights))
        omega.append(math.fsum(weights))
    return (torch.tensor(count, dtype=torch.float64), torch.tensor(omega, dtype=torch.float64))


def test_codes_match_the_compiled_enums(device):
    """Each code of `modan_ext.options` makes the op do what its name says (per-row statistics
    against the formula), so a table that drifts from the C++ enums (csrc/supcon_pair.h) fails
    here. The batch is chosen so that every weighting, both normalizations and both label kinds
    give different statistics (checked first: the test has teeth)."""
    labels = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 1], [0, 0, 0, 1]],
                          dtype=torch.bool)
    z = F.normalize(torch.randn(5, 6, generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64), dim=-1).to(device)

    def stats(labels_for_op, kind, weighting, normalization):
        return fwd(z, labels_for_op.to(device), kind, 1, 0, 5, False, 0.1, 0.1, 0.3,
                   weighting, normalization, False)[1].cpu()

    expected = {w: _count_and_omega(labels, w, 0.3) for w in WEIGHTINGS}
    for a, b in itertools.combinations(WEIGHTINGS, 2):
        assert not torch.equal(expected[a][1], expected[b][1]), f"{a} and {b} look alike here"
    assert not torch.equal(*expected["jaccard"]), "count and weight normalization look alike"
    packed = ops.pack_labels(labels)
    for (weighting, w_code), (normalization, n_code) in itertools.product(
            WEIGHTING_CODES.items(), NORMALIZATION_CODES.items()):
        count, omega = expected[weighting]
        norm = count if normalization == "count" else omega
        got = stats(packed, LABEL_KIND_CODES["multi_hot"], w_code, n_code)
        assert_close(got[:, 1:4], torch.stack([count, omega, norm], 1), 1e-12,
                     f"stats (count, omega, norm) of {weighting}/{normalization}")

    # The same int64 column read as class ids (equal ids) and as one word of label bits.
    ids = torch.tensor([1, 3, 2, 1, 0])
    as_ids, _ = _count_and_omega(ids, "jaccard", 0.3)
    as_bits, _ = _count_and_omega((ids[:, None] >> torch.arange(2)) & 1, "jaccard", 0.3)
    assert not torch.equal(as_ids, as_bits)
    jaccard, count = WEIGHTING_CODES["jaccard"], NORMALIZATION_CODES["count"]
    for kind, expected_count in (("class_ids", as_ids), ("multi_hot", as_bits)):
        got = stats(ids[:, None], LABEL_KIND_CODES[kind], jaccard, count)
        assert torch.equal(got[:, 1], expected_count), f"label kind {kind}: counts {got[:, 1]}"


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0, 1.0 + 2 ** -52, 1.5, 7.0])
def test_class_ids_follow_the_multi_hot_rule(device, threshold):
    """Class ids are sim = 1 for equal ids and 0 otherwise, then the one multi-hot rule
    (positive iff sim >= threshold and sim > 0, supcon_pair.h): the op gives class ids exactly
    what it gives one-hot multi-hot labels of the same classes, for every weighting and for
    thresholds above 1 too, where only an image's other views are positives. Reachable through
    torch.ops only: the Python layer rejects a threshold outside [0, 1]."""
    ids = torch.tensor([4, 4, 7, 4, 9])  # images 0, 1 and 3 share a class
    one_hot = ops.pack_labels(F.one_hot(ids % 8, 8).bool())  # classes 4, 7 and 9 -> 4, 7, 1
    z = F.normalize(torch.randn(10, 6, generator=torch.Generator().manual_seed(5),
                                dtype=torch.float64), dim=-1).to(device)
    views = 2
    for weighting in WEIGHTING_CODES.values():
        def run(labels, kind):
            args = (z, labels.to(device), kind, views, 0, 10, False, 0.1, 0.07, threshold,
                    weighting, NORMALIZATION_CODES["count"], False)
            loss, stats = fwd(*args)
            grad = bwd(*bwd_args(args, torch.ones_like(loss), stats))
            return loss.cpu(), stats.cpu(), grad.cpu()
        as_ids = run(ids[:, None], LABEL_KIND_CODES["class_ids"])
        as_bits = run(one_hot, LABEL_KIND_CODES["multi_hot"])
        same_class = 1.0 >= threshold
        expected_count = torch.tensor([5, 5, 1, 5, 1] if same_class else [1] * 5,
                                      dtype=torch.float64).repeat_interleave(views)
        assert torch.equal(as_ids[1][:, ops.STATS["count"]], expected_count), \
            f"weighting {weighting}, threshold {threshold}: counts {as_ids[1][:, 1]}"
        for got, expected, what in zip(as_ids, as_bits, ("loss", "stats", "gradient")):
            assert_close(got, expected, 1e-12, f"class ids vs one-hot {what}, weighting "
                                               f"{weighting}, threshold {threshold}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("first_view_only", [False, True])
def test_anchor_ranges_partition_the_problem(device, dtype, first_view_only):
    """A distributed rank passes its own rows as the anchor range: the ranks' loss rows, stats
    and (summed) gradients equal the full problem's. Ranges cross the 256-row tiles."""
    case = build(Spec(images=301, views=2, dim=19, pattern="paper", seed=9),
                 contrast_mode="one" if first_view_only else "all")
    full = op_args(case, device, dtype)
    M = full[0].shape[0]
    loss, stats = fwd(*full)
    grad_loss = torch.randn(M, dtype=dtype, generator=torch.Generator().manual_seed(0))
    grad_loss = grad_loss.to(device)
    grad = bwd(*bwd_args(full, grad_loss, stats))
    cuts = [0, 1, 255, 256, 257, 400, 511, M]
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    parts_grad = torch.zeros_like(grad)
    for begin, end in zip(cuts[:-1], cuts[1:]):
        args = op_args(case, device, dtype, anchor_begin=begin, anchor_end=end)
        part_loss, part_stats = fwd(*args)
        assert part_loss.shape == (end - begin,) and part_stats.shape == (end - begin, 5)
        assert_close(part_loss, loss[begin:end], rtol, f"loss rows [{begin}, {end})")
        assert_close(part_stats, stats[begin:end], rtol, f"stats rows [{begin}, {end})")
        parts_grad += bwd(*bwd_args(args, grad_loss[begin:end].contiguous(), part_stats))
    assert_close(parts_grad, grad, 10 * rtol, "sum of the ranks' gradients")
    # an empty range is valid and contributes nothing
    args = op_args(case, device, dtype, anchor_begin=5, anchor_end=5)
    empty_loss, empty_stats = fwd(*args)
    assert empty_loss.shape == (0,) and empty_stats.shape == (0, 5)
    assert torch.all(bwd(*bwd_args(args, empty_loss, empty_stats)) == 0)


def test_allow_tf32_is_ignored_on_cpu():
    require_kernel("cpu")
    case = build(Spec(images=6, views=2, dim=9, seed=3))
    a = fwd(*op_args(case, "cpu", torch.float32, allow_tf32=False))
    b = fwd(*op_args(case, "cpu", torch.float32, allow_tf32=True))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_give_nan_everywhere(device, dtype, bad):
    """Contract: every loss entry and every gradient entry is NaN (the kernel never raises)."""
    case = build(Spec(images=300, views=1, dim=7, pattern="paper", seed=5))
    args = op_args(case, device, dtype)
    args[0][299, 3] = bad  # in the last tile only
    loss, stats = fwd(*args)
    assert torch.isnan(loss).all(), loss
    grad = bwd(*bwd_args(args, torch.ones_like(loss), stats))
    assert torch.isnan(grad).all()
    # the public function with nan_policy="propagate": a NaN gradient, too
    features = args[0].detach().reshape(300, 7).clone().requires_grad_(True)
    out = modan_ext.jaccard_supcon_loss(features, case.labels.to(device), backend="kernel",
                                        nan_policy="propagate")
    out.backward()
    assert torch.isnan(out) and torch.isnan(features.grad).all()


def test_pack_labels_bit_layout():
    """Label k -> bit k % 64 of word k // 64, bit 63 included (the int64 sign bit)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(9, 300, generator=gen) < 0.5
    y[0] = False
    y[1, 63] = True
    y[2] = True
    packed = ops.pack_labels(y)
    assert packed.dtype == torch.int64 and packed.shape == (9, 5)
    for b in range(9):
        for w in range(5):
            value = sum(1 << (k - 64 * w) for k in range(64 * w, min(64 * w + 64, 300)) if y[b, k])
            if value >= 1 << 63:
                value -= 1 << 64  # two's complement int64
            assert int(packed[b, w]) == value, (b, w)


BAD_OP_ARGS = {
    "views-do-not-divide": lambda a: a[:3] + (4,) + a[4:],
    "anchor-end-past-M": lambda a: a[:5] + (a[0].shape[0] + 1,) + a[6:],
    "anchor-begin-negative": lambda a: a[:4] + (-1,) + a[5:],
    "anchor-range-reversed": lambda a: a[:4] + (3, 2) + a[6:],
    "labels-int32": lambda a: (a[0], a[1].int()) + a[2:],
    "labels-1d": lambda a: (a[0], a[1][:, 0].contiguous()) + a[2:],
    "class-ids-two-words": lambda a: (a[0], torch.zeros(a[1].shape[0], 2, dtype=torch.long), 1)
    + a[3:],
    "label-kind-2": lambda a: a[:2] + (2,) + a[3:],
    "features-float16": lambda a: (a[0].half(),) + a[1:],
    "features-int": lambda a: (a[0].long(),) + a[1:],
    "features-non-contiguous": lambda a: (a[0].T.contiguous().T,) + a[1:],
    "features-3d": lambda a: (a[0][None],) + a[1:],
    "temperature-0": lambda a: a[:7] + (0.0,) + a[8:],
    "weighting-5": lambda a: a[:10] + (5,) + a[11:],
    "normalization-2": lambda a: a[:11] + (2,) + a[12:],
}


@pytest.mark.parametrize("name", list(BAD_OP_ARGS))
def test_raw_op_rejects_inconsistent_arguments(name):
    """The kernel checks its canonical arguments: an exception with a message, never a crash."""
    require_kernel("cpu")
    case = build(Spec(images=6, views=2, dim=8, pattern="mixed", num_labels=70, seed=1))
    args = BAD_OP_ARGS[name](op_args(case, "cpu", torch.float32))
    with pytest.raises(RuntimeError, match="modan_ext"):
        fwd(*args)


def test_raw_bwd_rejects_inconsistent_arguments():
    require_kernel("cpu")
    case = build(Spec(images=6, views=2, dim=8, seed=1))
    args = op_args(case, "cpu", torch.float32)
    loss, stats = fwd(*args)
    for grad_loss, st in ((loss[:-1].contiguous(), stats), (loss.double(), stats),
                          (loss, stats[:, :4].contiguous()), (loss, stats[:-1].contiguous()),
                          (loss, stats.float()), (loss, stats.T.contiguous().T)):
        with pytest.raises(RuntimeError, match="modan_ext"):
            bwd(*bwd_args(args, grad_loss, st))


# ---- gradcheck through the kernel --------------------------------------------------------------

GRADCHECK_CASES = [
    (Spec(images=3, views=2, dim=4, pattern="mixed", num_labels=5, seed=1), dict()),
    (Spec(images=4, views=1, dim=3, pattern="random", num_labels=70, density=0.5, seed=2),
     dict(weighting="dice", normalization="weight", reduction="none", threshold=0.2)),
    (Spec(images=3, views=3, dim=3, pattern="class_ids", seed=3),
     dict(contrast_mode="one", reduction="sum", temperature=0.5)),
    (Spec(images=4, views=0, dim=5, pattern="paper", seed=4),
     dict(weighting="overlap", threshold=0.5, reduction="none")),
    (Spec(images=2, views=2, dim=3, pattern="none", scale=2.5, seed=5),
     dict(weighting="cosine", contrast_mode="one", reduction="none", base_temperature=0.3)),
    (Spec(images=3, views=2, dim=4, pattern="zero", seed=6),
     dict(weighting="binary", normalization="weight", temperature=0.2)),
]


@pytest.mark.parametrize("spec,options", GRADCHECK_CASES,
                         ids=[f"{s.pattern}-{o.get('reduction', 'mean')}"
                              for s, o in GRADCHECK_CASES])
def test_gradcheck_through_kernel(device, spec, options):
    case = build(spec, **options)
    features, labels = case.on(device, torch.float64)
    features.requires_grad_(True)

    def f(x):
        return modan_ext.jaccard_supcon_loss(x, labels, backend="kernel", **case.options)
    assert torch.autograd.gradcheck(f, (features,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_raw_op_with_anchor_range(device):
    case = build(Spec(images=4, views=2, dim=3, pattern="mixed", seed=8),
                 weighting="jaccard", normalization="weight", threshold=0.1)
    args = op_args(case, device, torch.float64, anchor_begin=2, anchor_end=7)
    z = args[0].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fwd(x, *args[1:])[0], (z,), eps=1e-6, atol=1e-7)


# ---- double backward ---------------------------------------------------------------------------

def test_double_backward_raises_clearly(device):
    case = build(Spec(images=4, views=2, dim=5, seed=2))
    features, labels = case.on(device, torch.float64)
    features.requires_grad_(True)
    loss = modan_ext.jaccard_supcon_loss(features, labels, backend="kernel")
    (grad,) = torch.autograd.grad(loss, features, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward") as info:
        torch.autograd.grad(grad.pow(2).sum(), features)
    assert "reference" in str(info.value)  # names the way out


def test_reference_supports_double_backward():
    """The documented way out: the reference is plain PyTorch (gradgradcheck, float64)."""
    case = build(Spec(images=3, views=2, dim=3, seed=2))
    features, labels = case.on("cpu", torch.float64)
    features.requires_grad_(True)

    def f(x):
        return modan_ext.jaccard_supcon_loss(x, labels, backend="reference")
    assert torch.autograd.gradgradcheck(f, (features,), eps=1e-6, atol=1e-6)


# ---- torch.compile -----------------------------------------------------------------------------

@torch._inductor.config.patch(fx_graph_cache=False)
@torch._functorch.config.patch(enable_autograd_cache=False)
def test_compile_fullgraph_matches_eager(device):
    """torch.compile(fullgraph=True) traces through the custom op (fake kernel + autograd), with
    a projection head in front, and gives the eager loss and gradients. Inductor's graph caches
    are off here: their key is the graph's code, which names the op but not what its fake kernel
    returns, so a graph cached before a change of the op contract (e.g. the stats' shape) would
    be replayed with the old output metadata."""
    import torch._dynamo
    torch._dynamo.reset()
    case = build(Spec(images=16, views=2, dim=12, pattern="paper", seed=3),
                 weighting="dice", reduction="mean")
    features, labels = case.on(device, torch.float32)
    head = torch.nn.Linear(12, 8).to(device)

    def step(x, y):
        z = F.normalize(head(x), dim=-1)
        return modan_ext.jaccard_supcon_loss(z, y, backend="kernel", weighting="dice")

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    out = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        head.zero_grad()
        x = features.clone().requires_grad_(True)
        loss = fn(x, labels)
        loss.backward()
        out[name] = (loss.detach(), x.grad, head.weight.grad.clone())
    for a, e, what in zip(out["compiled"], out["eager"], ("loss", "input grad", "weight grad")):
        assert_close(a, e, 1e-5, f"compiled vs eager {what}")
    # new values, same shapes: no recompilation, still right
    x2 = torch.randn_like(features)
    assert_close(compiled(x2, labels), step(x2, labels), 1e-5, "compiled, second batch")


def test_compile_fullgraph_module_dynamic_shapes(device):
    """The module under torch.compile(fullgraph=True, dynamic=True): batch sizes change, the
    fake kernel's symbolic shapes hold (reduction="none": [B, V])."""
    import torch._dynamo
    torch._dynamo.reset()
    module = modan_ext.JaccardSupConLoss(backend="kernel", reduction="none")
    graphs = []

    def recording_aot_eager(gm, example_inputs):  # keeps the traced graphs for inspection
        graphs.append(str(gm.graph))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=recording_aot_eager)
    first = None
    for images in (6, 9, 13, 20):
        case = build(Spec(images=images, views=2, dim=8, pattern="mixed", seed=images))
        compiled(*case.on(device, torch.float32))
        # Dynamo may hand the backend more than one graph while tracing the first call; what
        # matters is that later batch sizes reuse them.
        first = len(graphs) if first is None else first
    assert graphs and len(graphs) == first, (
        f"{len(graphs) - first} recompilation(s) for 3 new batch sizes under dynamic=True")


# ---- memory ------------------------------------------------------------------------------------

_MEMORY_SCRIPT = r"""
import json, sys, torch, modan_ext
torch.set_num_threads(int(sys.argv[3]))
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
def step(rows, dim):
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(rows // 2, 2, dim, generator=g), dim=-1)
    y = torch.rand(rows // 2, 12, generator=g) < 0.2
    f.requires_grad_(True)
    return f, y
f, y = step(512, 8)
modan_ext.jaccard_supcon_loss(f, y, backend=sys.argv[4]).backward()
del f, y
rss0 = kib("VmRSS")
f, y = step(int(sys.argv[1]), int(sys.argv[2]))
open("/proc/self/clear_refs", "w").write("5")
loss = modan_ext.jaccard_supcon_loss(f, y, backend=sys.argv[4])
loss.backward()
print(json.dumps(dict(growth=kib("VmHWM") - rss0, features=f.numel() * 4, labels=y.numel())))
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_memory_is_not_quadratic(threads):
    """A fused forward+backward at M = 8192 needs its inputs, the gradient and small per-thread
    buffers: far less than one M x M float32 matrix (256 MiB). Peak RSS in a fresh process."""
    import json
    import subprocess
    import sys
    require_kernel("cpu")
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs) here")
    rows, dim = 8192, 32
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(rows), str(dim),
                           str(threads), "kernel"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    over = r["growth"] - 2 * r["features"] - r["labels"]  # inputs and the gradient
    assert over < 32 * 2 ** 20, f"peak RSS {over / 2 ** 20:.1f} MiB over inputs + gradient"


_RETAINED_SCRIPT = r"""
import ctypes, gc, json, sys, torch, modan_ext
torch.set_num_threads(int(sys.argv[1]))
trim = ctypes.CDLL("libc.so.6").malloc_trim
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
def call(images, dim):
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(images, 2, dim, generator=g), dim=-1)
    y = torch.rand(images, 12, generator=g) < 0.2
    modan_ext.jaccard_supcon_loss(f.requires_grad_(True), y, backend="kernel").backward()
call(32, 8)
gc.collect(); trim(0)
rss0 = rss()
for _ in range(2):
    call(4, 2 ** 18)
gc.collect(); trim(0)
print(json.dumps(dict(retained=rss() - rss0)))
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_scratch_is_returned_after_the_call(threads):
    """The CPU kernel's scratch scales with the problem and is freed when the call returns:
    M = 8 rows of D = 2^18 (8 MiB of features) leave nothing resident beyond what the allocator
    keeps (trimmed here), where a 256 x D buffer per thread used to stay: 259 MiB
    (benchmarks/bench_scratch.py)."""
    import json
    import subprocess
    import sys
    require_kernel("cpu")
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("needs glibc's malloc_trim to tell freed memory from kept memory")
    proc = subprocess.run([sys.executable, "-c", _RETAINED_SCRIPT, str(threads)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    retained = json.loads(proc.stdout.strip().splitlines()[-1])["retained"]
    assert retained < 16 * 2 ** 20, f"{retained / 2 ** 20:.1f} MiB stayed resident after the call"


@pytest.mark.parametrize("contrast_mode", CONTRAST_MODES)
def test_non_contiguous_upstream_gradient(device, contrast_mode):
    """reduction="none" with an upstream gradient that is expanded or transposed (as autograd
    produces for e.g. loss.sum() or loss.T @ w) gives the same gradient as a contiguous one."""
    case = build(Spec(images=5, views=3, dim=6, pattern="mixed", seed=12),
                 reduction="none", contrast_mode=contrast_mode)
    features, labels = case.on(device, torch.float64)
    f = features.clone().requires_grad_(True)
    loss = modan_ext.jaccard_supcon_loss(f, labels, backend="kernel", **case.options)
    gen = torch.Generator().manual_seed(0)
    if contrast_mode == "all":
        dense = torch.randn(3, 5, generator=gen, dtype=torch.float64).to(device)
        upstreams = [dense.T, torch.full((1, 1), 0.7, dtype=torch.float64,
                                         device=device).expand(5, 3)]
    else:
        dense = torch.randn(5, 2, generator=gen, dtype=torch.float64).to(device)
        upstreams = [dense[:, 1], torch.full((1,), 0.7, dtype=torch.float64,
                                             device=device).expand(5)]
    for up in upstreams:
        assert not up.is_contiguous()
        (grad,) = torch.autograd.grad(loss, f, up, retain_graph=True)
        (expected,) = torch.autograd.grad(loss, f, up.contiguous(), retain_graph=True)
        ref_f = features.clone().requires_grad_(True)
        ref = reference_fn(ref_f, labels, **case.options)
        (ref_grad,) = torch.autograd.grad(ref, ref_f, up.contiguous())
        assert torch.equal(grad, expected)
        assert_close(grad, ref_grad, 1e-10, "gradient, non-contiguous upstream")


@pytest.mark.parametrize("dim", [1, 511, 2048])
def test_wide_features(device, dim):
    """D much larger than M (and D = 1): the products and gradient rows of any width."""
    for spec in (Spec(images=5, views=2, dim=dim, pattern="mixed", seed=dim),
                 Spec(images=140, views=2, dim=dim, pattern="paper", seed=dim)):
        case = build(spec, reduction="none")
        features, labels = case.on(device, torch.float64)
        loss, grad = run_loss(modan_ext.jaccard_supcon_loss, features, labels, backend="kernel",
                              **case.options)
        expected, expected_grad = run_loss(reference_fn, features, labels, **case.options)
        assert_close(loss, expected, 1e-10, f"loss, D = {dim}")
        assert_close(grad, expected_grad, 1e-10, f"gradient, D = {dim}")


def _chunk_oracle(z, labels, views, anchors, grad_loss, T, Tb, threshold, weighting,
                  normalization):
    """float64 loss rows, stats and gradient for the anchor rows `anchors` only, straight from
    the formula on a [|A|, M] slab (multi-hot labels of the B = M / views images)."""
    z = z.double()
    M = z.shape[0]
    logits = z[anchors] @ z.T / T
    logits[torch.arange(len(anchors)), anchors] = float("-inf")
    lse = torch.logsumexp(logits, 1)
    y = (labels != 0).double()
    image = anchors // views
    inter = y[image] @ y.T
    n = y.sum(1)
    ni, nj = n[image][:, None], n[None, :]
    if weighting == "dice":
        sim = torch.where(ni + nj > 0, 2 * inter / (ni + nj).clamp_min(1), 0 * inter)
    else:  # jaccard
        union = ni + nj - inter
        sim = torch.where(union > 0, inter / union.clamp_min(1), 0 * inter)
    w = torch.where((sim >= threshold) & (sim > 0), sim, 0 * sim)
    w[torch.arange(len(anchors)), image] = 1.0  # same image
    w = w.repeat_interleave(views, dim=1)  # image -> rows (image-major)
    w[torch.arange(len(anchors)), anchors] = 0.0  # not itself
    count = (w > 0).sum(1).double()
    omega = w.sum(1)
    norm = count if normalization == "count" else omega
    logp = logits - lse[:, None]
    logp[torch.arange(len(anchors)), anchors] = 0.0
    loss = -(T / Tb) * (w * logp).sum(1) / norm.clamp_min(1e-300)
    loss = torch.where(count > 0, loss, 0 * loss)
    p = torch.exp(logp)
    p[torch.arange(len(anchors)), anchors] = 0.0
    scale = grad_loss.double() / (Tb * norm.clamp_min(1e-300))
    G = scale[:, None] * (omega[:, None] * p - w)
    G = torch.where(count[:, None] > 0, G, 0 * G)
    grad = G.T @ z[anchors]  # d/dz_b of s_ab
    grad[anchors] += G @ z  # d/dz_a of s_ab
    entropy = lse - (torch.softmax(logits, 1) * logits.nan_to_num(neginf=0.0)).sum(1)
    stats = torch.stack([lse, count, omega, torch.where(count > 0, norm, 0 * norm), entropy], 1)
    return loss, stats, grad


@pytest.mark.parametrize("views", [1, 2])
def test_beyond_65536_rows_by_anchor_ranges(views):
    """M = 70002 (M^2 > 2^32: 32-bit index arithmetic would wrap): loss rows, stats and the
    gradient of anchor ranges at the start, across a tile edge and at the very end, against a
    float64 slab of the formula. Only tiles holding anchors are computed, so this is fast."""
    require_kernel("cpu")
    M, D = 70002, 4
    gen = torch.Generator().manual_seed(views)
    z = F.normalize(torch.randn(M, D, generator=gen), dim=-1)
    B = M // views
    labels = torch.zeros(B, 12, dtype=torch.bool)
    labels[torch.arange(B), torch.randint(3, (B,), generator=gen)] = True
    labels[torch.arange(B), 3 + torch.randint(9, (B,), generator=gen)] = True
    packed = ops.pack_labels(labels)
    T, Tb, threshold = 0.1, 0.07, 0.3
    for weighting, normalization in (("jaccard", "count"), ("dice", "weight")):
        for begin, end in ((0, 40), (65500, 65560), (M - 37, M)):
            args = (z, packed, LABEL_KIND_CODES["multi_hot"], views, begin, end, False, T, Tb,
                    threshold, WEIGHTING_CODES[weighting], NORMALIZATION_CODES[normalization],
                    False)
            loss, stats = fwd(*args)
            g = torch.randn(end - begin, generator=gen)
            grad = bwd(g, z, packed, stats, *args[2:])
            e_loss, e_stats, e_grad = _chunk_oracle(z, labels, views, torch.arange(begin, end),
                                                    g, T, Tb, threshold, weighting,
                                                    normalization)
            what = f"rows [{begin}, {end}), {weighting}/{normalization}"
            assert_close(loss, e_loss, 1e-5, f"loss {what}")
            assert_close(stats, e_stats, 1e-5, f"stats {what}")
            assert_close(grad, e_grad, 1e-5, f"gradient {what}")
