"""The CUDA library was built and holds code for the target GPU (no GPU needed to check it).

`setup.py` builds the CUDA kernel as the separate library `modan_ext/_cuda*.so` when a CUDA
toolkit is found. These tests read that library with `cuobjdump` (from $CUDA_HOME, the PATH, or
the copy Triton ships) and skip, saying why, when the build was CPU-only or no cuobjdump exists.

* the library embeds machine code (an ELF cubin) for exactly the architectures setup.py
  recorded in modan_ext/_build_info.py (what it told nvcc; .ci/setup: 9.0+PTX -> sm_90), and
  PTX for the recorded PTX targets, with the fused kernels in it: the PTX is what lets the
  driver run the library on a later GPU (modan_ext/_cuda_arch.py);
* the fused kernels are in it and use tensor-core instructions (HMMA), float32 path included;
* importing it registers the CUDA kernels of both ops (this works without a GPU too);
* every kernel's sm_90 machine code matches the committed fingerprint
  (csrc/cuda/sass_fingerprint.txt, written by .ci/sass_fingerprint.py): a change to csrc/cuda/
  that was meant to move code only must leave it as it was.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess

import pytest

import modan_ext
from modan_ext import ops

PACKAGE = os.path.dirname(modan_ext.__file__)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINGERPRINT_FILE = os.path.join(REPO, "csrc", "cuda", "sass_fingerprint.txt")


def _load_fingerprint_tool():
    path = os.path.join(REPO, ".ci", "sass_fingerprint.py")
    spec = importlib.util.spec_from_file_location("sass_fingerprint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sass_fingerprint = _load_fingerprint_tool()


def cuda_library() -> str:
    found = sorted(glob.glob(os.path.join(PACKAGE, "_cuda*.so")) +
                   glob.glob(os.path.join(PACKAGE, "_cuda*.pyd")))
    if not found:
        pytest.skip("modan_ext was built CPU-only (no modan_ext/_cuda*.so): the CUDA kernel is "
                    "built when a CUDA toolkit is found (setup.py); nothing to check")
    return found[0]


def cuobjdump() -> str:
    path = sass_fingerprint.find_cuobjdump()
    if path is None:
        pytest.skip("no cuobjdump found (CUDA_HOME/bin, PATH, triton): cannot read the library")
    return path


def built_targets() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(machine code, PTX) that setup.py recorded for this build, e.g. (("sm_90",),
    ("compute_90",))."""
    try:
        from modan_ext import _build_info
    except ImportError:
        pytest.fail("modan_ext/_cuda*.so exists but setup.py left no modan_ext/_build_info.py: "
                    "rebuild the extension")
    return _build_info.CUDA_SASS, _build_info.CUDA_PTX


def expected_archs() -> list[str]:
    """The recorded machine-code targets, as cuobjdump names them (sm_90, sm_90a, ...)."""
    return list(built_targets()[0])


def run(tool: str, *args: str) -> str:
    result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{tool} {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def test_cuda_library_contains_target_machine_code():
    lib = cuda_library()
    listing = run(cuobjdump(), "--list-elf", lib)
    elf_archs = set(re.findall(r"\.(sm_\d+[a-z]?)\.cubin", listing))
    assert elf_archs, f"{os.path.basename(lib)} holds no cubin:\n{listing}"
    assert elf_archs == set(expected_archs()), (
        f"{os.path.basename(lib)} has machine code for {sorted(elf_archs)}; the build record "
        f"(modan_ext/_build_info.py) says {expected_archs()}")


def test_cuda_library_ships_ptx_of_the_kernels():
    lib = cuda_library()
    tool = cuobjdump()
    ptx = built_targets()[1]
    assert ptx, ("the CUDA library was built without PTX (no +PTX in TORCH_CUDA_ARCH_LIST): a GPU "
                 "of a later architecture cannot run it (README, \"Building\")")
    listing = run(tool, "--list-ptx", lib)
    # cuobjdump names the PTX of compute_XY "<file>.sm_XY.ptx".
    ptx_archs = set(re.findall(r"\.sm_(\d+[a-z]?)\.ptx", listing))
    assert ptx_archs == {target.removeprefix("compute_") for target in ptx}, (
        f"{os.path.basename(lib)} holds PTX {sorted(ptx_archs)}; the build record says {ptx}")
    entries = set(re.findall(r"\.entry\s+(\w+)", run(tool, "-ptx", lib)))
    for kernel in ("supcon_fwd_kernel", "supcon_bwd_kernel"):
        assert any(kernel in entry for entry in entries), f"no {kernel} in the PTX"


def fused_kernels(sass: str) -> dict[str, str]:
    """{name: machine code} of the supcon_fwd/bwd kernel instances in a `cuobjdump -sass` text."""
    kernels = {}
    for body in re.split(r"\n\s*Function : ", sass)[1:]:
        name = body.split("\n", 1)[0].strip()
        if "supcon_fwd_kernel" in name or "supcon_bwd_kernel" in name:
            kernels[name] = body
    return kernels


def test_fused_kernels_use_tensor_cores():
    """On every architecture of the build record."""
    lib = cuda_library()
    tool = cuobjdump()
    for arch in expected_archs():
        kernels = fused_kernels(run(tool, "-sass", "-arch", arch, lib))
        assert kernels, f"no supcon_fwd_kernel / supcon_bwd_kernel in the {arch} code"
        # Template instance <MODE, LABELS>: MODE 0 TF32, 1 3xTF32 (float32), 2 float16, 3 bf16.
        modes = {int(m.group(1)) for name in kernels
                 for m in [re.search(r"kernelILi(\d)ELi\d", name)] if m}
        assert modes == {0, 1, 2, 3}, f"{arch}: kernel instances for modes {sorted(modes)} only"
        without = [name for name, body in kernels.items() if "HMMA" not in body]
        assert not without, f"{arch}: kernels without tensor-core (HMMA) instructions: {without}"
        for name, body in kernels.items():
            assert not re.search(r"\b(STL|LDL)\b", body), f"{arch}: {name} spills (local memory)"


def test_importing_the_library_registers_cuda_kernels():
    cuda_library()
    assert ops.CUDA_LOAD_ERROR is None, ops.CUDA_LOAD_ERROR
    import torch
    for op in ("modan_ext::supcon_fwd", "modan_ext::supcon_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    assert modan_ext.kernel_available("cuda")


def test_kernels_machine_code_matches_the_committed_fingerprint():
    lib = cuda_library()
    tool = cuobjdump()
    with open(FINGERPRINT_FILE) as f:
        expected = sass_fingerprint.Fingerprint.parse(f.read())
    elf_archs = set(re.findall(r"\.(sm_\d+[a-z]?)\.cubin", run(tool, "--list-elf", lib)))
    if expected.arch not in elf_archs:
        pytest.skip(f"the library holds no {expected.arch} code (TORCH_CUDA_ARCH_LIST="
                    f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'unset')}): the fingerprint is "
                    f"of {expected.arch} code")
    actual = sass_fingerprint.fingerprint(lib, tool, expected.arch)
    problems = sass_fingerprint.compare(expected, actual)
    assert not problems, (
        "the kernels' machine code differs from csrc/cuda/sass_fingerprint.txt:\n  " +
        "\n  ".join(problems) + "\nIf the change was meant, rewrite the file with "
        "`python .ci/sass_fingerprint.py --write csrc/cuda/sass_fingerprint.txt` and say why "
        "in the commit.")
