#!/usr/bin/env bash
# r12 (2 GPUs): the Inductor ordering wrapper (largeep._inductor_order) on the GPU machine's torch: the custom-op
# weights test (compiled with Inductor on the nvshmem kernels), the decode step in a CUDA graph, the pipelined and
# chunked layers on GPUs; and the wrapper's own test. Output: r12.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; R=$O/r12; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r12.tar.gz r12 && rm -rf r12); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 200 python3 -m pytest -q -ra -k "ops_weighted or decode_step or test_pipeline_gpu or test_layer_chunked_gpu or test_inductor_order or (test_pipeline_compiled and inductor)" --durations=5 . -p no:cacheprovider) > $R/tests.log 2>&1
grep -E "passed|failed|FAILED|Error" $R/tests.log | tail -8
echo "tests $(( $(date +%s) - t0 )) s"
pack
