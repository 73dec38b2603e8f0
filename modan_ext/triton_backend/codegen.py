"""Hopper code-generation check: compile every kernel variant for sm_90 without a GPU and read
what the compiler made of it.

    python -m modan_ext.triton_backend.codegen            # table + checks; exit 1 on a failure
    python -m modan_ext.triton_backend.codegen --json out.json
    python -m modan_ext.triton_backend.codegen --cache    # reuse Triton's kernel cache

Needs a process without TRITON_INTERPRET (the interpreter replaces the compiler). Per variant
(kernel x precision x feature-block size, as `config.tiles` chooses them for every D) it reports
registers, stack and local memory (spills) from the cubin, shared memory, and instruction counts
from PTX (wgmma) and SASS (HGMMA, DMMA, POPC, atomics), and checks:
* wgmma / HGMMA in every float32 (tf32, tf32x3), float16 and bfloat16 variant (DMMA for float64);
* no stack and no local memory (spills) in the main variants (D = 128, the project's default);
  the table shows every variant's;
* shared memory within the H200's 227 KiB per block;
* POPC in every variant (the multi-hot label path);
* no atomics in the backward (row-owner: bit-for-bit reproducible), nor in the forward;
* torch.compile sees through the ops: AOT-tracing forward and backward on fake CUDA tensors
  (no GPU needed) yields graphs that call the Triton kernels themselves
  (triton_kernel_wrapper_functional), not an opaque custom op.
Compiles go to a fresh temporary cache unless --cache, so the seconds column is compile time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

TARGET_ARCH = 90
SHARED_LIMIT = 227 * 1024  # bytes per block on H100 / H200
MAIN_DIM = 128
DIMS = range(1, 1025)  # every tile choice of config.tiles occurs here (above: streamed K, alike)


@dataclass(frozen=True)
class Variant:
    kernel: str  # "forward" | "backward"
    precision: int
    dim: int  # a feature dimension it serves (MAIN_DIM where it serves that)
    dims: str = ""  # all the feature dimensions it serves
    # Triton compiles a kernel again for integer arguments equal to 1 (and for multiples of 16,
    # which D always is: op.py pads the features' rows to 16 elements): one label word
    # (<= 64 labels, the paper's case) specialises the word loop away.
    one_word: bool = False

    @property
    def main(self) -> bool:
        return self.dim == MAIN_DIM


def variants() -> list[Variant]:
    """Every distinct compiled kernel (two dims with the same tiles share one), named by D = 128
    where that is one of its dims."""
    from . import config
    groups: dict = {}
    for kernel in ("forward", "backward"):
        for prec in config.PRECISION_NAMES:
            for dim in DIMS:
                key = (kernel, prec, config.tiles(prec, dim, kernel == "backward"))
                groups.setdefault(key, []).append(dim)
    def served(dims):
        return f"{dims[0]}-{dims[-1]}" if dims[-1] < DIMS[-1] else f">={dims[0]}"
    return [Variant(kernel, prec, MAIN_DIM if MAIN_DIM in dims else dims[0], served(dims),
                    one_word)
            for (kernel, prec, _), dims in groups.items() for one_word in (False, True)]


_FEATURE_TYPES = {0: "fp32", 1: "fp32", 2: "fp16", 3: "bf16", 4: "fp64"}


def _source(variant: Variant):
    """The ASTSource of a variant, with the argument types and alignments a launch would give."""
    from triton.compiler import ASTSource
    from . import config
    from .backward import supcon_backward_kernel
    from .forward import supcon_forward_kernel
    feat = _FEATURE_TYPES[variant.precision]
    acc = "fp64" if feat == "fp64" else "fp32"
    tiles = config.tiles(variant.precision, variant.dim, variant.kernel == "backward")
    pointers = {"z_ptr": f"*{feat}", "zlo_ptr": f"*{feat}", "labels_ptr": "*i64",
                "limits_ptr": "*i32",
                "params_ptr": f"*{acc}"}
    if variant.kernel == "forward":
        fn = supcon_forward_kernel
        pointers["out_ptr"] = f"*{acc}"
        ints = ["M", "D", "words", "views", "anchor_begin", "a_first", "a_step", "n_anchors",
                "label_kind", "weighting", "cid_positive"]
        constexprs = dict(PREC=variant.precision, ONE_CHUNK=tiles.one_chunk, BM=tiles.block_m,
                          BN=tiles.block_n, BK=tiles.block_k)
    else:
        fn = supcon_backward_kernel
        pointers.update(coef_ptr=f"*{acc}", grad_ptr=f"*{feat}")
        ints = ["M", "D", "words", "views", "anchor_begin", "anchor_end", "first_view_only",
                "label_kind", "weighting", "cid_positive"]
        constexprs = dict(PREC=variant.precision, ONE_CHUNK=tiles.one_chunk, BM=tiles.block_m,
                          BN=tiles.block_n, BK=tiles.block_k, BD=tiles.block_d)
    if variant.one_word:
        constexprs["words"] = 1
    signature = {}
    for name in fn.arg_names:
        signature[name] = pointers.get(name) or \
            ("i32" if name in ints and name not in constexprs else "constexpr")
    # torch allocations are 16-byte aligned, and D is a multiple of 16 (op.py pads it).
    aligned = [fn.arg_names.index(n) for n in list(pointers) + ["D"]]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return ASTSource(fn, signature, constexprs, attrs), tiles


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_variant(variant: Variant) -> dict:
    """Compile one variant for sm_90 and measure it (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from . import config
    start = time.perf_counter()
    source, tiles = _source(variant)
    compiled = triton.compile(source, target=GPUTarget("cuda", TARGET_ARCH, 32),
                              options={"num_warps": tiles.num_warps,
                                       "num_stages": tiles.num_stages})
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    resources = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)

    def count(prefix):
        return sum(1 for op in ops if op.startswith(prefix))

    return dict(
        kernel=variant.kernel, precision=config.PRECISION_NAMES[variant.precision],
        dim=variant.dim, dims=variant.dims, main=variant.main,
        specialised="W=1" if variant.one_word else "W>1", block=f"{tiles.block_m}x{tiles.block_n}x"
        f"{tiles.block_k}" + (f"/{tiles.block_d}" if variant.kernel == "backward" else ""),
        one_chunk=tiles.one_chunk, warps=tiles.num_warps, stages=tiles.num_stages,
        target=re.search(r"\.target\s+(\S+)", ptx).group(1),
        registers=int(resources.get("REG", -1)), stack=int(resources.get("STACK", -1)),
        local=int(resources.get("LOCAL", -1)),
        shared=int(compiled.metadata.shared) + int(resources.get("SHARED", 0)),
        wgmma=ptx.count("wgmma.mma_async"), hgmma=count("HGMMA"), dmma=count("DMMA"),
        hmma=count("HMMA"), popc=count("POPC"), atomics=count("ATOM") + count("RED"),
        seconds=round(seconds, 1))


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled variant (empty: all checks pass)."""
    out = []
    if row["precision"] == "fp64":
        if row["dmma"] == 0:
            out.append("no DMMA (float64 tensor cores)")
    elif row["wgmma"] == 0 or row["hgmma"] == 0:
        out.append(f"no wgmma/HGMMA (wgmma {row['wgmma']}, HGMMA {row['hgmma']})")
    if row["main"] and (row["stack"] or row["local"]):
        out.append(f"stack {row['stack']} / local {row['local']} bytes (spills) in a main variant")
    if row["shared"] > SHARED_LIMIT:
        out.append(f"shared memory {row['shared']} > {SHARED_LIMIT}")
    if row["popc"] == 0:
        out.append("no POPC in the label path")
    if row["atomics"] != 0:
        out.append(f"{row['atomics']} atomic instructions")
    if row["target"] != f"sm_{TARGET_ARCH}a":
        out.append(f"PTX target {row['target']}")
    return out


COLUMNS = ("kernel", "precision", "dims", "specialised", "block", "warps", "registers", "stack", "local",
           "shared", "wgmma", "hgmma", "dmma", "popc", "atomics", "seconds")


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " | main | result |",
             "|" + "---|" * (len(COLUMNS) + 2)]
    for row in rows:
        bad = problems(row)
        lines.append("| " + " | ".join(str(row[c]) for c in COLUMNS) +
                     f" | {'yes' if row['main'] else ''} | {'; '.join(bad) or 'ok'} |")
    return "\n".join(lines)


def trace_check(show: bool = False) -> list[str]:
    """Problems with torch.compile's view of the ops (empty: none). AOT autograd traces each op
    on fake CUDA tensors, as torch.compile does before Inductor compiles the graph. (The two are
    traced separately: autograd's engine wants a real CUDA context to run a backward; the
    interpreter tests check the autograd wiring.)"""
    import torch
    import triton
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_function
    from . import op  # noqa: F401  (registers the ops)
    scalars = (0, 2, 0, 256, False, 0.1, 0.07, 0.3, 0, 0, False)
    graphs = {}

    def traced(name, fn, *inputs):
        def keep(gm, _inputs):
            graphs[name] = gm.code
            return make_boxed_func(gm.forward)
        aot_function(fn, fw_compiler=keep)(*inputs)

    class Hopper:  # no GPU here: the driver the wrapper asks for the target of its analysis
        @staticmethod
        def get_current_target():
            from triton.backends.compiler import GPUTarget
            return GPUTarget("cuda", TARGET_ARCH, 32)

    triton.runtime.driver.set_active(Hopper())
    try:
        _trace_ops(traced, scalars)
    finally:
        triton.runtime.driver._active = None
    out = []
    for name in ("forward", "backward"):
        code = graphs.get(name, "")
        if show:
            print(f"{name} graph:{code}")
        if "triton_kernel_wrapper" not in code:
            out.append(f"the {name} graph calls no Triton kernel:\n{code}")
        if "modan_ext.triton_supcon" in code:
            out.append(f"the {name} graph keeps the op opaque:\n{code}")
    return out


def _trace_ops(traced, scalars):
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        z = torch.empty(256, 128, device="cuda")
        y = torch.zeros(128, 1, dtype=torch.int64, device="cuda")
        traced("forward", lambda z, y: torch.ops.modan_ext.triton_supcon_fwd(z, y, *scalars),
               z, y)
        g = torch.empty(256, device="cuda", dtype=torch.float32)
        stats = torch.empty(256, 5, device="cuda", dtype=torch.float64)
        traced("backward", lambda g, z, y, stats: torch.ops.modan_ext.triton_supcon_bwd(
            g, z, y, stats, *scalars), g, z, y, stats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--cache", action="store_true",
                        help="reuse Triton's kernel cache (the seconds column then shows 0)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("codegen: unset TRITON_INTERPRET (the interpreter replaces the compiler)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="modan_triton_cache_") as cache:
        if not args.cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # inherited by the worker processes
        todo = variants()
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(compile_variant, todo))
        elapsed = time.perf_counter() - start
    print(f"Triton kernels compiled for sm_{TARGET_ARCH}a: {len(rows)} variants in {elapsed:.0f} s "
          f"({args.jobs} processes{', cached' if args.cache else ''})")
    print(table(rows))
    failures = [f"{r['kernel']} {r['precision']} D={r['dims']}: {p}" for r in rows
                for p in problems(r)]
    traced = trace_check()
    print("torch.compile trace (fake CUDA tensors):", "ok" if not traced else "FAILED")
    failures += traced
    for failure in failures:
        print("FAIL", failure)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, failures=failures), f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
