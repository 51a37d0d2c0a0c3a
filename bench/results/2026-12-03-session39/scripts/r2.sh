#!/usr/bin/env bash
# Session 39, r2 (one GPU): num_sms against the real GPU's SM count (1 rank, then 2 sharing), the normal round
# trip on one rank with the torch backend too (a one-rank NCCL group: its CUDA paths, FP8 among them), a rank whose
# process exits before a dispatch (nvshmem, normal and low-latency mode, 2 ranks sharing the GPU), plus the CPU
# form of the latter (torch backend on gloo); the creation tests of the error table on nvshmem (its gathers now
# bounded on gloo).
# usage: bash bench/results/2026-12-03-session39/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}"
build
tests one_rank.log 150 test_gpu.py -k "num_sms_of or normal_gpu_one_rank"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
tests exits.log 300 test_gpu.py -k "num_sms_of or peer_exits"
tests creation.log 200 test_errors.py -k "nvshmem or create"
run_for exits_cpu.log 120 bash -c "cd tests && python3 -m pytest -v -p no:cacheprovider test_errors.py -k peer_exits"
echo "all $(elapsed) s"
finish
