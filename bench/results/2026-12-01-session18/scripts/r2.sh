#!/usr/bin/env bash
# r2 (1 GPU; the 2-GPU kind was not lent then): normal mode beyond 32 ranks. Build this tree; the 40-rank test
# with every rank on GPU 0 (40 NVSHMEM PEs on one GPU); the one-GPU and shared-GPU tests that fit one GPU.
# Output: r2.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; R=$O/r2; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r2.tar.gz r2 && rm -rf r2); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
nvidia-smi -L > $R/gpus.txt
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=90 timeout 420 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "normal_many_ranks" --durations=5 test_gpu.py) > $R/many_ranks.log 2>&1
grep -E "passed|failed|FAILED|Error|error" $R/many_ranks.log | tail -12
echo "many ranks $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 200 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "one_gpu" --durations=5 .) > $R/one_gpu_tests.log 2>&1
grep -E "passed|failed|FAILED" $R/one_gpu_tests.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
