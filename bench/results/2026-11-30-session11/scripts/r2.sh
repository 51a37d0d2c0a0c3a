#!/usr/bin/env bash
# new tree vs HEAD (old) low-latency: GPU tests on the new tree, then kernel/graph times alternated new/old/new
set -uo pipefail
O=$1; mkdir -p $O
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120
python3 -m pip install --no-build-isolation --no-deps . > $O/build_new.log 2>&1 || { tail -40 $O/build_new.log; exit 1; }
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $O/build_old.log 2>&1) || { tail -40 $O/build_old.log; exit 1; }
echo built
(cd tests && timeout 300 python3 -m pytest -q -ra -x -p no:cacheprovider -m gpu -k "low_latency" .) > $O/ll_tests.log 2>&1
tail -5 $O/ll_tests.log
grep -q " passed" $O/ll_tests.log && ! grep -q "failed\|error" $O/ll_tests.log || { grep -n "Error\|assert" $O/ll_tests.log | head -30; }
for v in new old new old; do
  if [ $v = old ]; then PP=/tmp/A; else PP=; fi
  PYTHONPATH=$PP timeout 150 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,32,128,256 --out $O/ll_$v.$RANDOM > $O/ll_times_$v.log 2>&1
  echo "== $v"; tail -14 $O/ll_times_$v.log
done
