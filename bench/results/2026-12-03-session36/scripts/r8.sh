#!/usr/bin/env bash
# Session 36, r8 (one GPU). NOT RUN in session 36 (too little device time left to start a machine): for a tree
# with proposed/fp8_quantize_bf16_div.patch applied (`git apply`), and old_tree/ unpacked from the tree before it.
# The FP8 quantise kernel for bf16 x dividing as the low-latency quantiser does (a product
# and one correction: bench/micro/fp8_div_check.cu's exhaustive check) and converting two values at a time, against
# the tree without the patch (__fdiv_rn per value, one conversion per value; unpacked into old_tree/ by `git archive
# HEAD | tar -x -C old_tree` before applying, not committed), alternating twice (scripts/fp8_cast.py); then the casts' bits (test_fp8_native_kernels)
# and the low-latency kernels' FP8 against fp8.quantize.
# usage: bash bench/results/2026-12-03-session36/scripts/r8.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r8}"
build
build_tree old_tree /tmp/old_lp
tests fp8.log 100 test_gpu.py -k "fp8_native_kernels or low_latency_fp8_bits"
cast=bench/results/2026-12-03-session36/scripts/fp8_cast.py
for i in 1 2; do
  run_for old$i.log 60 env PYTHONPATH=/tmp/old_lp python3 $cast "$SESSION_DIR/old$i.json"
  run_for new$i.log 60 python3 $cast "$SESSION_DIR/new$i.json"
done
echo "all $(elapsed) s"
finish
