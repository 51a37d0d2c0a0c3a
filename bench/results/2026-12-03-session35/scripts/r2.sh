#!/usr/bin/env bash
# Session 35, r2 (one GPU; test ranks share it). More of the normal mode's users for false reports of the new flag
# signatures: the error table, the layers and ops (autograd through cached dispatches and combines), and the
# remaining normal-mode GPU tests (streams, events, failed launches, out of memory, graphs, missing peers).
# usage: bash bench/results/2026-12-03-session35/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}" emulate
build
tests errors.log 90 test_errors.py
tests layers.log 120 test_layers.py
tests gpu_rest.log 130 test_gpu.py -k "stream_edges or previous_event or destroy_keeps or failed_ or out_of_memory or (missing_peer_times_out and not low_latency) or repeat_identical or one_rank or odd_sms or prepare_chunks or worst_graph or finished_calls"
tests ops.log "$(left 470)" test_ops.py
echo "all $(elapsed) s"
finish
