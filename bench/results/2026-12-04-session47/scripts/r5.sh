#!/usr/bin/env bash
# Session 47, r5 (one GPU): examples/train_moe.py on one GPU (NCCL, nvshmem backend): 20 steps with re-plans and a
# save, a resume to 30, and an uninterrupted 30 steps beside it (r4's script ran a shell function under timeout).
# usage: bash bench/results/2026-12-04-session47/scripts/r5.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r5}" emulate
build
TRAIN=(python3 -m torch.distributed.run --standalone --nproc-per-node 1 examples/train_moe.py --replan-every 5)
run_for train_save.log 120 "${TRAIN[@]}" --steps 20 --save "$SESSION_DIR/ck.pt"
run_for train_resume.log 120 "${TRAIN[@]}" --steps 30 --resume "$SESSION_DIR/ck.pt"
run_for train_whole.log 120 "${TRAIN[@]}" --steps 30
rm -f "$SESSION_DIR/ck.pt"
echo "all $(elapsed) s"
finish
