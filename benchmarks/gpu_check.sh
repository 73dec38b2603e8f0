#!/usr/bin/env bash
# GPU check (DEVELOPERS.md, "GPU check"): on a machine with a GPU, build the extension in place
# for sm_90, run the self-test of both GPU backends (the Triton kernels and the CUDA C++ kernel
# against the float64 reference), the whole test suite on CUDA (the Triton tests run the compiled
# kernels there), then the GPU benchmark (both backends: agreement on the same inputs, time vs
# cuBLAS and vs fused attention, memory).
# Everything is logged under ${OUT:-./gpu_logs}; short tables are printed last.
# Target: under 8 minutes on an H200: build ~2-3 min (the .cu alone ~1.5 min), self-test (~1 min:
# Triton compiles its kernels on first use), tests (parallel with pytest-xdist when present; cut
# at 210 s), benchmark (~2 min; cut at 180 s).
#
#   bash benchmarks/gpu_check.sh                 # from anywhere; runs in the repository root
#   OUT=/tmp/logs PYTHON=python3 bash benchmarks/gpu_check.sh
#   GPU_CHECK_QUICK=1 ...                        # smaller benchmark (smoke run)
#   GPU_CHECK_SKIP_TESTS=1 ...                   # build + self-test + benchmark only
#   GPU_CHECK_DRY_RUN=1 ...                      # no GPU: the script's flow on CPU (no build:
#                                                # the in-place build is used; Triton under its
#                                                # interpreter; a tiny benchmark; no tests)
#
# No network: missing Python packages (e.g. pytorch-metric-learning) may be carried as wheels in
# .whl/ at the repository root; they are installed with --no-index first.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-./gpu_logs}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }
status=0
DRY=${GPU_CHECK_DRY_RUN:-0}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build
if [ "$DRY" = "1" ]; then
  export TRITON_INTERPRET=1
else
  unset TRITON_INTERPRET  # compiled Triton kernels on CUDA tensors
fi

stamp "environment"
nvidia-smi || echo "nvidia-smi failed"
"$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torch CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.0f} GiB")
EOF
command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc not on PATH"

if compgen -G ".whl/*.whl" >/dev/null; then
  stamp "installing carried wheels from .whl/"
  "$PY" -m pip install --no-index --find-links .whl .whl/*.whl || echo "warning: wheel install failed"
fi

if [ "$DRY" != "1" ]; then
stamp "build (TORCH_CUDA_ARCH_LIST=9.0, in place)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MODAN_EXT_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  # nvcc on PATH may be a wrapper: ask it where the toolkit is (as setup.py and .ci/setup do).
  top=$(cd /tmp && echo '' > modan_probe.cu && nvcc --dryrun -c modan_probe.cu 2>&1 \
        | sed -n 's/^#\$ TOP=//p' | head -1 || true)
  [ -n "$top" ] && export CUDA_HOME=$(realpath "$top")
fi
echo "CUDA_HOME=${CUDA_HOME:-unset}"
rm -f modan_ext/_C*.so modan_ext/_cuda*.so
if ! "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  stamp "BUILD FAILED (full log: $OUT/build.log)"
  exit 1
fi
stamp "build done"
# Registers / spills / shared memory of every kernel, as ptxas reported them.
"$PY" - "$OUT/build.log" > "$OUT/ptxas.txt" <<'EOF' || true
import re, subprocess, sys
name = None
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\S+)'", line)
    if m:
        name = m.group(1)
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        frame = m.groups()
        continue
    m = re.search(r"Used (\d+) registers(.*)", line)
    if m and name:
        try:
            pretty = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
        except OSError:
            pretty = name
        pretty = pretty.replace("modan_ext::cuda_impl::", "")
        print(f"{pretty[:72]:72s} regs={m.group(1):>3} stack={frame[0]} spill_st={frame[1]} "
              f"spill_ld={frame[2]} {m.group(2).strip()}")
        name = None
EOF
grep -E "supcon_(fwd|bwd)" "$OUT/ptxas.txt" || true
if grep -E "supcon_(fwd|bwd)" "$OUT/ptxas.txt" | grep -vqE "spill_st=0 spill_ld=0"; then
  echo "WARNING: a supcon kernel spills registers (see $OUT/ptxas.txt)"
fi
CUOBJDUMP=$(command -v cuobjdump || echo "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump")
if [ ! -x "$CUOBJDUMP" ]; then  # Triton ships one
  CUOBJDUMP=$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)
fi
if [ -x "$CUOBJDUMP" ]; then
  "$CUOBJDUMP" --list-elf modan_ext/_cuda*.so | tee "$OUT/elf.txt"
  "$CUOBJDUMP" -sass modan_ext/_cuda*.so > "$OUT/sass.txt" 2>/dev/null || true
  echo "HMMA instructions in the library: $(grep -c HMMA "$OUT/sass.txt" || true)"
fi
fi  # build
"$PY" -c 'import modan_ext.ops as o; print("kernels:", sorted(o.KERNEL_DEVICE_TYPES), "| CUDA:", o.CUDA_LOAD_ERROR or "loaded")'

stamp "self-test (python -m modan_ext.selftest: each GPU backend vs the float64 reference)"
selftest_args=()
[ "$DRY" = "1" ] && selftest_args=(--quick)
set +e
PYTHONUNBUFFERED=1 timeout "${GPU_CHECK_SELFTEST_TIMEOUT:-240}" "$PY" -m modan_ext.selftest \
  ${selftest_args[@]+"${selftest_args[@]}"} > "$OUT/selftest.log" 2>&1
selftest_rc=$?
set -e
cat "$OUT/selftest.log"
[ "$selftest_rc" = "0" ] || { status=1; echo "SELF-TEST FAILED (rc=$selftest_rc)"; }

if [ "${GPU_CHECK_SKIP_TESTS:-0}" != "1" ] && [ "$DRY" != "1" ]; then
  stamp "tests (python -m pytest -x -q tests; CPU and CUDA parameters)"
  xdist=()
  # pytest-xdist (in the H200 image) spreads the suite over the cores; GPU_CHECK_XDIST=0: serial.
  if [ "${GPU_CHECK_XDIST:-1}" = "1" ] && "$PY" -c 'import xdist' 2>/dev/null; then
    xdist=(-n "${GPU_CHECK_WORKERS:-8}")
  fi
  set +e
  MODAN_EXT_REQUIRE_CUDA_KERNEL=1 PYTHONUNBUFFERED=1 timeout "${GPU_CHECK_TEST_TIMEOUT:-210}" \
    "$PY" -m pytest -x -q -p no:cacheprovider ${xdist[@]+"${xdist[@]}"} tests -rs 2>&1 | tee "$OUT/pytest.log"
  test_rc=${PIPESTATUS[0]}
  set -e
  [ "$test_rc" = "0" ] || { status=1; echo "TESTS FAILED or timed out (rc=$test_rc)"; }
  stamp "tests done (rc=$test_rc)"
fi

stamp "GPU benchmark (both backends; agreement, cuBLAS, SDPA, memory)"
bench_args=(--json "$OUT/bench_gpu.json" --markdown "$OUT/bench_gpu.md" \
            --budget-s "${GPU_CHECK_BENCH_BUDGET:-120}")
[ "${GPU_CHECK_QUICK:-0}" = "1" ] && bench_args+=(--quick)
[ "$DRY" = "1" ] && bench_args+=(--device cpu --quick --sizes 64 --agree-rows 64 --dim 32 \
                                 --repeats 1 --warmup 0 --no-reference)
set +e
PYTHONUNBUFFERED=1 timeout "${GPU_CHECK_BENCH_TIMEOUT:-180}" "$PY" benchmarks/bench_gpu.py \
  "${bench_args[@]}" > "$OUT/bench_gpu.log" 2>&1
bench_rc=$?
set -e
[ "$bench_rc" = "0" ] || { status=1; tail -30 "$OUT/bench_gpu.log"; echo "BENCHMARK FAILED (rc=$bench_rc)"; }

stamp "summary"
echo "self-test: $selftest_rc | tests: ${test_rc:-skipped} | benchmark: $bench_rc | logs: $OUT"
grep -E "^\| (device|cpu|cuda)|^backend='auto'" "$OUT/selftest.log" || true
[ -f "$OUT/bench_gpu.md" ] && cat "$OUT/bench_gpu.md"
exit $status
