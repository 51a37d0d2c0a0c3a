#!/usr/bin/env bash
# Helpers for a session's GPU scripts (bench/results/<date>-sessionN/scripts/rN.sh), sourced after `set -uo
# pipefail` on the GPU machine from the repository root:
#   source scripts/session_lib.sh OUT NAME [emulate]   # emulate: 2 ranks share each GPU (results checked, no link
#                                                      # timed); without it the tests see the real GPUs
#   build                                              # pip install of this tree (LARGEEP_BUILD_NATIVE=1)
#   build_tree DIR TARGET                              # pip install --target TARGET of the tree unpacked in DIR
#                                                      # (a baseline: run it with PYTHONPATH=TARGET)
#   tests LOG SECONDS pytest-args...                   # GPU tests (-m gpu) from tests/, cut with SIGINT so that
#                                                      # pytest prints its summary; prints its failures and counts
#   run_for LOG SECONDS command...                     # any command, its log and exit status
#   left SECONDS                                       # SECONDS less the time since the start (for the last step)
#   finish                                             # packs OUT/NAME into OUT/NAME.tar.gz
# NVLink multicast stays off: NCCL, PyTorch and NVSHMEM never use it on the shared hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) LARGEEP_TIMEOUT_S=${LARGEEP_TIMEOUT_S:-20}
export LARGEEP_TEST_POOL_TIMEOUT_S=${LARGEEP_TEST_POOL_TIMEOUT_S:-90}
# the GPU tests end at once where the native module does not load or torch sees no GPU (tests/conftest.py)
export LARGEEP_TEST_REQUIRE_NATIVE=1 LARGEEP_TEST_REQUIRE_GPUS=1
SESSION_OUT=$1; SESSION_NAME=$2; SESSION_DIR=$1/$2; mkdir -p "$SESSION_DIR"
if [ "${3:-}" = emulate ]; then export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1; fi
SESSION_T0=$(date +%s)

elapsed() { echo $(( $(date +%s) - SESSION_T0 )); }
left() { echo $(( $1 - $(elapsed) )); }
finish() { (cd "$SESSION_OUT" && tar czf "$SESSION_NAME.tar.gz" "$SESSION_NAME" && rm -rf "$SESSION_NAME"); }

build() {
  python3 -m pip install --no-build-isolation --no-deps . > "$SESSION_DIR/build.log" 2>&1 \
    || { tail -40 "$SESSION_DIR/build.log"; finish; exit 1; }
  echo "build $(elapsed) s"
}

build_tree() {
  local dir=$1 target=$2 log
  log="$SESSION_DIR/build_$(basename "$dir").log"
  (cd "$dir" && python3 -m pip install --no-build-isolation --no-deps --target "$target" . > "$log" 2>&1) \
    || { tail -30 "$log"; finish; exit 1; }
  echo "$dir build $(elapsed) s"
}

tests() {
  local log=$1 secs=$2; shift 2
  (cd tests && timeout -s INT -k 20 "$secs" python3 -m pytest -v -ra -p no:cacheprovider --durations=8 -m gpu "$@") \
    > "$SESSION_DIR/$log" 2>&1
  echo "$log rc=$? $(elapsed) s"
  grep -E "^(FAILED|ERROR)|passed|failed" "$SESSION_DIR/$log" | tail -10
}

run_for() {
  local log=$1 secs=$2; shift 2
  timeout -s INT -k 20 "$secs" "$@" > "$SESSION_DIR/$log" 2>&1
  echo "$log rc=$? $(elapsed) s"
  tail -12 "$SESSION_DIR/$log"
}
