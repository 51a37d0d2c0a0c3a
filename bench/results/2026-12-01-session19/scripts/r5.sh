#!/usr/bin/env bash
# r5 (1 GPU): normal mode beyond 32 nodes (up to 64 nodes, 512 ranks). Build this tree; the 40-rank test, now also
# as 40 nodes of 1 (the per-token loops over nodes 32 at a time: rdma_send<true>, reduce_token_many); the 32-rank
# wide-node test (reduce_token_many's other-node partials, now in chunks). Every kernel of groups of at most 32
# nodes and 8 ranks per node compiles to the same SASS as before (scripts/sass_diff.sh fae361d). Output: r5.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; R=$O/r5; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r5.tar.gz r5 && rm -rf r5); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=90 timeout 330 python3 -m pytest -v -ra --tb=short -p no:cacheprovider -m gpu -k "normal_many_ranks or wide_nodes" --durations=5 test_gpu.py) > $R/tests.log 2>&1
grep -E "PASSED|FAILED|passed|failed|Error" $R/tests.log | tail -20
echo "all $(( $(date +%s) - t0 )) s"
pack
