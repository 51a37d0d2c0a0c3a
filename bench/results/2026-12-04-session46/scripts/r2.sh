#!/usr/bin/env bash
# Session 46, r2 (one GPU): MoELayer/MoEPipeline check at each forward whether a DDP reduces their experts
# (layers.ddp_ignore_experts), and the strengthened ops tests (second derivative, returned ids): the ops', layers'
# and expert-TP GPU tests, two ranks sharing the GPU, then one rank.
# usage: bash bench/results/2026-12-04-session46/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}" emulate
build
tests ops_layers_tp.log 330 test_ops.py test_layers.py test_expert_tp.py
unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS
tests one.log "$(left 500)" test_layers.py test_ops.py test_expert_tp.py
echo "all $(elapsed) s"
finish
