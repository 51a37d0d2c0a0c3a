#!/usr/bin/env bash
# Session 33, r2 (one GPU; test ranks share it). After this session's fixes from reviews: the low-latency FP8
# quantiser on NaN/inf (new test), destroy keeping memory under held outputs (new test, runtime's free vote), the
# heap-growth memory check (a too-large Buffer beside a live one), the low-latency and zero-copy tests, the error
# table (rounds' void round as round 0 among its rows), rounds on the nvshmem backend; then one rank's low-latency
# kernel times (the quantiser's extra NaN test in the send).
# usage: bash bench/results/2026-12-02-session33/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}" emulate
build
tests gpu_new.log 270 test_gpu.py -k "not_finite or destroy or zero_copy or runtime_cycles or low_latency_gpu or rounds"
tests errors.log 120 test_errors.py
run_for ll_ep1.log "$(left 540)" env CUDA_VISIBLE_DEVICES=0 python3 bench/low_latency_times.py --nprocs 1 \
  --out "$SESSION_DIR/ll1"
echo "all $(elapsed) s"
finish
