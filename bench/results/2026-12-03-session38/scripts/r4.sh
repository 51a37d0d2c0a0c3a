#!/usr/bin/env bash
# Session 38, r4 (one GPU, the session's last device seconds): the skipped-k combine test with the weights sent, on
# 1 rank, after r3's failures, again in the test itself (it passed the combine copies of the dispatch's topk_idx,
# which the nvshmem backend refuses as it should, after a dispatch given weights).
# usage: bash bench/results/2026-12-03-session38/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}"
build
tests skipped1.log 60 test_gpu.py -k "skipped_not_finite"
echo "all $(elapsed) s"
finish
