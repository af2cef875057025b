#!/usr/bin/env bash
# A GPU session's work in as few device calls as possible (device time is
# scarce): run it from the repository root on the lent machine, e.g.
#   tools/gpu_session.sh build test sanitize     (first call)
#   tools/gpu_session.sh build bench             (second call; build is a no-op when warm)
# Each step logs to $OUT/<step>.log (default build/gpu-session) and prints its
# last lines; a failing step does not stop the later ones, and the exit status
# says whether any failed. bench also leaves bench/results packed in
# $OUT/bench-results.tgz (the device tool brings back at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu-session}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
PYTHON="${PYTHON:-python3}"
status=0

run_step() {
  local name=$1
  shift
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  tail -n 15 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

step_build() {
  # The CUDA extension is built when a GPU is visible; the check after it
  # fails loudly if the ops have no CUDA kernels.
  $PYTHON -c "import fused_bn, torch; torch.ops.fused_bn.batch_norm_eval(torch.ones(2, 1, 1, 1, device='cuda'), None, None, torch.zeros(1, device='cuda'), torch.ones(1, device='cuda'), 1e-5)" 2>/dev/null \
    && { echo "already built"; return 0; }
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  $PYTHON -m pip install --no-build-isolation --no-deps -e . || return 1
  $PYTHON -c "import fused_bn, torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
}

step_test() {
  $PYTHON -c "import pytest, hypothesis" 2>/dev/null || $PYTHON -m pip install pytest hypothesis
  # Every CUDA case of the suite (the cpu cases ran in CI), slowest listed.
  $PYTHON -m pytest -q tests -m cuda -p no:warnings --durations=10 -rfE
}

step_sanitize() {
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  local rc=0
  # cuda_smoke.py now runs every kernel path (844 cases); its time under each
  # tool has never been measured, so each tool gets a bound of its own
  # (memcheck first: the others are slower) and a timeout counts as a failure.
  for tool in memcheck racecheck initcheck synccheck; do
    echo "--- $tool"
    timeout "${SANITIZE_TIMEOUT:-180}" "$sanitizer" --tool "$tool" --error-exitcode 9 $PYTHON tools/cuda_smoke.py || rc=1
  done
  return $rc
}

step_smoke() {
  $PYTHON tools/cuda_smoke.py
}

step_bench() {
  $PYTHON -c "import matplotlib, tqdm" 2>/dev/null || $PYTHON -m pip install matplotlib tqdm
  $PYTHON -m bench.run && $PYTHON -m bench.blocks
  local rc=$?
  tar czf "$OUT/bench-results.tgz" bench/results
  return $rc
}

[ $# -gt 0 ] || set -- build test sanitize bench
for step in "$@"; do
  case "$step" in
    build|test|sanitize|smoke|bench) run_step "$step" "step_$step" ;;
    *) echo "unknown step: $step (build, test, sanitize, smoke, bench)" >&2; status=1 ;;
  esac
done
exit $status
