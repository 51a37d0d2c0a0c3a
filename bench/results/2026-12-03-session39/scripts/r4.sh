#!/usr/bin/env bash
# Session 39, r4 (one GPU, two ranks sharing it): after the audits' fixes and the test refactor, the missing-peer
# and peer-exit GPU tests, test_layers.py's GPU tests (the decode step's table_route in a CUDA graph) and
# test_ops.py's GPU tests (ops.combine's handle checks, the TP collectives' backwards).
# usage: bash bench/results/2026-12-03-session39/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}" emulate
build
tests peers.log 150 test_gpu.py -k "peer_exits or missing_peer"
tests layers.log 100 test_layers.py
tests ops.log "$(left 400)" test_ops.py test_expert_tp.py
echo "all $(elapsed) s"
finish
