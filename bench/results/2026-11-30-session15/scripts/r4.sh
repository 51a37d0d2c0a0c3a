#!/usr/bin/env bash
# r4 (2 GPUs): the rowmap 16-byte aligned (r3: misaligned int4 loads when E/N * N*M is not a multiple of 4); the
# weighted, property and low-latency reference GPU tests. Output: r4.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; R=$O/r4; mkdir -p $R
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 165 python3 -m pytest -q -ra -m gpu -k "weighted or property or test_low_latency_gpu" --durations=5 . -p no:cacheprovider) > $R/tests.log 2>&1
grep -E "passed|failed|FAILED|Error" $R/tests.log | tail -8
(cd $O && tar czf r4.tar.gz r4 && rm -rf r4)
