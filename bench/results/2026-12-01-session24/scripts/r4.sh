#!/usr/bin/env bash
# Session 24, r4 (one GPU): one native send for fresh and cached dispatches. Build; the refusal and bad-input tests of
# test_errors.py with the ranks on the GPU (LARGEEP_TEST_SHARED_GPUS=1, no emulation: void rounds, several emulated
# nodes, num_worst_tokens peers); with 2 ranks on the GPU (emulation): the normal-mode tests with cached dispatches
# on one node and on two or four emulated nodes, rounds, the late peer and out-of-memory tests, the nvshmem layer
# tests and the property tests.
# usage: bash bench/results/2026-12-01-session24/scripts/r4.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r4}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "one_gpu" test_errors.py) > $R/tests_errors.log 2>&1
echo "errors rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_errors.log | tail -6
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
(cd tests && timeout 240 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_gpu.py -k "normal_gpu or internode or normal_four_ranks or late_peer or out_of_memory or zero_copy or worst_tokens or repeat_identical or tokens_per_round_one_gpu or stream_edges") > $R/tests_gpu.log 2>&1
echo "gpu rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_gpu.log | tail -6
(cd tests && timeout 120 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_layers.py -k "nvshmem") > $R/tests_layers.log 2>&1
echo "layers rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_layers.log | tail -4
(cd tests && timeout 120 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_property.py) > $R/tests_property.log 2>&1
echo "property rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_property.log | tail -4
echo "all $(( $(date +%s) - t0 )) s"
pack
