#!/usr/bin/env bash
# Session 33, r4 (one GPU; test ranks share it). The nvshmem combine's float32 sums after a num_worst_tokens
# dispatch (new cases), the property tests (NormalRound now checks a cached dispatch's counts), rounds and cached
# dispatches on the nvshmem backend.
# usage: bash bench/results/2026-12-02-session33/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}" emulate
build
tests gpu_sel.log 200 test_gpu.py -k "float32_sums or tokens_per_round or cached"
tests property.log "$(left 480)" test_property.py
echo "all $(elapsed) s"
finish
