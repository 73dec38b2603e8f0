#!/usr/bin/env python3
"""Per-kernel fingerprint of the machine code (SASS) in the CUDA library, to prove without a GPU
that a change to csrc/cuda/ left every kernel's code as it was (or changed exactly the kernels
it meant to).

    python .ci/sass_fingerprint.py                      print the table
    python .ci/sass_fingerprint.py --write FILE         write it
    python .ci/sass_fingerprint.py --check FILE         compare; exit 1 on any difference
    python .ci/sass_fingerprint.py --dump DIR           normalised SASS, one file per kernel

Only ELF code for one architecture (--arch, default sm_90) is read: other architectures and
embedded PTX are ignored. Per kernel (function) the SASS listing is normalised:
* dropped: the address column and the raw encoding words, the header lines, the NOP padding
  after the last instruction -- all of which follow from where the code is placed;
* kept: every instruction's text (opcode, modifiers, registers, predicates, immediates,
  constant-bank operands, .reuse flags), its scheduling control bits (stall count, yield,
  barriers, from the encoding), and the kernel's resource usage (registers, stack, shared,
  local, parameter bytes). Branch and call targets are function-relative in the listing;
  they are written as instruction indices ("L42").
The fingerprint is the first 16 hex digits of the SHA-256 of that text; the table also shows the
instruction and register counts. The same source gives other code under another compiler, so
the file records ptxas's version, and --check says so first when the versions differ.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# "        /*01d0*/              @!P0 BRA 0x230 ;      /* 0x0000000000148947 */"
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* 0x([0-9a-f]{16}) \*/\s*$")
# the second (control) word of an instruction, on a line of its own
_CONTROL_WORD = re.compile(r"^\s*/\* 0x([0-9a-f]{16}) \*/\s*$")
_TARGET_OPS = re.compile(r"^(?:@!?U?P\w+\s+)?(BRA|BRX|BSSY|CALL\.\S+|JMP|JMX|SSY|PBK|PCNT|BPT)\b")
_HEX = re.compile(r"\b0x([0-9a-f]+)\b")
_PTXAS_VERSION = re.compile(rb"Cuda compilation tools, release [0-9.]+, V[0-9.]+")


def find_cuobjdump() -> str | None:
    """$CUDA_HOME/bin, the PATH, the copy shipped in Triton's package, /usr/local/cuda."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump") or "")
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "cuobjdump"))
    except ImportError:
        pass
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def find_library() -> str | None:
    found = sorted(glob.glob(os.path.join(REPO, "modan_ext", "_cuda*.so")))
    return found[0] if found else None


def _run(tool: str, *args: str, cwd: str | None = None) -> str:
    result = subprocess.run([tool, *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def _elf_sections(listing: str, arch: str) -> list[str]:
    """The parts of a cuobjdump listing that belong to ELF code for `arch` (PTX skipped)."""
    parts = re.split(r"^Fatbin (elf|ptx) code:\n=+\n", listing, flags=re.M)
    sections = []
    for kind, body in zip(parts[1::2], parts[2::2]):
        m = re.search(r"^arch = (\S+)$", body, flags=re.M)
        if kind == "elf" and m and m.group(1) == arch:
            sections.append(body)
    return sections


def _split_functions(section: str) -> dict[str, str]:
    pieces = re.split(r"^\s*Function : (\S+)\s*$", section, flags=re.M)
    return dict(zip(pieces[1::2], pieces[2::2]))


def _control_bits(word: str) -> int:
    # Bits 105..125 of the 128-bit instruction (41..61 of the second word): stall, yield,
    # write/read barrier, wait mask, reuse -- the schedule, not the placement.
    return (int(word, 16) >> 41) & 0x1FFFFF


def normalise(body: str) -> list[str]:
    """One line per instruction of one function's listing (see the module doc)."""
    lines = body.splitlines()
    out = []
    k = 0
    while k < len(lines):
        m = _INSTRUCTION.match(lines[k])
        k += 1
        if not m:
            continue
        text = re.sub(r"\s+", " ", m.group(2))
        control = None
        if k < len(lines):
            c = _CONTROL_WORD.match(lines[k])
            if c:
                control = _control_bits(c.group(1))
                k += 1
        if control is None:
            raise ValueError(f"no control word after instruction {m.group(0).strip()!r}")
        op = _TARGET_OPS.match(text)
        if op:
            text = _HEX.sub(lambda h: f"L{int(h.group(1), 16) // 16}", text)
        out.append(f"{text} ; ctl={control:06x}")
    while out and out[-1].startswith("NOP ;"):  # alignment padding
        out.pop()
    return out


def _resources(listing: str, arch: str) -> dict[str, str]:
    usage = {}
    for section in _elf_sections(listing, arch):
        for name, line in re.findall(r"^\s*Function (\S+):\n\s*(.+)$", section, flags=re.M):
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            usage[name] = " ".join(f"{key}:{fields.get(key, '?')}" for key in
                                   ("REG", "STACK", "SHARED", "LOCAL", "CONSTANT[0]"))
    return usage


def ptxas_versions(cuobjdump: str, library: str, arch: str) -> list[str]:
    """ptxas's version, from the toolkit note of each cubin for `arch` in the library."""
    with tempfile.TemporaryDirectory() as tmp:
        _run(cuobjdump, "-xelf", "all", os.path.abspath(library), cwd=tmp)
        versions = set()
        for cubin in glob.glob(os.path.join(tmp, f"*.{arch}.cubin")):
            with open(cubin, "rb") as f:
                versions.update(v.decode() for v in _PTXAS_VERSION.findall(f.read()))
    return sorted(versions)


class Fingerprint:
    def __init__(self, arch: str, compiler: str, kernels: dict[str, tuple[int, str, str]]):
        self.arch, self.compiler = arch, compiler
        self.kernels = kernels  # name -> (instructions, registers, hash)

    def format(self) -> str:
        lines = [f"# SASS fingerprint (.ci/sass_fingerprint.py): arch {self.arch}",
                 f"# compiler: {self.compiler}",
                 "# kernel  instructions  registers  hash"]
        for name in sorted(self.kernels):
            count, regs, digest = self.kernels[name]
            lines.append(f"{name}  {count}  {regs}  {digest}")
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> "Fingerprint":
        arch = re.search(r"^# SASS fingerprint .*: arch (\S+)$", text, flags=re.M).group(1)
        compiler = re.search(r"^# compiler: (.*)$", text, flags=re.M).group(1)
        kernels = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, count, regs, digest = line.split()
                kernels[name] = (int(count), regs, digest)
        return cls(arch, compiler, kernels)


def fingerprint(library: str, cuobjdump: str, arch: str = "sm_90",
                dump_dir: str | None = None) -> Fingerprint:
    sass = _elf_sections(_run(cuobjdump, "-sass", library), arch)
    if not sass:
        raise LookupError(f"{os.path.basename(library)} holds no ELF code for {arch}")
    resources = _resources(_run(cuobjdump, "-res-usage", library), arch)
    kernels = {}
    for section in sass:
        for name, body in _split_functions(section).items():
            code = normalise(body)
            res = resources.get(name, "REG:?")
            text = res + "\n" + "\n".join(code) + "\n"
            regs = re.search(r"REG:(\S+)", res).group(1)
            entry = (len(code), regs, hashlib.sha256(text.encode()).hexdigest()[:16])
            if name in kernels and kernels[name] != entry:
                raise ValueError(f"{name} appears twice with different code")
            kernels[name] = entry
            if dump_dir:
                os.makedirs(dump_dir, exist_ok=True)
                with open(os.path.join(dump_dir, name + ".sass"), "w") as f:
                    f.write(text)
    compiler = ", ".join(ptxas_versions(cuobjdump, library, arch)) or "unknown"
    return Fingerprint(arch, compiler, kernels)


def compare(expected: Fingerprint, actual: Fingerprint) -> list[str]:
    """Human-readable differences; empty when the kernels are the same."""
    problems = []
    if expected.arch != actual.arch:
        problems.append(f"architecture: expected {expected.arch}, library read for {actual.arch}")
    if expected.compiler != actual.compiler:
        problems.append(f"compiler differs: the file was written for '{expected.compiler}', the "
                        f"library was built by '{actual.compiler}' (the same source gives other "
                        "code: rebuild with that toolkit or rewrite the file with --write)")
    for name in sorted(set(expected.kernels) | set(actual.kernels)):
        e, a = expected.kernels.get(name), actual.kernels.get(name)
        if e is None:
            problems.append(f"new kernel: {name} ({a[0]} instructions)")
        elif a is None:
            problems.append(f"missing kernel: {name}")
        else:
            if e != a:
                problems.append(f"changed: {name}: instructions {e[0]} -> {a[0]}, "
                                f"registers {e[1]} -> {a[1]}, hash {e[2]} -> {a[2]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", nargs="?", help="default: modan_ext/_cuda*.so of this repo")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--cuobjdump", help="default: CUDA_HOME, PATH, Triton's copy")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE")
    group.add_argument("--check", metavar="FILE")
    parser.add_argument("--dump", metavar="DIR", help="also write the normalised SASS per kernel")
    args = parser.parse_args(argv)

    library = args.library or find_library()
    if library is None:
        parser.error("no modan_ext/_cuda*.so: build the CUDA library first (setup.py)")
    tool = args.cuobjdump or find_cuobjdump()
    if tool is None:
        parser.error("no cuobjdump found (CUDA_HOME/bin, PATH, triton): pass --cuobjdump")
    actual = fingerprint(library, tool, args.arch, args.dump)
    if args.write:
        with open(args.write, "w") as f:
            f.write(actual.format())
        print(f"wrote {len(actual.kernels)} kernels to {args.write}")
        return 0
    if args.check:
        with open(args.check) as f:
            expected = Fingerprint.parse(f.read())
        problems = compare(expected, actual)
        same = sum(1 for n, k in actual.kernels.items() if expected.kernels.get(n) == k)
        print(f"{same} of {len(expected.kernels)} kernels identical to {args.check}")
        for line in problems:
            print(line)
        return 1 if problems else 0
    sys.stdout.write(actual.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
