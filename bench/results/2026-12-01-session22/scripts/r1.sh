#!/usr/bin/env bash
# Session 22, r1 (one GPU): build; session 21's GPU tests that had not run (many destinations with the BF16 twins,
# the low-latency missing peer with both ranks on the GPU) and the normal missing peer after c70f668's refactor
# (LARGEEP_TEST_EMULATE_GPUS=2); calls in rounds on the nvshmem backend (4 ranks on the GPU) and on the torch
# backend with CUDA tensors (one rank, NCCL).
# usage: bash bench/results/2026-12-01-session22/scripts/r1.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r1}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "$(nvidia-smi -L | wc -l) GPUs; build $(( $(date +%s) - t0 )) s"
t() {  # name, env, -k expression
  (cd tests && env $2 timeout 170 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "$3" test_gpu.py) > $R/tests_$1.log 2>&1
  echo "$1 rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_$1.log | tail -6
}
t a LARGEEP_TEST_SHARED_GPUS=1 "many_destinations"
t b LARGEEP_TEST_EMULATE_GPUS=2 "missing_peer_times_out"
t c LARGEEP_TEST_SHARED_GPUS=1 "tokens_per_round_one_gpu or tokens_per_round_torch_one_rank"
echo "all $(( $(date +%s) - t0 )) s"
pack
