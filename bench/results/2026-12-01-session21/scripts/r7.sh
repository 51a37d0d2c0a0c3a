#!/usr/bin/env bash
# r7 (1 GPU): the final kernels (destinations in registers, the one-barrier block wait; the publish as before):
# build; the new 12-rank top-16 test (more than 8 destination ranks per token); the 4-rank low-latency tests with
# 4 ranks on the one GPU; the main 2-rank low-latency tests with both ranks on it (LARGEEP_TEST_EMULATE_GPUS=2).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r7}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 120 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "many_destinations" test_gpu.py) > $R/tests_a.log 2>&1
echo "a rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_a.log | tail -4
left=$(( 250 - ($(date +%s) - t0) ))
(cd tests && LARGEEP_TEST_EMULATE_GPUS=2 timeout $left python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "low_latency_four_ranks_shared or (low_latency_gpu and m128) or low_latency_put_path or low_latency_graph" test_gpu.py) > $R/tests_b.log 2>&1
echo "b rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_b.log | tail -14
pack
