#!/usr/bin/env bash
# Session 25, r2 (one GPU): the review fixes. Build; the one-GPU refusals and void rounds (void_round helper in the
# normal kernels); with 2 ranks on the GPU (emulation): every low-latency test (the round words now
# round * (max_tokens + 1) + count; test_low_latency_rounds_past_2_31), the normal-mode tests of void rounds, kinds
# and late peers, the bad-input table's low-latency rows, the layers' strided input (and the torch rows skipped
# under emulation by conftest), the property tests.
# usage: bash bench/results/2026-12-01-session25/scripts/r2.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r2}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
run() {  # name timeout pytest-args...
  local name=$1 to=$2; shift 2
  (cd tests && timeout $to python3 -m pytest -v -ra -p no:cacheprovider -m gpu "$@") > $R/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/$name.log | tail -8
}
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
LARGEEP_TEST_SHARED_GPUS=1 run one_gpu 100 -k one_gpu test_errors.py
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
run ll 240 test_gpu.py -k "low_latency and not many_ranks and not four_ranks"
run normal 150 test_gpu.py -k "kinds_disagree or late_peer or (normal_gpu and nvshmem and not repeat) or internode"
run table 90 -k "nvshmem-nccl and low_latency" test_errors.py
run layers 120 -rs test_layers.py -k "chunked or strided or decode"
run property 90 test_property.py
echo "all $(( $(date +%s) - t0 )) s"
pack
