#!/usr/bin/env bash
# Session 40, r2 (one GPU, two ranks sharing it: emulate): the GPU paths that the session's fixes touched.
# - bool arguments refused (checks.flags) on the nvshmem backend: the error table's new rows;
# - the zero-copy slot's stream registered before the launch (Buffer._run): zero-copy, stream and held-output tests;
# - the nvshmem backend's destroy leaves the status words of a busy device allocated, and a timeout found at the
#   next call says "an earlier": the missing-peer, peer-exit and destroy tests (LARGEEP_TIMEOUT_S 5 s there);
# - _collective's bound read before the collective (expert TP, the gate's load sum, replica sums): test_expert_tp
#   and test_layers on the GPU.
# usage: bash bench/results/2026-12-03-session40/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}" emulate
build
tests errors.log 100 test_errors.py -k "not_bool or bf16_partial or destroy or nvshmem_rows"
tests streams.log 150 test_gpu.py -k "zero_copy or finished_calls or held_outputs or stream_edges or missing_peer or late_peer"
tests exits.log 120 -s test_gpu.py -k "peer_exits or destroy_without_peer"
tests layers.log "$(left 560)" test_expert_tp.py test_layers.py
echo "all $(elapsed) s"
finish
