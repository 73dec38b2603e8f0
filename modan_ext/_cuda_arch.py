"""Whether the compiled CUDA library can run on a given GPU.

setup.py records in `modan_ext/_build_info.py` what `modan_ext._cuda` was compiled for: machine
code (`sm_XY`) and PTX (`compute_XY`). The CUDA driver runs
* machine code for sm_XY on a GPU of compute capability X.Z with Z >= Y (same major version);
  architecture-specific code (sm_90a) on X.Y alone;
* PTX for compute_XY on any GPU of capability >= X.Y, compiled by the driver when the library
  loads (JIT); compute_90a PTX on 9.0 alone.
On a GPU served by neither, every launch fails with "no kernel image is available", so the
backend choice asks here first and falls back to the reference.
"""
from __future__ import annotations

import re

import torch


def _parse(code: str) -> tuple[int, int, str]:
    """"sm_90" -> (9, 0, ""), "compute_120" -> (12, 0, ""), "sm_90a" -> (9, 0, "a")."""
    m = re.fullmatch(r"(?:sm|compute)_(\d+)(\d)([a-z]?)", code)
    if m is None:
        raise ValueError(f"modan_ext: unknown CUDA architecture {code!r} in _build_info.py")
    return int(m.group(1)), int(m.group(2)), m.group(3)


def _load_build_info():
    """(machine code, PTX) as parsed tuples, or None when the build left no record."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return (tuple(map(_parse, _build_info.CUDA_SASS)), tuple(map(_parse, _build_info.CUDA_PTX)))


# Parsed once: torch.compile traces `unserved_reason`, which must only compare tuples.
BUILT = _load_build_info()


def serves(capability: tuple[int, int], sass, ptx) -> bool:
    """Whether machine code `sass` or PTX `ptx` ((major, minor, suffix) each) runs on a GPU of
    compute `capability`. A suffixed target (sm_90a) runs on its own architecture only."""
    for major, minor, suffix in sass:
        if (major, minor) == capability or (not suffix and major == capability[0]
                                            and minor < capability[1]):
            return True
    for major, minor, suffix in ptx:
        if (major, minor) == capability or (not suffix and (major, minor) < capability):
            return True
    return False


def _names(targets) -> str:
    return " ".join(f"{major}.{minor}{suffix}" for major, minor, suffix in targets) or "none"


def unserved_reason(device: torch.device) -> str | None:
    """Why the CUDA library cannot run on CUDA `device`, or None when it can. Without a visible
    GPU there is nothing to run on and nothing to decide: None."""
    if not torch.cuda.is_available():
        return None
    # get_device_properties is constant-folded by torch.compile; the capability never changes.
    props = torch.cuda.get_device_properties(device)
    capability = (props.major, props.minor)
    if BUILT is None:
        return ("modan_ext/_build_info.py is missing, so which GPUs modan_ext._cuda serves is "
                "unknown: rebuild the extension (setup.py writes it)")
    if serves(capability, *BUILT):
        return None
    sass, ptx = BUILT
    return (f"modan_ext._cuda holds machine code for {_names(sass)} and PTX for {_names(ptx)}, "
            f"none of which runs on {props.name} (compute capability {props.major}."
            f"{props.minor}); rebuild with TORCH_CUDA_ARCH_LIST including "
            f"{props.major}.{props.minor} (README, \"Building\")")
