#!/usr/bin/env bash
# session 10 run4: host-time cuts (817983f: cached caller Stream objects, one-lookup dataclass walk, leaner tensor
# checks, the nvshmem dispatch's arrays by offset in one allocation) against 9fde1c4 (old, built into /tmp/A):
# the bench's 128/4096-token round trip alternated three times, then skew.py (host vs event time, rank skew) and
# diag_py.py (host time per piece) for both
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $O/build_old.log 2>&1) &
python3 -m pip install --no-build-isolation --no-deps . > $O/build_new.log 2>&1 || { tail -30 $O/build_new.log; exit 1; }
wait
(cd /tmp && python3 -c "import largeep.native as n; print('new', n.__file__, n.unavailable_reason())"; PYTHONPATH=/tmp/A python3 -c "import largeep.native as n; print('old', n.__file__, n.unavailable_reason())") | tee -a $O/summary.txt
B="--modes normal --tokens 128,4096 --dtypes bf16 --experts 256 --no-plots"
for i in 1 2 3; do
  for v in new old; do
    if [ $v = old ]; then P=/tmp/A; else P=; fi
    PYTHONPATH=$P timeout 60 python3 -m largeep.bench $B --backends nvshmem --out $O/b_${v}$i > $O/b_${v}$i.log 2>&1
    echo "== $v $i" | tee -a $O/summary.txt; grep -E "^nvshmem +normal +(roundtrip|layout)" $O/b_${v}$i.log | tee -a $O/summary.txt
  done
done
timeout 60 python3 -m largeep.bench $B --backends torch --out $O/b_torch > $O/b_torch.log 2>&1
echo "== torch" | tee -a $O/summary.txt; grep -E "^torch +normal +roundtrip" $O/b_torch.log | tee -a $O/summary.txt
for v in new old; do
  if [ $v = old ]; then P=/tmp/A; else P=; fi
  echo "== skew $v" >> $O/summary.txt
  PYTHONPATH=$P timeout 90 python3 ab/skew.py nvshmem 128 2>&1 | grep -v Warn | grep -v WARN >> $O/summary.txt
  PYTHONPATH=$P timeout 90 python3 ab/diag_py.py 128 > $O/diag_py_$v.log 2>&1
done
timeout 90 python3 ab/skew.py torch 128 2>&1 | grep -v Warn | grep -v WARN >> $O/summary.txt
cat $O/summary.txt | grep -v "^nvshmem"
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
