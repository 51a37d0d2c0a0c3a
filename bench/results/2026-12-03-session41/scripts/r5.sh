#!/usr/bin/env bash
# Session 41, r5 (one GPU): the second review's fixes. The host wait's stream query now runs in the relaxed capture
# mode: the CUDA-fault test again, and the CUDA-graph tests (captures beside host waits); a num_worst_tokens
# dispatch on GPUs voids its round only for too many tokens: the error table on the nvshmem backend (every rank's
# Buffer usable after each row) and the lone refusals; MoELayer's node limit only under home-node groups: the
# layer GPU tests.
# usage: bash bench/results/2026-12-03-session41/scripts/r5.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r5}"
build
tests fault.log 60 test_gpu.py -k "host_wait_sees_cuda_fault"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=5
tests errors.log 100 test_errors.py -k "nvshmem"
tests lone.log 60 test_gpu.py -k "lone_refusal"
tests graphs.log 100 test_gpu.py -k "graph or capture"
tests layers.log "$(left 300)" test_layers.py
echo "all $(elapsed) s"
finish
