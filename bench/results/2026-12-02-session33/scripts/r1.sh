#!/usr/bin/env bash
# Session 33, r1 (one GPU; test ranks share it). A regression check of the tree after session 32's last Buffer
# change (a fresh dispatch's count list copied once): build; test_gpu.py's normal-mode tests; test_errors.py's GPU
# rows.
# usage: bash bench/results/2026-12-02-session33/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
build
tests gpu_normal.log 300 test_gpu.py -k "not low_latency"
tests errors.log "$(left 520)" test_errors.py
echo "all $(elapsed) s"
finish
