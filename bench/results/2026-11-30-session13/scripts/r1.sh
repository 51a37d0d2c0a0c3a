#!/usr/bin/env bash
# session 13 run1 (2 GPUs): every GPU test on 7ed99b7 (session 12's changes that ran only with 2 ranks on one GPU,
# or not at all); the 4-rank tests with 2 ranks per GPU; the one-GPU tests (up to 4 ranks on GPU 0: refusals,
# random refusals, unchecked ids, property edge cases).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; mkdir -p $O
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -30 $O/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 300 python3 -m pytest -q -ra -m gpu -p no:cacheprovider . > $O/gpu_tests.log 2>&1); tail -1 $O/gpu_tests.log; grep FAILED $O/gpu_tests.log | head
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 80 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k shared_gpus test_gpu.py test_long_run.py > $O/shared_gpus_tests.log 2>&1); tail -1 $O/shared_gpus_tests.log; grep FAILED $O/shared_gpus_tests.log | head
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 100 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "one_gpu or unchecked or layer_checks_ids or some_ranks_refuse" . > $O/one_gpu_tests.log 2>&1); tail -1 $O/one_gpu_tests.log; grep FAILED $O/one_gpu_tests.log | head
echo "tests done $(( $(date +%s) - t0 )) s"
