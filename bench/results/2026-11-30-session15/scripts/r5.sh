#!/usr/bin/env bash
# r5 (2 GPUs, the last ~2 minutes of device time): after the review's mends (the combine applies the dispatch's
# copy of the weights; lead bounded; inf sums stay inf; a put sends a sum whole; top-16 case), the weighted GPU
# test on 2 ranks under each LARGEEP_TUNE low-latency path, as far as the time goes. Output: r5.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=60
O=$1; R=$O/r5; mkdir -p $R
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && python3 -m pytest -v -ra -m gpu -k "test_low_latency_weighted and 2-" . -p no:cacheprovider 2>&1 | tee $R/tests.log | grep -E "PASSED|FAILED|Error|passed|failed")
(cd $O && tar czf r5.tar.gz r5)
