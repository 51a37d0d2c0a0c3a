#!/usr/bin/env bash
# r11 (2 GPUs): the review mends of the low-latency weights (28b1f85): the custom-op weights test on the nvshmem
# kernels (now also under Inductor), the weighted low-latency tests, the decode step in a CUDA graph; then the bench's
# low-latency sweep with --ll-send-weights on nvshmem and torch (torch runs as without). Output: r11.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; R=$O/r11; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r11.tar.gz r11 && rm -rf r11); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 240 python3 -m pytest -q -ra -m gpu -k "ops_weighted or low_latency_weighted or decode_step" --durations=5 . -p no:cacheprovider) > $R/tests.log 2>&1
grep -E "passed|failed|FAILED|Error" $R/tests.log | tail -8
echo "tests $(( $(date +%s) - t0 )) s"
timeout 100 python3 -m largeep.bench --modes low_latency --backends nvshmem,torch --tokens 128 --no-plots --ll-send-weights --out $R/bench_w > $R/bench_w.log 2>&1
echo "bench rc=$? $(( $(date +%s) - t0 )) s"; grep -E "not for|^(nvshmem|torch) .*(dispatch|combine|roundtrip) " $R/bench_w.log
pack
