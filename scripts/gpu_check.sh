#!/usr/bin/env bash
# Everything that needs the GPU, in one run on a fresh GPU machine (python3 with a CUDA torch,
# nvcc, compute-sanitizer): build the extension, install the carried peer wheels, `falqon info`,
# the GPU tests, the layer benchmark and compute-sanitizer; then the stage times, and the
# benchmark table LAST.
#
#   scripts/gpu_check.sh              quick: GPU tests, layer benchmark --quick, sanitizer
#   FULL=1 scripts/gpu_check.sh       the whole layer sweep (7B + 13B shapes, 3 M, 2 r)
#
# Environment:
#   OUT        folder for logs and results (the device tool returns $OUT; at most 8 files):
#              build.log info.txt tests.log bench.log layer_<gpu>.json table.txt sanitizer.log
#              summary.txt. Default: runs/gpu_check-<date>/ (gitignored).
#   STAGES     which stages, in order (default "build peers info tests bench sanitizer")
#   PYTHON     the interpreter (default python3)
#   ALL_TESTS=1  the whole suite (-m "not slow") instead of the GPU test files
#   TORCH_CUDA_ARCH_LIST  default: the visible GPU's (setup.py), e.g. 9.0a on an H100
#   BUDGET     seconds the whole run may take (default 570: the device tool stops a command at
#              600 s); each stage also has a limit of its own (TESTS_LIMIT, BENCH_LIMIT,
#              SANITIZER_LIMIT), and gets no more than what is left of the budget, so that the
#              summary and the table are always printed.
# A failed stage is reported and the next ones still run; the exit code is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
STAGES=${STAGES:-build peers info tests bench sanitizer}
export PYTHONUNBUFFERED=1
# The checkout first on the path: works with the editable install and with an in-place build.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
summary=()
failed=0
t_all=$(date +%s)

BUDGET=${BUDGET:-570}

run_stage() {  # NAME LIMIT_S: runs the function stage_NAME in a bash of its own, under timeout
  local name=$1 limit=$2 t0 rc secs state left
  left=$(( BUDGET - ($(date +%s) - t_all) - 10 ))
  if [ "$left" -lt 15 ]; then
    summary+=("$(printf '%-10s %5ss  %s' "$name" 0 "NOT RUN: the ${BUDGET}s budget is spent")")
    failed=1
    return 1
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo
  echo "== $name (limit ${limit}s)"
  t0=$(date +%s)
  timeout --kill-after=20 "$limit" bash -c "stage_$name"
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  case $rc in
    0) state=ok ;;
    124|137) state="FAILED: over its ${limit}s limit" ;;
    *) state="FAILED (exit $rc)" ;;
  esac
  [ "$rc" = 0 ] || failed=1
  summary+=("$(printf '%-10s %5ss  %s' "$name" "$secs" "$state")")
  echo "== $name: $state in ${secs}s"
  return "$rc"
}

stage_build() {
  set -o pipefail
  export MAX_JOBS=${MAX_JOBS:-16}
  {
    nvidia-smi -L || true
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    if ! "$PY" -m pip install --no-build-isolation --no-deps -e .; then
      echo "pip's editable install failed; building in place with setup.py instead"
      "$PY" setup.py build_ext --inplace || return 1
    fi
  } >"$OUT/build.log" 2>&1
  local rc=$?
  tail -3 "$OUT/build.log"
  [ $rc = 0 ] || { tail -40 "$OUT/build.log"; return $rc; }
  "$PY" -c "import falqon; print('falqon', falqon.__version__, falqon.build_info())"
}

stage_peers() {
  set -o pipefail
  # Wheels carried from a machine with PyPI (scripts/fetch_peer_wheels.sh): bitsandbytes, torchao,
  # liger-kernel.
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no .whl/*.whl: the benchmark lists qlora_nf4 and fp8_lora_torchao as skipped"
    return 0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
    .whl/*.whl || return 1
  PYTHONPATH=$PYTHONPATH:/tmp/site "$PY" -c "import bitsandbytes, torchao; print('bitsandbytes', bitsandbytes.__version__, 'torchao', torchao.__version__)" 2>&1 | grep -v Warning
  PYTHONPATH=$PYTHONPATH:/tmp/site "$PY" -c "import importlib.metadata as m, liger_kernel.transformers.functional; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -1
  return 0
}

stage_info() {
  set -o pipefail
  "$PY" -m falqon.info 2>&1 | tee "$OUT/info.txt"
}

stage_tests() {
  set -o pipefail
  local files=(tests/test_cuda_ops.py tests/test_cuda_model.py tests/test_cuda_fusion.py
               tests/test_info.py)
  local args=(-q -rs --durations=15 -p no:cacheprovider)
  if [ "${ALL_TESTS:-0}" = 1 ]; then
    "$PY" -m pytest "${args[@]}" -m "not slow" tests 2>&1 | tee "$OUT/tests.log"
  else
    "$PY" -m pytest "${args[@]}" "${files[@]}" 2>&1 | tee "$OUT/tests.log"
  fi
}

stage_bench() {
  set -o pipefail
  local tag json
  tag=$("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import common; print(common.device_tag('cuda'))")
  json=benchmarks/results/layer_${tag}.json
  local mode=(--quick)
  [ "${FULL:-0}" = 1 ] && mode=()
  "$PY" benchmarks/layer.py "${mode[@]}" --out "$json" --table-out "$OUT/table.txt" \
    >"$OUT/bench.log" 2>&1
  local rc=$?
  cp "$json" "$OUT/" 2>/dev/null
  grep -E "^(layer benchmark|skipped|[0-9]+ records)" "$OUT/bench.log"
  [ $rc = 0 ] || tail -30 "$OUT/bench.log"
  return $rc
}

stage_sanitizer() {
  set -o pipefail
  local cs
  cs=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null)
  if [ -z "$cs" ]; then
    echo "compute-sanitizer not found" | tee "$OUT/sanitizer.log"
    return 1
  fi
  # Every tensor its own allocation, so that an access past its end is caught.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  {
    echo "-- memcheck, every op"
    "$cs" --tool memcheck --error-exitcode 1 --print-limit 20 "$PY" scripts/sanitize_ops.py &&
    echo "-- racecheck, the kernels that share memory between threads: quantise, the fused" \
      "backward (cp.async buffers, ldmatrix) and top-k" &&
    "$cs" --tool racecheck --error-exitcode 1 --print-limit 20 "$PY" scripts/sanitize_ops.py \
      --ops quantize,backward,topk
  } >"$OUT/sanitizer.log" 2>&1
  local rc=$?
  grep -E "^(-- |sanitize_ops: done|========= (ERROR SUMMARY|RACECHECK SUMMARY))" "$OUT/sanitizer.log"
  [ $rc = 0 ] || tail -40 "$OUT/sanitizer.log"
  return $rc
}

export PY OUT
export -f stage_build stage_peers stage_info stage_tests stage_bench stage_sanitizer
for s in $STAGES; do
  case $s in
    build) run_stage build 600 || { echo "the build failed: nothing else can run"; break; } ;;
    # The peers install into /tmp/site; the stages after it find them there.
    peers) run_stage peers 120; export PYTHONPATH=$PYTHONPATH:/tmp/site ;;
    info) run_stage info 60 ;;
    tests) run_stage tests "${TESTS_LIMIT:-300}" ;;
    bench) run_stage bench "${BENCH_LIMIT:-$([ "${FULL:-0}" = 1 ] && echo 540 || echo 180)}" ;;
    sanitizer) run_stage sanitizer "${SANITIZER_LIMIT:-180}" ;;
    *) echo "unknown stage $s (build peers info tests bench sanitizer)"; failed=1 ;;
  esac
done

{
  echo
  echo "== stages (total $(( $(date +%s) - t_all ))s; logs in $OUT)"
  printf '%s\n' "${summary[@]}"
} | tee "$OUT/summary.txt"
if [ -s "$OUT/table.txt" ]; then
  echo
  cat "$OUT/table.txt"
fi
exit $failed
