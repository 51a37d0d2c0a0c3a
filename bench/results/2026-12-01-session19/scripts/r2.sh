#!/usr/bin/env bash
# r2 (1 GPU): nodes of up to 32 ranks in the normal mode. Build this tree; the new 32-rank test (one node of 32, 2
# nodes of 16; top-24 so that the reductions read their sources in batches); the 40-rank test and the one-GPU tests
# again (every kernel of nodes of <= 8 ranks compiles to the same SASS as before, checked locally). Output: r2.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; R=$O/r2; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r2.tar.gz r2 && rm -rf r2); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=90 timeout 300 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "wide_nodes" --durations=5 test_gpu.py) > $R/wide_nodes.log 2>&1
grep -E "passed|failed|FAILED|Error|error" $R/wide_nodes.log | tail -20
echo "wide nodes $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 150 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "one_gpu" .) > $R/one_gpu_tests.log 2>&1
grep -E "passed|failed|FAILED" $R/one_gpu_tests.log | tail -8
echo "one-GPU tests $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=90 timeout 200 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "normal_many_ranks" test_gpu.py) > $R/many_ranks.log 2>&1
grep -E "passed|failed|FAILED|Error|error" $R/many_ranks.log | tail -12
echo "all $(( $(date +%s) - t0 )) s"
pack
