#!/usr/bin/env bash
# Session 23, r2 (one GPU): the review fixes: build (bindings abi 8); the new GPU tests (test_abandoned_round: a
# dispatch raising between its sends and its copy-out; test_normal_worst_graph_torch_one_rank: the torch backend's
# fresh num_worst_tokens dispatch in a CUDA graph) and the normal-mode GPU tests around the changed code (2 ranks on
# the GPU; the internode ones with nodes emulated, for the signal's fence); the refusal tests (void rounds); the
# placement CPU tests on this machine's torch (2.11: table_route under torch.compile(fullgraph=True)).
# usage: bash bench/results/2026-12-01-session23/scripts/r2.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r2}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 280 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "abandoned or worst_graph or normal_gpu or internode or zero_copy or worst_tokens_too_small or missing_peer_times_out" test_gpu.py) > $R/tests_gpu.log 2>&1
echo "test_gpu rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_gpu.log | tail -12
(cd tests && timeout 80 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "one_rank_refuses_one_gpu" test_errors.py) > $R/tests_errors.log 2>&1
echo "refusals rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_errors.log | tail -6
(cd tests && timeout 100 python3 -m pytest -v -ra -p no:cacheprovider -m "not gpu" test_placement.py "test_layers.py::test_placement_compiled" test_errors.py -k "placement or table_route or tune or review_edges") > $R/tests_cpu.log 2>&1
rc=$?; echo "cpu (torch $(python3 -c 'import torch;print(torch.__version__)')) rc=$rc $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_cpu.log | tail -6
echo "all $(( $(date +%s) - t0 )) s"
pack
