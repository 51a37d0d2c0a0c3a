#!/usr/bin/env bash
# Session 46, r5 (one GPU): the error table with its new row (a handle passed as dispatch's second positional
# argument) and the mode rows, on the nvshmem backend with two ranks sharing the GPU; the low-latency Buffer's layout
# test (one rank); the strided eager dispatch and DDP tests once more on the final tree.
# usage: bash bench/results/2026-12-04-session46/scripts/r5.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r5}" emulate
build
tests errors.log 240 test_errors.py -k "wrong_call and (dispatch or combine or low_latency)"
tests more.log 120 test_ops.py test_layers.py -k "strided or ddp or autocast"
unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS
tests one.log "$(left 500)" test_gpu.py -k "low_latency_layout_too_large or previous_event"
echo "all $(elapsed) s"
finish
