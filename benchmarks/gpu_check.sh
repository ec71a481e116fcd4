#!/usr/bin/env bash
# One unattended GPU check of moesim on a machine with one H100/H200 and only this project copied there
# (python3 with torch, Triton, transformers, pytest, hypothesis, numpy, scipy, networkx, matplotlib, pyarrow;
# simpy brought as a wheel in .whl/; no package index). At most ~8 minutes: every step has its own timeout and
# keeps its log even when it fails.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else ./gpu-check-<date>
#   bash benchmarks/gpu_check.sh --cpu [OUT_DIR]  # the same steps with tiny CPU settings (GPU-only steps skipped)
#
# Steps, in order: install (simpy wheel -> /tmp/site; the project editable, no index, no build isolation; a
# symlinked package tree as fallback), pytest -m gpu, bench_runtime --short, moesim validate at olmoe-1b-7b shape,
# bench_kernels (short). OUT_DIR receives at most 8 files, none in a subfolder (the device tool's limits):
#   summary.md             what ran, how long, exit codes, and the result tables (bench_runtime, validate)
#   logs.txt               every step's full output, concatenated
#   bench_runtime.md/json  benchmarks/bench_runtime.py's tables
#   validate_report.json   moesim validate's report (its report.md is in summary.md)
#   bench_kernels.md, kernel_calibration.json

set -u
MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; shift; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/gpu-check-$(date -u +%Y%m%d-%H%M)}}"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
export ROOT PY WORK MODE
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SUMMARY="$OUT_DIR/summary.md"
LOGS="$OUT_DIR/logs.txt"
cd "$ROOT" || exit 2
: >"$LOGS"
{
  echo "# moesim gpu_check ($MODE) — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"
  echo
  echo '```'
  (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi")
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.is_available())' 2>&1
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -1
  "$PY" -c 'import transformers; print("transformers", transformers.__version__)' 2>&1 | tail -1
  echo '```'
  echo
  echo "| step | exit | seconds | timeout |"
  echo "|---|---|---|---|"
} >"$SUMMARY"

# step NAME TIMEOUT_S CMD...: run with a timeout, append its output to logs.txt, one summary row
step() {
  local name="$1" limit="$2"
  shift 2
  local t0 rc
  t0=$(date +%s)
  {
    echo
    echo "======== $name (timeout ${limit}s): $*"
  } >>"$LOGS"
  if [ "$(type -t "$1")" = function ]; then
    export -f "$1"
    timeout --kill-after=10 "$limit" bash -c "$1" >>"$LOGS" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" >>"$LOGS" 2>&1
  fi
  rc=$?
  echo "| $name | $rc$([ "$rc" = 124 ] && echo ' (timed out)') | $(($(date +%s) - t0)) | $limit |" >>"$SUMMARY"
  echo "gpu_check: $name -> exit $rc" >&2
  return 0
}
skip() { echo "| $1 | skipped: $2 | 0 | – |" >>"$SUMMARY"; }

# -- install: simpy from the wheel, the project editable (no index); fallback: a symlinked package tree --------
install() {
  mkdir -p /tmp/site
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || return 1
  else
    echo "no .whl/*.whl: simpy must already be importable"
  fi
  "$PY" -c 'import simpy' 2>/dev/null || PYTHONPATH="/tmp/site" "$PY" -c 'import simpy; print("simpy", simpy.__version__)'
  local pipargs=(-q --no-deps --no-build-isolation --no-index -e .)
  if "$PY" -m pip install "${pipargs[@]}" || "$PY" -m pip install --user "${pipargs[@]}" \
    || "$PY" -m pip install --break-system-packages "${pipargs[@]}"; then
    echo "editable install: ok"
  else
    # moesim.runtime and moesim.kernels live in runtime/ and kernels/ (package-dir), so plain PYTHONPATH=. does
    # not work: build $WORK/moesim-shim/moesim from symlinks (the package's own entries + runtime + kernels)
    echo "editable install failed: using the symlinked tree $WORK/moesim-shim"
    rm -rf "$WORK/moesim-shim" && mkdir -p "$WORK/moesim-shim"/moesim
    for f in "$ROOT"/moesim/*; do ln -s "$f" "$WORK/moesim-shim"/moesim/; done
    ln -s "$ROOT/runtime" "$WORK/moesim-shim"/moesim/runtime
    ln -s "$ROOT/kernels" "$WORK/moesim-shim"/moesim/kernels
    echo "$WORK/moesim-shim" >"$WORK/shim"
    # tests start subprocesses with PYTHONPATH=<repo> (whose plain moesim/ lacks runtime/): a .pth in the user
    # site puts the shim and /tmp/site first in every interpreter (GPU mode only: the machine is thrown away)
    if [ "$MODE" = gpu ]; then
      local usersite
      usersite="$("$PY" -c 'import site; print(site.getusersitepackages() if site.ENABLE_USER_SITE else "")')"
      if [ -n "$usersite" ] && mkdir -p "$usersite"; then
        echo "import sys; sys.path[:0] = ['$WORK/moesim-shim', '/tmp/site']" >"$usersite/moesim-gpu-check.pth"
        echo "wrote $usersite/moesim-gpu-check.pth"
      fi
    fi
  fi
  (cd /tmp && "$PY" -c 'import moesim.runtime, moesim.kernels, moesim.cli; print("moesim imports from", moesim.__file__)')
}
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
step install 60 install
if [ -f "$WORK/shim" ]; then export PYTHONPATH="$WORK/moesim-shim:$PYTHONPATH"; fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

if [ "$MODE" = gpu ]; then
  step "pytest -m gpu" 100 "$PY" -m pytest tests -q -m gpu -p no:cacheprovider
  step "bench_runtime --short" 150 "$PY" benchmarks/bench_runtime.py --device cuda --short --run-timeout 100 \
    --out "$OUT_DIR/bench_runtime.md"
  step "moesim validate (olmoe-1b-7b, cuda)" 130 "$PY" -m moesim validate --device cuda --nproc 1 \
    --preset olmoe-1b-7b --batch 128 --prompt-len 256 --steps 32 --quiet --out "$WORK/validate"
  step "bench_kernels (short)" 50 "$PY" benchmarks/bench_kernels.py --shapes mixtral-8x7b,qwen3-30b-a3b \
    --tokens 1,64,1024 --rep-ms 25 --no-reference --out-dir "$WORK/kernels"
else
  step "pytest -m gpu" 120 "$PY" -m pytest tests/runtime/test_weights.py -q -m gpu -p no:cacheprovider
  step "bench_runtime --smoke" 300 "$PY" benchmarks/bench_runtime.py --device cpu --smoke --no-hf \
    --out "$OUT_DIR/bench_runtime.md"
  step "moesim validate (tiny, cpu)" 300 "$PY" -m moesim validate --device cpu --nproc 1 --preset tiny \
    --batch 4 --prompt-len 8 --steps 12 --quiet --out "$WORK/validate"
  skip "bench_kernels (short)" "needs a GPU"
fi

# -- collect: at most 8 files, flat -------------------------------------------------------------------------
[ -f "$WORK/validate/report.json" ] && cp "$WORK/validate/report.json" "$OUT_DIR/validate_report.json"
for f in "$WORK"/kernels/bench_kernels_*.md; do [ -f "$f" ] && cp "$f" "$OUT_DIR/bench_kernels.md"; done
for f in "$WORK"/kernels/kernel_calibration_*.json; do [ -f "$f" ] && cp "$f" "$OUT_DIR/kernel_calibration.json"; done
{
  for part in "$OUT_DIR/bench_runtime.md" "$WORK/validate/report.md" "$OUT_DIR/bench_kernels.md"; do
    if [ -f "$part" ]; then
      echo
      sed 's/^# /## /' "$part" | grep -v '^!\[' # headings one level down; the validate plot stays behind
    fi
  done
} >>"$SUMMARY"
rm -rf "$WORK"
echo "gpu_check: results in $OUT_DIR ($(find "$OUT_DIR" -maxdepth 1 -type f | wc -l) files)" >&2
