#!/usr/bin/env bash
# Session 45, r4 (one GPU): the reviews' changes to the layers (a low-latency forward drops its dispatch's outputs
# once its combine is sent; activation checkpointing's stop of a recomputation passes the layers' and expert TP's
# error handling untouched) with the layers', ops' and expert-TP GPU tests, two ranks sharing the GPU, then one
# rank on the GPU (results checked, nothing timed).
# usage: bash bench/results/2026-12-04-session45/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}" emulate
build
tests layers.log 150 test_layers.py test_ops.py test_expert_tp.py
unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS
tests one.log "$(left 400)" test_layers.py test_ops.py test_expert_tp.py
echo "all $(elapsed) s"
finish
