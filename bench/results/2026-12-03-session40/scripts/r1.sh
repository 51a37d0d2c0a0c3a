#!/usr/bin/env bash
# Session 40, r1 (one GPU): a regression pass over the GPU tests at the session's start, after session 39's
# changes (peer exits, creation gathers through _collective, the audits' fixes). First the one-rank tests on the
# real GPU, then test_gpu.py with two ranks sharing the GPU (emulate) for as long as the call allows.
# usage: bash bench/results/2026-12-03-session40/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}"
build
tests one_rank.log 150 test_gpu.py test_ops.py test_layers.py test_expert_tp.py
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
tests gpu.log "$(left 560)" test_gpu.py -k "not peer_exits and not long_run"
echo "all $(elapsed) s"
finish
