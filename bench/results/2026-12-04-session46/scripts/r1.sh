#!/usr/bin/env bash
# Session 46, r1 (one GPU): the plain eager ops.dispatch now copies strided or misaligned inputs (on the Buffer's
# stream after previous_event, FP8 quantisation included): the ops' and layers' GPU tests, two ranks sharing the
# GPU, then the strided test's torch-on-NCCL case and the layers' tests on one rank.
# usage: bash bench/results/2026-12-04-session46/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
build
tests ops_layers.log 240 test_ops.py test_layers.py
unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS
tests one.log "$(left 420)" test_layers.py test_ops.py
echo "all $(elapsed) s"
finish
