#!/usr/bin/env bash
# Session 36, r2 (one GPU; the tests' ranks share it). ops.dispatch(use_fp8=True) and MoELayer(use_fp8=True), and
# the native FP8 kernels behind fp8.quantize / fp8.dequantize on CUDA: their cost against the torch ops
# (scripts/fp8_cast.py), their bits against the CPU's, then the GPU tests of the FP8 dispatch through ops and the
# layers, and the tests that use the casts elsewhere (the low-latency FP8 rows and layers).
# usage: bash bench/results/2026-12-03-session36/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}" emulate
build
run_for fp8_cast.log 120 python3 bench/results/2026-12-03-session36/scripts/fp8_cast.py "$SESSION_DIR/fp8_cast.json"
tests fp8.log 150 test_gpu.py -k "fp8"
tests ops.log 200 test_ops.py -k "dispatch_fp8_gpu or zero_copy_training or second_derivative_and_checkpointed"
tests layers.log "$(left 570)" test_layers.py
echo "all $(elapsed) s"
finish
