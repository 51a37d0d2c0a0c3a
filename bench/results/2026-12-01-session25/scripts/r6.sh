#!/usr/bin/env bash
# Session 25, r6 (one GPU): the last review's fixes. Build; with 2 ranks on the GPU: the low-latency tests of the
# combine's output (now record_stream'd on the Buffer's stream: graphs, hooks, two in flight, ops), the round test
# with the combine's round counter moved too, the FP8 kind test, and the low-latency decode layer tests.
# usage: bash bench/results/2026-12-01-session25/scripts/r6.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=90 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r6}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
run() {  # name timeout pytest-args...
  local name=$1 to=$2; shift 2
  (cd tests && timeout $to python3 -m pytest -v -ra -p no:cacheprovider -m gpu "$@") > $R/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/$name.log | tail -8
}
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
run ll 150 test_gpu.py -k "low_latency and (rounds or fp8_disagree or graph or hook or two_in_flight or ops or weighted)"
run layers 60 test_layers.py -k "decode or low_latency"
echo "all $(( $(date +%s) - t0 )) s"
pack
