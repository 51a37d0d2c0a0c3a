#!/usr/bin/env bash
# Session 26, r7 (one GPU): after the second look at the change: the eager ops' second derivatives through the one
# autograd Function that now records either map of a handle (2 ranks on the GPU), and the too-many-tokens refusal
# (3 ranks on the GPU) after the id-check helper was shared.
# usage: bash bench/results/2026-12-01-session26/scripts/r7.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r7}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
P="python3 -m pytest -v -ra -p no:cacheprovider"
(cd tests && LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1 timeout -s INT -k 10 60 $P -m gpu test_ops.py -k second_derivative) > $R/ops.log 2>&1
echo "ops rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/ops.log | tail -4
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 timeout -s INT -k 10 50 $P test_errors.py -k "too_many_tokens_on_some and one-gpu") > $R/refuse.log 2>&1
echo "refuse rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/refuse.log | tail -4
pack
