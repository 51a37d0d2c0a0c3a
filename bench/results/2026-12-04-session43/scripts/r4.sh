#!/usr/bin/env bash
# Session 43, r4 (one GPU, two ranks sharing it): the 10,000-round checked long run of random sizes on the nvshmem
# backend with native ABI 18 (the low-latency combines' done flags carry the handle tags; more than 4096 dispatch
# rounds, so the tags wrap), every result against the reference, memory flat after warm-up.
# usage: bash bench/results/2026-12-04-session43/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}" emulate
build
export LARGEEP_TEST_ROUNDS=10000
tests long_run_10000.log "$(left 330)" -s "test_long_run.py::test_long_run[2-nvshmem-nccl]"
echo "all $(elapsed) s"
finish
