"""Whether the CUDA library serves a GPU, decided without a GPU (the device is monkeypatched).

The CUDA driver runs machine code for sm_XY on GPUs X.Z with Z >= Y, and PTX for compute_XY on
any GPU >= X.Y (JIT); anything else fails at launch with "no kernel image is available". So an
sm_90 build must not claim an A100 (8.0), and a 9.0+PTX build serves a Blackwell card (10.0).
"""
from __future__ import annotations

import ast
import importlib
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

import modan_ext
from modan_ext import _cuda_arch, ops, triton_backend

loss_module = importlib.import_module("modan_ext.loss")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SM90 = ((9, 0, ""),)
A100, H100, B200, RTX5090, FUTURE = (8, 0), (9, 0), (10, 0), (12, 0), (13, 0)


@pytest.mark.parametrize("sass, ptx, capability, served", [
    (SM90, (), H100, True),
    (SM90, (), A100, False),           # older major: no machine code, no PTX
    (SM90, (), B200, False),           # machine code never crosses a major version
    (SM90, SM90, B200, True),          # PTX, compiled by the driver
    (SM90, SM90, RTX5090, True),
    (SM90, SM90, A100, False),         # PTX runs on its own or later architectures only
    (((8, 0, ""),), (), (8, 6), True),  # same major, later minor
    (((8, 6, ""),), (), A100, False),
    (((9, 0, "a"),), (), H100, True),  # architecture-specific: its own architecture alone
    (((9, 0, "a"),), (), (9, 1), False),
    ((), ((9, 0, "a"),), B200, False),
    ((), (), H100, False),
])
def test_serves(sass, ptx, capability, served):
    assert _cuda_arch.serves(capability, sass, ptx) is served


def default_arch_list() -> str:
    """setup.py's DEFAULT_CUDA_ARCH_LIST, read without running setup.py."""
    with open(os.path.join(REPO, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "DEFAULT_CUDA_ARCH_LIST":
            return node.value.value
    raise AssertionError("setup.py defines no DEFAULT_CUDA_ARCH_LIST")


def test_the_default_build_serves_every_current_gpu_and_later_ones():
    sass, ptx = [], []
    for entry in default_arch_list().split(";"):
        major, minor = entry.removesuffix("+PTX").split(".")
        target = (int(major), int(minor), "")
        sass.append(target)
        if entry.endswith("+PTX"):
            ptx.append(target)
    assert ptx, "the default build ships no PTX: later GPUs could not run it"
    # A100, A10/RTX 30, Jetson Orin, L4/RTX 40, H100/H200, B200, B300, RTX 50, GB10, and later.
    for capability in [(8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0),
                       (12, 1), (13, 0)]:
        assert _cuda_arch.serves(capability, sass, ptx), capability
    # The kernel needs sm_80 (mma.sync TF32/BF16, cp.async): nothing for Turing.
    assert not _cuda_arch.serves((7, 5), sass, ptx)


@pytest.fixture
def gpu(monkeypatch):
    """A visible GPU of a chosen capability, a CUDA kernel registered, one warning to give."""
    def install(capability, built, name="a test GPU"):
        major, minor = capability
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: SimpleNamespace(name=name, major=major,
                                                                minor=minor))
        monkeypatch.setattr(ops, "KERNEL_DEVICE_TYPES", ops.KERNEL_DEVICE_TYPES | {"cuda"})
        monkeypatch.setattr(ops, "LOAD_ERROR", None)
        monkeypatch.setattr(ops, "CUDA_LOAD_ERROR", None)
        monkeypatch.setattr(_cuda_arch, "BUILT", built)
        monkeypatch.setattr(loss_module, "_warned", False)
        # These tests are about the C++ kernel's choice: "auto" on CUDA would take the Triton
        # backend first (test_auto_prefers_triton_whatever_the_cuda_build below).
        monkeypatch.setattr(triton_backend, "unavailable_reason",
                            lambda device: "Triton is switched off in this test")
    return install


def test_auto_prefers_triton_whatever_the_cuda_build(gpu, monkeypatch):
    gpu(A100, (SM90, ()), name="NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda device: None)
    assert modan_ext.resolve_backend("auto", "cuda:0") == "triton"
    with pytest.raises(RuntimeError, match=r"'kernel'.*TORCH_CUDA_ARCH_LIST including 8\.0"):
        modan_ext.resolve_backend("kernel", "cuda")


def test_an_sm90_build_does_not_serve_an_a100(gpu):
    gpu(A100, (SM90, ()), name="NVIDIA A100-SXM4-80GB")
    assert not modan_ext.kernel_available("cuda")
    assert not modan_ext.kernel_available(torch.device("cuda", 0))
    with pytest.warns(RuntimeWarning, match=r"9\.0.*none of which runs on NVIDIA A100.*8\.0"):
        assert modan_ext.resolve_backend("auto", "cuda:0") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once
        assert modan_ext.resolve_backend("auto", "cuda:0") == "reference"
    with pytest.raises(RuntimeError, match=r"'kernel'.*TORCH_CUDA_ARCH_LIST including 8\.0"):
        modan_ext.resolve_backend("kernel", "cuda")
    assert modan_ext.JaccardSupConLoss().backend_for("cuda") == "reference"


def test_a_9_0_ptx_build_serves_blackwell(gpu):
    gpu(B200, (SM90, SM90))
    assert modan_ext.kernel_available("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert modan_ext.resolve_backend("auto", "cuda") == "kernel"


def test_an_sm90_build_serves_an_h100(gpu):
    gpu(H100, (SM90, ()))
    assert modan_ext.kernel_available("cuda")
    assert modan_ext.resolve_backend("kernel", "cuda") == "kernel"


def test_a_library_without_build_record_is_not_trusted(gpu):
    gpu(H100, None)
    assert not modan_ext.kernel_available("cuda")
    assert "_build_info.py is missing" in ops.missing_kernel_reason("cuda")


def test_without_a_visible_gpu_the_library_alone_answers(gpu, monkeypatch):
    gpu(A100, (SM90, ()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert modan_ext.kernel_available("cuda")


def test_the_cpu_kernel_is_not_asked_about_gpus(gpu):
    gpu(A100, (SM90, ()))
    assert modan_ext.kernel_available("cpu") == ("cpu" in ops.KERNEL_DEVICE_TYPES)


def test_the_build_left_a_readable_record():
    """setup.py wrote modan_ext/_build_info.py, in targets this module understands (parsed at
    import). tests/test_cuda_build.py checks the record against the CUDA library itself."""
    if ops.LOAD_ERROR is not None:
        pytest.skip(f"no compiled library: {ops.LOAD_ERROR}")
    assert _cuda_arch.BUILT is not None, "the extension is built but left no _build_info.py"
