#!/usr/bin/env bash
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -40 $O/build.log; exit 1; }
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=60 timeout 120 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "create_destroy_four_ranks" test_long_run.py > $O/shared_create_destroy.log 2>&1; tail -2 $O/shared_create_destroy.log | tee -a $O/summary.txt)
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TEST_ROUNDS=10000 LARGEEP_TIMEOUT_S=60 timeout 380 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "long_run_four_ranks" test_long_run.py > $O/shared_long_run_10000.log 2>&1; tail -2 $O/shared_long_run_10000.log | tee -a $O/summary.txt)
cat $O/summary.txt
