#!/usr/bin/env bash
# Session 42, r1 (one GPU, two ranks sharing it): a 10,000-round checked long run of random sizes on the nvshmem
# backend (normal and low-latency Buffers, every result against the reference, memory flat after warm-up), the first
# since session 39, now with session 41's host waits (stream queries) and void rounds; then the two-rank GPU tests
# for the rest of the time.
# usage: bash bench/results/2026-12-03-session42/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
build
export LARGEEP_TEST_ROUNDS=10000
tests long_run_10000.log 300 -s "test_long_run.py::test_long_run[2-nvshmem-nccl]"
unset LARGEEP_TEST_ROUNDS
tests gpu.log "$(left 560)" test_gpu.py -k "not peer_exits and not long_run and not many and not wide"
echo "all $(elapsed) s"
finish
