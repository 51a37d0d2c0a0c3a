#!/usr/bin/env bash
# r2 (2 GPUs): low_latency_dispatch(topk_weights=) -- the combine summing each token's rows on the experts' rank.
# Builds the new tree and the tree before it (old, /tmp/A; ab/oldtree = git archive 85d1314 CMakeLists.txt setup.py
# pyproject.toml csrc python); runs the new GPU tests (weighted) and the property tests; then kernel and graph
# times at 1 and 128 tokens: new with weights (w), new without (u), old, twice, alternated. Output: r2.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; R=$O/r2; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r2.tar.gz r2); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $R/build_old.log 2>&1) || { tail -30 $R/build_old.log; pack; exit 1; }
echo "builds $(( $(date +%s) - t0 )) s"
(cd tests && timeout 170 python3 -m pytest -q -ra -m gpu -k "weighted or property" --durations=10 . -p no:cacheprovider) > $R/weighted_tests.log 2>&1
tail -15 $R/weighted_tests.log
echo "tests $(( $(date +%s) - t0 )) s"
for run in w1 u1 old1 w2 u2 old2; do
  P=; W=
  [[ $run == old* ]] && P=/tmp/A
  [[ $run == w* ]] && W=--weighted
  PYTHONPATH=$P timeout 50 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,128 $W --out $R/ll_$run > $R/ll_$run.log 2>&1
  echo "== $run"; grep -E "^(dispatch_hook|combine_hook|graph_back)" $R/ll_$run.log
done
echo "all $(( $(date +%s) - t0 )) s"
pack
