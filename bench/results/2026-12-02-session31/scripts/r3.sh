#!/usr/bin/env bash
# Session 31, r3 (one GPU; ranks share it). Build; then the refusal tests' "late" variants at 4 ranks after their
# fix (r2: the test gave rank 3 more tokens than max_tokens_per_rank), the num_worst_tokens CUDA graph at 2500
# tokens (the chunked prepare kernel replayed), and the internode / rounds tests with long calls.
# usage: bash bench/results/2026-12-02-session31/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
build
tests a_late.log 60 test_errors.py -k "one_rank_refuses_one_gpu and late"
tests b_graph.log "$(left 200)" test_gpu.py -k "normal_worst_graph or prepare_chunks"
echo "all $(elapsed) s"
finish
