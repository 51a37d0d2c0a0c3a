#!/usr/bin/env bash
# session 13 run7 (2 GPUs): NVSHMEM's initialisation now runs in a helper thread (bounded by LARGEEP_TIMEOUT_S), and
# an uneven placement of ranks on GPUs is refused before it: the new test (3 ranks: GPU 0, 1, 0), the one-GPU
# tests (every rank on GPU 0 now), then the 2-GPU tests of test_gpu.py as far as time allows.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -30 $O/build.log; exit 1; }
cd tests
LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=60 timeout 110 python3 -m pytest -v -ra -p no:cacheprovider --durations=5 -m gpu -k "uneven or one_gpu or some_ranks_refuse or unchecked" . > $O/one_gpu_tests.log 2>&1; grep -cE "PASSED" $O/one_gpu_tests.log; grep -E "FAILED|ERROR" $O/one_gpu_tests.log | head; tail -1 $O/one_gpu_tests.log
LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=60 timeout 80 python3 -m pytest -q -ra -p no:cacheprovider -m gpu test_gpu.py > $O/gpu_tests.log 2>&1; grep -E "FAILED|ERROR" $O/gpu_tests.log | head; tail -1 $O/gpu_tests.log
