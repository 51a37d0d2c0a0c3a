#!/usr/bin/env bash
# session 8 run1: verify what session 7 changed after its last device run (build, every GPU test, 4 ranks on 2 GPUs),
# low-latency times at the default ll_fuse=0, the expert path at full and half rows, the few-experts layer with its timeline
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=$1; mkdir -p $O
LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 330 bash scripts/device_check.sh $O/check build tests shared
cat $O/check/summary.txt >> $O/summary.txt
timeout 70 python3 bench/low_latency_times.py --nprocs 2 --out $O/ll > $O/ll.log 2>&1
grep -E "^(dispatch|combine|graph)" $O/ll.log | grep -E " (1|128) " | tee -a $O/summary.txt
for r in 8192 4096; do
CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/expert_path.py --rows $r --out $O/expert_path > $O/expert_path_$r.log 2>&1; tee -a $O/summary.txt < $O/expert_path_$r.log
done
timeout 100 python3 bench/layer_times.py --preset few_experts --profile chunked_2 --out $O/layer > $O/layer_f384.log 2>&1
grep -E "^(no_overlap|chunked|two_batch|gate_only|comm_only|experts)" $O/layer_f384.log | tee -a $O/summary.txt
tail -30 $O/layer_f384.log > $O/layer_tail.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
