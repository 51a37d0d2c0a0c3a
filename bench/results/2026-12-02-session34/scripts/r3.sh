#!/usr/bin/env bash
# Session 34, r3 (one GPU; test ranks share it). The quantiser's division as a product plus one FMA correction:
# first the exhaustive check against __fdiv_rn (bench/micro/fp8_div_check.cu), then the diagnostic of r2 again
# (kernel, fp8.quantize on CUDA and on CPU: all the same bits now?), the FP8 and low-latency GPU tests, the layers'
# low-latency tests, the one-GPU property cases; then one rank's low-latency kernel times.
# usage: bash bench/results/2026-12-02-session34/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
run_for micro.log 60 bash -c "nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/fdc bench/micro/fp8_div_check.cu && /tmp/fdc"
build
run_for diag.log 60 env CUDA_VISIBLE_DEVICES=0 python3 bench/results/2026-12-02-session34/scripts/fp8_diag.py /tmp
tests gpu_fp8.log 150 test_gpu.py -k "layout_too_large or fp8_bits or not_finite or low_latency"
tests layers.log 100 test_layers.py -k "low_latency or fp8"
tests property.log 80 test_property.py -k "one_gpu"
run_for ll_ep1.log "$(left 540)" env CUDA_VISIBLE_DEVICES=0 python3 bench/low_latency_times.py --nprocs 1 \
  --out "$SESSION_DIR/ll1"
echo "all $(elapsed) s"
finish
