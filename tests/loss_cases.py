"""The one source of test cases for the loss: specs, builders, hypothesis strategies, the loss
functions under test and the comparators.

Every test module draws its inputs from here, so the kernel-vs-reference tests, the property
tests, the distributed and the AMP/compile tests see the same kinds of batches (label patterns,
shapes, options) on every device.

* `Spec` describes a batch (shape, label pattern, feature scale, seed); `build(spec)` makes the
  float64 CPU tensors; `Case.on(device, dtype)` moves them. `encoder` is the small model that
  the training-step tests put in front of the loss.
* `specs()` / `option_sets()` are the hypothesis strategies; `GRID` is a deterministic grid of
  (spec, options) covering every option value at least once with every label pattern.
* `loss_fn`, `kernel_fn`, `reference_fn` are the loss pinned to a backend (`reference_fn` is the
  float64 oracle); `run_loss` evaluates one and its gradient for a given upstream gradient.
* `assert_close` / `assert_pair_close` compare results against a relative tolerance.
The anchor-by-anchor oracle lives in naive_oracle.py.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import strategies as st

import modan_ext
from modan_ext.options import CONTRAST_MODES, DEFAULTS, NORMALIZATIONS, REDUCTIONS, WEIGHTINGS
from modan_ext.reference import jaccard_supcon_loss_reference

# ---- devices ---------------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (device, backend) pairs for the tests that hold on every backend
DEVICE_BACKENDS = [pytest.param(device, backend, id=f"{device}-{backend}")
                   for device in DEVICES for backend in ("reference", "kernel")]


def require_kernel(device: str) -> None:
    """Skip (or fail) a test that needs the compiled kernel for `device`.

    The CPU kernel is always built (setup.py), so its absence is a failure unless
    MODAN_EXT_ALLOW_NO_KERNEL=1. A missing CUDA kernel on a GPU machine is a skip unless
    MODAN_EXT_REQUIRE_CUDA_KERNEL=1 (the GPU check sets it).
    """
    if modan_ext.kernel_available(device):
        return
    from modan_ext import ops
    why = ops.LOAD_ERROR or f"extension built without a {device} kernel"
    if device == "cpu" and os.environ.get("MODAN_EXT_ALLOW_NO_KERNEL") != "1":
        pytest.fail(f"the compiled CPU kernel is missing ({why}); build with "
                    "`pip install --no-build-isolation -e .` or set MODAN_EXT_ALLOW_NO_KERNEL=1")
    if device == "cuda" and os.environ.get("MODAN_EXT_REQUIRE_CUDA_KERNEL") == "1":
        pytest.fail(f"the compiled CUDA kernel is missing ({why})")
    pytest.skip(f"no compiled kernel for {device}: {why}")


def examples(n: int) -> int:
    """max_examples for a hypothesis test: n, or MODAN_TEST_EXAMPLES, or 10n (thorough)."""
    if os.environ.get("MODAN_TEST_EXAMPLES"):
        return int(os.environ["MODAN_TEST_EXAMPLES"])
    if os.environ.get("HYPOTHESIS_PROFILE") == "thorough":
        return 10 * n
    return n


# ---- options ---------------------------------------------------------------------------------

DEFAULT_OPTIONS = dataclasses.asdict(DEFAULTS)

# ---- label patterns --------------------------------------------------------------------------

MULTI_HOT_PATTERNS = (
    "random",     # Bernoulli(density) entries
    "mixed",      # per row: all-zero / copy of an earlier row / one-hot / random
    "zero",       # every row empty (only same-image views are positives)
    "identical",  # every row the same non-empty set
    "one_hot",    # one label per row out of a few classes
    "full",       # every label set (L == 1 included)
    "paper",      # 1 of 3 modalities + 1 of 9 anatomies (L = 12)
)
ID_PATTERNS = (
    "class_ids",  # 1-D integer class ids, a few classes, negative ids included
    "wide_ids",   # class ids k * 2**32: equal low 32 bits, so int32 truncation would merge them
)
LABEL_PATTERNS = MULTI_HOT_PATTERNS + ID_PATTERNS + ("none",)  # "none": labels=None (SimCLR)

LABEL_DTYPES = ("bool", "int64", "int32", "uint8", "float32", "float64")
_TORCH_DTYPES = {"bool": torch.bool, "int64": torch.int64, "int32": torch.int32,
                 "uint8": torch.uint8, "float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Spec:
    """A batch: `images` B, `views` V (0: 2-D features [B, D]), feature `dim` D, label pattern,
    number of labels L (multi-hot), label density, label dtype, feature row norm, seed."""
    images: int = 6
    views: int = 2
    dim: int = 16
    pattern: str = "mixed"
    num_labels: int = 12
    density: float = 0.3
    label_dtype: str = "bool"
    scale: float = 1.0  # row norm of the features (1.0: L2-normalised, as the API expects)
    seed: int = 0

    @property
    def rows(self) -> int:
        return self.images * max(self.views, 1)


@dataclass
class Case:
    spec: Spec
    features: torch.Tensor          # float64, CPU, [B, V, D] or [B, D]
    labels: torch.Tensor | None     # CPU
    options: dict = field(default_factory=dict)

    def on(self, device="cpu", dtype=torch.float64):
        """(features, labels) on `device`, features in `dtype` (a leaf, no grad)."""
        f = self.features.to(device=device, dtype=dtype)
        lab = None if self.labels is None else self.labels.to(device)
        return f, lab

    def __repr__(self):  # short, for hypothesis / pytest ids
        return f"Case({self.spec}, {self.options})"


def _multi_hot(pattern: str, images: int, num_labels: int, density: float,
               gen: torch.Generator) -> torch.Tensor:
    L = num_labels
    if pattern == "random":
        return torch.rand(images, L, generator=gen) < density
    if pattern == "zero":
        return torch.zeros(images, L, dtype=torch.bool)
    if pattern == "full":
        return torch.ones(images, L, dtype=torch.bool)
    if pattern == "identical":
        row = torch.rand(L, generator=gen) < max(density, 0.2)
        row[int(torch.randint(L, (1,), generator=gen))] = True  # non-empty
        return row.expand(images, L).clone()
    if pattern == "one_hot":
        classes = min(L, 4)
        cls = torch.randint(classes, (images,), generator=gen)
        cols = torch.randperm(L, generator=gen)[:classes]  # which columns the classes use
        y = torch.zeros(images, L, dtype=torch.bool)
        y[torch.arange(images), cols[cls]] = True
        return y
    if pattern == "paper":
        assert L == 12
        y = torch.zeros(images, L, dtype=torch.bool)
        y[torch.arange(images), torch.randint(3, (images,), generator=gen)] = True
        y[torch.arange(images), 3 + torch.randint(9, (images,), generator=gen)] = True
        return y
    if pattern == "mixed":
        y = torch.rand(images, L, generator=gen) < density
        kind = torch.randint(4, (images,), generator=gen)
        for i in range(images):
            k = int(kind[i])
            if k == 0:
                y[i] = False
            elif k == 1 and i > 0:
                y[i] = y[int(torch.randint(i, (1,), generator=gen))]
            elif k == 2:
                y[i] = False
                y[i, int(torch.randint(min(L, 3), (1,), generator=gen))] = True
        return y
    raise ValueError(pattern)


def build(spec: Spec, **options) -> Case:
    """The tensors of `spec` (float64 features on CPU), with `options` attached."""
    gen = torch.Generator().manual_seed(spec.seed)
    shape = (spec.images, spec.views, spec.dim) if spec.views else (spec.images, spec.dim)
    z = torch.randn(*shape, generator=gen, dtype=torch.float64)
    z = spec.scale * z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if spec.pattern == "none":
        labels = None
    elif spec.pattern == "class_ids":
        labels = torch.randint(-2, 2, (spec.images,), generator=gen, dtype=torch.int64)
    elif spec.pattern == "wide_ids":
        labels = torch.randint(0, 3, (spec.images,), generator=gen, dtype=torch.int64) << 32
    else:
        num_labels = 12 if spec.pattern == "paper" else spec.num_labels
        y = _multi_hot(spec.pattern, spec.images, num_labels, spec.density, gen)
        labels = y.to(_TORCH_DTYPES[spec.label_dtype])
    opts = dict(DEFAULT_OPTIONS)
    opts.update(options)
    return Case(spec, z, labels, opts)


def encoder(in_dim: int, out_dim: int, dtype=torch.float32, device="cpu", seed: int = 0):
    """The small model in front of the loss in the training-step tests (AMP, compile, DDP)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(in_dim, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, out_dim))
    return model.to(device=device, dtype=dtype)


# ---- hypothesis strategies ---------------------------------------------------------------------

# Label counts around the 64-bit word boundaries of the packed labels, and anything up to 300.
label_counts = st.one_of(
    st.sampled_from([1, 2, 12, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257, 300]),
    st.integers(1, 300))
dims = st.one_of(st.sampled_from([1, 2, 3, 8, 16, 31, 64, 128, 300]), st.integers(1, 300))
temperatures = st.one_of(st.sampled_from([0.07, 0.1, 0.5, 1.0]),
                         st.floats(0.05, 2.0, allow_nan=False))
thresholds = st.one_of(st.sampled_from([0.0, 0.3, 0.5, 1.0]),
                       st.floats(0.0, 1.0, allow_nan=False))


@st.composite
def specs(draw, max_rows: int = 36, patterns=LABEL_PATTERNS, flat=None, min_rows: int = 1,
          scales=(1.0,)):
    """A `Spec`: B images x V in {1, 2, 3} views (or 2-D features when `flat`), M <= max_rows."""
    if flat is None:
        flat = draw(st.booleans())
    views = 0 if flat else draw(st.sampled_from([1, 2, 3]))
    per_image = max(views, 1)
    images = draw(st.integers(max(1, -(-min_rows // per_image)), max(1, max_rows // per_image)))
    pattern = draw(st.sampled_from([p for p in patterns if not (flat and p == "none")]))
    return Spec(images=images, views=views, dim=draw(dims), pattern=pattern,
                num_labels=draw(label_counts),
                density=draw(st.sampled_from([0.02, 0.1, 0.3, 0.6, 0.9])),
                label_dtype=draw(st.sampled_from(LABEL_DTYPES)),
                scale=draw(st.sampled_from(scales)),
                seed=draw(st.integers(0, 2**31 - 1)))


@st.composite
def option_sets(draw, reductions=REDUCTIONS, contrast_modes=CONTRAST_MODES,
                weightings=WEIGHTINGS, normalizations=NORMALIZATIONS):
    return dict(temperature=draw(temperatures), base_temperature=draw(temperatures),
                threshold=draw(thresholds),
                normalization=draw(st.sampled_from(normalizations)),
                contrast_mode=draw(st.sampled_from(contrast_modes)),
                reduction=draw(st.sampled_from(reductions)),
                weighting=draw(st.sampled_from(weightings)))


@st.composite
def cases(draw, spec_kwargs=None, option_kwargs=None):
    spec = draw(specs(**(spec_kwargs or {})))
    return build(spec, **draw(option_sets(**(option_kwargs or {}))))


# ---- a deterministic grid ------------------------------------------------------------------------

def _grid():
    """Every (weighting, normalization, contrast mode, reduction) with a rotating label pattern and
    shape: 60 cases, each option value with many patterns and shapes."""
    shapes = [(5, 2, 16), (4, 3, 7), (7, 1, 33), (9, 0, 20), (3, 2, 130), (6, 0, 5)]
    patterns = [p for p in LABEL_PATTERNS]
    label_counts_ = [12, 65, 1, 129, 300, 64, 2]
    out, k = [], 0
    for weighting in WEIGHTINGS:
        for normalization in NORMALIZATIONS:
            for contrast_mode in CONTRAST_MODES:
                for reduction in REDUCTIONS:
                    images, views, dim = shapes[k % len(shapes)]
                    pattern = patterns[k % len(patterns)]
                    if views == 0 and pattern == "none":
                        pattern = "mixed"
                    spec = Spec(images=images, views=views, dim=dim, pattern=pattern,
                                num_labels=label_counts_[k % len(label_counts_)],
                                density=(0.1, 0.4, 0.8)[k % 3],
                                label_dtype=LABEL_DTYPES[k % len(LABEL_DTYPES)], seed=1000 + k)
                    opts = dict(weighting=weighting, normalization=normalization,
                                contrast_mode=contrast_mode, reduction=reduction,
                                threshold=(0.3, 0.0, 0.5, 1.0, 0.25)[k % 5],
                                temperature=(0.07, 0.2, 0.5)[k % 3],
                                base_temperature=(0.07, 0.1)[k % 2])
                    out.append(pytest.param(spec, opts, id=f"{weighting}-{normalization}-"
                                            f"{contrast_mode}-{reduction}-{pattern}"))
                    k += 1
    return out


GRID = _grid()


# ---- evaluation helpers ------------------------------------------------------------------------

def upstream_like(loss: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A fixed, non-trivial upstream gradient for `loss` (scalar: 1.7)."""
    if loss.dim() == 0:
        return torch.full_like(loss, 1.7)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss)


def run_loss(fn, features: torch.Tensor, labels, seed: int = 0, **options):
    """(loss, grad) of `fn(features, labels, **options)`; backward with `upstream_like(loss)`."""
    f = features.detach().clone().requires_grad_(True)
    loss = fn(f, labels, **options)
    loss.backward(upstream_like(loss, seed))
    return loss.detach(), f.grad


def kernel_fn(features, labels=None, **options):
    return modan_ext.jaccard_supcon_loss(features, labels, backend="kernel", **options)


def loss_fn(device, backend):
    """The public function pinned to `backend` (skips/fails when the kernel is missing)."""
    if backend == "kernel":
        require_kernel(device)

    def fn(features, labels=None, **options):
        return modan_ext.jaccard_supcon_loss(features, labels, backend=backend, **options)
    return fn


def reference_fn(features, labels=None, **options):
    """The oracle: float64 arithmetic whatever the input dtype (the result is float64)."""
    return jaccard_supcon_loss_reference(features.double(), labels, **options)


def tolerance(dtype: torch.dtype, options: dict, scale: float = 1.0) -> float:
    """Relative tolerance (to the largest entry of the expected tensor) of `dtype` arithmetic.

    float64: ~1e-10. float32: ~1e-5 for unit-norm features at T >= 0.07; the error of a logit
    s/T grows as |z|^2 / T, so the bound grows with it.
    """
    if dtype == torch.float64:
        return 1e-10
    amplification = max(1.0, scale * scale * 0.07 / options.get("temperature", 0.07))
    return 1e-5 * amplification


def natural_scales(features: torch.Tensor, options: dict, seed: int = 0):
    """(loss scale, gradient scale) that a loss/gradient of this problem has when nothing cancels.

    Used as a floor under max|expected| when comparing, so that an expected value which is ~0 by
    cancellation (e.g. two rows that are each other's only contrast: p = 1, loss 0) is compared
    with an absolute tolerance of the size that rounding in the inputs' dtype can produce.
    loss: T / T_base; gradient: |upstream| * max|z| / T_base (divided by the number of anchors
    for reduction="mean")."""
    T, Tb = options.get("temperature", 0.07), options.get("base_temperature", 0.07)
    zmax = float(features.detach().double().norm(dim=-1).max()) if features.numel() else 1.0
    reduction = options.get("reduction", "mean")
    flat = features.dim() == 2
    rows = features.shape[0] * (1 if flat else features.shape[1])
    anchors = features.shape[0] if options.get("contrast_mode") == "one" else rows
    if reduction == "none":
        shape = (anchors,) if flat or options.get("contrast_mode") == "one" else \
            tuple(features.shape[:2])
        up = float(upstream_like(torch.zeros(shape, dtype=torch.float64), seed).abs().max())
    else:
        up = 1.7 / (anchors if reduction == "mean" else 1)
    return T / Tb, up * zmax / Tb


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "",
                 floor: float = 0.0):
    """|actual - expected| <= rtol * max(max|expected|, floor) entrywise, same shape, and
    non-finite entries in the same places."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != " \
                                           f"{tuple(expected.shape)}"
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert torch.equal(torch.isfinite(a), torch.isfinite(e)), \
        f"{what}: non-finite entries differ:\nactual={a}\nexpected={e}"
    a, e = a[torch.isfinite(e)], e[torch.isfinite(e)]
    if e.numel() == 0:
        return
    scale = max(float(e.abs().max()), floor)
    err = float((a - e).abs().max())
    bound = rtol * scale
    assert err <= bound, (f"{what}: max abs error {err:.3e} > {bound:.3e} "
                          f"(rtol {rtol:.1e} x scale {scale:.3e})")


def assert_pair_close(got, expected, features: torch.Tensor, options: dict, rtol: float,
                      what: str = "", seed: int = 0):
    """Compare (loss, grad) pairs from `run_loss(..., seed=seed, **options)`, each against its
    natural scale as a floor (see `natural_scales`)."""
    loss_floor, grad_floor = natural_scales(features, options, seed)
    assert_close(got[0], expected[0], rtol, f"loss {what}", loss_floor)
    assert_close(got[1], expected[1], rtol, f"gradient {what}", grad_floor)
