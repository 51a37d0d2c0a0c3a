#!/usr/bin/env bash
# Session 36, r7 (one GPU; the tests' ranks share it). The low-latency layer dequantises only the FP8 rows its
# experts take (gathered first, at most its capacity) instead of every slot: the decode step in a CUDA graph, now
# with FP8 as its docstring said (the test had run bf16) and bf16, plain and with a placement.
# usage: bash bench/results/2026-12-03-session36/scripts/r7.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r7}" emulate
build
tests layers.log 200 test_layers.py -k "decode_step or low_latency"
echo "all $(elapsed) s"
finish
