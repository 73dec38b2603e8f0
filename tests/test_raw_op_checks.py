"""The raw ops' argument check (csrc/supcon_problem.h), called directly through torch.ops.

`torch.ops.modan_ext.supcon_fwd/bwd` can be called without the Python layer's validation, so
the C++ side checks every argument of the op contract itself, once for both backends: each bad
argument must give a RuntimeError that names the problem, never a crash, an overflow or a
silently wrong answer.
"""
from __future__ import annotations

import math

import pytest
import torch

from loss_cases import DEVICES, require_kernel

fwd = torch.ops.modan_ext.supcon_fwd
bwd = torch.ops.modan_ext.supcon_bwd

IMAGES, VIEWS, DIM = 4, 2, 8
ROWS = IMAGES * VIEWS


@pytest.fixture(params=DEVICES)
def device(request):
    require_kernel(request.param)
    return request.param


def good_args(device):
    """Valid canonical arguments: 4 images x 2 views, multi-hot labels in one word."""
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(ROWS, DIM, generator=g), dim=1)
    labels = torch.tensor([[0b011], [0b110], [0b001], [0b100]], dtype=torch.int64)
    return dict(features=features.to(device), labels=labels.to(device), label_kind=0,
                views=VIEWS, anchor_begin=0, anchor_end=ROWS, first_view_only=False,
                temperature=0.1, base_temperature=0.07, threshold=0.0, weighting=0,
                normalization=0, allow_tf32=False)


def call_fwd(a):
    return fwd(a["features"], a["labels"], a["label_kind"], a["views"], a["anchor_begin"],
               a["anchor_end"], a["first_view_only"], a["temperature"], a["base_temperature"],
               a["threshold"], a["weighting"], a["normalization"], a["allow_tf32"])


def call_bwd(a, grad_loss, stats):
    return bwd(grad_loss, a["features"], a["labels"], stats, a["label_kind"], a["views"],
               a["anchor_begin"], a["anchor_end"], a["first_view_only"], a["temperature"],
               a["base_temperature"], a["threshold"], a["weighting"], a["normalization"],
               a["allow_tf32"])


# 4 * (2**62 + 1) = 2**64 + 4 wraps to 4 in int64: a `labels.size(0) * views == features.size(0)`
# test passes it, and every row then belongs to image 0.
OVERFLOWING_VIEWS = 2**62 + 1

BAD = {
    "views-0": (dict(views=0), r"views must be >= 1, got 0"),
    "views-negative": (dict(views=-2), r"views must be >= 1, got -2"),
    "views-do-not-divide-rows": (dict(views=3), r"features.size\(0\) \(8\) must be views \(3\) "
                                                r"times labels.size\(0\) \(4\)"),
    "views-times-images-overflows": (
        dict(features=lambda a: a["features"][:4].contiguous(), views=OVERFLOWING_VIEWS,
             anchor_end=4),
        r"features.size\(0\) \(4\) must be views \(4611686018427387905\) times "
        r"labels.size\(0\) \(4\)"),
    "temperature-inf": (dict(temperature=math.inf), r"temperature must be finite and > 0"),
    "temperature-nan": (dict(temperature=math.nan), r"temperature must be finite and > 0"),
    "temperature-0": (dict(temperature=0.0), r"temperature must be finite and > 0"),
    "temperature-negative": (dict(temperature=-0.1), r"temperature must be finite and > 0"),
    "base-temperature-inf": (dict(base_temperature=math.inf),
                             r"base_temperature must be finite and > 0"),
    "base-temperature-nan": (dict(base_temperature=math.nan),
                             r"base_temperature must be finite and > 0"),
    "base-temperature-0": (dict(base_temperature=0.0), r"base_temperature must be finite and > 0"),
    "label-kind-2": (dict(label_kind=2), r"label_kind must be 0 \(multi-hot\) or 1 \(class ids\)"),
    "label-kind-negative": (dict(label_kind=-1), r"label_kind must be 0"),
    "class-ids-two-words": (dict(label_kind=1, labels=lambda a: torch.zeros(
        IMAGES, 2, dtype=torch.int64, device=a["features"].device)),
        r"class-id labels must have shape \[B, 1\]"),
    "weighting-5": (dict(weighting=5), r"weighting must be in 0..4"),
    "weighting-negative": (dict(weighting=-1), r"weighting must be in 0..4"),
    "normalization-2": (dict(normalization=2), r"normalization must be 0 \(count\) or 1"),
    "anchor-begin-negative": (dict(anchor_begin=-1), r"anchor range \[-1, 8\) must lie within "
                                                     r"\[0, 8\]"),
    "anchor-end-past-rows": (dict(anchor_end=ROWS + 1), r"anchor range \[0, 9\) must lie within"),
    "anchor-range-reversed": (dict(anchor_begin=5, anchor_end=3), r"anchor range \[5, 3\) must"),
    "labels-int32": (dict(labels=lambda a: a["labels"].int()),
                     r"labels must be a contiguous int64 \[B, W\] tensor"),
    "features-3d": (dict(features=lambda a: a["features"][None]),
                    r"features must be a contiguous \[M, D\] tensor"),
}


def with_bad(a, change):
    bad = dict(a)
    for key, value in change.items():
        bad[key] = value(a) if callable(value) else value
    return bad


@pytest.mark.parametrize("name", list(BAD))
def test_forward_names_the_bad_argument(device, name):
    change, message = BAD[name]
    with pytest.raises(RuntimeError, match=r"modan_ext: .*" + message):
        call_fwd(with_bad(good_args(device), change))


@pytest.mark.parametrize("name", list(BAD))
def test_backward_names_the_bad_argument(device, name):
    a = good_args(device)
    loss, stats = call_fwd(a)
    bad = with_bad(a, BAD[name][0])
    # grad_loss and stats sized for the bad anchor range when it is a valid size, so that the
    # check under test is the one that fires
    anchors = max(bad["anchor_end"] - bad["anchor_begin"], 0)
    grad_loss = torch.ones(anchors, dtype=loss.dtype, device=loss.device)
    stats = torch.zeros(anchors, stats.shape[1], dtype=stats.dtype, device=stats.device)
    change, message = BAD[name]
    with pytest.raises(RuntimeError, match=r"modan_ext: .*" + message):
        call_bwd(bad, grad_loss, stats)


def test_the_good_arguments_pass(device):
    """The cases above differ from these arguments in the one named argument only."""
    a = good_args(device)
    loss, stats = call_fwd(a)
    assert loss.shape == (ROWS,) and torch.isfinite(loss).all() and (loss > 0).all()
    grad = call_bwd(a, torch.ones_like(loss), stats)
    assert grad.shape == (ROWS, DIM) and torch.isfinite(grad).all()


def test_views_equal_to_the_rows_per_image_still_pass(device):
    """The overflow-safe form accepts every consistent shape, e.g. one image of all rows."""
    a = good_args(device)
    a["labels"] = a["labels"][:1].contiguous()
    a["views"] = ROWS
    loss, _ = call_fwd(a)
    assert loss.shape == (ROWS,) and torch.isfinite(loss).all()
