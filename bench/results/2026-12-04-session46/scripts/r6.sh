#!/usr/bin/env bash
# Session 46, r6 (one GPU): MoELayer.for_buffer on the nvshmem backend (a prefill layer and its low-latency twin,
# two ranks sharing the GPU).
# usage: bash bench/results/2026-12-04-session46/scripts/r6.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r6}" emulate
build
tests serve.log 200 test_layers.py -k "serve"
echo "all $(elapsed) s"
finish
