#!/usr/bin/env bash
# Session 34, r2 (one GPU): why r1's test_low_latency_fp8_bits found 7240 of 7.3M codes differing between the
# kernels and largeep.fp8.quantize on CUDA: the same tokens quantised by the kernel, by fp8.quantize on CUDA and on
# CPU, saved for a look here (scripts/fp8_diag.py).
# usage: bash bench/results/2026-12-02-session34/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}" emulate
build
run_for diag.log 120 env CUDA_VISIBLE_DEVICES=0 python3 bench/results/2026-12-02-session34/scripts/fp8_diag.py "$SESSION_DIR"
echo "all $(elapsed) s"
finish
