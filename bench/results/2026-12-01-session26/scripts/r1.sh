#!/usr/bin/env bash
# Session 26, r1 (one GPU): session 25's CPU-only changes on the GPU. Build; with 2 ranks on the GPU:
# test_failed_reduce_launch (the combine's guard: push + reduce interrupted between its launches) with the failed
# copy-out, late-peer and internode tests; the layers', ops' and gate's GPU tests (slot layout in the state dict, the
# compiled gate's capacity check); then the rest of test_gpu.py.
# usage: bash bench/results/2026-12-01-session26/scripts/r1.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=90 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r1}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
nvidia-smi > $R/nvidia-smi.txt 2>&1
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 100 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_gpu.py -k "failed_reduce or failed_copyout or late_peer or internode") > $R/guard.log 2>&1
echo "guard rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/guard.log | tail -8
(cd tests && timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_layers.py test_ops.py test_gate.py) > $R/layers.log 2>&1
echo "layers rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/layers.log | tail -8
(cd tests && timeout 250 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_gpu.py -k "not (failed_reduce or failed_copyout or late_peer or internode)") > $R/gpu.log 2>&1
echo "gpu rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/gpu.log | tail -12
echo "all $(( $(date +%s) - t0 )) s"
pack
