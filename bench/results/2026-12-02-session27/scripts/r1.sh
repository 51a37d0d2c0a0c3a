#!/usr/bin/env bash
# Session 27, r1 (one GPU, 2 ranks sharing it: results checked, no link timed). Build; then
#  (a) the low-latency GPU tests (the combine's ids taken from the dispatch, counts bounded, hooks marked after
#      their receive, the new op codes) and the ops' weighted low-latency test;
#  (b) the layers', ops' and gate's GPU tests (seeded expert init, chunk views not 16-byte aligned, interleaved
#      steps, the static cap of table_route under capture);
#  (c) the rest of test_gpu.py, as far as the time allows.
# timeout -s INT: pytest still prints its summary when cut.
# usage: bash bench/results/2026-12-02-session27/scripts/r1.sh $OUT [name]
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
(cd tests && timeout -s INT -k 20 170 $P test_gpu.py -k "low_latency or hook") > $R/a_ll.log 2>&1
echo "a rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/a_ll.log | tail -8
(cd tests && timeout -s INT -k 20 120 $P test_layers.py test_ops.py test_gate.py test_placement.py) > $R/b_layers.log 2>&1
echo "b rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/b_layers.log | tail -8
left=$(( 560 - ($(date +%s) - t0) ))
(cd tests && timeout -s INT -k 15 $left $P test_gpu.py -k "not (low_latency or hook)") > $R/c_gpu.log 2>&1
echo "c rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/c_gpu.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
