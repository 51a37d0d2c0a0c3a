#!/usr/bin/env bash
# Session 40, r4 (one GPU, two ranks sharing it: emulate): the native module after its errors name their source
# from csrc/ on and a peer that did not arrive is told without "[false]" (HOST_FAIL): the missing-peer destroy and
# the peer-exit tests, printing the messages (-s).
# usage: bash bench/results/2026-12-03-session40/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}" emulate
build
tests exits.log 150 -s test_gpu.py -k "peer_exits or destroy_without_peer"
echo "all $(elapsed) s"
finish
