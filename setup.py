"""Build modan_ext: the CPU kernel always (`modan_ext._C`, which also holds the op schemas), the
CUDA kernel (`modan_ext._cuda`, a separate library so that a CPU-only machine still loads the CPU
kernel) when a CUDA toolkit is found and torch is a CUDA build.

Environment:
  MODAN_EXT_CUDA=1|0      force the CUDA kernel on / off (default: on when a toolkit is found)
  CUDA_HOME               toolkit root (found from `nvcc` when unset)
  TORCH_CUDA_ARCH_LIST    e.g. "9.0"; required when building CUDA on a machine without a GPU
  MODAN_EXT_DEBUG=1       -O0 -g
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

# Stable ABI target: torch 2.11 -> one binary serves torch >= 2.11.
TORCH_TARGET = "-DTORCH_TARGET_VERSION=0x020b000000000000"
PY_LIMITED = "-DPy_LIMITED_API=0x030a0000"
HERE = os.path.dirname(os.path.abspath(__file__))


def _nvcc_root():
    """The real toolkit root: `nvcc` on PATH may be a wrapper script, so ask nvcc itself."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True,
                             timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"TOP=(\S+)", out)
    return os.path.realpath(m.group(1)) if m else None


def _want_cuda():
    import torch
    flag = os.environ.get("MODAN_EXT_CUDA", "").strip()
    if flag == "0":
        return False
    if torch.version.cuda is None:
        if flag == "1":
            raise RuntimeError("MODAN_EXT_CUDA=1 but the installed torch is a CPU-only build")
        return False
    if not os.environ.get("CUDA_HOME"):
        root = _nvcc_root()
        if root:
            os.environ["CUDA_HOME"] = root
    found = bool(os.environ.get("CUDA_HOME")) and os.path.exists(
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    if flag == "1" and not found:
        raise RuntimeError("MODAN_EXT_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
    return found


def _check_arch_list():
    import torch
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    if torch.cuda.is_available():
        return  # torch reads the archs off the visible GPUs
    raise RuntimeError(
        "Building the CUDA kernel on a machine without a GPU needs TORCH_CUDA_ARCH_LIST "
        "(e.g. TORCH_CUDA_ARCH_LIST=9.0 for H100/H200), or MODAN_EXT_CUDA=0 for a CPU-only build.")


def extensions():
    from torch.utils import cpp_extension

    debug = os.environ.get("MODAN_EXT_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    common = dict(include_dirs=[os.path.join(HERE, "csrc")], py_limited_api=True)
    cxx = opt + [TORCH_TARGET, PY_LIMITED, "-fdiagnostics-color=always", "-fno-math-errno"]
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    exts = [cpp_extension.CppExtension("modan_ext._C", cpu_sources,
                                       extra_compile_args={"cxx": cxx}, **common)]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    use_cuda = bool(cuda_sources) and _want_cuda()
    if use_cuda:
        _check_arch_list()
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        defines = ["-DUSE_CUDA", "-DMODAN_EXT_WITH_CUDA"]
        nvcc = opt + [TORCH_TARGET, *defines, "--use_fast_math", "-lineinfo", "-Xptxas=-v"]
        exts.append(cpp_extension.CUDAExtension(
            "modan_ext._cuda", cuda_sources,
            extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc}, **common))
    print(f"modan_ext: building {'CPU + CUDA' if use_cuda else 'CPU only'} kernels")
    return exts


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    ext_modules=extensions(),
    cmdclass=cmdclass(),
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
