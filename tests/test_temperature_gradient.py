"""A learnable temperature: T and T_base given as tensors that require grad get their gradient.

The fused ops take T and T_base as plain floats; the Python layer adds the gradient from the
op's statistics (∂ℓ_a/∂T = Ω_a / (T_base norm_a) · H(p_a), ∂ℓ_a/∂T_base = −ℓ_a / T_base), while
the reference computes with the tensors and gets it from autograd. Checked: kernel against the
reference's autograd for every reduction, normalization, contrast mode and kind of labels;
both against finite differences (gradcheck, float64); float32; the module form with an
nn.Parameter; torch.compile. The distributed path: tests/test_distributed.py ("learnable").
"""
from __future__ import annotations

import triton_setup  # noqa: F401  (first: decides where the Triton kernels run)

import itertools

import pytest
import torch
import torch.nn.functional as F

import modan_ext
from loss_cases import DEVICE_BACKENDS, DEVICES, Spec, assert_close, build, require_kernel, \
    upstream_like
from modan_ext.options import CONTRAST_MODES, NORMALIZATIONS, REDUCTIONS
from triton_setup import DEVICE as TRITON_DEVICE, requires_device

WHICH = ("temperature", "base_temperature", "both")


def leaf(value: float, dtype=torch.float64, device="cpu") -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device, requires_grad=True)


def loss_and_gradients(backend: str, features, labels, which: str, seed: int = 0,
                       dtype=torch.float64, **options):
    """(loss, dL/dfeatures, dL/dT or None, dL/dT_base or None) for an upstream gradient
    `upstream_like(loss, seed)`; T = 0.2 and T_base = 0.1 unless given in `options`."""
    values = dict(temperature=options.pop("temperature", 0.2),
                  base_temperature=options.pop("base_temperature", 0.1))
    tensors = {name: leaf(value, dtype, features.device) for name, value in values.items()
               if which in (name, "both")}
    x = features.detach().clone().requires_grad_(True)
    loss = modan_ext.jaccard_supcon_loss(x, labels, backend=backend, **{**values, **tensors},
                                         **options)
    loss.backward(upstream_like(loss, seed))
    return (loss.detach(), x.grad, *(tensors[name].grad if name in tensors else None
                                     for name in ("temperature", "base_temperature")))


CASES = [
    pytest.param(Spec(images=6, views=2, dim=8, pattern=pattern, num_labels=9, density=0.4,
                      seed=k), dict(reduction=reduction, normalization=normalization,
                                    contrast_mode=mode, weighting=weighting),
                 id=f"{pattern}-{reduction}-{normalization}-{mode}-{weighting}")
    for k, (pattern, reduction, normalization, mode, weighting) in enumerate(
        (p, r, n, m, w) for (p, w), r, n, m in itertools.product(
            (("mixed", "jaccard"), ("class_ids", "dice"), ("none", "jaccard"),
             ("zero", "binary")),
            REDUCTIONS, NORMALIZATIONS, CONTRAST_MODES))
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("spec,options", CASES)
def test_kernel_matches_the_reference_autograd(device, spec, options, which):
    require_kernel(device)
    assert_matches_the_reference_autograd("kernel", device, spec, options, which)


@requires_device
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("spec,options", CASES[::3])
def test_triton_matches_the_reference_autograd(spec, options, which):
    """The Triton backend's v2 statistics (entropy) give the same temperature gradients."""
    assert_matches_the_reference_autograd("triton", TRITON_DEVICE, spec, options, which)


def assert_matches_the_reference_autograd(backend, device, spec, options, which):
    case = build(spec, **options)
    features, labels = case.on(device, torch.float64)
    opts = {k: v for k, v in case.options.items() if k not in ("temperature", "base_temperature")}
    got = loss_and_gradients(backend, features, labels, which, **opts)
    expected = loss_and_gradients("reference", features, labels, which, **opts)
    tensor = {"loss": True, "features' gradient": True, "dL/dT": which != "base_temperature",
              "dL/dT_base": which != "temperature"}
    for (name, is_tensor), g, e in zip(tensor.items(), got, expected):
        if not is_tensor:  # a float temperature
            assert g is None and e is None, f"{name}: a gradient for a float"
            continue
        for who, grad in ((backend, g), ("reference", e)):
            assert grad is not None, f"{name}: no gradient from the {who} (detached)"
        assert_close(g, e, 1e-10, f"{name} ({which})", floor=1e-6)
    if which != "base_temperature" and spec.pattern != "zero":
        assert got[2].abs() > 1e-3, "dL/dT is ~0 here: the case has no teeth"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_gradcheck_with_respect_to_the_temperatures(device, backend, reduction, normalization):
    """Finite differences (float64) of the features, T and T_base together."""
    if backend == "kernel":
        require_kernel(device)
    case = build(Spec(images=4, views=2, dim=3, pattern="mixed", num_labels=5, seed=3))
    features, labels = case.on(device, torch.float64)

    def f(x, t, t_base):
        return modan_ext.jaccard_supcon_loss(x, labels, temperature=t, base_temperature=t_base,
                                             backend=backend, reduction=reduction,
                                             normalization=normalization, threshold=0.2)
    inputs = (features.requires_grad_(True), leaf(0.3, device=device), leaf(0.2, device=device))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.07, 1e-3])
def test_float32_temperature_gradient(device, temperature):
    """A float32 parameter and float32 features: dL/dT within float32 precision of float64."""
    require_kernel(device)
    case = build(Spec(images=12, views=2, dim=16, pattern="paper", seed=4))
    features, labels = case.on(device, torch.float32)
    got = loss_and_gradients("kernel", features, labels, "both", dtype=torch.float32,
                             temperature=temperature)
    expected = loss_and_gradients("reference", features.double(), labels, "both",
                                  temperature=temperature)
    assert got[2].dtype == torch.float32
    for name, g, e in zip(("dL/dT", "dL/dT_base"), got[2:], expected[2:]):
        assert_close(g, e, 1e-4, name)


def test_module_keeps_a_parameter_temperature_and_reads_it_at_every_call():
    """JaccardSupConLoss(temperature=nn.Parameter(...)): the parameter is the module's, its
    gradient is the functional form's, and after an optimizer step the new value is used."""
    require_kernel("cpu")
    case = build(Spec(images=6, views=2, dim=8, pattern="random", num_labels=7, seed=5))
    features, labels = case.on("cpu", torch.float64)
    temperature = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    module = modan_ext.JaccardSupConLoss(temperature=temperature, backend="kernel")
    assert any(p is temperature for p in module.parameters())
    optimizer = torch.optim.SGD([temperature], lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        loss = module(features, labels)
        loss.backward()
        t = leaf(temperature.detach().item())
        expected = modan_ext.jaccard_supcon_loss(features, labels, temperature=t,
                                                 backend="kernel")
        expected.backward()
        assert_close(loss.detach(), expected.detach(), 1e-12, "loss at the current temperature")
        assert_close(temperature.grad, t.grad, 1e-12, "dL/dT")
        optimizer.step()
    assert temperature.detach().item() != 0.3


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_a_tensor_that_needs_no_gradient_is_a_value(backend):
    if backend == "kernel":
        require_kernel("cpu")
    case = build(Spec(images=5, views=2, dim=6, seed=6))
    features, labels = case.on("cpu", torch.float64)
    as_tensor = modan_ext.jaccard_supcon_loss(features, labels, backend=backend,
                                              temperature=torch.tensor(0.3, dtype=torch.float64),
                                              base_temperature=torch.tensor(0.2,
                                                                            dtype=torch.float64))
    as_float = modan_ext.jaccard_supcon_loss(features, labels, backend=backend,
                                             temperature=0.3, base_temperature=0.2)
    assert torch.equal(as_tensor, as_float)


def test_under_torch_compile():
    """The op takes T as a float, so a compiled graph cannot hold a tensor temperature:
    fullgraph=True refuses it and says why; otherwise the value is read outside the graph (a
    graph break) and loss and gradient are the eager ones."""
    require_kernel("cpu")
    import torch._dynamo
    torch._dynamo.reset()
    case = build(Spec(images=6, views=2, dim=8, pattern="paper", seed=7))
    features, labels = case.on("cpu", torch.float32)

    def step(x, t):
        return modan_ext.jaccard_supcon_loss(F.normalize(x, dim=-1), labels, temperature=t,
                                             backend="kernel")
    with pytest.raises(Exception, match="option given as a tensor is read as a Python float"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(features, leaf(0.1, torch.float32))
    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(step, backend="aot_eager"), step):
        t = leaf(0.1, torch.float32)
        x = features.clone().requires_grad_(True)
        loss = fn(x, t)
        loss.backward()
        results.append((loss.detach(), x.grad, t.grad))
    for got, expected, name in zip(*results, ("loss", "features' gradient", "dL/dT")):
        assert_close(got, expected, 1e-6, f"compiled vs eager {name}")
    torch._dynamo.reset()
