#!/usr/bin/env bash
# Session 24, r1 (one GPU): the tests changed in session 23 that had not yet run on a GPU: the stricter FP8 check in the
# low-latency GPU tests, test_normal_gpu_repeat_identical's rerun comparison, finished_calls_on_streams, and the
# property tests; 2 ranks sharing the GPU.
# usage: bash bench/results/2026-12-01-session24/scripts/r1.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r1}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
(cd tests && timeout 300 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_gpu.py -k "low_latency_gpu or four_ranks or repeat_identical or finished_calls or put_path or graph_and_double or low_latency_weighted") > $R/tests_gpu.log 2>&1
echo "gpu rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_gpu.log | tail -8
(cd tests && timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_property.py) > $R/tests_property.log 2>&1
echo "property rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_property.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
