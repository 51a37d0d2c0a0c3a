#!/usr/bin/env bash
# session 13 run3 (2 GPUs): the one-GPU tests of run1 again, verbose with durations (run1's 100 s limit cut them
# off in the first test): the random refusals on 2 GPUs over NCCL, then up to 4 ranks on GPU 0.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; mkdir -p $O
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -30 $O/build.log; exit 1; }
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 420 python3 -m pytest -v -ra -p no:cacheprovider --durations=0 -m gpu -k "one_gpu or unchecked or layer_checks_ids or some_ranks_refuse" . > $O/one_gpu_tests.log 2>&1); grep -E "PASSED|FAILED|ERROR" $O/one_gpu_tests.log | tail -25; tail -1 $O/one_gpu_tests.log
echo "all done $(( $(date +%s) - t0 )) s"
