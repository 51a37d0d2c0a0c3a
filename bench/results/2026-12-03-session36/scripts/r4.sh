#!/usr/bin/env bash
# Session 36, r4 (one GPU; the tests' ranks share it). After two reviews of the FP8 dispatch and casts: the casts'
# kernel test (calls counted, part-full warp steps, more edge values, fallbacks), the low-latency FP8 tests that use
# the casts, the FP8 dispatch through ops (bf16 and float32 x; async with and without grad; a late x; the caller's
# stream busy after previous_event, async and in order; num_worst_tokens), and the layers' GPU tests.
# usage: bash bench/results/2026-12-03-session36/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}" emulate
build
tests fp8.log 150 test_gpu.py -k "fp8"
tests ops.log 150 test_ops.py -k "dispatch_fp8_gpu or zero_copy_training or second_derivative_and_checkpointed"
tests layers.log "$(left 570)" test_layers.py
echo "all $(elapsed) s"
finish
