#!/usr/bin/env bash
# Session 30, r4 (one GPU; ranks share it). Build; then:
#  (a) the low-latency custom ops without weights (eager and compiled, nvshmem), previous_event_orders after its
#      stream-order fix (the torch backend's one-rank variant now runs under the emulation), hook mode's send;
#  (b) test_ops.py and test_layers.py GPU tests;
#  (c) test_long_run.py's GPU tests (the checked rounds now assert dtypes, use_ue8m0, combines without out=),
#      as far as the time allows.
# usage: bash bench/results/2026-12-02-session30/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}" emulate
build
tests a_ops_events.log 100 "test_gpu.py::test_low_latency_ops_weighted" "test_gpu.py::test_previous_event_orders" \
  "test_gpu.py::test_low_latency_send_holds_nothing"
tests b_layers_ops.log 150 test_ops.py test_layers.py
tests c_long_run.log "$(left 470)" test_long_run.py
echo "all $(elapsed) s"
finish
