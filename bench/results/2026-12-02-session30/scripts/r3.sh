#!/usr/bin/env bash
# Session 30, r3 (one GPU; ranks share it). Build; then this session's new GPU tests:
#  (a) previous_event / async_finish with a late side-stream write (both backends, both modes), hook mode's send
#      with late peers, the worst-tokens graph against the reference, the round trips whose reference was the
#      library's own layout (runtime cycles, layout id check, config mismatch);
#  (b) test_errors.py's GPU tests (19 new rows of the error table);
#  (c) the low-latency layer and ops tests (the torch backend's combine marker does not run on GPUs: a check).
# usage: bash bench/results/2026-12-02-session30/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
build
tests a_new.log 220 "test_gpu.py::test_previous_event_orders" "test_gpu.py::test_low_latency_send_holds_nothing" \
  "test_gpu.py::test_normal_worst_graph" "test_gpu.py::test_normal_worst_graph_torch_one_rank" \
  "test_gpu.py::test_runtime_cycles" "test_gpu.py::test_layout_id_check" "test_gpu.py::test_config_mismatch_refused"
tests b_errors.log 110 test_errors.py
tests c_ops.log "$(left 540)" test_ops.py test_layers.py -k "low_latency or decode"
echo "all $(elapsed) s"
finish
