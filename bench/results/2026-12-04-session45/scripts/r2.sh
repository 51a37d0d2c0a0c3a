#!/usr/bin/env bash
# Session 45, r2 (one GPU): the chunked forward's fix (only tickets kept for the release after an error; r1's
# test_zero_copy_training_gpu failure) with the layers', ops' and expert-TP GPU tests, then the normal-mode tests
# of test_gpu.py other than the copy-engine ones (run in r1) for what time is left: every call of session 44's
# status words and reporting notify. Two ranks share the GPU (results checked, nothing timed).
# usage: bash bench/results/2026-12-04-session45/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}" emulate
build
tests layers.log 150 test_layers.py test_ops.py test_expert_tp.py
tests normal.log "$(left 565)" test_gpu.py -k "not copy_engines and not low_latency and not ll_"
echo "all $(elapsed) s"
finish
