#!/usr/bin/env bash
# Session 45, r5 (one GPU): send_chunk's copies rewritten as one branch (no change of behaviour meant): the layers'
# GPU tests that send strided, misaligned or pipelined chunks, two ranks sharing the GPU, then one rank.
# usage: bash bench/results/2026-12-04-session45/scripts/r5.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r5}" emulate
build
tests layers.log 150 test_layers.py test_ops.py
unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS
tests one.log "$(left 330)" test_layers.py
echo "all $(elapsed) s"
finish
