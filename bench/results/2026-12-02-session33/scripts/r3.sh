#!/usr/bin/env bash
# Session 33, r3 (one GPU; test ranks share it). The low-latency round marked abandoned when a call raises after its
# send (new test), creation and destroy after the runtime's alloc waits on its own stream (runtime cycles, destroy
# tests, the error table's creation rows), grouped_mm's argument checks on the GPU (test_ops), the layers.
# usage: bash bench/results/2026-12-02-session33/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
build
tests gpu_sel.log 150 test_gpu.py -k "raised_after_send or runtime_cycles or destroy or hook_capture or not_finite"
tests errors.log 100 test_errors.py
tests ops_layers.log "$(left 420)" test_ops.py test_layers.py
echo "all $(elapsed) s"
finish
