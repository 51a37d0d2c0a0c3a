#!/usr/bin/env bash
# Session 41, r1 (one GPU): the normal combine's bf16 partial sums between nodes (Buffer.combine(bf16_partial_sums=
# True)). First their results, with ranks sharing the GPU (emulate): 2 nodes of one rank (the same bits as float32
# partials), 4 ranks as 2 nodes of 2 (bit for bit against the test's reference, which differs there from float32
# partials), after a num_worst_tokens dispatch and in rounds; ranks that disagree on the flag; the error table's
# new rows. Then the combine kernels' times on one rank against the tree before (old_tree/, unpacked from d25d853:
# `git archive d25d853 | tar -x -C old_tree`, without bench/results and docs; not committed), alternated twice:
# the fused combine (default) and push + reduce (LARGEEP_TUNE comb=0), whose reduce took the new argument.
# Prediction: no change beyond noise (the new branch runs only for partials of other nodes).
# usage: bash bench/results/2026-12-03-session41/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
build
build_tree old_tree /tmp/old_lp
tests partials.log 240 test_gpu.py -k "bf16_partials"
tests errors.log 60 test_errors.py -k "bf16_partial_sums or ranks_disagree"
unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS
args="--nprocs 1 --tokens 128,4096 --dtypes bf16 --num-sms 24 --iters 40 --warmup 5"
for i in 1 2; do
  run_for old$i.log 45 env CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/old_lp python3 old_tree/bench/kernel_times.py $args --out "$SESSION_DIR/old$i"
  run_for new$i.log 45 env CUDA_VISIBLE_DEVICES=0 python3 bench/kernel_times.py $args --out "$SESSION_DIR/new$i"
  run_for old_c0_$i.log 45 env LARGEEP_TUNE=comb=0 CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/old_lp python3 old_tree/bench/kernel_times.py $args --out "$SESSION_DIR/old_c0_$i"
  run_for new_c0_$i.log 45 env LARGEEP_TUNE=comb=0 CUDA_VISIBLE_DEVICES=0 python3 bench/kernel_times.py $args --out "$SESSION_DIR/new_c0_$i"
done
echo "all $(elapsed) s"
finish
