#!/usr/bin/env bash
# Session 43, r3 (one GPU): the handle-tag check after every done flag has come (r2's fused combines timed out).
# Two ranks sharing the GPU: the handle test (plain / hook / fused, one node and two nodes of one rank), every
# low-latency test of test_gpu.py (r2 was cut before the last seven), then the long run's low-latency rounds.
# usage: bash bench/results/2026-12-04-session43/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
build
tests handles.log 90 test_gpu.py -k "low_latency_handles_disagree"
tests ll_gpu.log "$(left 420)" test_gpu.py -k "low_latency and not handles_disagree"
echo "all $(elapsed) s"
finish
