#!/usr/bin/env bash
# Session 26, r5 (one GPU): test_runtime_cycles with torch's cache given back before each reading (r3/r4: the fall of
# free memory was torch's per-stream block cache, plateauing once the 32-stream pool came round) and a threshold of
# 8 MiB; with 2 ranks on the GPU.
# usage: bash bench/results/2026-12-01-session26/scripts/r5.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r5}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
P="python3 -m pytest -v -ra -p no:cacheprovider --durations=5 -m gpu"
(cd tests && LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1 timeout -s INT -k 20 120 $P test_gpu.py -k "runtime_cycles") > $R/cycles.log 2>&1
echo "cycles rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed|fell by" $R/cycles.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
