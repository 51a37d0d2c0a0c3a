#!/usr/bin/env bash
# r5 (2 GPUs): the low-latency paths that r3/r4 did not reach (the review's list): more tokens than the send's
# blocks (512 and 320 tokens), rows of 16384 channels (more vectors than a block loads ahead, 128 scales), the put
# path with 320 tokens; under the default tune, ll_fuse=1 and ll_spread=0 (test_low_latency_tune).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; mkdir -p $O/r5
R=$O/r5
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -30 $R/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=90 timeout 150 python3 -m pytest -v -ra -m gpu \
  -k "low_latency_gpu or low_latency_tune or put_path" test_gpu.py -p no:cacheprovider) > $R/gpu_tests.log 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed" $R/gpu_tests.log | tail -30
(cd $O && tar czf r5.tar.gz r5 && rm -rf r5)
echo "all done $(( $(date +%s) - t0 )) s"
