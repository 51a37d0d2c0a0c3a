#!/usr/bin/env bash
# Session 40, r3 (one GPU, two ranks sharing it: emulate): the layer's GPU tests after the gate-output checks in
# MoELayer.route, then the many-rank tests that r1's pass did not reach, for as long as the call allows.
# usage: bash bench/results/2026-12-03-session40/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
build
tests layers.log 120 test_layers.py test_ops.py
tests gpu_many.log "$(left 400)" test_gpu.py -k "normal_many_ranks_shared_gpus or normal_wide_nodes_shared_gpus or low_latency_four_ranks_shared_gpus or low_latency_bf16_partial_sums_four_ranks_shared_gpus or calls_kinds_disagree_four_ranks_shared_gpus"
echo "all $(elapsed) s"
finish
