#!/usr/bin/env bash
# Session 23, r4 (one GPU): build; test_abandoned_round (its assertion fixed) with 2 ranks on the GPU; the layer and
# pipeline GPU tests after the ops change for torch.inference_mode (2 ranks on the GPU); test_inference_mode and the
# expert-TP CPU tests on this machine's torch (2.11).
# usage: bash bench/results/2026-12-01-session23/scripts/r4.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r4}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
(cd tests && timeout 100 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "abandoned" test_gpu.py) > $R/tests_abandoned.log 2>&1
echo "abandoned rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_abandoned.log | tail -4
(cd tests && timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "nvshmem or cuda_graph or decode" test_layers.py) > $R/tests_layers.log 2>&1
echo "layers rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_layers.log | tail -8
unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS
(cd tests && timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m "not gpu" test_layers.py test_expert_tp.py -k "inference_mode or size_checks or bad_configs") > $R/tests_cpu.log 2>&1
rc=$?; echo "cpu (torch $(python3 -c 'import torch;print(torch.__version__)')) rc=$rc $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_cpu.log | tail -6
echo "all $(( $(date +%s) - t0 )) s"
pack
