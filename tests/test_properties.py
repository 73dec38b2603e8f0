"""Properties of the loss, checked on both backends (reference and kernel) on every device.

External oracles: `pytorch_metric_learning.losses.SupConLoss` (one-hot labels) and
`NTXentLoss` plus a hand-written SimCLR cross-entropy (identity labels). Invariances: permuting
the batch, the views, the label columns; rotating the features. Structure: per-anchor rows of
dL/dS sum to zero; no positive -> exact zero; large-norm features stay finite.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import modan_ext
from loss_cases import (DEVICE_BACKENDS, MULTI_HOT_PATTERNS, Spec, assert_close,
                        assert_pair_close, build, cases, examples, loss_fn, natural_scales,
                        option_sets, reference_fn, run_loss, specs)
from modan_ext.options import NORMALIZATIONS, REDUCTIONS, WEIGHTINGS
from naive_oracle import anchors_with_positive


TOL = 1e-10  # float64 everywhere in this file unless stated


# ---- external oracle: one-hot labels are SupCon ------------------------------------------------

def pml_supcon(features: torch.Tensor, class_ids: torch.Tensor, temperature: float):
    """pytorch-metric-learning's SupConLoss on our [B, V, D] batch.

    Correspondence (read off pytorch_metric_learning/losses/supcon_loss.py):
    * PML takes embeddings [N, D] with labels [N]: we pass features.reshape(B*V, D) with each
      image's class id repeated for its V views (PML treats equal labels as positives, so the
      other views of an image are positives as in ours; row order does not matter).
    * PML L2-normalises the embeddings itself (CosineSimilarity): we feed unit-norm features so
      the dot product we use is the same cosine.
    * PML's log-prob denominator is logsumexp over every other row (pos + neg masks, the diagonal
      excluded by convert_to_pairs): our lse over k != a.
    * PML's per-anchor loss is -mean over positives of log p (divided by |P(a)| + tiny): our
      normalization="count" with every weight 1 (one-hot labels) and T / T_base = 1, i.e.
      base_temperature = temperature.
    * PML's AvgNonZeroReducer averages the per-anchor losses that are > 0: anchors without
      positives have loss 0 and drop out, as in our reduction="mean" (an anchor with positives
      has loss > 0 unless p = 1, which needs M = 2).
    * PML returns 0 when there is no positive pair or no negative pair at all: tests keep a
      negative in the batch.
    """
    SupConLoss = pytest.importorskip(
        "pytorch_metric_learning.losses",
        reason="pytorch-metric-learning is a test dependency (.ci/requirements.txt)").SupConLoss
    B, V, D = features.shape
    embeddings = features.reshape(B * V, D)
    labels = class_ids.repeat_interleave(V)
    return SupConLoss(temperature=temperature)(embeddings, labels)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=examples(50))
@given(images=st.integers(2, 12), views=st.sampled_from([1, 2, 3]),
       classes=st.integers(2, 5), dim=st.integers(2, 40),
       temperature=st.sampled_from([0.07, 0.1, 0.5, 1.0]), threshold=st.floats(0.01, 1.0),
       weighting=st.sampled_from(WEIGHTINGS),
       normalization=st.sampled_from(NORMALIZATIONS), seed=st.integers(0, 2**20))
def test_one_hot_labels_equal_pml_supcon(device, backend, images, views, classes, dim,
                                         temperature, threshold, weighting, normalization,
                                         seed):
    fn = loss_fn(device, backend)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(classes, (images,), generator=gen)
    ids[0], ids[1] = 0, 1  # at least one negative pair
    z = F.normalize(torch.randn(images, views, dim, generator=gen, dtype=torch.float64), dim=-1)
    z = z.to(device)
    expected, expected_grad = run_loss(lambda f, y: pml_supcon(f, y, temperature), z,
                                       ids.to(device))
    one_hot = F.one_hot(ids, classes).to(device)
    lf, gf = natural_scales(z, dict(temperature=temperature, base_temperature=temperature))
    for labels in (ids.to(device), one_hot, one_hot.bool(), one_hot.float()):
        # one-hot: every weighting's similarity is 1 (same class) or 0, so the threshold and
        # the normalization do not matter
        # PML differentiates through its own L2 normalisation: do the same (z is unit-norm,
        # so the values are unchanged and the gradients are both the tangential part)
        loss, grad = run_loss(lambda f, y, **o: fn(F.normalize(f, dim=-1), y, **o), z, labels,
                              temperature=temperature, base_temperature=temperature,
                              threshold=threshold, weighting=weighting,
                              normalization=normalization)
        assert_close(loss, expected, 1e-9, f"loss vs PML SupConLoss, labels {labels.dtype}", lf)
        assert_close(grad, expected_grad, 1e-9, "gradient vs PML SupConLoss", gf)


# ---- external oracle: identity labels are SimCLR / NT-Xent -------------------------------------

def simclr_nt_xent(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2B views, written as in the SimCLR paper: cross-entropy of each
    view against its partner with itself masked out of the softmax."""
    B, V, D = features.shape
    assert V == 2
    z = torch.cat([features[:, 0], features[:, 1]])  # [2B, D], partner of r is (r + B) % 2B
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device),
                                float("-inf"))
    target = (torch.arange(2 * B, device=z.device) + B) % (2 * B)
    return F.cross_entropy(logits, target)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("images", [2, 5, 16])
def test_identity_labels_equal_simclr(device, backend, images):
    NTXentLoss = pytest.importorskip(
        "pytorch_metric_learning.losses",
        reason="pytorch-metric-learning is a test dependency (.ci/requirements.txt)").NTXentLoss
    fn = loss_fn(device, backend)
    gen = torch.Generator().manual_seed(images)
    z = F.normalize(torch.randn(images, 2, 24, generator=gen, dtype=torch.float64), dim=-1)
    z = z.to(device)
    T = 0.2
    expected, expected_grad = run_loss(lambda f, y: simclr_nt_xent(f, T), z, None)
    pml, pml_grad = run_loss(
        lambda f, y: NTXentLoss(temperature=T)(f.reshape(-1, f.shape[-1]),
                                               torch.arange(images).repeat_interleave(2)),
        z, None)
    # PML normalises the embeddings itself and differentiates through that
    normed, normed_grad = run_loss(lambda f, y: simclr_nt_xent(F.normalize(f, dim=-1), T), z,
                                   None)
    assert_close(pml, expected, 1e-9, "PML NTXentLoss vs hand-written NT-Xent")
    assert_close(pml_grad, normed_grad, 1e-9, "PML NTXentLoss vs hand-written NT-Xent grad")
    eye = torch.eye(images, device=device)
    for labels in (None, torch.arange(images, device=device), eye, eye.bool(),
                   torch.zeros(images, 3, device=device)):  # empty rows: views only, = SimCLR
        for weighting in ("jaccard", "binary", "cosine"):
            loss, grad = run_loss(fn, z, labels, temperature=T, base_temperature=T,
                                  weighting=weighting)
            what = f"labels {None if labels is None else labels.dtype}, {weighting}"
            assert_close(loss, expected, 1e-9, f"loss vs NT-Xent, {what}")
            assert_close(grad, expected_grad, 1e-9, f"gradient vs NT-Xent, {what}")


# ---- invariances -------------------------------------------------------------------------------

def assert_permutes(fn, case, device, permute, permute_labels, reductions, what):
    """Permuting the inputs (`permute` on features, `permute_labels` on labels) permutes the
    per-anchor losses alike and leaves each reduced loss unchanged, its gradient permuted."""
    features, labels = case.on(device)
    p_features = permute(features)
    p_labels = None if labels is None else permute_labels(labels)
    opts = dict(case.options, reduction="none")
    loss, _ = run_loss(fn, features, labels, **opts)
    p_loss, _ = run_loss(fn, p_features, p_labels, **opts)
    # the upstream gradient of run_loss is fixed by position: the gradients are compared through
    # the reduced losses below instead
    lf, _ = natural_scales(features, opts)
    assert_close(p_loss, permute(loss), TOL, f"per-anchor loss under a {what}", lf)
    for reduction in reductions:
        opts = dict(case.options, reduction=reduction)
        l1, g1 = run_loss(fn, features, labels, **opts)
        l2, g2 = run_loss(fn, p_features, p_labels, **opts)
        assert_pair_close((l2, g2), (l1, permute(g1)), features, opts, TOL,
                          f"{reduction}, {what}")


def _permutation(n: int, seed: int, device) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=examples(60))
@given(case=cases(), seed=st.integers(0, 2**20))
def test_permuting_the_batch(device, backend, case, seed):
    """Permuting the images (rows with 2-D features) permutes per-anchor losses and gradients
    and leaves reduced losses unchanged."""
    perm = _permutation(case.spec.images, seed, device)
    assert_permutes(loss_fn(device, backend), case, device, lambda t: t[perm],
                    lambda labels: labels[perm], ("mean", "sum"), "batch permutation")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=examples(40))
@given(case=cases(spec_kwargs=dict(flat=False), option_kwargs=dict(contrast_modes=("all",))),
       seed=st.integers(0, 2**20))
def test_permuting_the_views(device, backend, case, seed):
    """With contrast_mode="all", the order of the V views is arbitrary."""
    perm = _permutation(case.spec.views, seed, device)
    assert_permutes(loss_fn(device, backend), case, device, lambda t: t[:, perm],
                    lambda labels: labels, ("mean",), "view permutation")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=examples(60))
@given(spec=specs(patterns=MULTI_HOT_PATTERNS), options=option_sets(),
       seed=st.integers(0, 2**20))
def test_permuting_label_columns(device, backend, spec, options, seed):
    fn = loss_fn(device, backend)
    case = build(spec, **options)
    features, labels = case.on(device)
    perm = _permutation(labels.shape[1], seed, device)
    loss, grad = run_loss(fn, features, labels, **case.options)
    p_loss, p_grad = run_loss(fn, features, labels[:, perm], **case.options)
    assert_pair_close((p_loss, p_grad), (loss, grad), features, case.options, TOL,
                      "label-column permutation")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=examples(60))
@given(case=cases(spec_kwargs=dict(scales=(1.0, 2.5))), seed=st.integers(0, 2**20))
def test_rotating_the_features(device, backend, case, seed):
    """z -> z Q (Q orthogonal) keeps every dot product: same loss, gradient rotated by Q."""
    fn = loss_fn(device, backend)
    features, labels = case.on(device)
    D = features.shape[-1]
    q, r = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    q = (q * torch.sign(torch.diagonal(r))).to(device)  # Haar-distributed orthogonal
    loss, grad = run_loss(fn, features, labels, **case.options)
    r_loss, r_grad = run_loss(fn, features @ q, labels, **case.options)
    tol = 1e-9 * max(1.0, 0.07 / case.options["temperature"]) * case.spec.scale ** 2
    assert_pair_close((r_loss, r_grad), (loss, grad @ q), features, case.options, tol,
                      "rotation of the features")


# ---- structure of the gradient -----------------------------------------------------------------

@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=examples(60))
@given(case=cases(spec_kwargs=dict(max_rows=24), option_kwargs=dict(reductions=("none",))),
       anchor_seed=st.integers(0, 2**20))
def test_row_of_dl_ds_sums_to_zero(device, backend, case, anchor_seed):
    """Σ_b ∂ℓ_a/∂s_ab = 0 for every anchor a (the softmax's rows sum to one and the weights
    cancel, ARCHITECTURE.md "The op contract").

    Seen through autograd on the features with the upstream gradient e_a (only ℓ_a): for b ≠ a,
    ∂ℓ_a/∂z_b = (∂ℓ_a/∂s_ab) z_a, so Σ_{b≠a} ∂ℓ_a/∂z_b = (Σ_b ∂ℓ_a/∂s_ab) z_a must vanish,
    while ∂ℓ_a/∂z_a itself need not."""
    fn = loss_fn(device, backend)
    features, labels = case.on(device)
    f = features.clone().requires_grad_(True)
    loss = fn(f, labels, **case.options)
    flat_loss = loss.reshape(-1)
    views = features.shape[1] if features.dim() == 3 else 1
    one = case.options["contrast_mode"] == "one"
    k = anchor_seed % flat_loss.numel()
    row = k * views if one else k  # image-major row index of the anchor
    (grad,) = torch.autograd.grad(flat_loss[k], f)
    grad = grad.reshape(-1, features.shape[-1])
    others = torch.cat([grad[:row], grad[row + 1:]]).sum(0)
    # scale: the largest gradient entry, at least |z| / T_base (what one anchor's gradient is
    # when nothing cancels)
    natural = float(features.norm(dim=-1).max()) / case.options["base_temperature"]
    scale = max(float(grad.abs().max()), natural)
    assert float(others.abs().max()) <= 1e-10 * scale, \
        f"Σ_b≠a dℓ_a/dz_b = {others} (anchor row {row}); scale {scale:.3e}"
    # and the check has teeth: the anchor's own gradient is not zero when it has positives
    # and more than one other row (non-degenerate features)
    if float(flat_loss[k].detach()) != 0.0 and grad.shape[0] > 2 and case.spec.dim > 1:
        assert float(grad[row].abs().max()) > 0


# ---- no positive anywhere ----------------------------------------------------------------------

NO_POSITIVE = [
    pytest.param(lambda: (torch.randn(6, 8), torch.zeros(6, 5)), id="2d-empty-rows"),
    pytest.param(lambda: (torch.randn(5, 8), torch.eye(5)), id="2d-distinct-one-hot"),
    pytest.param(lambda: (torch.randn(5, 8), torch.arange(5)), id="2d-distinct-ids"),
    pytest.param(lambda: (torch.randn(4, 1, 8), torch.eye(4).bool()), id="3d-one-view"),
    pytest.param(lambda: (torch.randn(3, 1, 8), None), id="3d-one-view-simclr"),
    pytest.param(lambda: (torch.randn(4, 8), torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0],
                                                           [0, 0, 1, 1], [1, 0, 0, 1]])),
                 id="2d-below-threshold"),  # Jaccard 1/3 < 0.5
    pytest.param(lambda: (torch.randn(1, 1, 8), None), id="single-row"),
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("make", NO_POSITIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_no_positive_gives_zero_loss_and_gradient(device, backend, make, dtype):
    fn = loss_fn(device, backend)
    torch.manual_seed(0)
    z, labels = make()
    z = F.normalize(z, dim=-1).to(device, dtype)
    labels = None if labels is None else labels.to(device)
    for reduction in REDUCTIONS:
        loss, grad = run_loss(fn, z, labels, threshold=0.5, reduction=reduction)
        assert torch.all(loss == 0), f"{reduction}: loss {loss}"
        assert torch.all(grad == 0), f"{reduction}: gradient {grad}"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_anchor_without_positive_gets_zero_and_does_not_count(device, backend):
    """reduction="mean" averages over the anchors that have a positive only."""
    fn = loss_fn(device, backend)
    z = F.normalize(torch.randn(5, 6, generator=torch.Generator().manual_seed(1),
                                dtype=torch.float64), dim=-1).to(device)
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0], [0, 0]], device=device)
    per = fn(z, labels, reduction="none")
    assert per.shape == (5,)
    assert torch.all(per[2:] == 0) and torch.all(per[:2] > 0)
    assert_close(fn(z, labels), per[:2].mean(), TOL, "mean over counted anchors")
    assert_close(fn(z, labels, reduction="sum"), per.sum(), TOL, "sum")


# ---- numerics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("norm", [30.0, 1e3])
def test_large_norm_features_stay_finite(device, backend, dtype, norm):
    """|z| = 1e3 at T = 0.07: logits ~1e7, exp overflows everything without an online
    max / log-sum-exp; the loss must be finite and equal the float64 reference."""
    fn = loss_fn(device, backend)
    case = build(Spec(images=12, views=2, dim=16, pattern="paper", scale=norm, seed=11),
                 reduction="none")
    features, labels = case.on(device, dtype)
    loss, grad = run_loss(fn, features, labels, **case.options)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    expected, expected_grad = run_loss(reference_fn, features.double(), labels, **case.options)
    # The logits carry an absolute rounding error ~ eps * |z|^2 / T (float32 at |z| = 1e3:
    # ~1!). The loss is linear in the logits (relative error ~ eps); the gradient goes through
    # softmax probabilities, which that error perturbs where they are not saturated.
    eps = torch.finfo(dtype).eps
    assert_close(loss, expected, 1e-12 if dtype == torch.float64 else 1e-5, "loss, large norm")
    # float32 at |z| = 1e3: the bound is > 1, only finiteness is meaningful there
    grad_rtol = 50 * eps * norm ** 2 / 0.07
    if grad_rtol < 0.5:
        assert_close(grad, expected_grad, grad_rtol, "gradient at large norm")


# ---- consistency between options ---------------------------------------------------------------

@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=examples(40))
@given(case=cases(spec_kwargs=dict(flat=False)))
def test_contrast_mode_one_is_view_zero_of_all(device, backend, case):
    fn = loss_fn(device, backend)
    features, labels = case.on(device)
    all_ = fn(features, labels, **dict(case.options, contrast_mode="all", reduction="none"))
    one = fn(features, labels, **dict(case.options, contrast_mode="one", reduction="none"))
    assert all_.shape == features.shape[:2] and one.shape == features.shape[:1]
    lf, _ = natural_scales(features, case.options)
    assert_close(one, all_[:, 0], TOL, "contrast_mode='one' vs view 0 of 'all'", lf)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=examples(40))
@given(spec=specs(patterns=MULTI_HOT_PATTERNS + ("class_ids",), flat=False),
       options=option_sets())
def test_one_view_equals_2d_features(device, backend, spec, options):
    """[B, 1, D] and [B, D] are the same batch."""
    fn = loss_fn(device, backend)
    case = build(Spec(**{**spec.__dict__, "views": 1}), **options)
    features, labels = case.on(device)
    l3, g3 = run_loss(fn, features, labels, **case.options)
    l2, g2 = run_loss(fn, features[:, 0], labels, **case.options)
    assert_pair_close((l2, g2), (l3.reshape(l2.shape), g3[:, 0]), features[:, 0],
                      case.options, TOL, "[B,1,D] vs [B,D]")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=examples(40))
@given(case=cases(option_kwargs=dict(reductions=("none",))))
def test_reductions_agree(device, backend, case):
    fn = loss_fn(device, backend)
    features, labels = case.on(device)
    per = fn(features, labels, **case.options)
    total = fn(features, labels, **dict(case.options, reduction="sum"))
    mean = fn(features, labels, **dict(case.options, reduction="mean"))
    lf, _ = natural_scales(features, case.options)
    assert_close(total, per.sum(), TOL, "sum == none.sum()", lf)
    counted = anchors_with_positive(features.cpu(), None if labels is None else labels.cpu(),
                                    **case.options)
    assert torch.all(per.cpu()[~counted] == 0), "an anchor without positive has a loss"
    assert_close(mean, per.sum() / max(int(counted.sum()), 1), TOL,
                 "mean == sum over anchors with a positive / their number", lf)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=examples(40))
@given(case=cases(), factor=st.sampled_from([0.5, 2.0, 3.0]))
def test_base_temperature_scales_the_loss(device, backend, case, factor):
    """ℓ ∝ 1 / T_base (T fixed)."""
    fn = loss_fn(device, backend)
    features, labels = case.on(device)
    base = case.options["base_temperature"]
    l1, g1 = run_loss(fn, features, labels, **case.options)
    l2, g2 = run_loss(fn, features, labels, **dict(case.options, base_temperature=base * factor))
    assert_pair_close((l2 * factor, g2 * factor), (l1, g1), features, case.options, TOL,
                      "x T_base")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=examples(40))
@given(case=cases(option_kwargs=dict(weightings=("binary",))))
def test_binary_weights_make_normalizations_equal(device, backend, case):
    """Every weight is 1 with weighting="binary", so Σw = |P(a)|."""
    fn = loss_fn(device, backend)
    features, labels = case.on(device)
    l1, g1 = run_loss(fn, features, labels, **dict(case.options, normalization="count"))
    l2, g2 = run_loss(fn, features, labels, **dict(case.options, normalization="weight"))
    assert_pair_close((l2, g2), (l1, g1), features, case.options, TOL,
                      "binary: count vs weight normalization")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=examples(40))
@given(spec=specs(patterns=("mixed", "random", "one_hot", "identical", "zero")),
       options=option_sets(weightings=("jaccard", "binary")))
def test_jaccard_threshold_one_equals_class_ids(device, backend, spec, options):
    """Jaccard >= 1 means identical non-empty label sets: multi-hot labels at threshold 1 are
    the class ids of the distinct non-empty rows (empty rows: a class of their own each)."""
    fn = loss_fn(device, backend)
    case = build(spec, **dict(options, threshold=1.0))
    features, labels = case.on(device)
    rows = (labels != 0).cpu()
    _, ids = torch.unique(rows, dim=0, return_inverse=True)
    empty = ~rows.any(1)
    ids[empty] = ids.max() + 1 + torch.arange(int(empty.sum()))
    l1, g1 = run_loss(fn, features, labels, **case.options)
    l2, g2 = run_loss(fn, features, ids.to(device), **case.options)
    assert_pair_close((l1, g1), (l2, g2), features, case.options, TOL,
                      "multi-hot at threshold 1 vs class ids")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=examples(30))
@given(spec=specs(patterns=MULTI_HOT_PATTERNS), options=option_sets())
def test_label_dtypes_are_equivalent(device, backend, spec, options):
    fn = loss_fn(device, backend)
    case = build(spec, **options)
    features, labels = case.on(device)
    expected, expected_grad = run_loss(fn, features, labels.bool(), **case.options)
    for dtype in (torch.int8, torch.int64, torch.uint8, torch.float16, torch.float32):
        loss, grad = run_loss(fn, features, labels.to(dtype), **case.options)
        assert torch.equal(loss, expected) and torch.equal(grad, expected_grad), dtype


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_threshold_zero_means_any_shared_label(device, backend):
    """threshold=0 makes every pair with similarity > 0 a positive, never a pair with none."""
    fn = loss_fn(device, backend)
    z = F.normalize(torch.randn(4, 5, generator=torch.Generator().manual_seed(2),
                                dtype=torch.float64), dim=-1).to(device)
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]], device=device)
    per = fn(z, labels, threshold=0.0, reduction="none")
    tiny = fn(z, labels, threshold=1e-9, reduction="none")
    assert_close(per, tiny, TOL, "threshold 0 vs 1e-9")
    assert per[2] == 0 and per[3] == 0 and per[0] > 0 and per[1] > 0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_propagates_with_propagate_policy(device, backend):
    fn = loss_fn(device, backend)
    for bad in (float("nan"), float("inf")):
        z = F.normalize(torch.randn(4, 2, 6, dtype=torch.float64), dim=-1).to(device)
        z[1, 0, 3] = bad
        for reduction in REDUCTIONS:
            loss = fn(z, None, nan_policy="propagate", reduction=reduction)
            assert torch.isnan(loss).all(), (bad, reduction, loss)
