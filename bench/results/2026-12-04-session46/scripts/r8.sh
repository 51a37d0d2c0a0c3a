#!/usr/bin/env bash
# Session 46, r8 (one GPU): after the review's refactor of the data-parallel test bodies and clip_grad_norm_'s
# single walk: the DDP, clip and serving GPU tests once more, two ranks sharing the GPU.
# usage: bash bench/results/2026-12-04-session46/scripts/r8.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r8}" emulate
build
tests review.log 200 test_layers.py -k "ddp or clip or serve or autocast"
echo "all $(elapsed) s"
finish
