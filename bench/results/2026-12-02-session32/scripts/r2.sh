#!/usr/bin/env bash
# Session 32, r2 (one GPU, one rank). Whether a point of the low-latency sweep depends on its place in it, now that
# each token count has a Buffer of its own: the same counts in both orders and alone, 20 warm-up and 200 timed calls
# (r1's 3 + 10 were too few to tell: one-rank whole calls are host-bound).
# usage: bash bench/results/2026-12-02-session32/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}"
build
B="python3 -m largeep.bench --nprocs 1 --modes low_latency --dtypes fp8 --hidden 7168 --topk 8 --experts 288 --no-plots --backends nvshmem --warmup 20 --iters 200"
run_for a_8_128.log 70 $B --tokens 8,128 --out "$SESSION_DIR/a_8_128"
run_for b_128_8.log 70 $B --tokens 128,8 --out "$SESSION_DIR/b_128_8"
run_for c_128.log 60 $B --tokens 128 --out "$SESSION_DIR/c_128"
run_for d_8.log 60 $B --tokens 8 --out "$SESSION_DIR/d_8"
for f in a_8_128 b_128_8 c_128 d_8; do echo "== $f"; grep -E "^nvshmem +low_latency +(dispatch|combine|roundtrip) " "$SESSION_DIR/$f.log"; done
echo "all $(elapsed) s"
finish
