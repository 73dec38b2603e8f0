"""The fused kernel against the float64 reference: loss AND gradient, every option, every shape.

float64 kernel vs float64 reference: ~1e-10 relative; float32 kernel vs float64 reference (same
input values): ~1e-5 relative (see `loss_cases.tolerance`). The reference itself is checked against
a second oracle written from the formula anchor by anchor (`naive_oracle.naive_loss`), so a shared
misreading of the layout or of an option would not pass silently.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import modan_ext
from loss_cases import (DEVICES, GRID, LABEL_PATTERNS, Spec, assert_close, build, cases,
                        examples, kernel_fn, natural_scales, option_sets, reference_fn,
                        require_kernel, run_loss, specs, tolerance)
from modan_ext.options import WEIGHTINGS
from naive_oracle import naive_fn


def compare(case, device, dtype, fn=kernel_fn, oracle=reference_fn, seed=0, rtol=None):
    """fn on `dtype` features vs the oracle on the very same values in float64."""
    features, labels = case.on(device, dtype)
    loss, grad = run_loss(fn, features, labels, seed=seed, **case.options)
    expected_loss, expected_grad = run_loss(oracle, features.double(), labels, seed=seed,
                                            **case.options)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == out_dtype, f"loss dtype {loss.dtype} for {dtype} features"
    assert grad.dtype == dtype, f"gradient dtype {grad.dtype} for {dtype} features"
    assert loss.device == features.device and grad.device == features.device
    tol = rtol if rtol is not None else tolerance(dtype, case.options, case.spec.scale)
    loss_floor, grad_floor = natural_scales(features, case.options, seed)
    assert_close(loss, expected_loss, tol, f"loss {case}", loss_floor)
    assert_close(grad, expected_grad, tol, f"gradient {case}", grad_floor)
    return loss, grad


# ---- the reference against the anchor-by-anchor oracle ----------------------------------------

@settings(max_examples=examples(150))
@given(case=cases(spec_kwargs=dict(max_rows=10)))
def test_reference_matches_naive_oracle(case):
    compare(case, "cpu", torch.float64, fn=reference_fn, oracle=naive_fn)


@pytest.mark.parametrize("spec,options", GRID)
def test_reference_matches_naive_oracle_grid(spec, options):
    compare(build(spec, **options), "cpu", torch.float64, fn=reference_fn, oracle=naive_fn)


# ---- the kernel against the reference -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,options", GRID)
def test_kernel_matches_reference_grid(spec, options, device, dtype):
    require_kernel(device)
    compare(build(spec, **options), device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,options", GRID[::7])
def test_kernel_matches_naive_oracle(spec, options, device):
    require_kernel(device)
    compare(build(spec, **options), device, torch.float64, oracle=naive_fn)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(400))
@given(case=cases(), seed=st.integers(0, 2**16))
def test_kernel_matches_reference(device, dtype, case, seed):
    require_kernel(device)
    compare(case, device, dtype, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(100))
@given(spec=specs(scales=(0.3, 3.0, 10.0)), options=option_sets(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_kernel_matches_reference_unnormalised(device, spec, options, dtype):
    """Features are used as given; rows of any norm give the same loss as the reference."""
    require_kernel(device)
    compare(build(spec, **options), device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_labels", [1, 63, 64, 65, 128, 129, 300])
@pytest.mark.parametrize("pattern", ["random", "mixed", "identical", "one_hot", "full"])
def test_kernel_matches_reference_label_words(device, num_labels, pattern):
    """Label counts at and around the 64-bit word boundaries of the packed labels."""
    require_kernel(device)
    for weighting in WEIGHTINGS:
        spec = Spec(images=9, views=2, dim=8, pattern=pattern, num_labels=num_labels,
                    density=0.5, seed=num_labels)
        compare(build(spec, weighting=weighting, threshold=0.2, reduction="none"), device,
                torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_high_label_bits_are_read(device):
    """Images that differ only in label 299 (word 4, bit 43) or label 63 (bit 63, the sign bit
    of an int64 word) are not identical."""
    require_kernel(device)
    for col in (63, 127, 299):
        labels = torch.zeros(4, 300, dtype=torch.bool)
        labels[:, 0] = True
        labels[:2, col] = True  # images 0, 1: {0, col}; images 2, 3: {0}  -> Jaccard 1/2
        case = build(Spec(images=4, views=2, dim=5, seed=col), threshold=0.75,
                     reduction="none")
        case.labels = labels.to(device)
        # threshold 0.75: images 0 and 1 are positives of each other, not of images 2 and 3
        loss, _ = compare(case, device, torch.float64)
        case.labels = labels[:, :col].to(device)  # the same batch without label `col`
        loss_without, _ = compare(case, device, torch.float64)
        assert not torch.allclose(loss, loss_without), "label column ignored"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_threshold_ties(device, weighting, dtype):
    """A pair whose label similarity equals the threshold is a positive (>=), also in float32.

    Label sets with |y_i| = 1..6 and every overlap give similarities such as 1/3, 1/2, 3/5, 2/3,
    7/10 ...; each such value is used as the threshold (as the nearest double, i.e. how a user
    writes 0.7 or 1/3)."""
    require_kernel(device)
    rows = []
    for n in range(1, 7):
        for k in range(0, n + 1):
            y = torch.zeros(16, dtype=torch.bool)
            y[:k] = True  # shares k labels with the first row
            y[8:8 + n - k] = True
            rows.append(y)
    rows.append(torch.zeros(16, dtype=torch.bool))
    rows[0] = torch.zeros(16, dtype=torch.bool)
    rows[0][:10] = True  # |y_0| = 10: Jaccard 7/10, 3/10, ... with the others
    labels = torch.stack(rows)
    spec = Spec(images=labels.shape[0], views=1, dim=6, seed=7)
    ties = [1 / 3, 0.5, 0.6, 2 / 3, 0.7, 0.3, 0.75, 0.8, 0.4, 0.25, 1 / 6, 0.2, 5 / 6, 1.0]
    for threshold in ties:
        case = build(spec, weighting=weighting, threshold=threshold, reduction="none",
                     normalization="weight")
        case.labels = labels
        compare(case, device, dtype)


def _jaccard_three_tenths_batch():
    """Images 0 and 1 have a Jaccard of exactly 3/10 (|y_0| = 3 inside |y_1| = 10), image 2
    shares nothing: whether (0, 1) is a positive is decided by `sim >= threshold` alone."""
    labels = torch.zeros(3, 12, dtype=torch.bool)
    labels[0, :3] = True
    labels[1, :10] = True
    labels[2, 11] = True
    return labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("threshold,positive", [
    (0.3, True), (0.30000001, False), (0.3 + 2 ** -54, False), (0.29999999, True)])
def test_threshold_is_decided_in_float64_for_every_feature_dtype(device, backend, dtype,
                                                                 threshold, positive):
    """A similarity of exactly 3/10 against thresholds a hair above and below it: the decision
    is the float64 one (`3/10 >= threshold` in double) for every feature dtype and backend,
    also where the arithmetic is float32 (the reference, the automatic fallback, computes in
    float32 for these inputs; float32 rounds 0.30000001 to the same number as 0.3)."""
    if backend == "kernel":
        require_kernel(device)
    labels = _jaccard_three_tenths_batch().to(device)
    assert (3 / 10 >= threshold) == positive  # the float64 decision this case expects
    case = build(Spec(images=3, views=2, dim=8, seed=11), threshold=threshold,
                 reduction="none")
    features = case.features.to(device=device, dtype=dtype)
    got = modan_ext.jaccard_supcon_loss(features, labels, backend=backend, **case.options)
    oracle = {decided: reference_fn(features.double(), labels,
                                    **dict(case.options, threshold=0.3 if decided else 0.31))
              for decided in (True, False)}
    # The two decisions give clearly different losses, so the comparison below has teeth.
    assert (oracle[True] - oracle[False]).abs().max() > 1e-2
    assert_close(got, oracle[positive].to(got.dtype), 1e-5,
                 f"{backend} loss, {dtype} features, threshold {threshold!r}")


MANY_TILES = [  # (spec, options): several 256-row tiles, ragged edges, views across tile edges
    pytest.param(Spec(images=301, views=2, dim=67, pattern="paper", seed=3),
                 dict(reduction="none"), id="paper-V2-all"),
    pytest.param(Spec(images=301, views=2, dim=67, pattern="paper", seed=3),
                 dict(contrast_mode="one"), id="paper-V2-one"),
    pytest.param(Spec(images=201, views=3, dim=33, pattern="mixed", num_labels=300, density=0.2,
                      seed=4),
                 dict(contrast_mode="one", reduction="none", weighting="cosine",
                      normalization="weight", threshold=0.2), id="mixed-L300-V3-one"),
    pytest.param(Spec(images=150, views=4, dim=16, pattern="random", num_labels=70,
                      density=0.5, seed=5),
                 dict(weighting="dice", reduction="sum", threshold=0.5), id="random-V4"),
    pytest.param(Spec(images=700, views=0, dim=5, pattern="wide_ids", seed=6),
                 dict(reduction="none", temperature=0.2), id="wide-ids-2d"),
    pytest.param(Spec(images=520, views=1, dim=300, pattern="zero", seed=7),
                 dict(reduction="none"), id="no-positive-at-all"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("spec,options", MANY_TILES)
def test_kernel_matches_reference_many_tiles(device, dtype, threads, spec, options):
    """Batches of several tiles (M up to 700), 1, 2 and 3 threads."""
    require_kernel(device)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compare(build(spec, **options), device, dtype)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_is_deterministic(device):
    """Same input, same thread count: bitwise the same loss and gradient (the kernel merges
    per-thread partial results in a fixed order)."""
    require_kernel(device)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        case = build(Spec(images=400, views=2, dim=40, pattern="paper", seed=8),
                     reduction="none")
        features, labels = case.on(device, torch.float32)
        first = run_loss(kernel_fn, features, labels, **case.options)
        for _ in range(3):
            again = run_loss(kernel_fn, features, labels, **case.options)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs(device, dtype):
    """Half features: loss in float32, gradient in the features' dtype, equal to the float64
    reference on the same (rounded) values within half-precision output rounding."""
    require_kernel(device)
    case = build(Spec(images=8, views=2, dim=32, pattern="paper", seed=5), reduction="none")
    features, labels = case.on(device, dtype)
    for backend in ("kernel", "reference"):
        loss, grad = run_loss(modan_ext.jaccard_supcon_loss, features, labels,
                              backend=backend, **case.options)
        assert loss.dtype == torch.float32 and grad.dtype == dtype, backend
        expected_loss, expected_grad = run_loss(reference_fn, features.double(), labels,
                                                **case.options)
        assert_close(loss, expected_loss, 1e-5, f"{backend} loss")
        eps = torch.finfo(dtype).eps
        assert_close(grad, expected_grad, 2 * eps, f"{backend} gradient")


@pytest.mark.parametrize("device", DEVICES)
def test_auto_backend_is_the_kernel(device):
    """"auto" is the compiled C++ kernel on CPU, the Triton kernels on CUDA (README, "GPU
    backends")."""
    require_kernel(device)
    case = build(Spec(images=6, views=2, dim=8, seed=1), reduction="none")
    features, labels = case.on(device, torch.float32)
    expected = "kernel" if device == "cpu" else "triton"
    assert modan_ext.resolve_backend("auto", device) == expected
    auto = modan_ext.jaccard_supcon_loss(features, labels, **case.options)
    chosen = modan_ext.jaccard_supcon_loss(features, labels, backend=expected, **case.options)
    assert torch.equal(auto, chosen)
    module = modan_ext.JaccardSupConLoss(**case.options)
    assert module.backend_for(device) == expected
    assert torch.equal(module(features, labels), chosen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,options", GRID[::5])
def test_module_matches_function(spec, options, device):
    case = build(spec, **options)
    features, labels = case.on(device, torch.float64)
    for backend in ("reference", "kernel"):
        if backend == "kernel" and not modan_ext.kernel_available(device):
            continue
        module = modan_ext.JaccardSupConLoss(backend=backend, **case.options)
        loss_m, grad_m = run_loss(lambda f, y: module(f, y), features, labels)
        loss_f, grad_f = run_loss(modan_ext.jaccard_supcon_loss, features, labels,
                                  backend=backend, **case.options)
        assert torch.equal(loss_m, loss_f) and torch.equal(grad_m, grad_f)


def test_label_patterns_are_all_generated():
    """The grid exercises every label pattern (guards the case generator itself)."""
    used = {p.values[0].pattern for p in GRID}
    assert used == set(LABEL_PATTERNS)
