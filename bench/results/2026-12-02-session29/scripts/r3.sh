#!/usr/bin/env bash
# Session 29, r3 (one GPU; 2 ranks share it). Build; then the session's changes on the GPU:
#  (a) test_layers.py's and test_ops.py's GPU tests (send_chunk's copies after the ready event, the layer's chunk
#      views aligned before it; Buffer creation's new order);
#  (b) test_errors.py's GPU tests (the low-latency dispatch's value checks, rearranged);
#  (c) the six 4-rank tests of test_gpu.py that r2 did not reach, as far as the time allows.
# usage: bash bench/results/2026-12-02-session29/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
build
tests a_layers_ops.log 170 test_layers.py test_ops.py
tests b_errors.log 100 test_errors.py
tests c_gpu4.log "$(left 545)" "test_gpu.py::test_normal_many_ranks_shared_gpus" \
  "test_gpu.py::test_normal_wide_nodes_shared_gpus" "test_gpu.py::test_low_latency_four_ranks_shared_gpus[m128-fp8]" \
  "test_gpu.py::test_low_latency_four_ranks_shared_gpus[m128-bf16-hook]" \
  "test_gpu.py::test_low_latency_bf16_partial_sums_four_ranks_shared_gpus[one-node]" \
  "test_gpu.py::test_low_latency_bf16_partial_sums_four_ranks_shared_gpus[2-nodes]"
echo "all $(elapsed) s"
finish
