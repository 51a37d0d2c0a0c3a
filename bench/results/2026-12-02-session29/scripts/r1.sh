#!/usr/bin/env bash
# Session 29, r1 (one GPU; 2 ranks share it: results checked, no link timed). Build; then the trees' parts that had
# not run on a GPU at the end of session 28:
#  (a) test_ops.py's GPU tests (the zero-copy training test with its delayed Buffer stream) and test_layers.py's;
#  (b) test_gpu.py from its start (every Buffer creation now ends in the allocation's second rendezvous), as far as
#      the time allows; r2 takes the rest by name.
# usage: bash bench/results/2026-12-02-session29/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
build
tests a_ops_layers.log 150 test_ops.py test_layers.py
tests b_gpu.log "$(left 560)" test_gpu.py
echo "all $(elapsed) s"
finish
