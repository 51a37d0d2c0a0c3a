#!/usr/bin/env bash
# Session 44, r2 (one GPU): the copy engines' transfers alone (bench/micro/ce_copy_bench.cu: strided copies in
# pieces, each followed by its flag copy, into this GPU's own memory; no peer GPU here), then the copy-engine
# combine with its reduction launched before the copies, on ranks sharing the GPU (results checked, nothing
# timed): two ranks (every copy-engine test), four ranks (the normal-mode cases).
# usage: bash bench/results/2026-12-04-session44/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}" emulate
run_for micro_build.log 120 nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/ce_copy_bench bench/micro/ce_copy_bench.cu
run_for ce_copy_bench.log 120 /tmp/ce_copy_bench
build
tests ce2.log 200 test_gpu.py -k "copy_engines"
LARGEEP_TEST_EMULATE_GPUS=4 tests ce4.log "$(left 540)" test_gpu.py -k "normal_gpu_copy_engines"
echo "all $(elapsed) s"
finish
