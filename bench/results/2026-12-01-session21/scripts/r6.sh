#!/usr/bin/env bash
# r6 (1 GPU): the block wait with one barrier and the batched publish (new) against the tree before (old: the commit
# before, made beforehand: mkdir -p ab/oldtree && git archive HEAD~1 CMakeLists.txt setup.py pyproject.toml csrc
# python | tar x -C ab/oldtree; installed into /tmp/A). Low-latency kernel times at 1 rank (1, 8, 128 tokens, FP8,
# H 7168, top-8, 288 experts), alternated n o n o n o; the low-latency GPU tests with 2 and 4 ranks on the one GPU
# (LARGEEP_TEST_EMULATE_GPUS=2, LARGEEP_TEST_SHARED_GPUS=1); then, time allowing, the trace of the new tree.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; N=${2:-r6}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
rm -rf /tmp/oldsrc && cp -r ab/oldtree /tmp/oldsrc
(cd /tmp/oldsrc && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $R/build_old.log 2>&1) || { tail -20 $R/build_old.log; pack; exit 1; }
echo "builds $(( $(date +%s) - t0 )) s"
for run in n1 o1 n2 o2 n3 o3; do
  P=; [[ $run == o* ]] && P=/tmp/A
  PYTHONPATH=$P timeout 90 python3 bench/low_latency_times.py --nprocs 1 --tokens 1,8,128 --iters 30 --out $R/ll_$run > $R/ll_$run.log 2>&1
  echo "== $run rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(dispatch|combine)_hook +(send|recv)" $R/ll_$run.log
done
(cd tests && LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 260 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "low_latency and not many_ranks" test_gpu.py test_layers.py test_property.py test_ops.py) > $R/tests.log 2>&1
echo "tests rc=$? $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed" $R/tests.log | tail -20
if [ $(( $(date +%s) - t0 )) -lt 470 ]; then
  rm -rf build
  CUDAFLAGS=-DLARGEEP_TRACE python3 -m pip install --no-build-isolation --no-deps . > $R/build_trace.log 2>&1 && \
  timeout 60 python3 bench/low_latency_times.py --nprocs 1 --tokens 1,128 --iters 20 --out /tmp/tr > $R/trace.log 2>&1
  python3 bench/trace_summary.py $R/trace.log > $R/trace_summary.txt 2>&1; grep dispatch_send $R/trace_summary.txt
  rm -rf build
fi
echo "all $(( $(date +%s) - t0 )) s"
pack
