#!/usr/bin/env bash
# Session 46, r4 (one GPU): the layers after this session's changes (GroupedExperts under autocast, load_global_experts
# through the shared slot cut, MoELayer.for_buffer's constructor path, the DDP check): the layers' and ops' GPU tests,
# two ranks sharing the GPU, then one rank (the autocast test on CUDA among them).
# usage: bash bench/results/2026-12-04-session46/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}" emulate
build
tests layers.log 260 test_layers.py test_ops.py
unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS
tests one.log "$(left 420)" test_layers.py test_ops.py
echo "all $(elapsed) s"
finish
