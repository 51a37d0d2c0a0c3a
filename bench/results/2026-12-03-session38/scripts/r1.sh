#!/usr/bin/env bash
# Session 38, r1 (one GPU): session 37's proposed/fp8_casts_half_warp.patch applied to the working tree (`git
# apply`), with old_tree/ unpacked from HEAD before it (`git archive HEAD | tar -x -C old_tree`, then rm -rf
# old_tree/bench/results old_tree/docs; not committed).
# 1. The FP8 casts with one half-warp per 128-channel group (eight values and 16-byte loads per lane, eight groups
#    per warp step) against the kernels before (a warp per group, four values per lane): first their bits, then
#    their times, alternating twice (session 37's fp8_cast2.py: per call and back to back).
#    Prediction (session 37): quantise at 32768 x 7168 from 291 us to about 200-230 us; dequantise from about 220
#    to about 190 us; 4096 rows within a few us of before per call.
# 2. The GPU tests added after session 37's r3 and those of the library changes after it (Buffer creation on an
#    out-of-step group, the layer's and fp8's refusals), two ranks sharing the GPU: test_errors.py whole, test_info's
#    GPU report, the FP8 dispatch with a gradient and the layer tests.
# usage: bash bench/results/2026-12-03-session38/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}"
build
build_tree old_tree /tmp/old_lp
tests fp8.log 100 test_gpu.py -k "fp8_native_kernels or low_latency_fp8_bits or low_latency_fp8_not_finite"
cast=bench/results/2026-12-03-session37/scripts/fp8_cast2.py
for i in 1 2; do
  run_for old$i.log 60 env PYTHONPATH=/tmp/old_lp python3 $cast "$SESSION_DIR/old$i.json"
  run_for new$i.log 60 python3 $cast "$SESSION_DIR/new$i.json"
done
tests info.log 60 test_info.py
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
tests errors.log 150 test_errors.py
tests ops_fp8.log 100 test_ops.py -k "dispatch_fp8_gpu"
tests layers.log "$(left 540)" test_layers.py
echo "all $(elapsed) s"
finish
