#!/usr/bin/env bash
# Session 42, r3 (one GPU): the last reviews' fixes. One rank on the real GPU: the layer and ops tests (a forward
# on the custom-op path that raises frees its handles; gate and placement outputs checked), then two ranks sharing
# it: the layer tests, the torch backend's and the Buffer's error tables on the nvshmem backend (group, handle
# owner and previous_event refusals).
# usage: bash bench/results/2026-12-03-session42/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}"
build
tests one.log 90 test_layers.py test_ops.py
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=5
tests errors.log 80 test_errors.py -k "nvshmem or handle_owners or event"
tests layers.log "$(left 270)" test_layers.py
echo "all $(elapsed) s"
finish
