#!/usr/bin/env bash
# session 10 run8: the session's last tree: every GPU test, the 4-rank tests on 2 GPUs, then the bench's round
# trip (nvshmem twice, the torch backend once, 128 and 4096 tokens)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=$1; mkdir -p $O
LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 360 bash scripts/device_check.sh $O/check build tests shared
cat $O/check/summary.txt >> $O/summary.txt
grep -E "FAILED|ERROR" $O/check/gpu_tests.log | head -20 >> $O/summary.txt
tail -1 $O/check/gpu_tests.log >> $O/summary.txt
B="--modes normal --tokens 128,4096 --dtypes bf16 --experts 256 --no-plots"
for i in 1 2; do
  timeout 60 python3 -m largeep.bench $B --backends nvshmem --out $O/b_new$i > $O/b_new$i.log 2>&1
  echo "== nvshmem $i" | tee -a $O/summary.txt; grep -E "^nvshmem +normal +roundtrip" $O/b_new$i.log | tee -a $O/summary.txt
done
timeout 60 python3 -m largeep.bench $B --backends torch --out $O/b_torch > $O/b_torch.log 2>&1
echo "== torch" | tee -a $O/summary.txt; grep -E "^torch +normal +roundtrip" $O/b_torch.log | tee -a $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
