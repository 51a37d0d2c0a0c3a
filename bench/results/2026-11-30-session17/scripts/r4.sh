#!/usr/bin/env bash
# r4 (2 GPUs): the review mends of bf16_partial_sums (the exact-value body with two unweighted rounds first).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; R=$O/r4; mkdir -p $R
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 300 python3 -m pytest -q -ra -m gpu -k "bf16_partial_sums or ops_weighted or test_low_latency_weighted" --durations=8 . -p no:cacheprovider) > $R/tests.log 2>&1
grep -E "passed|failed|FAILED|Error" $R/tests.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
