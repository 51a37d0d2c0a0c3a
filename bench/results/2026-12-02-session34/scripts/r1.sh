#!/usr/bin/env bash
# Session 34, r1 (one GPU; test ranks share it). The low-latency FP8 quantiser dividing by the scale (new test: its
# bits against largeep.fp8.quantize; fp8_check now asserts the exact codes in every low-latency FP8 test), the
# low-latency layout refusal (new test), the bindings' error clearing and slot give-back (the zero-copy and destroy
# tests), the one-GPU property cases, the error table; then one rank's low-latency kernel times (the division).
# usage: bash bench/results/2026-12-02-session34/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
build
tests gpu_new.log 200 test_gpu.py -k "layout_too_large or fp8_bits or not_finite or low_latency_gpu or zero_copy or destroy or hook"
tests property.log 110 test_property.py -k "one_gpu"
tests errors.log 100 test_errors.py
run_for ll_ep1.log "$(left 540)" env CUDA_VISIBLE_DEVICES=0 python3 bench/low_latency_times.py --nprocs 1 \
  --out "$SESSION_DIR/ll1"
echo "all $(elapsed) s"
finish
