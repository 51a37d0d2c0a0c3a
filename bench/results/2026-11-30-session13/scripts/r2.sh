#!/usr/bin/env bash
# session 13 run2 (2 GPUs): low-latency kernel and graph times (bench/low_latency_times.py, 1 and 128 tokens, FP8,
# H 7168, top-8, 288 experts) of 7ed99b7 (a repeated expert sent once) against 88f1f0f (old, /tmp/A), new/old/new/old.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; mkdir -p $O
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -30 $O/build.log; exit 1; }
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $O/build_old.log 2>&1) || { tail -30 $O/build_old.log; exit 1; }
for run in new1 old1 new2 old2; do
  if [[ $run == old* ]]; then P=/tmp/A; else P=; fi
  PYTHONPATH=$P timeout 50 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,128 --out $O/ll_$run > $O/ll_$run.log 2>&1
  echo "== $run"; tail -8 $O/ll_$run.log
done
echo "all done $(( $(date +%s) - t0 )) s"
