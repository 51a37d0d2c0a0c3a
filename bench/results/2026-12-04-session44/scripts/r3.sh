#!/usr/bin/env bash
# Session 44, r3 (one GPU): the copy-engine combine in at most 4 pieces a source, and ranks that mix it with the
# fused kernel, on ranks sharing the GPU (results checked, nothing timed): two ranks, every copy-engine test; four
# ranks, the normal-mode and mixed cases; then, two ranks again, the calls that read the status words a reporting
# notify now extends (void rounds of refused or disagreeing ranks, num_worst_tokens).
# usage: bash bench/results/2026-12-04-session44/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
build
tests ce2.log 200 test_gpu.py -k "copy_engines"
LARGEEP_TEST_EMULATE_GPUS=4 tests ce4.log 200 test_gpu.py -k "normal_gpu_copy_engines"
tests status.log "$(left 540)" test_gpu.py -k "kinds_disagree or lone_refusal or worst or layout_id_check"
echo "all $(elapsed) s"
finish
