#!/usr/bin/env bash
# Session 47, r8 (one GPU): the session's final tree: every GPU test of test_layers.py and test_ops.py on two ranks
# sharing the GPU, then the same files' GPU tests on one rank (NCCL), and the training example on one GPU.
# usage: bash bench/results/2026-12-04-session47/scripts/r8.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r8}" emulate
build
tests layers_ops.log 300 test_layers.py test_ops.py
(unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS; tests one.log 200 test_layers.py test_ops.py)
TRAIN=(python3 -m torch.distributed.run --standalone --nproc-per-node 1 examples/train_moe.py --replan-every 5)
run_for train.log 120 "${TRAIN[@]}" --steps 20
echo "all $(elapsed) s"
finish
