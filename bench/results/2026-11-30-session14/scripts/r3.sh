#!/usr/bin/env bash
# r3 (2 GPUs): the low-latency dispatch send with its loads ahead of the slot wait, no per-thread fences and one
# release per destination rank, against 1c4e6f1 (old, /tmp/A; ab/oldtree = git archive 1c4e6f1 CMakeLists.txt
# setup.py pyproject.toml csrc python): low-latency kernel and graph times new/old/new/old at 1 and 128 tokens, then
# every GPU test and the 4-rank low-latency tests on 2 GPUs, then the phase marks of the new tree (trace build).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; mkdir -p $O
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -30 $O/build.log; exit 1; }
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $O/build_old.log 2>&1) || { tail -30 $O/build_old.log; exit 1; }
echo "builds $(( $(date +%s) - t0 )) s"
for run in new1 old1 new2 old2; do
  if [[ $run == old* ]]; then P=/tmp/A; else P=; fi
  PYTHONPATH=$P timeout 60 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,128 --out $O/ll_$run > $O/ll_$run.log 2>&1
  echo "== $run"; grep -E "^(dispatch_hook|combine_hook|graph_back)" $O/ll_$run.log
done
echo "a/b done $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 330 python3 -m pytest -q -ra -x -m gpu . -p no:cacheprovider) > $O/gpu_tests.log 2>&1
tail -3 $O/gpu_tests.log
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 120 python3 -m pytest -q -ra -m gpu -k "low_latency and shared" . -p no:cacheprovider) > $O/shared_ll_tests.log 2>&1
tail -2 $O/shared_ll_tests.log
echo "tests done $(( $(date +%s) - t0 )) s"
CUDAFLAGS=-DLARGEEP_TRACE python3 -m pip install --no-build-isolation --no-deps . > $O/build_trace.log 2>&1 || { tail -30 $O/build_trace.log; exit 1; }
timeout 60 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,128 --iters 20 --out $O/trace > $O/trace.log 2>&1
python3 bench/trace_summary.py $O/trace.log | tee $O/trace_summary.txt
gzip $O/trace.log
echo "all done $(( $(date +%s) - t0 )) s"
