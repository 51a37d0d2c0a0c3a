#!/usr/bin/env bash
# Session 23, r5 (one GPU): the low-latency GPU tests after the signal's new fence (launch.cuh set_peer_flag, which
# the put path to peers on other "nodes" takes): build; the put-path, low-latency and 4-rank tests with the ranks on
# the GPU; the calls-in-rounds tests on 2 emulated nodes.
# usage: bash bench/results/2026-12-01-session23/scripts/r5.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r5}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 200 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "put_path or four_ranks_shared or tokens_per_round_one_gpu" test_gpu.py) > $R/tests_gpu.log 2>&1
echo "test_gpu rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_gpu.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
