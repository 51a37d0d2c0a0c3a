#!/usr/bin/env bash
# Session 30, r2 (one GPU; ranks share it). Build; then this session's changes on the GPU:
#  (a) the tests strengthened or added: low-latency graph / two in flight / rounds with experts that scale their rows
#      (element-wise bounds), use_ue8m0, the normal combine's float32 sums bit for bit (3 and 4 ranks, 2 x 2 nodes),
#      tokens_per_round on an "nccl" pool, the bf16 partial sums in a graph (weighted);
#  (b) the kernel changes: cached hierarchical dispatch (fwd_pos left as written), the low-latency send's row bound:
#      the emulated-nodes tests and the low-latency tune sweep (every LL_CASES case, three tunes);
#  (c) test_property's GPU tests (output dtypes now asserted) and test_errors' GPU tests, as far as the time allows.
# usage: bash bench/results/2026-12-02-session30/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}" emulate
build
tests a_new.log 200 "test_gpu.py::test_normal_combine_float32_sums_shared_gpus" \
  "test_gpu.py::test_low_latency_graph_and_double_buffer" "test_gpu.py::test_low_latency_rounds_past_2_31" \
  "test_gpu.py::test_normal_tokens_per_round" "test_gpu.py::test_low_latency_gpu" \
  "test_gpu.py::test_low_latency_bf16_partial_sums"
tests b_kernels.log 200 test_gpu.py -k "nodes or low_latency_tune"
tests c_property.log 100 test_property.py
tests d_errors.log "$(left 545)" test_errors.py
echo "all $(elapsed) s"
finish
