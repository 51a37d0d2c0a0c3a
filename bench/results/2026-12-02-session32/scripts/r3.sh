#!/usr/bin/env bash
# Session 32, r3 (one GPU, one rank). A smoke run of the widened full GPU preset (hidden 2048/4096/7168, top-4 and
# top-8, normal 128-8192 and low-latency 1-256 tokens, FP8 and BF16), 24 SMs only and few calls: does every point
# run on both backends? (One-rank whole calls: not performance figures.)
# usage: bash bench/results/2026-12-02-session32/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}"
build
run_for full.log 420 python3 -m largeep.bench --preset full --nprocs 1 --num-sms 24 --warmup 1 --iters 3 \
  --backends nvshmem,torch --no-plots --out "$SESSION_DIR/full"
grep -cE "^(nvshmem|torch) " "$SESSION_DIR/full.log"
grep -E "^skip|failed|Error" "$SESSION_DIR/full.log" | head -20
echo "all $(elapsed) s"
finish
