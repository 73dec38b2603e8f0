"""Build modan_ext: the CPU kernel always (`modan_ext._C`, which also holds the op schemas), the
CUDA kernel (`modan_ext._cuda`, a separate library so that a CPU-only machine still loads the CPU
kernel) when a CUDA toolkit is found and torch is a CUDA build.

Nothing about CUDA is decided until the extensions are compiled: `sdist` and the package metadata
need neither a toolkit nor a GPU.

Environment:
  MODAN_EXT_CUDA=1|0      force the CUDA kernel on / off (default: on when a toolkit is found)
  CUDA_HOME               toolkit root (found from `nvcc` when unset)
  TORCH_CUDA_ARCH_LIST    e.g. "9.0+PTX" (H100/H200 machine code + PTX for later GPUs); default:
                          the visible GPUs' architectures (+PTX of the newest), and on a machine
                          without a GPU DEFAULT_CUDA_ARCH_LIST below
  MODAN_EXT_DEBUG=1       -O0 -g
"""
import glob
import os
import re
import shutil
import subprocess

import torch
from setuptools import Extension, setup
from torch.utils import cpp_extension

# Stable ABI target: torch 2.11 -> one binary serves torch >= 2.11.
TORCH_TARGET = "-DTORCH_TARGET_VERSION=0x020b000000000000"
PY_LIMITED = "-DPy_LIMITED_API=0x030a0000"
HERE = os.path.dirname(os.path.abspath(__file__))

# A CUDA build with no GPU to ask and no TORCH_CUDA_ARCH_LIST targets the GPUs that the PyTorch
# CUDA 13 wheels serve (sm_75 ... sm_120) from sm_80 on (the kernel needs mma.sync TF32/BF16 and
# cp.async). Machine code for each runs on later GPUs of its major version (sm_86 on sm_89, sm_100
# on sm_103, sm_120 on sm_121); PTX of the newest lets the driver compile for GPUs to come.
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;9.0;10.0;12.0+PTX"
# What the CUDA library was compiled for, read by modan_ext/_cuda_arch.py; written at each build,
# never tracked (.gitignore) nor put in the sdist (MANIFEST.in).
BUILD_INFO = "_build_info.py"


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


def _cuda_targets():
    """(machine-code archs, PTX archs) the CUDA library is compiled for, e.g. (["sm_90"],
    ["compute_90"]): read off the -gencode flags that torch's BuildExtension passes to nvcc
    (the same function and environment), so the record is what was built."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        print(f"modan_ext: no GPU to ask and no TORCH_CUDA_ARCH_LIST: building for "
              f"{DEFAULT_CUDA_ARCH_LIST}")
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    flags = " ".join(cpp_extension._get_cuda_arch_flags())
    codes = sorted(re.findall(r"code=((?:sm|compute)_\w+)", flags),
                   key=lambda code: int(re.search(r"\d+", code).group()))
    return ([c for c in codes if c.startswith("sm_")],
            [c for c in codes if c.startswith("compute_")])


def _compile_flags():
    """(cxx flags, nvcc optimisation flags, Extension keywords) that both libraries share."""
    debug = os.environ.get("MODAN_EXT_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    common = dict(include_dirs=[os.path.join(HERE, "csrc")], py_limited_api=True)
    cxx = opt + [TORCH_TARGET, PY_LIMITED, "-fdiagnostics-color=always", "-fno-math-errno"]
    return cxx, opt, common


def cpu_extension():
    cxx, _, common = _compile_flags()
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    return cpp_extension.CppExtension("modan_ext._C", cpu_sources, extra_compile_args={"cxx": cxx},
                                      **common)


def cuda_sources():
    return sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))


def cuda_placeholder():
    """The CUDA library's entry, where there are CUDA sources. Its build settings need a
    toolkit, which only a build may ask for: BuildExtensions fills them in, or drops it."""
    sources = cuda_sources()
    return [Extension("modan_ext._cuda", sources, py_limited_api=True)] if sources else []


def cuda_extension():
    """The CUDA library as torch builds it, or None where there is no toolkit."""
    if not _want_cuda():
        return None
    cxx, opt, common = _compile_flags()
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    defines = ["-DUSE_CUDA", "-DMODAN_EXT_WITH_CUDA"]
    nvcc = opt + [TORCH_TARGET, *defines, "--use_fast_math", "-lineinfo", "-Xptxas=-v"]
    return cpp_extension.CUDAExtension(
        "modan_ext._cuda", cuda_sources(),
        extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc}, **common)


class BuildExtensions(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's build_ext, deciding about CUDA only when it runs (sdist lists sources through it
    and must not depend on a toolkit or a GPU) and recording the CUDA targets it built."""

    def run(self):
        placeholder = next((e for e in self.extensions if e.name == "modan_ext._cuda"), None)
        cuda = cuda_extension() if placeholder else None
        sass, ptx = [], []
        if cuda is None:
            if placeholder:
                self.extensions.remove(placeholder)
        else:
            sass, ptx = _cuda_targets()
            # setuptools prepared the entry when this command was finalized (file name, stubs:
            # the underscored fields); the rest now comes from torch's CUDAExtension.
            vars(placeholder).update(
                {key: value for key, value in vars(cuda).items() if not key.startswith("_")})
        targets = f" (machine code {' '.join(sass)}; PTX {' '.join(ptx) or 'none'})" if cuda else ""
        print(f"modan_ext: building {'CPU + CUDA' if cuda else 'CPU only'} kernels{targets}")
        super().run()
        # The wheel takes build_lib's copy; an in-place (or editable) build imports the source's.
        folders = {os.path.join(self.build_lib, "modan_ext")}
        if self.inplace:
            folders.add(os.path.join(HERE, "modan_ext"))
        for folder in folders:
            _write_build_info(folder, sass, ptx)


def _write_build_info(folder, sass, ptx):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, BUILD_INFO), "w") as f:
        f.write('"""What modan_ext._cuda was compiled for (written by setup.py at build time)."""\n'
                f"CUDA_SASS = {tuple(sass)!r}\nCUDA_PTX = {tuple(ptx)!r}\n")


setup(
    ext_modules=[cpu_extension(), *cuda_placeholder()],
    cmdclass={"build_ext": BuildExtensions},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
