#!/usr/bin/env bash
# Session 31, r4 (one GPU; ranks share it). Build; then the prepare kernel after its review: the launch number apart
# from the chunk totals (no overflow), a ticket past the last chunk reported (kOpPrepare), ABI 11; the chunked tests
# (calls of 1023-4100 tokens, the worst-tokens graph at 2500 tokens), the refusal tests' long variants (the bad id in
# the last chunk and in the first), one rank's kernel times at 24 SMs.
# usage: bash bench/results/2026-12-02-session31/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}" emulate
build
run_for kt_ep1.log 50 env CUDA_VISIBLE_DEVICES=0 python3 bench/kernel_times.py --nprocs 1 --num-sms 24 \
  --out "$SESSION_DIR/ep1"
tests a_late.log 70 test_errors.py -k "one_rank_refuses_one_gpu and late"
tests b_chunks.log "$(left 235)" test_gpu.py -k "prepare_chunks or normal_worst_graph or repeat_identical"
echo "all $(elapsed) s"
finish
