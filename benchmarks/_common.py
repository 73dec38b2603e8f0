"""What every benchmark shares: the problem (inputs), the machine (name, memory, load), memory
probes, a port.

Problem (paper-like): B = M / V images of V views, unit-norm features [B, V, D], L = 12 labels
(one of 3 modalities + one of 9 anatomies per image, so w in {0, 1/3, 1} at threshold 0.3).
Each benchmark script imports this module from its own folder (on sys.path when the script runs).
"""
from __future__ import annotations

import platform
import socket

MIB, GIB = 2 ** 20, 2 ** 30


def make_inputs(rows: int, dim: int, views: int, seed: int, device, dtype=None):
    """Unit-norm features [rows / views, views, dim] and paper-like labels [rows / views, 12]."""
    import torch
    images = rows // views
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(images, views, dim, generator=gen)
    features = torch.nn.functional.normalize(features, dim=-1)
    return features.to(device=device, dtype=dtype), paper_labels(images, gen).to(device)


def paper_labels(images: int, generator):
    """Multi-hot labels [images, 12]: one of 3 modalities + one of 9 anatomies per image."""
    import torch
    labels = torch.zeros(images, 12, dtype=torch.bool)
    labels[torch.arange(images), torch.randint(3, (images,), generator=generator)] = True
    labels[torch.arange(images), 3 + torch.randint(9, (images,), generator=generator)] = True
    return labels


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _field(path: str, name: str) -> int:
    """The number after `name:` in a /proc file (kB figures there)."""
    with open(path) as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{name} not in {path}")


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A memory figure (VmRSS, VmHWM, ...) of this process or of process `pid`, in bytes."""
    return _field(f"/proc/{pid}/status", field) * 1024


def available_bytes() -> int:
    """The machine's available memory (effectively unlimited where /proc/meminfo is missing)."""
    try:
        return _field("/proc/meminfo", "MemAvailable") * 1024
    except (OSError, RuntimeError):
        return 1 << 62


def total_bytes() -> int:
    """The machine's memory (0 where /proc/meminfo is missing)."""
    try:
        return _field("/proc/meminfo", "MemTotal") * 1024
    except (OSError, RuntimeError):
        return 0


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ("?" where /proc/loadavg is missing): how busy a
    shared machine was while something was timed."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
