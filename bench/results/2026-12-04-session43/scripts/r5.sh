#!/usr/bin/env bash
# Session 43, r5 (one GPU, two ranks sharing it): the tests whose "next call raises" check became one helper
# (tests/gpu_bodies._raised_not_timeout): the low-latency handle tags and the normal mode's kinds and handles.
# usage: bash bench/results/2026-12-04-session43/scripts/r5.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r5}" emulate
build
tests next_call.log "$(left 120)" test_gpu.py -k "low_latency_handles_disagree or (calls_kinds_disagree and not four_ranks and not bf16)"
echo "all $(elapsed) s"
finish
