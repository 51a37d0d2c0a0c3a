#!/usr/bin/env bash
# Session 48, r1 (one GPU): experts with biases and GPT-OSS's clamped activation. The session's GPU tests of them
# (two ranks sharing the GPU, then one rank), their CPU tests and the porting tests under the machine's torch, and
# the cost of the biases and the activation on one rank's experts (bench/expert_mlp_cost.py, two sizes).
# usage: bash bench/results/2026-12-04-session48/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
build
tests shared.log 150 test_layers.py -k "gpt_oss or unknown_pairs"
(unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS; tests one.log 150 test_layers.py -k "gpt_oss or unknown_pairs")
CPU=(python3 -m pytest -q -p no:cacheprovider -m "not gpu" tests/test_layers.py tests/test_expert_tp.py tests/test_hf_port.py
     tests/test_gate.py -k "gpt_oss or router_bias or router or ported or hf or unknown_pairs")
(unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS; run_for cpu.log 240 "${CPU[@]}")
run_for cost_prefill.log 120 python3 bench/expert_mlp_cost.py --rows 32768 --experts 64 --hidden 7168 --ffn 2048 \
  --out "$SESSION_DIR/cost_prefill.json"
run_for cost_gpt_oss.log 120 python3 bench/expert_mlp_cost.py --rows 16384 --experts 32 --hidden 2880 --ffn 2880 \
  --out "$SESSION_DIR/cost_gpt_oss.json"
echo "all $(elapsed) s"
finish
