"""Mixed precision (torch.autocast) and torch.compile.

AMP: features that a model produces under autocast (half precision) give a float32 loss equal to
the float32 loss of the same values upcast, checked against the float64 reference too; their
gradient comes back in the half dtype and the parameters' in float32.

Compile: a training step (model + loss) compiles with fullgraph=True, no graph break, and gives the
eager loss and gradients; changing the batch size compiles once more (automatic dynamic shapes),
not once per size; with `torch._dynamo.mark_dynamic` on the batch dimension, never again.
The compile tests use the "aot_eager" backend (dynamo + AOTAutograd, which trace the op's fake
kernel and autograd formula, without inductor's C++ compile time); inductor itself is covered by
tests/test_custom_op.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import modan_ext
from loss_cases import Spec, assert_close, build, encoder, reference_fn

IN_DIM, DIM, NUM_LABELS = 12, 16, 9
LAYOUTS = {  # features' shape - labels
    "3d-multi": dict(views=2, pattern="random"),
    "3d-none": dict(views=2, pattern="none"),
    "2d-ids": dict(views=0, pattern="class_ids"),
}

AMP_CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16"),
]


def _need(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA autocast needs a GPU; none is visible on this machine")


def model_inputs(layout="3d-multi", images=10, device="cpu", seed=0):
    """(encoder input [B, V, IN_DIM] or [B, IN_DIM], labels) in float32."""
    spec = Spec(images=images, dim=IN_DIM, num_labels=NUM_LABELS, density=0.3, seed=seed,
                **LAYOUTS[layout])
    return build(spec).on(device, torch.float32)


def close(actual, expected, rtol, what=""):
    """max |actual - expected| <= rtol * max(max |expected|, 1e-6)."""
    assert_close(actual, expected, rtol, what, floor=1e-6)


# ---- autocast ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("device,dtype", AMP_CASES)
def test_autocast_loss_is_float32_and_gradients_keep_the_input_dtype(device, dtype, layout,
                                                                     backend):
    _need(device)
    x, labels = model_inputs(layout, device=device)
    model = encoder(IN_DIM, DIM, device=device)
    for reduction in ("mean", "none"):
        model.zero_grad()
        with torch.autocast(device, dtype=dtype):
            features = F.normalize(model(x), dim=-1).to(dtype)  # what a half model hands over
            features.retain_grad()
            loss = modan_ext.jaccard_supcon_loss(features, labels, backend=backend,
                                                 reduction=reduction)
        assert loss.dtype == torch.float32, f"{reduction}: loss dtype {loss.dtype} under autocast"
        upstream = torch.ones_like(loss)
        loss.backward(upstream)
        assert features.grad.dtype == dtype, f"features' gradient dtype {features.grad.dtype}"
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())

        # The same values upcast, outside autocast: float32 path, and the float64 oracle.
        upcast = features.detach().float().requires_grad_(True)
        expected = modan_ext.jaccard_supcon_loss(upcast, labels, backend=backend,
                                                 reduction=reduction)
        expected.backward(upstream)
        oracle = reference_fn(features.detach(), labels, reduction=reduction)
        same = 1e-6 if device == "cpu" else 1e-5  # CUDA: half inputs may take other MMA paths
        close(loss, expected, same, f"{reduction}: autocast vs float32 loss")
        close(loss, oracle, 2e-5, f"{reduction}: autocast vs float64 oracle")
        # The gradient is computed in float32 and rounded once to the half dtype.
        half_eps = torch.finfo(dtype).eps
        close(features.grad, upcast.grad, 2 * half_eps,
              f"{reduction}: features' gradient vs float32 path")


# ---- torch.compile -----------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def make_step(model, **loss_options):
    loss_fn = modan_ext.JaccardSupConLoss(**loss_options)

    def step(x, labels):
        return loss_fn(F.normalize(model(x), dim=-1), labels)
    return step


def loss_and_grads(step, model, x, labels):
    model.zero_grad()
    loss = step(x, labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_matches_eager(got, eager, grad_rtol=1e-5):
    """(loss, parameter gradients) of a compiled step against the eager step's."""
    close(got[0], eager[0], 1e-6, "loss")
    for k, (g, e) in enumerate(zip(got[1], eager[1])):
        close(g, e, grad_rtol, f"gradient of parameter {k}")


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_step_has_no_graph_break_and_matches_eager(layout, backend):
    x, labels = model_inputs(layout)
    model = encoder(IN_DIM, DIM)
    step = make_step(model, backend=backend, temperature=0.1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    got = loss_and_grads(compiled, model, x, labels)
    eager = loss_and_grads(step, model, x, labels)
    assert counter.frame_count == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert_matches_eager(got, eager)


def test_compiled_step_with_gather_flag_in_one_process():
    """gather_distributed=True without a process group is the plain loss, also when compiled."""
    x, labels = model_inputs()
    model = encoder(IN_DIM, DIM)
    step = make_step(model, gather_distributed=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = loss_and_grads(compiled, model, x, labels)
    assert_matches_eager(got, loss_and_grads(make_step(model), model, x, labels))


def test_compiled_step_under_autocast():
    x, labels = model_inputs()
    model = encoder(IN_DIM, DIM)
    step = make_step(model)

    def amp_step(x, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return step(x, labels)
    compiled = torch.compile(amp_step, fullgraph=True, backend="aot_eager")
    got = loss_and_grads(compiled, model, x, labels)
    assert got[0].dtype == torch.float32 and not counters["graph_break"]
    # bf16 model: the two graphs may round the gradients differently
    assert_matches_eager(got, loss_and_grads(amp_step, model, x, labels), grad_rtol=1e-2)


def test_compiled_step_including_backward():
    """loss.backward() inside the compiled function (dynamo's trace_autograd_ops)."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch has no torch._dynamo.config.trace_autograd_ops")
    x, labels = model_inputs()
    model = encoder(IN_DIM, DIM)
    step = make_step(model)

    def train_step(x, labels):
        loss = step(x, labels)
        loss.backward()
        return loss.detach()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        model.zero_grad()
        loss = torch.compile(train_step, fullgraph=True, backend="aot_eager")(x, labels)
        grads = [p.grad.clone() for p in model.parameters()]
    assert_matches_eager((loss, grads), loss_and_grads(step, model, x, labels))


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("mark_dynamic", [False, True], ids=["automatic", "mark_dynamic"])
def test_new_batch_sizes_do_not_recompile(mark_dynamic, backend):
    """Needs the op schema's views/anchor range as SymInt (csrc/supcon.cpp): with `int`, dynamo
    specialises them, hence the batch size, and recompiles for every size."""
    model = encoder(IN_DIM, DIM)
    step = make_step(model, backend=backend)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for images in (6, 9, 12, 15, 20):
        x, labels = model_inputs(images=images, seed=images)
        if mark_dynamic:
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(labels, 0)
        loss, _ = loss_and_grads(compiled, model, x, labels)
        eager_loss, _ = loss_and_grads(step, model, x, labels)
        close(loss, eager_loss, 1e-6, f"batch of {images} images")
    # automatic dynamic shapes: the first size is compiled static, the second dynamic, then reuse
    assert counter.frame_count == (1 if mark_dynamic else 2), \
        f"{counter.frame_count} compilations for 5 batch sizes"


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_functional_and_module_forms_compile_fullgraph_with_dynamic_shapes(backend):
    """torch.compile(jaccard_supcon_loss, dynamic=True, fullgraph=True) and the same for the
    module: dynamic=True makes the float options symbolic too, so the option checks must accept
    symbolic values (comparisons, not math.isfinite). Loss and gradient are the eager ones for
    several batch sizes, and a bad option still names itself."""
    options = dict(temperature=0.1, base_temperature=0.07, threshold=0.25, weighting="dice",
                   backend=backend)
    compiled = {
        "functional": torch.compile(modan_ext.jaccard_supcon_loss, dynamic=True, fullgraph=True,
                                    backend="aot_eager"),
        "module": torch.compile(modan_ext.JaccardSupConLoss(**options), dynamic=True,
                                fullgraph=True, backend="aot_eager"),
    }
    for images in (6, 9, 13):
        case = build(Spec(images=images, views=2, dim=DIM, pattern="random",
                          num_labels=NUM_LABELS, seed=images))
        features, labels = case.on("cpu", torch.float32)
        x = features.clone().requires_grad_(True)
        eager = modan_ext.jaccard_supcon_loss(x, labels, **options)
        (eager_grad,) = torch.autograd.grad(eager, x)
        for form, fn in compiled.items():
            x = features.clone().requires_grad_(True)
            loss = fn(x, labels, **options) if form == "functional" else fn(x, labels)
            (grad,) = torch.autograd.grad(loss, x)
            close(loss, eager, 1e-6, f"{form}, {images} images: loss")
            close(grad, eager_grad, 1e-5, f"{form}, {images} images: gradient")
    assert not counters["graph_break"], dict(counters["graph_break"])
    features, labels = model_inputs()
    with pytest.raises(Exception, match="temperature must be a finite number > 0"):
        compiled["functional"](features, labels, **dict(options, temperature=0.0))
