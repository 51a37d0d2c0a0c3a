#!/usr/bin/env bash
# Session 27, r3 (one GPU, 2 ranks sharing it). Build; then
#  (a) test_low_latency_weighted (now also: ids set to -1 in place after a weighted dispatch, unseen under
#      inference mode: the combine keeps the dispatch's ids);
#  (b) the layers' and ops' GPU tests after the review's fixes (alignment copies in the backward and the custom ops,
#      experts drawn on the GPU, the compiled checkpointing test).
# usage: bash bench/results/2026-12-02-session27/scripts/r3.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=90 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r3}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
P="python3 -m pytest -v -ra -p no:cacheprovider --durations=8 -m gpu"
step() { local name=$1 secs=$2; shift 2; (cd tests && timeout -s INT -k 15 $secs $P "$@") > $R/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/$name.log | tail -6; }
step a_ll 120 test_gpu.py -k "test_low_latency_weighted"
step b_layers 150 test_layers.py test_ops.py
echo "all $(( $(date +%s) - t0 )) s"
pack
