#!/usr/bin/env bash
# Session 32, r5 (one GPU; test ranks share it). The property tests again after the fix of their comparison (r4: with
# num_worst_tokens the torch backend on CPU now fills its count list, a GPU backend gives none; the tensors agree).
# usage: bash bench/results/2026-12-02-session32/scripts/r5.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r5}" emulate
build
tests property.log "$(left 480)" test_property.py
echo "all $(elapsed) s"
finish
