#!/usr/bin/env bash
# Session 30, r1 (one GPU; 2 ranks share it). Build; then session 29's last changes, tested on CPU only until now:
#  (a) test_errors.py's GPU tests (the low-latency dispatch's value checks now run after every other check);
#  (b) test_layers.py's and test_ops.py's GPU tests (num_logical_experts relaxed, the gate's capacity_factor check);
#  (c) test_gpu.py's low-latency tests, as far as the time allows.
# usage: bash bench/results/2026-12-02-session30/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
build
tests a_errors.log 110 test_errors.py
tests b_layers_ops.log 170 test_layers.py test_ops.py
tests c_gpu_ll.log "$(left 540)" test_gpu.py -k low_latency
echo "all $(elapsed) s"
finish
