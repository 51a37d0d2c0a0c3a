#!/usr/bin/env bash
# Session 39, r3 (one GPU, two ranks sharing it): the peer-exit tests again with their times printed, then a
# 10,000-round checked long run of random sizes on the nvshmem backend (normal and low-latency Buffers, every
# result against the reference, memory flat after warm-up), the first since session 6's on the current kernels.
# usage: bash bench/results/2026-12-03-session39/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
build
tests exits.log 120 test_gpu.py -s -k "peer_exits"
export LARGEEP_TEST_ROUNDS=10000
tests long_run_10000.log "$(left 580)" -s "test_long_run.py::test_long_run[2-nvshmem-nccl]"
echo "all $(elapsed) s"
finish
