#!/usr/bin/env bash
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -40 $O/build.log; exit 1; }
timeout 100 python3 bench/low_latency_times.py --nprocs 2 --out $O/perf > $O/perf_ll_ep2.log 2>&1; echo "rc $?" >> $O/perf_ll_ep2.log
grep -E "^(dispatch|combine|graph)" $O/perf_ll_ep2.log | grep -E " (1|128) " 
