#!/usr/bin/env bash
# Session 34, r5 (one GPU; test ranks share it). The session's last tree: the layers' and ops' GPU tests (fp8.quantize
# dividing by a tensor on CUDA, expert_order and gather_rows bounds), the low-latency tests r4's cut left out
# (put path onwards), the FP8 bits and layout tests again.
# usage: bash bench/results/2026-12-02-session34/scripts/r5.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r5}" emulate
build
tests ops.log 110 test_ops.py
tests layers.log 150 test_layers.py
tests gpu_ll.log 150 test_gpu.py -k "put_path or many_ranks or many_destinations or fp8_bits or layout_too_large or hook_capture or graph"
echo "all $(elapsed) s"
finish
