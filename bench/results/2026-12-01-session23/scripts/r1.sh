#!/usr/bin/env bash
# Session 23, r1 (one GPU): the work of session 22 that had not run on a GPU: build; the layer and pipeline GPU tests
# (the eager ops backward's lazy topk_idx read, a071d5c/1557b1e) and the low-latency hook tests (c834fe0's hook
# capture state), both with 2 ranks on the GPU (LARGEEP_TEST_EMULATE_GPUS=2).
# usage: bash bench/results/2026-12-01-session23/scripts/r1.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r1}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 180 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "nvshmem or cuda_graph or decode" test_layers.py) > $R/tests_layers.log 2>&1
echo "layers rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_layers.log | tail -14
(cd tests && timeout 260 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "hook_capture or test_low_latency_gpu or graph_and_double or low_latency_weighted" test_gpu.py) > $R/tests_gpu.log 2>&1
echo "ll rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_gpu.log | tail -14
echo "all $(( $(date +%s) - t0 )) s"
pack
