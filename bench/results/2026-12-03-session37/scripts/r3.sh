#!/usr/bin/env bash
# Session 37, r3 (one GPU, two ranks sharing it, emulate): the GPU tests r1 and r2 did not reach (the four-rank
# low-latency tests and the wide-nodes normal test), on the tree with the bf16 quantiser committed.
# usage: bash bench/results/2026-12-03-session37/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
build
tests gpu_left.log "$(left 200)" test_gpu.py -k "low_latency_bf16_partial_sums_four_ranks_shared_gpus or low_latency_four_ranks_shared_gpus or normal_wide_nodes_shared_gpus"
echo "all $(elapsed) s"
finish
