#!/usr/bin/env bash
# r3 (1 GPU): the 2-GPU tests with 2 ranks on GPU 0 (LARGEEP_TEST_EMULATE_GPUS=2: "nccl" pools become gloo groups
# with every rank on GPU 0, NVSHMEM's several PEs per GPU): the normal kernels rewritten in session 18 had not run
# the 2-rank suite. Correctness only. Build this tree; test_gpu, test_layers, test_property, test_ops, test_long_run,
# test_bench (-m gpu, but the shared-GPU, one-GPU, many-rank tests run in r1/r2); then test_errors with what time is
# left. Tests of the torch backend on NCCL cannot pass here (gloo). Output: r3.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; R=$O/r3; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r3.tar.gz r3 && rm -rf r3); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
SKIP="not shared_gpus and not one_gpu and not many_ranks and not wide_nodes"
(cd tests && timeout 400 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "$SKIP" --durations=15 \
  test_gpu.py test_layers.py test_property.py test_ops.py test_long_run.py test_bench.py) > $R/tests_a.log 2>&1
echo "a rc=$? $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed" $R/tests_a.log | tail -40
left=$(( 530 - ($(date +%s) - t0) ))
if [ $left -gt 30 ]; then
  (cd tests && timeout $left python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "$SKIP" test_errors.py) > $R/tests_b.log 2>&1
  echo "b rc=$? $(( $(date +%s) - t0 )) s"
  grep -E "^(FAILED|ERROR)|passed|failed" $R/tests_b.log | tail -20
fi
pack
