#!/usr/bin/env bash
# r7 (2 GPUs): the custom-op path with topk_weights (GPU test, the low-latency layer and decode-step tests), then the
# main benchmark's low-latency sweep without and with --ll-send-weights, alternated (SPEC's low-latency config:
# H 7168, top-8, 288 experts, FP8; 1 and 128 tokens per rank). Output: r7.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; R=$O/r7; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r7.tar.gz r7 && rm -rf r7); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 300 python3 -m pytest -q -ra -m gpu -k "ops_weighted or decode_step or test_pipeline_gpu or test_low_latency_weighted" --durations=5 . -p no:cacheprovider) > $R/tests.log 2>&1
grep -E "passed|failed|FAILED|Error" $R/tests.log | tail -8
echo "tests $(( $(date +%s) - t0 )) s"
for run in u1 w1 u2 w2; do
  W=; B=nvshmem,torch
  [[ $run == w* ]] && W=--ll-send-weights
  [[ $run == *2 ]] && B=nvshmem
  timeout 150 python3 -m largeep.bench --modes low_latency --backends $B --tokens 1,128 --no-plots $W --out $R/bench_$run > $R/bench_$run.log 2>&1
  echo "== $run rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^ *(nvshmem|torch) " $R/bench_$run.log | head -30
done
echo "all $(( $(date +%s) - t0 )) s"
pack
