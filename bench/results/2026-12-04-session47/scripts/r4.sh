#!/usr/bin/env bash
# Session 47, r4 (one GPU): the review's fixes (set_placement's per-slot optimizer state of other shapes, the FSDP2
# check's registry key) and the replica counts after a load: the layers' and ops' GPU tests on two ranks sharing
# the GPU; then examples/train_moe.py on one GPU (NCCL, nvshmem backend): 20 steps with re-plans and a save, a
# resume to 30, and an uninterrupted 30 steps beside it.
# usage: bash bench/results/2026-12-04-session47/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}" emulate
build
tests layers_ops.log 300 test_layers.py test_ops.py
train() { python3 -m torch.distributed.run --standalone --nproc-per-node 1 examples/train_moe.py --replan-every 5 "$@"; }
run_for train_save.log 120 train --steps 20 --save "$SESSION_DIR/ck.pt"
run_for train_resume.log 120 train --steps 30 --resume "$SESSION_DIR/ck.pt"
run_for train_whole.log 120 train --steps 30
rm -f "$SESSION_DIR/ck.pt"
echo "all $(elapsed) s"
finish
