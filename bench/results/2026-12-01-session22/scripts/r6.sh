#!/usr/bin/env bash
# Session 22, r6 (one GPU): the review's low-latency fixes: build; test_low_latency_hook_capture (new, one rank);
# the low-latency GPU tests with 2 ranks on the GPU (LARGEEP_TEST_EMULATE_GPUS=2): test_low_latency_gpu (its hook
# cases now drop the combine's weights before the hook), the graph and double-buffer test, the weighted tests.
# usage: bash bench/results/2026-12-01-session22/scripts/r6.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r6}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 240 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "hook_capture or test_low_latency_gpu or graph_and_double or low_latency_weighted" test_gpu.py) > $R/tests_gpu.log 2>&1
echo "tests rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_gpu.log | tail -14
echo "all $(( $(date +%s) - t0 )) s"
pack
