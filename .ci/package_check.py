#!/usr/bin/env python3
"""CI: the package as a user receives it, built and used without the checkout.

1. copy the checkout's files (tracked, and untracked ones git does not ignore) to a temporary
   folder, leaving build leftovers behind (an old *.egg-info/SOURCES.txt would put files in the
   sdist that MANIFEST.in forgot), and build the sdist there with MODAN_EXT_CUDA=1, no
   TORCH_CUDA_ARCH_LIST and no visible GPU: making a source archive must decide nothing about
   CUDA, so this must not fail;
2. check that it ships every one of those files that belongs in it (package, csrc/ including
   the CUDA sources, tests/, the .ci/ scripts the tests load, the build and licence files) and
   no build output;
3. unpack it in a temporary folder and build a wheel from it alone (CPU only, to save time;
   --no-isolation: this interpreter's torch);
4. install the wheel into an empty folder and, from a process whose sys.path holds that folder
   and this interpreter's site-packages only, import it, check that it is the installed copy,
   that its metadata version is `__version__` and that the CPU kernel is available, and compare
   one kernel call (loss and gradient) with the reference.

    python .ci/package_check.py [--keep]     # needs `build` (.ci/requirements.txt)
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the sdist must hold of the checkout's files: these folders whole, the Python scripts of
# .ci/ (tests load them), these files.
SHIPPED_FOLDERS = ("modan_ext/", "csrc/", "tests/")
SHIPPED_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "ARCHITECTURE.md",
                 "LICENSE")
# Build outputs that must never travel in an sdist (a packager's own build of them).
NEVER_SHIPPED = ("modan_ext/_build_info.py",)
NEVER_SHIPPED_SUFFIXES = (".so", ".pyd", ".o", ".pyc")

SMOKE = r'''
import importlib.metadata, os, sys
import torch
site = os.path.realpath(sys.argv[1])
import modan_ext
from modan_ext import _build_info

where = os.path.realpath(modan_ext.__file__)
assert where.startswith(site + os.sep), f"imported {where}, not the installed copy in {site}"
others = [p for p in sys.path if os.path.isdir(os.path.join(p or ".", "modan_ext"))
          and os.path.realpath(p or ".") != site]
assert not others, f"another modan_ext is on sys.path: {others}"
dist = importlib.metadata.distribution("modan_ext")
assert os.path.realpath(dist.locate_file("")) == site, f"metadata from {dist.locate_file('')}"
assert dist.version == modan_ext.__version__, (dist.version, modan_ext.__version__)
assert modan_ext.kernel_available("cpu"), modan_ext.ops.LOAD_ERROR

gen = torch.Generator().manual_seed(0)
features = torch.nn.functional.normalize(
    torch.randn(12, 2, 24, generator=gen, dtype=torch.float64), dim=-1)
labels = torch.rand(12, 7, generator=gen) < 0.4
leaf_k = features.clone().requires_grad_()
leaf_r = features.clone().requires_grad_()
loss_k = modan_ext.jaccard_supcon_loss(leaf_k, labels, backend="kernel")
loss_r = modan_ext.jaccard_supcon_loss_reference(leaf_r, labels)
loss_k.backward()
loss_r.backward()
loss_error = abs(loss_k.item() - loss_r.item()) / abs(loss_r.item())
grad_error = ((leaf_k.grad - leaf_r.grad).norm() / leaf_r.grad.norm()).item()
assert loss_error < 1e-10 and grad_error < 1e-10, (loss_error, grad_error)
print(f"  imported {where}")
print(f"  version {modan_ext.__version__} (metadata {dist.version}); CPU kernel available; "
      f"CUDA targets {_build_info.CUDA_SASS + _build_info.CUDA_PTX or 'none (CPU-only wheel)'}")
print(f"  kernel vs reference, float64 [12, 2, 24]: loss {loss_k.item():.12f}, relative error "
      f"loss {loss_error:.1e}, gradient {grad_error:.1e}")
'''


def run(step: str, command: list[str], log: str, **kwargs) -> None:
    """Run `command`, its output to `log`; on failure show the log's end and stop."""
    with open(log, "w") as f:
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, text=True, **kwargs)
    if result.returncode != 0:
        with open(log) as f:
            tail = f.readlines()[-40:]
        sys.exit(f"package check: {step} failed (exit {result.returncode}); end of {log}:\n"
                 + "".join(tail))


def environment(**changes: str | None) -> dict[str, str]:
    """This process's environment with `changes`; None removes a variable."""
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def checkout_files() -> list[str]:
    """The checkout's files: tracked, and untracked ones that git does not ignore."""
    out = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"package check: cannot list the checkout's files (git ls-files): {out.stderr}")
    return [p for p in out.stdout.split("\0") if p and os.path.isfile(os.path.join(REPO, p))]


def copy_checkout(files: list[str], target: str) -> None:
    for path in files:
        os.makedirs(os.path.dirname(os.path.join(target, path)), exist_ok=True)
        shutil.copy2(os.path.join(REPO, path), os.path.join(target, path))


def must_ship(path: str) -> bool:
    return (path.startswith(SHIPPED_FOLDERS) or path in SHIPPED_FILES
            or (path.startswith(".ci/") and path.endswith(".py")))


def check_contents(sdist: str, files: list[str]) -> list[str]:
    """The sdist's files (relative to its top folder), after checking that it holds those of
    the checkout's `files` that belong in it, and no build output."""
    with tarfile.open(sdist) as tar:
        names = [m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()]
    shipped = set(names)
    missing = [p for p in files if must_ship(p) and p not in shipped]
    stray = [p for p in names if p in NEVER_SHIPPED or p.endswith(NEVER_SHIPPED_SUFFIXES)]
    problems = [f"missing: {p}" for p in missing] + [f"build output: {p}" for p in stray]
    if not any(p.startswith("csrc/cuda/") and p.endswith(".cu") for p in names):
        problems.append("no CUDA source (csrc/cuda/*.cu)")
    if problems:
        sys.exit("package check: the sdist is wrong (MANIFEST.in):\n  " + "\n  ".join(problems))
    return sorted(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="modan_ext_package_")
    start = time.perf_counter()
    times = []

    def done(step: str, what: str, since: float) -> float:
        now = time.perf_counter()
        times.append(f"{step} {now - since:.0f} s")
        print(f"package check: {what} ({now - since:.0f} s)", flush=True)
        return now

    try:
        t = time.perf_counter()
        files = checkout_files()
        checkout = os.path.join(work, "checkout")
        copy_checkout(files, checkout)
        dist = os.path.join(work, "dist")
        run("sdist", [sys.executable, "-m", "build", "--sdist", "--no-isolation",
                      "--outdir", dist, checkout], os.path.join(work, "sdist.log"),
            env=environment(MODAN_EXT_CUDA="1", TORCH_CUDA_ARCH_LIST=None,
                            CUDA_VISIBLE_DEVICES=""))
        sdist, = glob.glob(os.path.join(dist, "*.tar.gz"))
        names = check_contents(sdist, files)
        t = done("sdist", f"sdist {os.path.basename(sdist)}: {len(names)} files, every source "
                 "file, CUDA sources included, no build output", t)
        print("  " + "\n  ".join(names))

        unpacked = os.path.join(work, "unpacked")
        with tarfile.open(sdist) as tar:
            tar.extractall(unpacked, filter="data")
        source, = glob.glob(os.path.join(unpacked, "*"))
        wheels = os.path.join(work, "wheels")
        run("wheel from the sdist", [sys.executable, "-m", "build", "--wheel", "--no-isolation",
                                     "--outdir", wheels, source], os.path.join(work, "wheel.log"),
            cwd=source, env=environment(MODAN_EXT_CUDA="0",
                                        MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count()))))
        wheel, = glob.glob(os.path.join(wheels, "*.whl"))
        t = done("wheel", f"wheel {os.path.basename(wheel)} built from the unpacked sdist", t)

        site = os.path.join(work, "site")
        run("install", [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                        "--target", site, wheel], os.path.join(work, "install.log"))
        t = done("install", f"installed into an empty folder {site}", t)

        empty = os.path.join(work, "elsewhere")
        os.mkdir(empty)
        smoke = subprocess.run([sys.executable, "-c", SMOKE, site], cwd=empty,
                               env=environment(PYTHONPATH=site), capture_output=True, text=True)
        if smoke.returncode != 0:
            sys.exit(f"package check: the installed wheel failed:\n{smoke.stdout}{smoke.stderr}")
        print(smoke.stdout, end="")
        done("use", "imported from outside the checkout; kernel matches the reference", t)
        print(f"package check passed in {time.perf_counter() - start:.0f} s "
              f"({', '.join(times)})")
    finally:
        if args.keep:
            print(f"package check: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
