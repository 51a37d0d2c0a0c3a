#!/usr/bin/env bash
# r3 (2 GPUs): the summed combine cut into n pieces, one per entry's warp, every entry's loads in flight at once.
# Builds the new tree and 85d1314 (old, /tmp/A; ab/oldtree = git archive 85d1314 CMakeLists.txt setup.py
# pyproject.toml csrc python); the weighted GPU tests and the property tests; kernel and graph times at 1 and 128
# tokens: new with weights (w), new without (u), old, twice, alternated; then the other GPU tests in the time left.
# Output: r3.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; R=$O/r3; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r3.tar.gz r3 && rm -rf r3); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $R/build_old.log 2>&1) || { tail -30 $R/build_old.log; pack; exit 1; }
echo "builds $(( $(date +%s) - t0 )) s"
(cd tests && timeout 170 python3 -m pytest -q -ra -m gpu -k "weighted or property" --durations=5 . -p no:cacheprovider) > $R/weighted_tests.log 2>&1
grep -E "passed|failed|FAILED|Error" $R/weighted_tests.log | tail -8
echo "tests $(( $(date +%s) - t0 )) s"
for run in w1 u1 old1 w2 u2 old2; do
  P=; W=
  [[ $run == old* ]] && P=/tmp/A
  [[ $run == w* ]] && W=--weighted
  PYTHONPATH=$P timeout 50 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,128 $W --out $R/ll_$run > $R/ll_$run.log 2>&1
  echo "== $run"; grep -E "^(dispatch_hook|combine_hook|graph_back)" $R/ll_$run.log | grep -v "hook  *(dispatch|combine) "
done
left=$(( 580 - ($(date +%s) - t0) ))
echo "a/b done $(( $(date +%s) - t0 )) s; $left s for the other GPU tests"
(cd tests && timeout $left python3 -m pytest -q -ra -m gpu -k "not weighted and not property" --durations=10 . -p no:cacheprovider) > $R/gpu_tests.log 2>&1
tail -3 $R/gpu_tests.log
grep -E "FAILED|Error" $R/gpu_tests.log | head -5
pack
