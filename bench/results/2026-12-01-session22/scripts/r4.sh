#!/usr/bin/env bash
# Session 22, r4 (one GPU): the session's final tree: build; the refusal tests of test_errors.py with the ranks on the
# GPU (one_rank_refuses_one_gpu, the new worst_all variant among them) and the unchecked-ids test; test_gpu.py's GPU
# tests with 2 ranks on the GPU (LARGEEP_TEST_EMULATE_GPUS=2; 4-rank tests with the ranks on the GPU,
# LARGEEP_TEST_SHARED_GPUS=1), less the 34- and 40-rank tests, the 32-rank wide-node test and test_runtime_cycles
# (see session 19: "invalid device ordinal" under the emulation, or too long for one call); then the long-run,
# create/destroy and two-group tests on the nvshmem backend (LARGEEP_TEST_ROUNDS=300) and the layer tests.
# usage: bash bench/results/2026-12-01-session22/scripts/r4.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r4}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 130 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "one_rank_refuses_one_gpu or unchecked_out_of_range" test_errors.py) > $R/tests_errors.log 2>&1
echo "refusals rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_errors.log | tail -8
(cd tests && timeout 290 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "not many_ranks and not wide_nodes and not runtime_cycles" test_gpu.py) > $R/tests_gpu.log 2>&1
echo "test_gpu rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_gpu.log | tail -8
(cd tests && LARGEEP_TEST_ROUNDS=300 timeout 120 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "nvshmem or create_destroy or side_by_side" test_long_run.py test_layers.py) > $R/tests_more.log 2>&1
echo "long run / layers rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_more.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
