#!/usr/bin/env bash
# Session 23, r3 (one GPU): r2's two failures were the new tests' own mistakes (a list summed as a tensor; the torch
# backend's one-rank test run with LARGEEP_TEST_EMULATE_GPUS, which makes "nccl" pools gloo groups on the CPU), and
# its CPU tests ran out of time in test_placement_compiled: build; test_abandoned_round with 2 ranks on the GPU;
# test_normal_worst_graph_torch_one_rank without emulation (one rank, NCCL, CUDA tensors); test_placement_compiled
# on this machine's torch (2.11).
# usage: bash bench/results/2026-12-01-session23/scripts/r3.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r3}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1 timeout 100 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "abandoned" test_gpu.py) > $R/tests_abandoned.log 2>&1
echo "abandoned rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_abandoned.log | tail -4
(cd tests && timeout 100 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "worst_graph_torch_one_rank" test_gpu.py) > $R/tests_torch_graph.log 2>&1
echo "torch graph rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_torch_graph.log | tail -4
(cd tests && timeout 240 python3 -m pytest -v -ra -p no:cacheprovider "test_layers.py::test_placement_compiled") > $R/tests_cpu.log 2>&1
echo "placement_compiled rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_cpu.log | tail -4
echo "all $(( $(date +%s) - t0 )) s"
pack
