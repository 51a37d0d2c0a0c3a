#!/usr/bin/env bash
# r6 (1 GPU): the final tree (rounds code simplified, same behaviour): build; the tokens_per_round one-GPU test.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; R=$O/r6; mkdir -p $R
pack() { (cd $O && tar czf r6.tar.gz r6 && rm -rf r6); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "tokens_per_round_one_gpu" test_gpu.py) > $R/tests.log 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests.log | tail -4
pack
