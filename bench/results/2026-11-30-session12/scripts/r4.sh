#!/usr/bin/env bash
# session 12 run4: host time of the normal round trip's calls (bench/host_profile.py, rank 0 medians; layout,
# then a fresh dispatch, then a combine, ranks aligned before each round trip) with the id check folded into the
# count exchange (new) against 88f1f0f (old, /tmp/A), alternated. 2 GPUs, 128 tokens, H 7168, top-8, 256 experts.
# The dispatch after a layout of the same ids skips its check (the layout's memo), so each tree also runs
# host_profile's round trip without the layout (--no-layout).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -30 $O/build.log; exit 1; }
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $O/build_old.log 2>&1) || { tail -30 $O/build_old.log; exit 1; }
for run in new1 old1 new2 old2 new3 old3; do
  if [[ $run == old* ]]; then P=/tmp/A; else P=; fi
  for lay in layout no-layout; do
    PYTHONPATH=$P timeout 90 python3 bench/host_profile.py --nprocs 2 --tokens 128 --iters 200 --$lay \
      --out $O/hp_${run}_$lay > $O/hp_${run}_$lay.log 2>&1
    echo "== $run $lay: $(grep -E '^host time per call' $O/hp_${run}_$lay.log)"
  done
done
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
