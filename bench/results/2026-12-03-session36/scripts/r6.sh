#!/usr/bin/env bash
# Session 36, r6 (one GPU; the tests' ranks share it). The tests that quantise on CUDA through fp8.quantize (now
# the native kernel): normal-mode round trips with FP8 rows, several nodes, and the error table's FP8 rows.
# usage: bash bench/results/2026-12-03-session36/scripts/r6.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r6}" emulate
build
tests gpu.log 200 test_gpu.py -k "normal_gpu or four_ranks_shared or internode"
tests errors.log "$(left 280)" test_errors.py -k "fp8"
echo "all $(elapsed) s"
finish
