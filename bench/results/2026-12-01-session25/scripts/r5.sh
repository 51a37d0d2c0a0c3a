#!/usr/bin/env bash
# Session 25, r5 (one GPU): the FP8 kind bit in low-latency rows. Build; with 2 ranks on the GPU:
# test_low_latency_fp8_disagree, every low-latency test again (the bit is in every row's metadata), the bad-input
# table's low-latency rows and the property tests; without emulation: the
# 12 ranks on the GPU of test_low_latency_many_destinations_one_gpu (FP8 and BF16 rows, both paths).
# usage: bash bench/results/2026-12-01-session25/scripts/r5.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=90
O=$1; N=${2:-r5}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
run() {  # name timeout pytest-args...
  local name=$1 to=$2; shift 2
  (cd tests && timeout $to python3 -m pytest -v -ra -p no:cacheprovider -m gpu "$@") > $R/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/$name.log | tail -8
}
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
LARGEEP_TEST_SHARED_GPUS=1 run shared 150 test_gpu.py -k "many_destinations_one_gpu"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
run ll 260 test_gpu.py -k "low_latency and not many_ranks and not four_ranks"
run table 60 -k "nvshmem-nccl and low_latency" test_errors.py
run property 80 test_property.py
echo "all $(( $(date +%s) - t0 )) s"
pack
