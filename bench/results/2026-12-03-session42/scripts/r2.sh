#!/usr/bin/env bash
# Session 42, r2 (one GPU): the session's fixes. The environment report (the NVSHMEM library the native module runs
# with); one rank on the real GPU: the ops, layer and expert-TP tests (second derivatives through the expert GEMMs,
# the registry's holds, bf16_partial_sums through ops and MoELayer); then two or four ranks sharing it: every
# bf16-partial-sum test (the new ops one on the nvshmem backend, 4 ranks as 2 nodes of 2), the ops, layer and
# expert-TP tests, and the two-rank GPU tests r1 had no time for.
# usage: bash bench/results/2026-12-03-session42/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}"
build
run_for info.json 60 python3 -m largeep --json
tests one.log 150 test_ops.py test_layers.py test_expert_tp.py
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
tests partials.log 120 test_gpu.py -k "bf16_partial"
tests layers.log 150 test_ops.py test_layers.py test_expert_tp.py
tests rest.log "$(left 560)" test_gpu.py -k "normal_internode or kinds_disagree or low_latency_put_path or tokens_per_round or fp8_native or (four_ranks_shared and not bf16) or float32_sums or late_peer or missing_peer_times_out_low or num_sms_of"
echo "all $(elapsed) s"
finish
