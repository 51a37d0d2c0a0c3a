#!/usr/bin/env bash
# Session 25, r1 (one GPU): the CPU-only changes of session 24's end, first time on a GPU. Build; without emulation:
# the torch backend's 6-field signature on NCCL (test_normal_worst_graph_torch_one_rank) and the one-GPU refusals
# and void rounds that now hand zero-copy slots back (zc_give_back); with 2 ranks on the GPU (emulation): out of
# memory, failed copy-out, late peer, kinds that disagree, zero-copy and tokens_per_round; the bad-input table's
# nvshmem rows on subgroups; the layers and ops (weighted_row_sum's shape-static backward on CUDA).
# usage: bash bench/results/2026-12-01-session25/scripts/r1.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r1}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
run() {  # name timeout pytest-args...
  local name=$1 to=$2; shift 2
  (cd tests && timeout $to python3 -m pytest -v -ra -p no:cacheprovider -m gpu "$@") > $R/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/$name.log | tail -8
}
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
run torch_graph 90 test_gpu.py -k "normal_worst_graph_torch_one_rank"
LARGEEP_TEST_SHARED_GPUS=1 run one_gpu 120 -k one_gpu test_errors.py
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
run gpu 200 test_gpu.py -k "out_of_memory or failed_copyout or late_peer or kinds_disagree or zero_copy or tokens_per_round"
run table 150 -k "nvshmem-nccl" test_errors.py
run layers 150 test_layers.py test_ops.py
echo "all $(( $(date +%s) - t0 )) s"
pack
