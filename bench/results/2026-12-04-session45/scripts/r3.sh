#!/usr/bin/env bash
# Session 45, r3 (one GPU): the normal-mode tests r2 skipped for want of 4 GPUs, with four ranks sharing the GPU
# (results checked, nothing timed): 4-rank normal cases, two emulated nodes of 2 and 4 nodes of 1 (the push +
# reduce combines, whose status words session 44 extended), CUDA-graph worst-case dispatches, a missing peer.
# usage: bash bench/results/2026-12-04-session45/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
export LARGEEP_TEST_EMULATE_GPUS=4
build
tests four.log "$(left 540)" test_gpu.py -k "(nvshmem-4 or repeat_identical or worst_graph or missing_peer or internode or four_gpus or runtime_cycles) and not torch and not copy_engines and not low_latency and not ll_"
echo "all $(elapsed) s"
finish
