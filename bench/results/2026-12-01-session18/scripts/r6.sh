#!/usr/bin/env bash
# r6 (1 GPU): the first Buffer refused on every rank when its GPU cannot hold its symmetric memory (memory_reason),
# and the Buffer creation's extra exchange (each rank's free memory) under the existing tests: the new one-GPU test,
# the one-GPU tests, and the 40-rank test. Output: r6.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; R=$O/r6; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r6.tar.gz r6 && rm -rf r6); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
nvidia-smi -L > $R/gpus.txt
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 200 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "one_gpu" --durations=5 .) > $R/one_gpu_tests.log 2>&1
grep -E "passed|failed|FAILED" $R/one_gpu_tests.log | tail -8
echo "one-GPU tests $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=90 timeout 200 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "normal_many_ranks" test_gpu.py) > $R/many_ranks.log 2>&1
grep -E "passed|failed|FAILED" $R/many_ranks.log | tail -4
echo "all $(( $(date +%s) - t0 )) s"
pack
