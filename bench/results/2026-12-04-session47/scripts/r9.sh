#!/usr/bin/env bash
# Session 47, r9 (one GPU): after the closing review's refactor (the DDP/FSDP2 checks' shared group test, the
# gather's slot table helper, _collective's shared timeout tail): the GPU tests that run through them, two ranks
# sharing the GPU.
# usage: bash bench/results/2026-12-04-session47/scripts/r9.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r9}" emulate
build
tests review.log 150 test_layers.py -k "ddp or lean or set_placement or serve or global_experts"
echo "all $(elapsed) s"
finish
