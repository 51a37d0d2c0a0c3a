#!/usr/bin/env bash
# Session 36, r5 (one GPU). The FP8 casts' kernel test again: r4 counted the kernel's calls wrongly for x of 0 or 1
# rows (a slice of one row, or of none, is contiguous, and the kernel rightly took it); the test now expects that.
# usage: bash bench/results/2026-12-03-session36/scripts/r5.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r5}"
build
tests fp8.log 150 test_gpu.py -k "fp8_native_kernels"
echo "all $(elapsed) s"
finish
