#!/usr/bin/env bash
# session 10 run1: verify what session 9 left untested (build, every GPU test, 4 ranks on 2 GPUs), then the
# 128-token round-trip A/B: this tree (new) against ac94c51 (old: before the native id check), alternated; torch once
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
O=$1; mkdir -p $O
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $O/build_old.log 2>&1) &
LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 330 bash scripts/device_check.sh $O/check build tests shared
cat $O/check/summary.txt >> $O/summary.txt
grep -E "FAILED|ERROR" $O/check/gpu_tests.log | head -20 >> $O/summary.txt
wait
(cd /tmp && PYTHONPATH=/tmp/A python3 -c "import largeep.native as n; print('old', n.__file__, n.unavailable_reason())") | tee -a $O/summary.txt
B="--modes normal --tokens 128,4096 --dtypes bf16 --experts 256 --no-plots"
for i in 1 2 3; do
  for v in new old; do
    if [ $v = old ]; then P=/tmp/A; else P=; fi
    PYTHONPATH=$P timeout 60 python3 -m largeep.bench $B --backends nvshmem --out $O/b_${v}$i > $O/b_${v}$i.log 2>&1
    echo "== $v $i" | tee -a $O/summary.txt; grep -E "^nvshmem +normal" $O/b_${v}$i.log | tee -a $O/summary.txt
  done
done
timeout 60 python3 -m largeep.bench $B --backends torch --out $O/b_torch > $O/b_torch.log 2>&1
echo "== torch" | tee -a $O/summary.txt; grep -E "^torch +normal" $O/b_torch.log | tee -a $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
