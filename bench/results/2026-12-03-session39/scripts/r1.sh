#!/usr/bin/env bash
# Session 39, r1 (one GPU): session 38's r4 (the skipped-k combine test with the weights sent, 1 rank), then, with
# two ranks sharing the GPU, the same test and the FP8 non-finite one on 2 ranks, test_layers.py's GPU tests (the
# layer's input checks through checks.tensor, f2aa205) and test_errors.py whole (the creation and num_sms rows).
# usage: bash bench/results/2026-12-03-session39/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}"
build
tests skipped1.log 90 test_gpu.py -k "skipped_not_finite"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
tests skipped2.log 120 test_gpu.py -k "skipped_not_finite or fp8_not_finite"
tests layers.log 120 test_layers.py
tests errors.log "$(left 570)" test_errors.py
echo "all $(elapsed) s"
finish
