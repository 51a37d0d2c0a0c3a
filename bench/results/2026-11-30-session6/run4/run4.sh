#!/usr/bin/env bash
# A = working tree (finished-call path), B = 3783445 (ab/old.tar); GPU tests on A; 128-token round trip A B A; host profile A and B; LL kernels A
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
rm -rf /tmp/Bsrc /tmp/B; mkdir -p /tmp/Bsrc && tar xf ab/old.tar -C /tmp/Bsrc
(cd /tmp/Bsrc && python3 -m pip install --no-build-isolation --no-deps --target /tmp/B . > $O/buildB.log 2>&1; echo "B build rc $?" >> $O/summary.txt) &
python3 -m pip install --no-build-isolation --no-deps . > $O/buildA.log 2>&1 || { tail -40 $O/buildA.log; exit 1; }
wait
(cd tests && LARGEEP_TIMEOUT_S=20 timeout 400 python3 -m pytest -q -ra -m gpu -p no:cacheprovider . > $O/gpu_tests.log 2>&1; tail -3 $O/gpu_tests.log | tee -a $O/summary.txt)
i=0
for v in A B A; do i=$((i+1))
  if [ $v = B ]; then PP=/tmp/B; else PP=; fi
  PYTHONPATH=$PP timeout 150 python3 -m largeep.bench --modes normal --tokens 128 --dtypes bf16 --backends nvshmem,torch --experts 256 --no-plots --out $O/bench128_$i$v > $O/bench128_$i$v.log 2>&1
  echo "== bench128 $i$v" >> $O/summary.txt; grep -iE "round|nvshmem|torch" $O/bench128_$i$v.log | tail -12 >> $O/summary.txt
done
for v in A B; do
  if [ $v = B ]; then PP=/tmp/B; else PP=; fi
  PYTHONPATH=$PP timeout 120 python3 bench/host_profile.py --nprocs 2 --tokens 128 --iters 300 --out $O/host_$v > $O/host_profile_$v.log 2>&1
  echo "== host $v" >> $O/summary.txt; grep -E "^host time|^native calls" $O/host_profile_$v.log >> $O/summary.txt
done
timeout 150 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,32,128 --out $O/ll > $O/ll.log 2>&1
echo "== ll" >> $O/summary.txt; grep -E "^(dispatch|combine|graph)" $O/ll.log >> $O/summary.txt
cat $O/summary.txt
