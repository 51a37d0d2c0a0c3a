#!/usr/bin/env bash
# Session 32, r1 (one GPU; test ranks share it). Build; the benchmark's low-latency sweep now opens one Buffer per
# token count (nvshmem and torch, one rank, two token counts, then the same counts one at a time); the layers' and
# ops' GPU tests after this session's argument checks; test_gpu.py's low-latency tests (the kernels are unchanged
# since session 31; a regression check of the tree).
# usage: bash bench/results/2026-12-02-session32/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
build
B="python3 -m largeep.bench --nprocs 1 --modes low_latency --dtypes fp8 --hidden 7168 --topk 8 --experts 288 --no-plots"
run_for bench_ll_8_128.log 150 $B --tokens 8,128 --backends nvshmem,torch --out "$SESSION_DIR/bench_ll_8_128"
run_for bench_ll_8.log 60 $B --tokens 8 --backends nvshmem --out "$SESSION_DIR/bench_ll_8"
run_for bench_ll_128.log 60 $B --tokens 128 --backends nvshmem --out "$SESSION_DIR/bench_ll_128"
tests layers_ops.log 200 test_layers.py test_ops.py
tests gpu_ll.log "$(left 540)" test_gpu.py -k "low_latency"
echo "all $(elapsed) s"
finish
