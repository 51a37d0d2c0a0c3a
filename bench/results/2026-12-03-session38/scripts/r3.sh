#!/usr/bin/env bash
# Session 38, r3 (one GPU, the session's last device minutes): the skipped-k combine test with the weights sent
# ("weights", "partial"), whose r2 cases failed in the test itself (it passed the combine a copy of the dispatch's
# weights, which the nvshmem backend refuses as it should); 1 rank, then 2 ranks sharing the GPU.
# usage: bash bench/results/2026-12-03-session38/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}"
build
tests skipped1.log 60 test_gpu.py -k "skipped_not_finite"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
tests skipped2.log 60 test_gpu.py -k "skipped_not_finite"
echo "all $(elapsed) s"
finish
