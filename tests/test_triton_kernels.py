"""The Triton kernels against the float64 reference: every option of the op contract, shapes
across the tile edges, label words, ties, anchor ranges, NaN, 16-bit inputs, the v2 statistics and
the gradient at large logits.

Without a GPU they run in Triton's interpreter on CPU tensors (tests/triton_setup.py); on a GPU
machine the same tests run the compiled kernels on CUDA tensors. The kernels' tiles are 64 rows x
32 columns with feature blocks of 64 / 128 (streamed in blocks of 32 or 64 above 128), so M up to
~100 crosses several tiles both ways and D in {63, 64, 65, 127, 128, 129, 200} every block edge.
"""
from __future__ import annotations

import triton_setup  # noqa: F401  (first: decides where the kernels run)

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import modan_ext
from loss_cases import (GRID, Spec, assert_close, build, examples, natural_scales, option_sets,
                        reference_fn, run_loss, specs, tolerance, upstream_like)
from modan_ext import ops
from modan_ext import options as options_module
from triton_setup import DEVICE, HALF_TOLERANCE, requires_device, triton_fn

pytestmark = requires_device


def compare(case, dtype, seed=0, rtol=None):
    """The Triton backend on `dtype` features vs the float64 reference on the same values."""
    features, labels = case.on(DEVICE, dtype)
    loss, grad = run_loss(triton_fn, features, labels, seed=seed, **case.options)
    expected_loss, expected_grad = run_loss(reference_fn, features.double(), labels, seed=seed,
                                            **case.options)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.device == features.device
    tol = rtol if rtol is not None else tolerance(dtype, case.options, case.spec.scale)
    loss_floor, grad_floor = natural_scales(features, case.options, seed)
    assert_close(loss, expected_loss, tol, f"loss {case}", loss_floor)
    assert_close(grad, expected_grad, tol, f"gradient {case}", grad_floor)
    return loss, grad


# ---- every option, every label pattern ----------------------------------------------------------

@pytest.mark.parametrize("spec,options", GRID)
def test_grid_float64(spec, options):
    compare(build(spec, **options), torch.float64)


@pytest.mark.parametrize("spec,options", GRID[1::3])
def test_grid_float32(spec, options):
    compare(build(spec, **options), torch.float32)


@settings(max_examples=examples(12))
@given(spec=specs(max_rows=100, min_rows=33), options=option_sets(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_shapes_across_tiles(spec, options, seed, dtype):
    """M across several 64 x 32 tiles, D across the feature-block edges, L around word edges."""
    compare(build(spec, **options), dtype, seed)


@pytest.mark.parametrize("dim", [1, 63, 64, 65, 127, 128, 129, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_feature_block_edges(dim, dtype):
    spec = Spec(images=23, views=3, dim=dim, pattern="paper", seed=dim)
    compare(build(spec, reduction="none", threshold=0.3), dtype)


@pytest.mark.parametrize("num_labels", [1, 63, 64, 65, 128, 129, 300])
def test_label_words(num_labels):
    """Label counts at and around the 64-bit word boundaries, every weighting."""
    for weighting in ("jaccard", "dice", "cosine", "overlap", "binary"):
        spec = Spec(images=11, views=2, dim=8, pattern="random", num_labels=num_labels,
                    density=0.5, seed=num_labels)
        compare(build(spec, weighting=weighting, threshold=0.2, reduction="none"),
                torch.float64)


def test_high_label_bits_are_read():
    """Images that differ only in label 63 (the sign bit of a word) or 299 are not identical."""
    for col in (63, 299):
        labels = torch.zeros(4, 300, dtype=torch.bool)
        labels[:, 0] = True
        labels[:2, col] = True
        case = build(Spec(images=4, views=2, dim=5, seed=col), threshold=0.75, reduction="none")
        case.labels = labels
        with_bit, _ = compare(case, torch.float64)
        case.labels = labels[:, :col]
        without, _ = compare(case, torch.float64)
        assert not torch.allclose(with_bit, without), f"label column {col} ignored"


def _tie_labels():
    """Label sets with |y| = 1..6 and every overlap with a common row: similarities 1/3, 1/2, 3/5,
    2/3, 7/10, ... (as tests/test_kernel_vs_reference.py builds them)."""
    rows = []
    for n in range(1, 7):
        for k in range(0, n + 1):
            y = torch.zeros(16, dtype=torch.bool)
            y[:k] = True
            y[8:8 + n - k] = True
            rows.append(y)
    rows[0] = torch.zeros(16, dtype=torch.bool)
    rows[0][:10] = True
    return torch.stack(rows)


@pytest.mark.parametrize("weighting", ["jaccard", "dice", "cosine", "overlap", "binary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_threshold_ties(weighting, dtype):
    """A similarity equal to the threshold (as the nearest double: 1/3, 0.2, 0.3, 0.7 ...) is a
    positive, in float32 too: the kernels decide as supcon_pair.h does, in double."""
    labels = _tie_labels()
    spec = Spec(images=labels.shape[0], views=1, dim=6, seed=7)
    for threshold in (1 / 3, 0.2, 0.3, 0.7, 2 / 3, 0.30000000000000004):
        case = build(spec, weighting=weighting, threshold=threshold, reduction="none",
                     normalization="weight")
        case.labels = labels
        compare(case, dtype)


# ---- anchor ranges (first_view_only, a distributed rank's rows) --------------------------------

def _op_rows(z, packed, kind, views, begin, end, first_view_only, options):
    from modan_ext.triton_backend import forward_op
    return forward_op()(z, packed, kind, views, begin, end, first_view_only,
                        options["temperature"], options["base_temperature"],
                        options["threshold"], options_module.WEIGHTING_CODES[options["weighting"]],
                        options_module.NORMALIZATION_CODES[options["normalization"]], False)


@pytest.mark.parametrize("begin,end", [(0, 0), (0, 90), (6, 50), (33, 34), (41, 90), (90, 90)])
@pytest.mark.parametrize("first_view_only", [False, True])
def test_anchor_ranges(begin, end, first_view_only):
    """The raw op on anchor rows [begin, end) (every row a contrast): per-row losses equal the
    reference's rows, the others are 0, and the gradient is the reference's gradient of the
    range's losses."""
    case = build(Spec(images=30, views=3, dim=20, pattern="mixed", seed=begin + 7 * end),
                 reduction="none", weighting="dice", threshold=0.2)
    features, labels = case.on(DEVICE, torch.float64)
    opts = case.options
    z = features.reshape(-1, features.shape[-1]).clone().requires_grad_(True)
    packed, kind = ops.canonical_labels(labels, features.shape[0], features.device)
    loss, stats = _op_rows(z, packed, kind, 3, begin, end, first_view_only, opts)
    assert loss.shape == (end - begin,) and stats.shape == (end - begin, 5)
    assert stats.dtype == torch.float64

    f64 = features.detach().clone().requires_grad_(True)
    mode = "one" if first_view_only else "all"
    ref = reference_fn(f64, labels, **dict(opts, contrast_mode=mode))  # [B, V] or [B]
    rows = torch.zeros(90, dtype=torch.float64)
    if first_view_only:
        rows[::3] = ref
    else:
        rows[:] = ref.reshape(-1)  # rows image-major
    expected = rows[begin:end]
    assert_close(loss, expected, 1e-10, "range loss", 1.0)
    upstream = upstream_like(loss, seed=3)
    if loss.numel():
        (grad,) = torch.autograd.grad((loss * upstream).sum(), z)
        full = torch.zeros(90, dtype=torch.float64)
        full[begin:end] = upstream
        up = full[::3] if first_view_only else full.view(30, 3)
        (expected_grad,) = torch.autograd.grad((ref * up).sum(), f64)
        assert_close(grad, expected_grad.reshape(90, -1), 1e-10, "range gradient", 1.0)


# ---- statistics of op contract v2 ---------------------------------------------------------------

def _float64_stats(z, labels, views, threshold, weighting, temperature):
    """(lse, count, omega, entropy) per row in float64 from the reference's building blocks."""
    from modan_ext.reference import label_similarity, positive_weights
    x = (z @ z.T) / temperature
    eye = torch.eye(z.shape[0], dtype=torch.bool)
    x = x.masked_fill(eye, float("-inf"))
    lse = torch.logsumexp(x, dim=1)
    p = torch.softmax(x, dim=1)
    entropy = -(p * torch.where(eye, torch.zeros_like(x), torch.log(p.clamp_min(1e-300)))).sum(1)
    images = z.shape[0] // views
    weight = positive_weights(label_similarity(labels, images, weighting,
                                               z.device), threshold, weighting)
    image_of = torch.arange(z.shape[0]) // views
    w = weight[image_of][:, image_of].masked_fill(eye, 0)
    return lse, (w > 0).sum(1).double(), w.sum(1), entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("normalization", ["count", "weight"])
def test_statistics_v2(dtype, normalization):
    """stats [Ma, 5] float64 = (lse, count, omega, norm, entropy); count/omega/norm 0 without a
    positive, all five 0 for rows of the range that are not anchors (first_view_only)."""
    spec = Spec(images=35, views=2, dim=24, pattern="mixed", num_labels=12, seed=11)
    case = build(spec, reduction="none", normalization=normalization, weighting="jaccard",
                 temperature=0.2)
    features, labels = case.on(DEVICE, dtype)
    z = features.reshape(-1, features.shape[-1])
    packed, kind = ops.canonical_labels(labels, 35, z.device)
    for first_view_only in (False, True):
        _, stats = _op_rows(z, packed, kind, 2, 0, 70, first_view_only, case.options)
        assert stats.dtype == torch.float64 and stats.shape == (70, 5)
        lse, count, omega, entropy = _float64_stats(z.double().cpu(), labels.cpu(), 2, 0.3,
                                                    "jaccard", 0.2)
        norm = count if normalization == "count" else omega
        counted = count > 0
        expected = torch.stack([lse, count, omega, torch.where(counted, norm, 0 * norm),
                                entropy], 1)
        if first_view_only:
            expected[1::2] = 0
        rtol = 1e-12 if dtype == torch.float64 else 2e-6
        got = stats.cpu()
        for k, name in enumerate(("lse", "count", "omega", "norm", "entropy")):
            assert_close(got[:, k], expected[:, k], rtol, f"{name} fvo={first_view_only}", 1.0)
        assert (got[:, 4] >= 0).all()


# ---- large logits: each anchor's gradient, relative to itself ------------------------------------

def _near_tie_features(images, views, dim, seed, scale_exp):
    """Rows u + d_r: a common vector u (entries +-1/4) plus a sparse perturbation d_r (one entry
    +-2^-12 or none), times 2^scale_exp. Every product and sum is exact in float32 (and tf32):
    float32 and float64 see the same logits x = s / T for T a power of two. All rows are nearly
    parallel, so at T = 2^-16 the logits are ~2.5e4 (one float32 ulp ~ 2^-9) while their gaps
    are 0 or a few units: softmaxes with ties at the top, where an lse rounded to float32 misplaces
    p by ~1e-3."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.where(torch.rand(dim, generator=gen) < 0.5, -0.25, 0.25).double()
    d = torch.zeros(images * views, dim, dtype=torch.float64)
    pick = torch.randint(0, dim, (images * views,), generator=gen)
    d[torch.arange(images * views), pick] = torch.randint(-1, 2, (images * views,),
                                                         generator=gen).double() * 2.0 ** -12
    return ((u + d) * 2.0 ** scale_exp).reshape(images, views, dim)


LARGE_LOGITS = [pytest.param(0, 2.0 ** -16, id="T=2^-16"), pytest.param(0, 2.0 ** -18, id="T=2^-18"),
                pytest.param(3, 2.0 ** -10, id="unnormalised-x8")]


def _tie_problem(scale_exp):
    features = _near_tie_features(12, 2, 6, seed=5, scale_exp=scale_exp)
    labels = torch.zeros(12, 4, dtype=torch.bool)
    labels[torch.arange(12), torch.arange(12) % 4] = True  # 4 classes of 3 images
    return features, labels


@pytest.mark.parametrize("scale_exp,temperature", LARGE_LOGITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_large_logit_gradient_per_anchor(scale_exp, temperature, dtype):
    """Tiny temperatures and unnormalised features give |x| ~ 1e4-1e5 and nearly saturated
    softmaxes. Each anchor's own gradient (upstream = that anchor only) must match float64
    relative to its own size; an lse rounded to float32 (op contract v1) fails this (checked
    below)."""
    z, labels = _tie_problem(scale_exp)
    opts = dict(temperature=temperature, base_temperature=0.07, threshold=0.5, reduction="none")
    features, labels_d = z.to(device=DEVICE, dtype=dtype), labels.to(DEVICE)
    f = features.detach().clone().requires_grad_(True)
    loss = triton_fn(f, labels_d, **opts)
    f64 = z.clone().requires_grad_(True)
    ref = reference_fn(f64, labels, **opts)
    assert_close(loss, ref, 1e-10 if dtype == torch.float64 else 1e-6, "loss", 1.0)
    worst = 0.0
    for anchor in range(24):
        up = torch.zeros(24, dtype=torch.float64)
        up[anchor] = 1
        (grad,) = torch.autograd.grad((loss * up.view(12, 2).to(loss)).sum(), f,
                                      retain_graph=True)
        (ref_grad,) = torch.autograd.grad((ref * up.view(12, 2)).sum(), f64, retain_graph=True)
        size = float(ref_grad.norm())
        assert size > 0, "every anchor here has a positive"
        worst = max(worst, float((grad.cpu().double() - ref_grad).norm()) / size)
    assert worst <= (1e-10 if dtype == torch.float64 else 1e-5), worst


@pytest.mark.parametrize("scale_exp,temperature", LARGE_LOGITS)
def test_float32_rounded_lse_would_fail(scale_exp, temperature):
    """Negative control for the test above: the same backward fed an lse rounded to float32
    misses the float64 gradient by far more than 1e-5 (so that test can fail)."""
    from modan_ext.triton_backend import op
    z, labels = _tie_problem(scale_exp)
    packed, kind = ops.canonical_labels(labels, 12, "cpu")
    flat, packed = z.reshape(24, 6).float().to(DEVICE), packed.to(DEVICE)
    args = (kind, 2, 0, 24, False, temperature, 0.07, 0.5, 0, 0, False)
    loss, stats = op.triton_supcon_fwd(flat, packed, *args)
    up = torch.ones_like(loss)
    exact = op.triton_supcon_bwd(up, flat, packed, stats, *args)
    rounded = stats.clone()
    rounded[:, 0] = rounded[:, 0].float().double()
    coarse = op.triton_supcon_bwd(up, flat, packed, rounded, *args)
    f64 = z.clone().requires_grad_(True)
    ref = reference_fn(f64, labels, temperature=temperature, base_temperature=0.07,
                       threshold=0.5, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, f64)
    ref_grad = ref_grad.reshape(24, 6)

    def error(g):
        return float((g.cpu().double() - ref_grad).norm() / ref_grad.norm())
    assert error(exact) <= 1e-5 and error(coarse) >= 1e-4, (error(exact), error(coarse))


# ---- edge cases ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_nan_propagates_everywhere(dtype):
    case = build(Spec(images=20, views=2, dim=9, seed=2), reduction="none",
                 nan_policy="propagate")
    features, labels = case.on(DEVICE, dtype)
    features[3, 1, 4] = float("nan")
    loss, grad = run_loss(triton_fn, features, labels, **case.options)
    assert torch.isnan(loss).all() and torch.isnan(grad).all()
    features[3, 1, 4] = float("inf")
    loss, grad = run_loss(triton_fn, features, labels, **case.options)
    assert torch.isnan(loss).all() and torch.isnan(grad).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_positive_gives_zero_loss_and_gradient(reduction):
    """A batch without any positive (one view, distinct classes; and M = 1): loss 0, gradient 0,
    never NaN."""
    for images in (1, 40):
        case = build(Spec(images=images, views=1, dim=7, pattern="class_ids", seed=1),
                     reduction=reduction)
        case.labels = torch.arange(images)
        features, labels = case.on(DEVICE, torch.float32)
        loss, grad = run_loss(triton_fn, features, labels, **case.options)
        assert torch.equal(loss, torch.zeros_like(loss)), loss
        assert torch.equal(grad, torch.zeros_like(grad))


def test_class_ids_above_threshold_one_leave_only_views():
    """Op contract v2: class ids give sim 1, a positive iff 1 >= threshold; threshold > 1 (only
    through the raw op) leaves the other views of the same image."""
    z = torch.nn.functional.normalize(torch.randn(16, 2, 5, dtype=torch.float64), dim=-1)
    ids = torch.tensor([0, 1] * 8)
    z, ids = z.to(DEVICE), ids.to(DEVICE)
    flat = z.reshape(32, 5)
    packed, kind = ops.canonical_labels(ids, 16, z.device)
    opts = dict(temperature=0.1, base_temperature=0.07, weighting="jaccard",
                normalization="count")
    _, at_one = _op_rows(flat, packed, kind, 2, 0, 32, False, dict(opts, threshold=1.0))
    _, above = _op_rows(flat, packed, kind, 2, 0, 32, False, dict(opts, threshold=1.5))
    assert torch.all(at_one[:, 1] == 15)  # the other view + 7 images x 2 views of the class
    assert torch.all(above[:, 1] == 1)    # the other view only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs(dtype):
    """16-bit features: products in 16-bit tensor-core precision, float32 accumulation and
    statistics; loss float32, gradient in the features' dtype. Under Triton's interpreter bf16
    goes through the bf16-dot fix of `runtime` (its tl.dot reads bf16 as raw integers)."""
    for pattern, dim in (("paper", 32), ("mixed", 130)):
        case = build(Spec(images=40, views=2, dim=dim, pattern=pattern, seed=dim),
                     reduction="none")
        features, labels = case.on(DEVICE, dtype)
        loss, grad = run_loss(triton_fn, features, labels, **case.options)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        expected_loss, expected_grad = run_loss(reference_fn, features.double(), labels,
                                                **case.options)
        assert_close(loss, expected_loss, 1e-5, "loss")
        assert_close(grad, expected_grad, HALF_TOLERANCE[dtype], "gradient")


def test_deterministic():
    """Same input: bit-identical loss and gradient (no atomics; fixed reduction order)."""
    case = build(Spec(images=45, views=2, dim=40, pattern="paper", seed=8), reduction="none")
    features, labels = case.on(DEVICE, torch.float32)
    first = run_loss(triton_fn, features, labels, **case.options)
    again = run_loss(triton_fn, features, labels, **case.options)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_gradcheck_float64():
    from modan_ext.triton_backend import op
    z = torch.nn.functional.normalize(torch.randn(8, 5, dtype=torch.float64), dim=-1)
    labels = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0]] * 2).bool()
    packed, kind = ops.canonical_labels(labels, 8, "cpu")
    z, packed = z.to(DEVICE).requires_grad_(True), packed.to(DEVICE)

    def loss(z):
        return op.triton_supcon_fwd(z, packed, kind, 1, 1, 7, False, 0.3, 0.2, 0.3, 2, 1,
                                    False)[0]
    assert torch.autograd.gradcheck(loss, (z,), eps=1e-6, atol=1e-7)


def test_opcheck():
    """Schema, fake kernel and autograd registration are consistent (torch.library.opcheck)."""
    from modan_ext.triton_backend import op
    z = torch.nn.functional.normalize(torch.randn(12, 6, dtype=torch.float32), dim=-1)
    labels = torch.tensor([[3], [5], [3], [9], [5], [3]])
    z, labels = z.to(DEVICE).requires_grad_(True), labels.to(DEVICE)
    args = (z, labels, 1, 2, 2, 12, False, 0.1, 0.07, 0.3, 0, 0, False)
    torch.library.opcheck(op.triton_supcon_fwd, args)
    loss, stats = op.triton_supcon_fwd(*args)
    torch.library.opcheck(op.triton_supcon_bwd,
                          (torch.ones_like(loss), z.detach(), labels, stats) + args[2:])


def test_compile_fullgraph():
    """A model + loss step with the Triton backend compiles with fullgraph=True, and its loss and
    gradient are the eager ones. (Under the interpreter the ops are opaque to torch.compile;
    compiled for a GPU they are triton_ops that torch.compile traces down to the kernels: the
    codegen check traces that.)"""
    torch._dynamo.reset()
    case = build(Spec(images=20, views=2, dim=16, pattern="paper", seed=4))
    features, labels = case.on(DEVICE, torch.float32)
    weight = torch.randn(16, 16, device=DEVICE) * 0.3

    def step(x, w):
        z = torch.nn.functional.normalize(x @ w, dim=-1)
        return modan_ext.jaccard_supcon_loss(z, labels, backend="triton")

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        w = weight.clone().requires_grad_(True)
        loss = fn(features, w)
        loss.backward()
        results.append((loss.detach(), w.grad))
    assert_close(results[1][0], results[0][0], 1e-6, "compiled loss")
    assert_close(results[1][1], results[0][1], 1e-5, "compiled gradient")


def test_autocast_and_module():
    """Under autocast the loss runs in float32; the module reports the Triton backend."""
    case = build(Spec(images=12, views=2, dim=8, pattern="paper", seed=9))
    features, labels = case.on(DEVICE, torch.float32)
    module = modan_ext.JaccardSupConLoss(backend="triton")
    assert module.backend_for(DEVICE) == "triton"
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = module(features, labels)
    assert loss.dtype == torch.float32
    expected = reference_fn(features.double(), labels)
    assert math.isclose(float(loss), float(expected), rel_tol=1e-5)
