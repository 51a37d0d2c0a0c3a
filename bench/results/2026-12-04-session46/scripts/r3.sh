#!/usr/bin/env bash
# Session 46, r3 (one GPU): DDP over the replicated parameters + expert parallelism on CUDA (nvshmem backend),
# two SGD steps against the dense model, two ranks sharing the GPU (a gloo group: DDP's all-reduces over gloo).
# usage: bash bench/results/2026-12-04-session46/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
build
tests ddp.log 200 test_layers.py -k ddp
echo "all $(elapsed) s"
finish
