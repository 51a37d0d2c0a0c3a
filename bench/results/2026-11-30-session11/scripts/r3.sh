#!/usr/bin/env bash
# new tree (parts up to 16, concurrent atomics) vs HEAD (old) low-latency: GPU tests, 4-rank shared tests, then
# kernel/graph times alternated new/old/new/old
set -uo pipefail
O=$1; mkdir -p $O
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120
python3 -m pip install --no-build-isolation --no-deps . > $O/build_new.log 2>&1 || { tail -40 $O/build_new.log; exit 1; }
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $O/build_old.log 2>&1) || { tail -40 $O/build_old.log; exit 1; }
echo built
(cd tests && timeout 300 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "low_latency" .) > $O/ll_tests.log 2>&1
tail -3 $O/ll_tests.log; grep -n "^FAILED\|^ERROR" $O/ll_tests.log | head
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 timeout 200 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "shared_gpus and low_latency" test_gpu.py test_long_run.py) > $O/shared_ll.log 2>&1
tail -2 $O/shared_ll.log
i=0
for v in new old new old; do
  i=$((i+1))
  if [ $v = old ]; then PP=/tmp/A; else PP=; fi
  PYTHONPATH=$PP timeout 150 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,8,32,128,256 --out $O/ll_${v}_$i > $O/ll_times_${v}_$i.log 2>&1
  echo "== $v $i"; grep -E "^(dispatch_hook|graph_back)" $O/ll_times_${v}_$i.log | awk '{print $1,$2,$4,$6}' | paste -sd' '
done
