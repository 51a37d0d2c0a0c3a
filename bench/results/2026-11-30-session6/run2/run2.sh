#!/usr/bin/env bash
# A/B round (not committed): LL spread vs packed; fused combine with and without d7e6adb's kernel hunks; 1-GPU kernel times
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
rm -rf /tmp/Bsrc /tmp/B; cp -r . /tmp/Bsrc; rm -rf /tmp/Bsrc/build
(cd /tmp/Bsrc && patch -R -p1 < ab/syncwarp.patch > $O/patchB.log 2>&1 && python3 -m pip install --no-build-isolation --no-deps --target /tmp/B . > $O/buildB.log 2>&1; echo "B build rc $?" >> $O/summary.txt) &
python3 -m pip install --no-build-isolation --no-deps . > $O/buildA.log 2>&1 || { tail -40 $O/buildA.log; exit 1; }
wait
cat $O/summary.txt
(cd /tmp && python3 -c "import largeep.native as n; print('A native:', n.unavailable_reason() or 'ok')"; PYTHONPATH=/tmp/B python3 -c "import largeep, largeep.native as n; print('B', largeep.__file__, n.unavailable_reason() or 'ok')") | tee -a $O/summary.txt
# LL correctness with the new default (spread)
(cd tests && timeout 300 python3 -m pytest -q -m gpu -k "low_latency" -p no:cacheprovider . > $O/ll_tests.log 2>&1; tail -3 $O/ll_tests.log | tee -a $O/summary.txt)
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 timeout 200 python3 -m pytest -q -m gpu -k "low_latency_four" -p no:cacheprovider . > $O/ll_shared.log 2>&1; tail -2 $O/ll_shared.log | tee -a $O/summary.txt)
for sp in 1 0 1; do
  LARGEEP_TUNE=ll_spread=$sp timeout 200 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,32,128,256 --out $O/ll_sp$sp > $O/ll_sp$sp.log 2>&1
  echo "== ll_spread=$sp" >> $O/summary.txt; grep -E "^(dispatch|combine|graph)" $O/ll_sp$sp.log | grep -E " (128|256) " >> $O/summary.txt
done
i=0; for v in A B A B; do i=$((i+1))
  if [ $v = B ]; then PP=/tmp/B; else PP=; fi
  PYTHONPATH=$PP timeout 200 python3 bench/kernel_times.py --nprocs 2 --num-sms 16,24 --dtypes bf16 --out $O/comb_${i}$v > $O/comb_${i}$v.log 2>&1
  echo "== combine tree $v" >> $O/summary.txt; grep -E "^(dispatch|combine) " $O/comb_${i}$v.log >> $O/summary.txt
done
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/kernel_times.py --nprocs 1 --num-sms 8,16,24 --out $O/ep1 > $O/ep1.log 2>&1
echo "== ep1" >> $O/summary.txt; grep -E "^(layout|dispatch|combine) " $O/ep1.log >> $O/summary.txt
cat $O/summary.txt
