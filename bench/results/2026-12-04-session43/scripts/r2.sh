#!/usr/bin/env bash
# Session 43, r2 (one GPU): native ABI 18 (the low-latency combine's done flags carry the handle's dispatch tag).
# Two ranks sharing the GPU: the new test (handles of different dispatches, plain / hook / fused, one node and two
# nodes of one rank: NVLink stores and puts), then every low-latency test of test_gpu.py and test_errors.py; one
# rank: bench/low_latency_times.py's CUDA-graph replay times through largeep.bench.timing.Timer.
# usage: bash bench/results/2026-12-04-session43/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}" emulate
build
tests handles.log 90 test_gpu.py -k "low_latency_handles_disagree"
tests ll_gpu.log 200 test_gpu.py -k "low_latency and not handles_disagree"
tests ll_errors.log 90 test_errors.py -k "low_latency"
unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS
run_for ll_times.log "$(left 440)" python3 bench/low_latency_times.py --out "$SESSION_DIR/ll_times" --tokens 1,128 \
  --iters 20 --graph-reps 10
echo "all $(elapsed) s"
finish
