#!/usr/bin/env bash
# Session 22, r7 (one GPU): the ops fixes (a071d5c) on the GPU: build; the layer and pipeline GPU tests (eager and
# custom ops, CUDA-graph decode step) with 2 ranks on the GPU (LARGEEP_TEST_EMULATE_GPUS=2).
# usage: bash bench/results/2026-12-01-session22/scripts/r7.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r7}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "nvshmem or cuda_graph or decode" test_layers.py) > $R/tests_layers.log 2>&1
echo "tests rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_layers.log | tail -12
echo "all $(( $(date +%s) - t0 )) s"
pack
