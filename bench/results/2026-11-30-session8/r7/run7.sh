#!/usr/bin/env bash
# session 8 run7 (final tree): the GPU tests of the layers, ops and expert TP, the finished-call and dispatch tests;
# the few-experts layer's parts with comm_beside_experts against experts_carveout
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -40 $O/build.log; exit 1; }
(cd tests && LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 200 python3 -m pytest -q -m gpu test_layers.py test_ops.py test_expert_tp.py "test_gpu.py::test_finished_calls_on_streams" "test_gpu.py::test_normal_gpu" -p no:cacheprovider > $O/tests.log 2>&1; tail -3 $O/tests.log | tee -a $O/summary.txt)
timeout 100 python3 bench/layer_times.py --preset few_experts --variants no_overlap,chunked_2,comm_only,experts_only,experts_carveout,comm_beside_experts --out $O/layer > $O/layer.log 2>&1
grep -E "^(no_overlap|chunked|comm|experts)" $O/layer.log | tee -a $O/summary.txt
grep -o '"overlap_of_independent_parts": [0-9.]*\|"independent_parts_speedup": [0-9.]*' $O/layer.log | tee -a $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
