#!/usr/bin/env bash
# Session 39, r5 (one GPU, two ranks sharing it): the GPU tests that now run their pool through
# dist_pool.run_in_own_pool (the peer-exit tests and destroy without a peer).
# usage: bash bench/results/2026-12-03-session39/scripts/r5.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r5}" emulate
build
tests own_pool.log 150 test_gpu.py -k "peer_exits or destroy_without_peer"
echo "all $(elapsed) s"
finish
