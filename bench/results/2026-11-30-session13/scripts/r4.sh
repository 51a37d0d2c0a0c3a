#!/usr/bin/env bash
# session 13 run4 (1 GPU): probe_ranks.py (3 and 4 ranks of the nvshmem backend on GPU 0), stdout and stderr.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -30 $O/build.log; exit 1; }
CUDA_VISIBLE_DEVICES=0 timeout 330 python3 bench/results/2026-11-30-session13/scripts/probe_ranks.py > $O/probe.log 2>&1
grep -E "^== |Error|error|Timeout" $O/probe.log | head -60
