#!/usr/bin/env bash
# Session 43, r1 (one GPU): native ABI 17 (an unchecked get_dispatch_layout counts an expert id out of range
# nowhere instead of failing the Buffer) and EventOverlap's device. One rank on the real GPU, then two ranks
# sharing it: the unchecked-id tests (layout, dispatch, combine, low-latency), the id checks, the layout and event
# tests, and the normal-mode rounds that compare every layout against the reference.
# usage: bash bench/results/2026-12-04-session43/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}"
build
tests one.log 60 test_errors.py -k "one_gpu or event or id_check"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=5
tests errors.log 90 test_errors.py -k "unchecked or id_check or event"
tests gpu.log "$(left 300)" test_gpu.py -k "layout or previous_event or finished_calls or (normal_gpu and nvshmem)"
echo "all $(elapsed) s"
finish
