#!/usr/bin/env bash
# session 9 run1: verify what session 8 changed after its last device run (build, every GPU test, 4 ranks on 2 GPUs),
# then the stack variants of layer_times (few_experts, at 24/24 and at 8 SMs / carveout 8) and low-latency times
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=$1; mkdir -p $O
LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 330 bash scripts/device_check.sh $O/check build tests shared
cat $O/check/summary.txt >> $O/summary.txt
grep -E "FAILED|ERROR" $O/check/gpu_tests.log | head -20 >> $O/summary.txt
V=no_overlap,comm_only,experts_only,stack_sequential,stack_pipeline
timeout 110 python3 bench/layer_times.py --preset few_experts --variants $V --out $O/layer > $O/layer_f384.log 2>&1
tail -22 $O/layer_f384.log > $O/layer_tail.txt
timeout 110 python3 bench/layer_times.py --preset few_experts --num-sms 8 --carveout 8 --variants $V --out $O/layer_sm8 > $O/layer_f384_sm8.log 2>&1
tail -22 $O/layer_f384_sm8.log > $O/layer_sm8_tail.txt
timeout 60 python3 bench/low_latency_times.py --nprocs 2 --out $O/ll > $O/ll.log 2>&1
grep -E "^(dispatch|combine|graph)" $O/ll.log | grep -E " (1|128) " | tee -a $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
