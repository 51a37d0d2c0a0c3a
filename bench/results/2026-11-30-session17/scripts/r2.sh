#!/usr/bin/env bash
# r2 (2 GPUs): bf16_partial_sums (the low-latency combine's per-rank sums sent as one bf16 row) and the Placement
# default-device fix. GPU tests of the low-latency paths it touches, then kernel times (hook mode) of three trees of
# options alternated: u (no weights), w (--weighted: sums as two bf16 rows), b (--weighted --bf16-partial-sums);
# SPEC's low-latency config (H 7168, top-8, 288 experts, FP8), 1, 32, 128 and 256 tokens. Output: r2.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; R=$O/r2; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r2.tar.gz r2 && rm -rf r2); }
git log --oneline -1 > $R/tree.txt
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 330 python3 -m pytest -q -ra -m gpu -k "bf16_partial_sums or decode_step or low_latency_weighted or ops_weighted or test_low_latency_gpu or put_path or property" --durations=8 . -p no:cacheprovider) > $R/tests.log 2>&1
grep -E "passed|failed|FAILED|Error" $R/tests.log | tail -12
echo "tests $(( $(date +%s) - t0 )) s"
for run in u1 w1 b1 u2 w2 b2; do
  W=
  [[ $run == w* ]] && W=--weighted
  [[ $run == b* ]] && W="--weighted --bf16-partial-sums"
  timeout 60 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,32,128,256 $W --out $R/ll_$run > $R/ll_$run.log 2>&1
  echo "== $run rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(dispatch_hook|combine_hook|graph_back)" $R/ll_$run.log | grep -E " (1|128) " 
done
echo "all $(( $(date +%s) - t0 )) s"
pack
