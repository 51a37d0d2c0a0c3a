#!/usr/bin/env bash
# Session 28, r1 (one GPU, 2 ranks sharing it: results checked, no link timed). Build; then
#  (a) the layers', ops', gate's and placement's GPU tests (session 27's last layers change, 98e6471, untested there);
#  (b) test_gpu.py, as far as the time allows.
# timeout -s INT: pytest still prints its summary when cut.
# usage: bash bench/results/2026-12-02-session28/scripts/r1.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=90 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r1}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
nvidia-smi > $R/nvidia-smi.txt 2>&1
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
P="python3 -m pytest -v -ra -p no:cacheprovider --durations=8 -m gpu"
(cd tests && timeout -s INT -k 20 150 $P test_layers.py test_ops.py test_gate.py test_placement.py) > $R/a_layers.log 2>&1
echo "a rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/a_layers.log | tail -8
left=$(( 560 - ($(date +%s) - t0) ))
(cd tests && timeout -s INT -k 15 $left $P test_gpu.py) > $R/b_gpu.log 2>&1
echo "b rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/b_gpu.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
