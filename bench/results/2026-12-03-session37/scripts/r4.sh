#!/usr/bin/env bash
# Session 37, r4 (one GPU). NOT RUN in session 37 (its device time was spent): for a tree with
# proposed/fp8_casts_half_warp.patch applied (`git apply`), and old_tree/ unpacked from the tree before it
# (`git archive HEAD | tar -x -C old_tree`, then rm -rf old_tree/bench/results old_tree/docs; not committed).
# The FP8 casts with one half-warp per group (eight values and 16-byte loads per lane, eight groups per warp step),
# against the kernels before (a warp per group, four values per lane): first their bits (test_fp8_native_kernels,
# the low-latency kernels' FP8 against fp8.quantize, the FP8 dispatch with a gradient on two ranks sharing the GPU),
# then their times, alternating twice (scripts/fp8_cast2.py: per call and back to back).
# Prediction: quantise at 32768 x 7168 from 291 us (2.4 TB/s) to about 200-230 us; dequantise from about 220 to
# about 190 us; 4096 rows, where the host's launch path is most of a call, within a few us of before per call.
# usage: bash bench/results/2026-12-03-session37/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}"
build
build_tree old_tree /tmp/old_lp
tests fp8.log 100 test_gpu.py -k "fp8_native_kernels or low_latency_fp8_bits or low_latency_fp8_not_finite"
cast=bench/results/2026-12-03-session37/scripts/fp8_cast2.py
for i in 1 2; do
  run_for old$i.log 60 env PYTHONPATH=/tmp/old_lp python3 $cast "$SESSION_DIR/old$i.json"
  run_for new$i.log 60 python3 $cast "$SESSION_DIR/new$i.json"
done
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
tests ops_fp8.log 120 test_ops.py -k "dispatch_fp8_gpu"
tests layers_fp8.log "$(left 500)" test_layers.py -k "chunked_gpu"
echo "all $(elapsed) s"
finish
