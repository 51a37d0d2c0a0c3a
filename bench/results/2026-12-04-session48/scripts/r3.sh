#!/usr/bin/env bash
# Session 48, r3 (one GPU). Tree: b2 added by a kernel too (ops._row_bias_add), the review's fixes, with old_tree/
# unpacked from 046f48e (r2's tree: the fused activation, b2 by a gather and an add; `git archive 046f48e | tar -x
# -C old_tree`, its bench/results and docs removed; not committed).
# 1. test_expert_act.py's GPU tests (the activation and bias kernels against float64 loops).
# 2. bench/expert_mlp_cost.py, old tree against this one, alternating, at the prefill size and a GPT-OSS-like one.
# 3. Every GPU test of test_layers.py and test_ops.py on two ranks sharing the GPU, then on one rank.
# usage: bash bench/results/2026-12-04-session48/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
build
build_tree old_tree /tmp/old_lp
D=$SESSION_DIR
(unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS; tests act.log 90 test_expert_act.py)
PRE=(--rows 32768 --experts 64 --hidden 7168 --ffn 2048)
GPT=(--rows 16384 --experts 32 --hidden 2880 --ffn 2880)
for i in 1 2; do
  run_for old_prefill$i.log 90 env PYTHONPATH=/tmp/old_lp python3 bench/expert_mlp_cost.py "${PRE[@]}" --out "$D/old_prefill$i.json"
  run_for new_prefill$i.log 90 python3 bench/expert_mlp_cost.py "${PRE[@]}" --out "$D/new_prefill$i.json"
  run_for old_gpt$i.log 60 env PYTHONPATH=/tmp/old_lp python3 bench/expert_mlp_cost.py "${GPT[@]}" --out "$D/old_gpt$i.json"
  run_for new_gpt$i.log 60 python3 bench/expert_mlp_cost.py "${GPT[@]}" --out "$D/new_gpt$i.json"
done
tests shared.log 240 test_layers.py test_ops.py
(unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS; tests one.log "$(left 570)" test_layers.py test_ops.py)
echo "all $(elapsed) s"
finish
