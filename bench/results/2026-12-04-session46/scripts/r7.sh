#!/usr/bin/env bash
# Session 46, r7 (one GPU): layers.clip_grad_norm_ on the nvshmem backend (two ranks sharing the GPU), then the
# layers' GPU tests once more on the final tree, two ranks and one.
# usage: bash bench/results/2026-12-04-session46/scripts/r7.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r7}" emulate
build
tests layers.log 240 test_layers.py
unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS
tests one.log "$(left 420)" test_layers.py
echo "all $(elapsed) s"
finish
