#!/usr/bin/env bash
# Session 33, r5 (one GPU; test ranks share it). After the review of the session's own diff: the low-latency calls
# guarded by the normal mode's _closes_open_round, NVSHMEM's initialisation and destroy's sync through one thread
# helper (_in_thread). The abandoned-round, destroy, low-latency and hook tests, the error table (init timeout).
# usage: bash bench/results/2026-12-02-session33/scripts/r5.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r5}" emulate
build
tests gpu_sel.log 200 test_gpu.py -k "raised_after_send or destroy or low_latency_gpu or hook or runtime_cycles or not_finite"
tests errors.log "$(left 420)" test_errors.py
echo "all $(elapsed) s"
finish
