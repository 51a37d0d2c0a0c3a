#!/usr/bin/env bash
# Session 47, r6 (one GPU): docs/usage.md's "Your own MoE layer on largeep.ops" recipe on CUDA with the nvshmem
# backend (2 ranks sharing the GPU), every variant, against the float64 dense reference; ops.dispatch's new
# expert_alignment on the GPU paths with it.
# usage: bash bench/results/2026-12-04-session47/scripts/r6.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r6}" emulate
build
tests own_layer.log 300 test_ops.py -k "own_layer or fp8 or strided or second_derivative"
echo "all $(elapsed) s"
finish
