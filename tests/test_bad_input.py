"""Bad input: each gets a clear exception naming the problem, or the documented result.

Every check runs through the function on both backends and through the module, so a check that
exists on one path only shows up.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import modan_ext
from loss_cases import (DEVICE_BACKENDS, Spec, assert_close, build, loss_fn, reference_fn,
                        require_kernel, run_loss)
from modan_ext.options import REDUCTIONS


def callers(device, backend):
    """The ways a user reaches the loss: the function and the module."""
    def module(features, labels=None, **options):
        return modan_ext.JaccardSupConLoss(backend=backend, **options)(features, labels)
    return [loss_fn(device, backend), module]


def unit(*shape, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device, dtype)


def raises(exc, *fragments):
    """pytest.raises that also checks that the message names the problem (case-insensitive)."""
    class _Checker:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *args):
            handled = self.ctx.__exit__(*args)
            message = str(self.info.value).lower()
            for fragment in fragments:
                assert fragment.lower() in message, \
                    f"message {str(self.info.value)!r} does not mention {fragment!r}"
            return handled
    return _Checker()


# ---- shapes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(8,), (2, 2, 2, 8), ()], ids=["1d", "4d", "0d"])
def test_features_of_wrong_rank(device, backend, shape):
    for call in callers(device, backend):
        features = torch.randn(shape, device=device)
        with raises(ValueError, "features", "shape"):
            call(features, torch.zeros(2, 3, device=device))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_labels_of_wrong_rank(device, backend):
    for call in callers(device, backend):
        with raises(ValueError, "labels", "shape"):
            call(unit(4, 2, 8, device=device), torch.zeros(4, 3, 2, device=device))
        with raises(ValueError, "labels", "shape"):
            call(unit(4, 2, 8, device=device), torch.tensor(1, device=device))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_mismatched_batch(device, backend):
    for call in callers(device, backend):
        # 3-D features: labels are per image (B), not per row (B * V)
        with raises(ValueError, "labels", "8", "4"):
            call(unit(4, 2, 8, device=device), torch.zeros(8, 3, device=device))
        with raises(ValueError, "labels", "3", "4"):
            call(unit(4, 2, 8, device=device), torch.arange(3, device=device))
        with raises(ValueError, "labels", "5", "6"):
            call(unit(6, 8, device=device), torch.zeros(5, 2, device=device))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_labels_none_with_2d_features(device, backend):
    for call in callers(device, backend):
        with raises(ValueError, "labels=None", "[B, V, D]"):
            call(unit(6, 8, device=device), None)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_multi_hot_without_columns(device, backend):
    for call in callers(device, backend):
        with raises(ValueError, "labels", "columns"):
            call(unit(4, 2, 8, device=device), torch.zeros(4, 0, device=device))


# ---- label values and dtypes -------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bad", [2, -1, 0.5, float("nan")], ids=["2", "-1", "0.5", "nan"])
def test_non_binary_multi_hot_labels(device, backend, bad):
    for call in callers(device, backend):
        labels = torch.zeros(4, 3, device=device)
        labels[1, 2] = bad
        with raises(ValueError, "labels", "0 or 1"):
            call(unit(4, 2, 8, device=device), labels)
        if float(bad).is_integer():
            with raises(ValueError, "labels", "0 or 1"):
                call(unit(4, 2, 8, device=device), labels.long())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_one_dimensional_labels_must_be_integer_ids(device, backend, dtype):
    for call in callers(device, backend):
        with raises(TypeError, "integer"):
            call(unit(4, 2, 8, device=device), torch.zeros(4, device=device, dtype=dtype))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_labels_that_are_not_tensors(device, backend):
    for call in callers(device, backend):
        with raises(TypeError, "labels"):
            call(unit(4, 2, 8, device=device), [[0, 1]] * 4)


# ---- feature values and dtypes -----------------------------------------------------------------

@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64])
def test_non_floating_features(device, backend, dtype):
    for call in callers(device, backend):
        features = torch.ones(4, 2, 8, device=device).to(dtype)
        with raises(TypeError, "features", "float"):
            call(features, torch.zeros(4, 3, device=device))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_features_that_are_not_tensors(device, backend):
    for call in callers(device, backend):
        with raises(TypeError, "features", "tensor"):
            call(np.ones((4, 2, 8), dtype=np.float32), torch.zeros(4, 3))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_raise_by_default(device, backend, bad):
    for call in callers(device, backend):
        features = unit(4, 2, 8, device=device)
        features[2, 1, 5] = bad
        with raises(ValueError, "non-finite", "nan_policy"):
            call(features, torch.zeros(4, 3, device=device))
        with raises(ValueError, "non-finite"):
            call(features, None, nan_policy="raise")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_finite_features_propagate_when_asked(device, backend, bad, reduction):
    for call in callers(device, backend):
        features = unit(4, 2, 8, device=device)
        features[2, 1, 5] = bad
        loss = call(features, torch.zeros(4, 3, device=device), nan_policy="propagate",
                    reduction=reduction)
        assert torch.isnan(loss).all(), loss


# ---- empty and tiny batches --------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("features_shape,labels_shape", [
    ((0, 2, 8), (0, 3)), ((0, 8), (0, 3)), ((0, 2, 8), None), ((0, 8), (0,)),
], ids=["3d", "2d", "3d-none", "2d-ids"])
def test_empty_batch(device, backend, features_shape, labels_shape):
    for call in callers(device, backend):
        labels = None if labels_shape is None else (
            torch.zeros(labels_shape, device=device, dtype=torch.int64))
        with raises(ValueError, "empty"):
            call(torch.zeros(features_shape, device=device), labels)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(4, 0, 8), (4, 2, 0), (4, 0)], ids=["V=0", "D=0", "2d-D=0"])
def test_zero_sized_view_or_dim(device, backend, shape):
    for call in callers(device, backend):
        with raises(ValueError, "zero-sized"):
            call(torch.zeros(shape, device=device), torch.zeros(4, 3, device=device))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("make", [
    lambda d: (unit(1, 8, device=d, dtype=torch.float64), torch.ones(1, 3, device=d)),
    lambda d: (unit(1, 8, device=d, dtype=torch.float64), torch.zeros(1, dtype=torch.long,
                                                                      device=d)),
    lambda d: (unit(1, 1, 8, device=d, dtype=torch.float64), None),
], ids=["2d-multi-hot", "2d-ids", "3d-simclr"])
def test_single_row(device, backend, make):
    """M = 1: nothing to contrast with, no positive: the documented result is a zero loss with
    a zero gradient (reduction="none": one zero), never NaN."""
    features, labels = make(device)
    for call in callers(device, backend):
        for reduction in REDUCTIONS:
            loss, grad = run_loss(call, features, labels, reduction=reduction)
            if reduction == "none":  # [M] for 2-D features, [B, V] for 3-D
                assert loss.shape == features.shape[:-1], loss.shape
            else:
                assert loss.shape == ()
            assert torch.all(loss == 0) and torch.all(grad == 0), (reduction, loss, grad)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_two_rows_one_image(device, backend):
    """M = 2, both views of one image: p = 1, so the loss is 0 (up to rounding), finite."""
    for call in callers(device, backend):
        loss, grad = run_loss(call, unit(1, 2, 8, device=device, dtype=torch.float64), None)
        assert abs(float(loss)) < 1e-12 and torch.isfinite(grad).all()


# ---- devices and layouts -----------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed devices need a GPU")
@pytest.mark.parametrize("backend", ["reference", "kernel", "auto"])
def test_mixed_devices_cuda(backend):
    if backend == "kernel":
        require_kernel("cuda")
    for features, labels in ((unit(4, 2, 8, device="cuda"), torch.zeros(4, 3)),
                             (unit(4, 2, 8), torch.zeros(4, 3, device="cuda"))):
        with pytest.raises((ValueError, RuntimeError)) as info:
            modan_ext.jaccard_supcon_loss(features, labels, backend=backend)
        message = str(info.value).lower()
        assert "cuda" in message and "cpu" in message, message


@pytest.mark.parametrize("backend", ["reference", "kernel", "auto"])
def test_mixed_devices_meta(backend):
    """Labels on another device than the features (meta stands in for a GPU on CPU-only CI)."""
    features = unit(4, 2, 8)
    with raises(ValueError, "device", "meta", "cpu"):
        modan_ext.jaccard_supcon_loss(features, torch.zeros(4, 3, device="meta"),
                                      backend=backend)
    with raises(ValueError, "device", "meta", "cpu"):
        modan_ext.jaccard_supcon_loss(features.to("meta"), torch.zeros(4, 3), backend=backend)


def test_meta_inputs_give_meta_output_of_the_right_shape():
    """Shape inference without data (e.g. for FLOP counters): no value checks, no warning."""
    features = torch.empty(4, 2, 8, device="meta")
    labels = torch.empty(4, 3, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for reduction, shape in (("mean", ()), ("none", (4, 2))):
            out = modan_ext.jaccard_supcon_loss(features, labels, reduction=reduction)
            assert out.device.type == "meta" and tuple(out.shape) == shape


def test_kernel_backend_without_a_kernel_names_the_device():
    with raises(RuntimeError, "kernel", "meta"):
        modan_ext.jaccard_supcon_loss(torch.empty(4, 2, 8, device="meta"), None,
                                      backend="kernel")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_inputs_work_and_match(device, backend):
    case = build(Spec(images=6, views=3, dim=10, pattern="mixed", seed=4), reduction="none")
    features, labels = case.on(device, torch.float64)
    big = torch.zeros(10, 3, 6, 2, dtype=torch.float64, device=device)  # [D, V, B, 2]
    big[..., 1] = features.permute(2, 1, 0)
    strided = big[..., 1].permute(2, 1, 0)  # features' values, no unit stride anywhere
    assert strided.shape == features.shape and not strided.is_contiguous()
    assert torch.equal(strided, features)
    labels_t = labels.T.contiguous().T  # column-major labels
    expected_loss, expected_grad = run_loss(reference_fn, features, labels, **case.options)
    for call in callers(device, backend):
        for f, y in ((strided, labels), (features, labels_t), (strided, labels_t),
                     (features[:, [2, 0, 1]][:, [1, 2, 0]], labels)):  # fancy-indexed copy
            loss, grad = run_loss(call, f, y, **case.options)
            assert_close(loss, expected_loss, 1e-10, "loss, non-contiguous")
            assert_close(grad, expected_grad, 1e-10, "gradient, non-contiguous")
        # an expanded (stride-0) batch: every image the same features
        one = features[:1].expand(6, 3, 10)
        loss, _ = run_loss(call, one, labels, **case.options)
        ref, _ = run_loss(reference_fn, one.contiguous(), labels, **case.options)
        assert_close(loss, ref, 1e-10, "loss, expanded features")


# ---- options -----------------------------------------------------------------------------------

BAD_OPTIONS = [
    (dict(temperature=0.0), ValueError, ("temperature",)),
    (dict(temperature=-0.1), ValueError, ("temperature",)),
    (dict(temperature=float("nan")), ValueError, ("temperature",)),
    (dict(temperature=float("inf")), ValueError, ("temperature",)),
    (dict(temperature="0.1"), TypeError, ("temperature",)),
    (dict(temperature=True), TypeError, ("temperature",)),
    (dict(base_temperature=0.0), ValueError, ("base_temperature",)),
    (dict(base_temperature=-1), ValueError, ("base_temperature",)),
    (dict(threshold=-0.01), ValueError, ("threshold", "[0, 1]")),
    (dict(threshold=1.01), ValueError, ("threshold", "[0, 1]")),
    (dict(threshold=float("nan")), ValueError, ("threshold",)),
    (dict(threshold=None), TypeError, ("threshold",)),
    (dict(normalization="sum"), ValueError, ("normalization", "'sum'", "'count'")),
    (dict(contrast_mode="both"), ValueError, ("contrast_mode", "'both'", "'one'")),
    (dict(reduction="avg"), ValueError, ("reduction", "'avg'", "'mean'")),
    (dict(weighting="jacard"), ValueError, ("weighting", "'jacard'", "'jaccard'")),
    (dict(nan_policy="ignore"), ValueError, ("nan_policy", "'ignore'", "'propagate'")),
    (dict(backend="gpu"), ValueError, ("backend", "'gpu'", "'kernel'")),
    (dict(weighting="Jaccard"), ValueError, ("weighting",)),
]


@pytest.mark.parametrize("options,exc,fragments", BAD_OPTIONS,
                         ids=[f"{k}={v!r}" for o, _, _ in BAD_OPTIONS for k, v in o.items()])
def test_bad_options(options, exc, fragments):
    features, labels = unit(4, 2, 8), torch.zeros(4, 3)
    with raises(exc, *fragments):
        modan_ext.jaccard_supcon_loss(features, labels, **options)
    with raises(exc, *fragments):  # the module refuses at construction, before any data
        modan_ext.JaccardSupConLoss(**options)
    if "backend" not in options:
        with raises(exc, *fragments):
            modan_ext.reference.jaccard_supcon_loss_reference(features, labels, **options)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_threshold_bounds_are_valid(device, backend, threshold):
    for call in callers(device, backend):
        loss = call(unit(4, 2, 8, device=device), torch.eye(4, device=device),
                    threshold=threshold)
        assert math.isfinite(float(loss))


def test_fallback_warns_once(monkeypatch):
    """No compiled kernel for the device: "auto" falls back to the reference with ONE warning,
    and gives the reference's result."""
    from modan_ext import loss, ops
    monkeypatch.setattr(ops, "kernel_available", lambda device: False)
    monkeypatch.setattr(loss, "_warned", False)
    features, labels = unit(4, 2, 8, dtype=torch.float64), torch.eye(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [modan_ext.jaccard_supcon_loss(features, labels) for _ in range(3)]
    fallback = [w for w in caught if "modan_ext" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert "reference" in str(fallback[0].message)
    assert modan_ext.resolve_backend("auto", "cpu") == "reference"
    for loss in out:
        assert_close(loss, reference_fn(features, labels), 1e-12, "fallback result")
    with raises(RuntimeError, "kernel"):
        modan_ext.jaccard_supcon_loss(features, labels, backend="kernel")
