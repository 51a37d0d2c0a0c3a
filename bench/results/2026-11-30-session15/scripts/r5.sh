#!/usr/bin/env bash
# r5 (2 GPUs; for the next session, not run in session 15): the commits after r4 -- the review's mends (the combine
# applies the dispatch's copy of the weights; lead bounded; inf sums stay inf; a put sends a sum whole; top-16 case)
# and the kernels templated on whether weights travel. Builds this tree and 85d1314 (old: /tmp/A; first
# `git archive 85d1314 CMakeLists.txt setup.py pyproject.toml csrc python | tar x -C ab/oldtree`); the weighted GPU
# tests under each LARGEEP_TUNE low-latency path, the property tests and the low-latency reference cases; then the
# default path (u) against old and with weights (w): kernel and graph times at 1 and 128 tokens, alternated.
# Then the full GPU suite (scripts/device_check.sh ... tests shared) in a second call. Output: r5.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; R=$O/r5; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r5.tar.gz r5 && rm -rf r5); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $R/build_old.log 2>&1) || { tail -30 $R/build_old.log; pack; exit 1; }
echo "builds $(( $(date +%s) - t0 )) s"
(cd tests && timeout 240 python3 -m pytest -q -ra -m gpu -k "weighted or property or test_low_latency_gpu" --durations=5 . -p no:cacheprovider) > $R/tests.log 2>&1
grep -E "passed|failed|FAILED|Error" $R/tests.log | tail -8
echo "tests $(( $(date +%s) - t0 )) s"
for run in u1 old1 w1 u2 old2 w2; do
  P=; W=
  [[ $run == old* ]] && P=/tmp/A
  [[ $run == w* ]] && W=--weighted
  PYTHONPATH=$P timeout 50 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,128 $W --out $R/ll_$run > $R/ll_$run.log 2>&1
  echo "== $run"; grep -E "^(dispatch_hook|combine_hook|graph_back)" $R/ll_$run.log
done
echo "all $(( $(date +%s) - t0 )) s"
pack
