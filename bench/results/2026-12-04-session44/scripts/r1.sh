#!/usr/bin/env bash
# Session 44, r1 (one GPU): the copy-engine combine (LARGEEP_TUNE comb=8) on ranks sharing the GPU (results
# checked, nothing timed). Two ranks: every normal-mode case through it, and its late-peer and kinds-disagree cases;
# four ranks: the same cases; then the default fused combine's normal-mode cases (nothing of it should change).
# usage: bash bench/results/2026-12-04-session44/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
build
tests ce2.log 200 test_gpu.py -k "copy_engines and not 4"
LARGEEP_TEST_EMULATE_GPUS=4 tests ce4.log 150 test_gpu.py -k "normal_gpu_copy_engines and 4"
tests fused.log "$(left 540)" test_gpu.py -k "normal_gpu and nvshmem and not copy_engines and not one_rank"
echo "all $(elapsed) s"
finish
