#!/usr/bin/env bash
# Session 23, r6 (one GPU): the second round of review fixes: build; test_normal_stream_edges (one rank, NCCL: the
# capture refusal, the layout's event, a cross-Buffer previous_event); test_abandoned_round after its guard became a
# decorator, the layer GPU tests after experts_chunk's change (repeated experts) and the row-kernel GPU tests, with
# 2 ranks on the GPU.
# usage: bash bench/results/2026-12-01-session23/scripts/r6.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r6}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 60 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "normal_stream_edges" test_gpu.py) > $R/tests_edges.log 2>&1
echo "edges rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_edges.log | tail -4
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
(cd tests && timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu "test_gpu.py::test_abandoned_round" test_layers.py test_ops.py -k "abandoned or nvshmem or cuda_graph or decode or row or order") > $R/tests_more.log 2>&1
echo "more rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_more.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
