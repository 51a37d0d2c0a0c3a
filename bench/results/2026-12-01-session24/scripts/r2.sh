#!/usr/bin/env bash
# Session 24, r2 (one GPU): a failed Buffer's normal-mode kernels no longer raise the flags that announce rows or
# partial sums (test_late_peer_gets_no_stale_sums), and a dispatch out of memory for its outputs drains its round
# (test_dispatch_outputs_out_of_memory); with the tests around them (refusals and void rounds, missing peers,
# num_worst_tokens, zero-copy, two emulated nodes, four ranks) and the bad-input table on the GPU; 2 ranks sharing it.
# usage: bash bench/results/2026-12-01-session24/scripts/r2.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r2}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
(cd tests && timeout 200 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_gpu.py -k "out_of_memory or late_peer or missing_peer") > $R/tests_new.log 2>&1
echo "new rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_new.log | tail -8
(cd tests && timeout 240 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_gpu.py -k "worst or layout_id or zero_copy or stream_edges or normal_gpu or internode or normal_four_ranks or destroy_without") > $R/tests_around.log 2>&1
echo "around rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_around.log | tail -8
(cd tests && timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_errors.py) > $R/tests_errors.log 2>&1
echo "errors rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_errors.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
