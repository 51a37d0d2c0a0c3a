#!/usr/bin/env bash
# Session 48, r4 (one GPU). Tree: the biases' gradients summed by a kernel (ops._segment_row_sum_op: each expert's
# rows in a fixed order, no atomics, no sort) instead of an index_put, with old_tree/ unpacked from 9ff431e (r3's
# tree; `git archive 9ff431e | tar -x -C old_tree`, its bench/results and docs removed; not committed).
# 1. test_expert_act.py's GPU tests; the layer GPU tests of the experts (one rank; then the 2-rank GPT-OSS layer
#    test with two ranks sharing the GPU).
# 2. bench/expert_mlp_cost.py, old tree against this one, alternating, at the prefill size and a GPT-OSS-like one.
# usage: bash bench/results/2026-12-04-session48/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}" emulate
build
build_tree old_tree /tmp/old_lp
D=$SESSION_DIR
(unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS
 tests act.log 60 test_expert_act.py
 tests one.log 90 test_layers.py -k "gpt_oss or unknown_pairs or autocast or chunked")
tests shared.log 90 test_layers.py -k "gpt_oss_layer_gpu"
PRE=(--rows 32768 --experts 64 --hidden 7168 --ffn 2048)
GPT=(--rows 16384 --experts 32 --hidden 2880 --ffn 2880)
for i in 1 2; do
  run_for old_prefill$i.log 60 env PYTHONPATH=/tmp/old_lp python3 bench/expert_mlp_cost.py "${PRE[@]}" --out "$D/old_prefill$i.json"
  run_for new_prefill$i.log 60 python3 bench/expert_mlp_cost.py "${PRE[@]}" --out "$D/new_prefill$i.json"
  run_for old_gpt$i.log 40 env PYTHONPATH=/tmp/old_lp python3 bench/expert_mlp_cost.py "${GPT[@]}" --out "$D/old_gpt$i.json"
  run_for new_gpt$i.log 40 python3 bench/expert_mlp_cost.py "${GPT[@]}" --out "$D/new_gpt$i.json"
done
echo "all $(elapsed) s"
finish
