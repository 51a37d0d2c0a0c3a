#!/usr/bin/env bash
# Session 35, r4 (one GPU, one rank: the kernels' own cost, no link). NOT RUN in session 35 (no device time left):
# prepared for a tree with proposed/fused_want_int64.patch applied (`git apply`), where the fused reduction takes
# its flag's expected value as one int64 (r3: +2 us at 4096 tokens with the signature as a separate argument; the
# cause is a guess until this runs). As r3 otherwise. Baseline fad91cc (unpacked into
# old_tree/ by `git archive fad91cc | tar -x -C old_tree`, not committed) and
# after (this tree), in the same run, alternating twice: BF16 dispatch and combine at 4096 tokens; first the fused
# combine's mismatch tests again (test ranks sharing the GPU).
# usage: bash bench/results/2026-12-03-session35/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}"
build
(cd old_tree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/old_lp . > "$SESSION_DIR/build_old.log" 2>&1) \
  || { tail -30 "$SESSION_DIR/build_old.log"; finish; exit 1; }
echo "old build $(elapsed) s"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
tests kinds.log 60 test_gpu.py -k "calls_kinds_disagree and fused"
unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS
args="--nprocs 1 --tokens 4096 --dtypes bf16 --num-sms 24 --iters 40 --warmup 5"
for i in 1 2; do
  run_for old$i.log 60 env CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/old_lp python3 old_tree/bench/kernel_times.py $args --out "$SESSION_DIR/old$i"
  run_for new$i.log 60 env CUDA_VISIBLE_DEVICES=0 python3 bench/kernel_times.py $args --out "$SESSION_DIR/new$i"
done
echo "all $(elapsed) s"
finish
