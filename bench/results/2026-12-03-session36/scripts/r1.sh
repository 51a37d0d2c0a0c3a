#!/usr/bin/env bash
# Session 36, r1 (one GPU, one rank: the kernels' own cost, no link). Tree: session 35's proposed
# fused_want_int64.patch applied (the fused reduction takes its flag's expected value as one int64). Three builds in
# the same run, alternating twice: fad91cc (before the flag signatures, old_tree/), fdd981f (signatures, reduction
# with a separate signature argument, cur_tree/), and this tree; both unpacked by `git archive REV | tar -x -C DIR`,
# not committed. BF16 dispatch and combine at 128 and 4096 tokens. Then the mismatch and normal-mode tests of this tree
# (test ranks sharing the GPU).
# usage: bash bench/results/2026-12-03-session36/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}"
build
for t in old cur; do
  (cd ${t}_tree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/${t}_lp . > "$SESSION_DIR/build_$t.log" 2>&1) \
    || { tail -30 "$SESSION_DIR/build_$t.log"; finish; exit 1; }
  echo "$t build $(elapsed) s"
done
args="--nprocs 1 --tokens 128,4096 --dtypes bf16 --num-sms 24 --iters 40 --warmup 5"
for i in 1 2; do
  for t in old cur; do
    run_for $t$i.log 60 env CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/${t}_lp python3 ${t}_tree/bench/kernel_times.py $args --out "$SESSION_DIR/$t$i"
  done
  run_for new$i.log 60 env CUDA_VISIBLE_DEVICES=0 python3 bench/kernel_times.py $args --out "$SESSION_DIR/new$i"
done
echo "bench $(elapsed) s"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
tests kinds.log 200 test_gpu.py -k "calls_kinds_disagree"
tests normal.log "$(left 580)" test_gpu.py -k "normal_gpu or zero_copy or worst or combine_float32"
unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS
echo "all $(elapsed) s"
finish
