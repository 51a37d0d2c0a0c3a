#!/usr/bin/env bash
# Session 22, r5 (one GPU): the final tree, the test_gpu.py tests that r4's time limit cut (those after
# test_low_latency_many_destinations_one_gpu, less the 34- and 40-rank tests and the 32-rank wide-node test), with
# r4's settings: calls in rounds (the new empty-y combine among them) on the nvshmem and torch backends, and the
# low-latency tests with 4 ranks on the GPU.
# usage: bash bench/results/2026-12-01-session22/scripts/r5.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r5}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 300 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "tokens_per_round or low_latency_bf16_partial_sums_four_ranks or low_latency_four_ranks_shared" test_gpu.py) > $R/tests_gpu.log 2>&1
echo "test_gpu rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_gpu.log | tail -10
echo "all $(( $(date +%s) - t0 )) s"
pack
