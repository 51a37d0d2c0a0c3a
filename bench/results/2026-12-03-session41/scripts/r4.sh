#!/usr/bin/env bash
# Session 41, r4 (one GPU): (1) a CUDA fault met by a host wait raises its own RuntimeError (r3's test failed only
# because ordering the caller's stream after the failed call raised over it; fixed in buffer.py); (2) lone refusals
# (one rank's call refused for its arguments) on the nvshmem backend, two ranks sharing the GPU: told to the other
# rank where the call can tell it, else the retry pairs correctly; the error table on the nvshmem backend after the
# checks moved into one try; (3) MoELayer with the gate's replica capacity and node-limited routing: the layer GPU
# tests; (4) the normal-mode round trips again.
# usage: bash bench/results/2026-12-03-session41/scripts/r4.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r4}"
build
tests fault.log 60 test_gpu.py -k "host_wait_sees_cuda_fault"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=5
tests lone.log 150 test_gpu.py -k "lone_refusal"
tests errors.log 120 test_errors.py -k "nvshmem"
tests layers.log 120 test_layers.py
tests normal.log "$(left 400)" test_gpu.py -k "(test_normal and not four and not many and not wide) or low_latency_roundtrip"
echo "all $(elapsed) s"
finish
