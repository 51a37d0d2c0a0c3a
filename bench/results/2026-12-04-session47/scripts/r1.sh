#!/usr/bin/env bash
# Session 47, r1 (one GPU): the forward's refusal of a fully_shard over the experts, under the GPU machine's torch
# (its FSDP2 internals), CPU gloo tests there; the DDP GPU test beside it, two ranks sharing the GPU.
# usage: bash bench/results/2026-12-04-session47/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
build
tests fsdp.log 200 test_layers.py -k "fsdp or ddp"
echo "all $(elapsed) s"
finish
