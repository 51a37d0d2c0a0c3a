#!/usr/bin/env bash
# Session 27, r5 (one GPU, 2 ranks sharing it): after the abandoned-round marking became one method, the GPU tests
# of a normal-mode round left open (failed copy-out and reduce launches) and of a low-latency receive that raised.
# usage: bash bench/results/2026-12-02-session27/scripts/r5.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=90 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r5}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout -s INT -k 15 110 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_gpu.py test_errors.py \
  -k "failed_copyout or failed_reduce or receive_raised or hook_that_raised") > $R/a_abandon.log 2>&1
echo "a rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/a_abandon.log | tail -6
pack
