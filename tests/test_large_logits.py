"""The gradient at large logits (small temperatures, features not normalised), anchor by anchor.

Each anchor's gradient (reduction="none", upstream one-hot on that anchor) is compared with the
float64 reference's on the same input values, relative to that anchor's own gradient: when an
anchor's softmax is nearly saturated its gradient is small, and an error of the size of one
rounding of a logit (|x| ~ 1e5 has an ulp of ~0.01) is then a large part of it, although
tiny against the batch's largest gradient entry, which is all that a tolerance scaled by the
largest entry can see. The bound is the float32 reference's own error on the same problem
(the precision float32 logits allow there) times a small factor, plus a floor; float64 must
match to ~1e-10.

What broke before op contract v2: the backward recomputed x = s / T and the vector clones
contracted it with the following `x − lse` into one FMA, so the backward's p = exp(x − lse) did
not use the forward's x (1.5e-2 relative error at T = 1e-6, 3 at T = 1e-8, NaN at T = 1e-12 in
float32 and at T = 1e-20 in float64); and lse reached the backward rounded to float32.
"""
from __future__ import annotations

import pytest
import torch

import modan_ext
from loss_cases import DEVICES, Spec, build, require_kernel

FLOAT32_FACTOR = 4.0     # the kernel's error may be this many times the float32 reference's
FLOAT32_FLOOR = 1e-6     # ... plus this (about 8 float32 epsilons)
FLOAT64_BOUND = 1e-10
ZERO_GRADIENT = 1e-30    # an anchor's gradient below this x its natural size counts as zero


@pytest.fixture(params=DEVICES)
def device(request):
    require_kernel(request.param)
    return request.param


def per_anchor_gradients(loss_fn, features: torch.Tensor, labels, **options) -> torch.Tensor:
    """[anchors, features.numel()]: row a is the gradient of anchor a's loss (float64)."""
    x = features.detach().clone().requires_grad_(True)
    losses = loss_fn(x, labels, reduction="none", **options).reshape(-1)
    rows = []
    for a in range(losses.numel()):
        (grad,) = torch.autograd.grad(losses[a], x, retain_graph=True)
        rows.append(grad.detach().double().reshape(-1).cpu())
    return torch.stack(rows)


def relative_errors(got: torch.Tensor, expected: torch.Tensor, natural: float) -> torch.Tensor:
    """Per anchor: max |got − expected| / max |expected| (at least ZERO_GRADIENT x natural)."""
    size = expected.abs().amax(1).clamp_min(ZERO_GRADIENT * natural)
    return (got - expected).abs().amax(1) / size


def kernel(x, labels, **options):
    return modan_ext.jaccard_supcon_loss(x, labels, backend="kernel", **options)


def reference(compute_dtype):
    def fn(x, labels, **options):
        return modan_ext.jaccard_supcon_loss_reference(x, labels, compute_dtype=compute_dtype,
                                                       **options)
    return fn


CASES = [  # (dtype, temperature, feature norm, label pattern)
    *[(torch.float32, t, 1.0, "random") for t in (1e-1, 1e-3, 1e-6, 1e-8, 1e-10, 1e-12)],
    (torch.float32, 1e-6, 1.0, "class_ids"),
    (torch.float32, 1e-8, 1.0, "none"),
    (torch.float32, 0.07, 100.0, "random"),
    (torch.float32, 0.07, 100.0, "paper"),
    (torch.float32, 1e-3, 30.0, "mixed"),
    *[(torch.float64, t, 1.0, "random") for t in (1e-3, 1e-8, 1e-12, 1e-16, 1e-20)],
    (torch.float64, 0.07, 1e4, "paper"),
]


@pytest.mark.parametrize("normalization", ["count", "weight"])
@pytest.mark.parametrize("dtype,temperature,scale,pattern", CASES,
                         ids=[f"{str(d)[6:]}-T{t:g}-norm{s:g}-{p}" for d, t, s, p in CASES])
def test_each_anchors_gradient_is_as_precise_as_the_reference(device, dtype, temperature,
                                                              scale, pattern, normalization):
    case = build(Spec(images=16, views=2, dim=32, pattern=pattern, density=0.3, scale=scale,
                      seed=int(1e3 * scale) % 97 + len(pattern)))
    features, labels = case.on(device, dtype)
    options = dict(temperature=temperature, base_temperature=0.07, threshold=0.3,
                   normalization=normalization)
    expected = per_anchor_gradients(reference(torch.float64), features.double(), labels,
                                    **options)
    got = per_anchor_gradients(kernel, features, labels, **options)
    natural = scale / options["base_temperature"]  # |z| / T_base: a gradient where nothing cancels
    errors = relative_errors(got, expected, natural)
    assert torch.isfinite(errors).all(), f"non-finite gradient entries: {errors}"
    if dtype == torch.float64:
        bound = FLOAT64_BOUND
    else:
        float32_reference = per_anchor_gradients(reference(torch.float32), features, labels,
                                                 **options)
        bound = FLOAT32_FACTOR * float(relative_errors(float32_reference, expected,
                                                       natural).max()) + FLOAT32_FLOOR
    worst = int(errors.argmax())
    assert float(errors.max()) <= bound, (
        f"anchor {worst}: gradient error {float(errors[worst]):.3e} relative to its own "
        f"gradient (max |g| = {float(expected[worst].abs().max()):.3e}); bound {bound:.3e}")
