#!/usr/bin/env bash
# r6 (1 GPU): the final tree (the 40-rank and 32-rank tests now share one helper, with the same calls): build;
# the 40-rank test (5 x 8, 20 x 2, 40 x 1) and the 32-rank wide-node test (1 x 32, 2 x 16). Output: r6.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; R=$O/r6; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r6.tar.gz r6 && rm -rf r6); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=90 timeout 330 python3 -m pytest -v -ra --tb=short -p no:cacheprovider -m gpu -k "normal_many_ranks or wide_nodes" --durations=5 test_gpu.py) > $R/tests.log 2>&1
grep -E "PASSED|FAILED|passed|failed|Error" $R/tests.log | tail -20
echo "all $(( $(date +%s) - t0 )) s"
pack
