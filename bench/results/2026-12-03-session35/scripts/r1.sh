#!/usr/bin/env bash
# Session 35, r1 (one GPU; test ranks share it). The data flags that carry the sender's kind of rows and handle tag: the new
# mismatch test (cached dispatch FP8/dtype, combine y dtype/weights; push+reduce, fused, two emulated nodes, 2 x 2
# ranks with real forwarders), then
# the normal-mode tests that must see no false report (round trips, zero-copy, worst, late peer, the void-round kinds
# test, several nodes, rounds); round_scale from the exponent bits: the exhaustive quantiser check and the FP8 bits
# tests.
# usage: bash bench/results/2026-12-03-session35/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
run_for micro.log 60 bash -c "nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/fdc bench/micro/fp8_div_check.cu && /tmp/fdc"
build
tests kinds.log 200 test_gpu.py -k "calls_kinds_disagree"
tests normal.log 120 test_gpu.py -k "normal_gpu or zero_copy or test_kinds_disagree or late_peer or worst"
tests nodes.log 100 test_gpu.py -k "internode or four_ranks_shared or tokens_per_round or combine_float32"
tests fp8.log "$(left 570)" test_gpu.py -k "fp8_bits or not_finite or low_latency_gpu"
echo "all $(elapsed) s"
finish
