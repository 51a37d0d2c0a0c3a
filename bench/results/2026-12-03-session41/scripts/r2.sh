#!/usr/bin/env bash
# Session 41, r2 (one GPU): the reduce kernel's bf16 partials as a template argument (r1: the runtime flag made the
# one-node push + reduce's reduce 90.8 -> 92.9 us at 4096 tokens, both alternations). Its times on one rank against
# old_tree/ (d25d853, as r1), alternated twice, push + reduce (LARGEEP_TUNE comb=0) and the fused combine once;
# prediction: within 0.3 us of the old tree. Then the results again, ranks sharing the GPU: the bf16-partial tests,
# and the multi-node normal-mode tests the change touches (internode 2 x 1, the kinds that disagree, 4 ranks as
# one node, 2 x 2 and 4 x 1, the combine's float32 sums).
# usage: bash bench/results/2026-12-03-session41/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}"
build
build_tree old_tree /tmp/old_lp
args="--nprocs 1 --tokens 128,4096 --dtypes bf16 --num-sms 24 --iters 40 --warmup 5"
for i in 1 2; do
  run_for old_c0_$i.log 45 env LARGEEP_TUNE=comb=0 CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/old_lp python3 old_tree/bench/kernel_times.py $args --out "$SESSION_DIR/old_c0_$i"
  run_for new_c0_$i.log 45 env LARGEEP_TUNE=comb=0 CUDA_VISIBLE_DEVICES=0 python3 bench/kernel_times.py $args --out "$SESSION_DIR/new_c0_$i"
done
run_for new1.log 45 env CUDA_VISIBLE_DEVICES=0 python3 bench/kernel_times.py $args --out "$SESSION_DIR/new1"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
tests partials.log 150 test_gpu.py -k "bf16_partials"
tests internode.log "$(left 560)" test_gpu.py -k "normal_internode or (calls_kinds_disagree and two_nodes) or normal_four_ranks_shared or combine_float32_sums_shared or calls_kinds_disagree_four"
echo "all $(elapsed) s"
finish
