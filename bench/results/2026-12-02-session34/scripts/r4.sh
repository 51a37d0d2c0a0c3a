#!/usr/bin/env bash
# Session 34, r4 (one GPU; test ranks share it). The quantiser's arithmetic in fp8.cuh with the sign kept: the
# exhaustive check (every e4m3 code = __fdiv_rn's?), the FP8 bits test (negative zeros now), the low-latency and
# missing-peer GPU tests, the error table, the multi-node tests (the copy-out's new op code), the one-GPU property
# cases; then one rank's low-latency kernel times.
# usage: bash bench/results/2026-12-02-session34/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}" emulate
run_for micro.log 60 bash -c "nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/fdc bench/micro/fp8_div_check.cu && /tmp/fdc"
build
tests gpu_ll.log 200 test_gpu.py -k "layout_too_large or fp8_bits or not_finite or low_latency or missing_peer"
tests errors.log 90 test_errors.py
tests nodes.log 90 test_gpu.py -k "internode or four_ranks_shared or late_peer"
tests property.log 60 test_property.py -k "one_gpu"
run_for ll_ep1.log "$(left 560)" env CUDA_VISIBLE_DEVICES=0 python3 bench/low_latency_times.py --nprocs 1 \
  --out "$SESSION_DIR/ll1"
echo "all $(elapsed) s"
finish
