#!/usr/bin/env bash
# Session 24, r5 (one GPU): the kind of rows in the count exchange. Build; the refusals with 2 or 4 ranks on the GPU
# (LARGEEP_TEST_SHARED_GPUS=1, no emulation); with 2 ranks on the GPU (emulation): the bad-input table's dispatch
# cases on nvshmem (dispatch_ranks_disagree_on_dtype / _on_fp8 among them), test_kinds_disagree_without_wait,
# the normal-mode tests around the count exchange (one node, emulated nodes, num_worst_tokens, zero-copy), the late
# peer and out-of-memory tests again, and the property tests.
# usage: bash bench/results/2026-12-01-session24/scripts/r5.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r5}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 timeout 100 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "one_rank_refuses_one_gpu" test_errors.py) > $R/tests_refusals.log 2>&1
echo "refusals rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_refusals.log | tail -6
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
(cd tests && timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "nvshmem-nccl and dispatch" test_errors.py) > $R/tests_table.log 2>&1
echo "table rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_table.log | tail -6
(cd tests && timeout 200 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_gpu.py -k "kinds_disagree or late_peer or out_of_memory or (normal_gpu and nvshmem) or internode or worst_tokens or zero_copy or (four_ranks and normal)") > $R/tests_gpu.log 2>&1
echo "gpu rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_gpu.log | tail -6
(cd tests && timeout 100 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_property.py) > $R/tests_property.log 2>&1
echo "property rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_property.log | tail -4
echo "all $(( $(date +%s) - t0 )) s"
pack
