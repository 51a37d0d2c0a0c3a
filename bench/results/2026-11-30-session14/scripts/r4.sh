#!/usr/bin/env bash
# r4 (2 GPUs): the low-latency dispatch receive reading each row's metadata, first vectors and scales in one round
# trip, against f0db099 (old, /tmp/A; ab/oldtree = git archive f0db099 CMakeLists.txt setup.py pyproject.toml csrc
# python): kernel and graph times new/old/new/old at 1 and 128 tokens; every GPU test and the 4-rank low-latency
# tests on 2 GPUs; the new tree's low-latency times at 1 to 256 tokens. Everything under OUT goes into r4.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; mkdir -p $O/r4
R=$O/r4
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -30 $R/build.log; exit 1; }
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $R/build_old.log 2>&1) || { tail -30 $R/build_old.log; exit 1; }
echo "builds $(( $(date +%s) - t0 )) s"
for run in new1 old1 new2 old2; do
  if [[ $run == old* ]]; then P=/tmp/A; else P=; fi
  PYTHONPATH=$P timeout 60 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,128 --out $R/ll_$run > $R/ll_$run.log 2>&1
  echo "== $run"; grep -E "^(dispatch_hook|combine_hook|graph_back)" $R/ll_$run.log | grep -v "combine"
done
echo "a/b done $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 330 python3 -m pytest -q -ra -m gpu . -p no:cacheprovider) > $R/gpu_tests.log 2>&1
tail -2 $R/gpu_tests.log
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 120 python3 -m pytest -q -ra -m gpu -k "low_latency and shared" . -p no:cacheprovider) > $R/shared_ll_tests.log 2>&1
tail -1 $R/shared_ll_tests.log
echo "tests done $(( $(date +%s) - t0 )) s"
timeout 90 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,8,32,128,256 --out $R/ll_sweep > $R/ll_sweep.log 2>&1
grep -E "^(dispatch_hook|combine_hook|graph_back)" $R/ll_sweep.log
(cd $O && tar czf r4.tar.gz r4 && rm -rf r4)
echo "all done $(( $(date +%s) - t0 )) s"
