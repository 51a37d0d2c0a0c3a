#!/usr/bin/env bash
# Session 24, r7 (one GPU): build; the rest of the bad-input table on the nvshmem backend (creation, layout,
# combine, low-latency rows) with 2 ranks on the GPU (emulation), now that its tensors are made on the Buffer's device.
# usage: bash bench/results/2026-12-01-session24/scripts/r7.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r7}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
(cd tests && timeout 120 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "nvshmem-nccl and not dispatch" test_errors.py) > $R/tests_table.log 2>&1
echo "table rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_table.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
