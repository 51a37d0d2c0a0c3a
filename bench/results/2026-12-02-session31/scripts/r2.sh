#!/usr/bin/env bash
# Session 31, r2 (one GPU). Build; then the normal dispatch's prepare kernel with several blocks per destination
# (calls of more than 1024 tokens):
#  (a) one rank: normal-mode kernel times at 8 / 16 / 24 SMs (prepare was 20.3 us at 4096 tokens in r1);
#  (b) 2 ranks share the GPU: test_normal_prepare_chunks (new), the repeat-identical and one-rank normal tests;
#      the refusal tests (new "late" variants: the bad id in the last chunk), 2 and 4 ranks;
#  (c) test_gpu.py's normal-mode tests, as far as the time allows.
# usage: bash bench/results/2026-12-02-session31/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}" emulate
build
D=$SESSION_DIR
run_for kt_ep1.log 150 env CUDA_VISIBLE_DEVICES=0 python3 bench/kernel_times.py --nprocs 1 --num-sms 8,16,24 \
  --out "$D/ep1"
tests a_chunks.log 150 test_gpu.py -k "prepare_chunks or repeat_identical or normal_gpu_one_rank"
tests b_refusals.log 120 test_errors.py -k "one_rank_refuses_one_gpu"
tests c_normal.log "$(left 560)" test_gpu.py -k "normal and not low_latency and not prepare_chunks and not repeat_identical"
echo "all $(elapsed) s"
finish
