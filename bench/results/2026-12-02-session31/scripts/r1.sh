#!/usr/bin/env bash
# Session 31, r1 (one GPU). Build; then:
#  (a) one rank on the GPU: normal-mode kernel times of the current kernels at 8 / 16 / 24 SMs (the model's 1-GPU
#      records are session 6's, of kernels since replaced), low-latency kernel times at 1..256 tokens, and the host
#      time of a 128-token round trip;
#  (b) previous_event_orders after session 30's refactor of its low-latency check (CPU-tested only), 2 ranks share
#      the GPU; then test_gpu.py's normal-mode tests as far as the time allows.
# usage: bash bench/results/2026-12-02-session31/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
build
D=$SESSION_DIR
run_for kt_ep1.log 150 env CUDA_VISIBLE_DEVICES=0 python3 bench/kernel_times.py --nprocs 1 --num-sms 8,16,24 \
  --out "$D/ep1"
run_for ll_ep1.log 90 env CUDA_VISIBLE_DEVICES=0 python3 bench/low_latency_times.py --nprocs 1 --out "$D/ll1"
run_for hp_ep1.log 60 env CUDA_VISIBLE_DEVICES=0 python3 bench/host_profile.py --nprocs 1 --iters 300 \
  --tokens 128 --out "$D/hp1"
tests a_events.log 80 "test_gpu.py::test_previous_event_orders"
tests b_normal.log "$(left 540)" test_gpu.py -k "normal and not low_latency"
echo "all $(elapsed) s"
finish
