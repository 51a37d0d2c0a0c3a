#!/usr/bin/env bash
# Session 32, r4 (one GPU; test ranks share it). After the Buffer's changes (a cached dispatch returns its handle's
# per-expert counts; low_latency_combine's out= check): the normal-mode round trips on nvshmem and torch at 2 ranks
# (fresh, cached and num_worst_tokens dispatches, their counts checked), the num_worst_tokens graph, the property
# tests' GPU cases.
# usage: bash bench/results/2026-12-02-session32/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}" emulate
build
tests normal.log 240 test_gpu.py -k "(test_normal_gpu and -2]) or normal_worst_graph[96-2]"
tests property.log "$(left 480)" test_property.py
echo "all $(elapsed) s"
finish
