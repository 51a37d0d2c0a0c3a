#!/usr/bin/env bash
# session 7 run7 (final tree): every GPU test, 4 ranks on 2 GPUs, low-latency times with ll_fuse=1 the default,
# the expert path's host times, the few-experts layer
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=$1; mkdir -p $O
LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 330 bash scripts/device_check.sh $O/check build tests shared
timeout 70 python3 bench/low_latency_times.py --nprocs 2 --out $O/ll > $O/ll.log 2>&1
grep -E "^(dispatch|combine|graph)" $O/ll.log | grep -E " (1|128) " | tee -a $O/summary.txt
CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/expert_path.py --out $O/expert_path > $O/expert_path.log 2>&1; tee -a $O/summary.txt < $O/expert_path.log
timeout 90 python3 bench/layer_times.py --preset few_experts --out $O/layer > $O/layer_f384.log 2>&1
grep -E "^(no_overlap|chunked|two_batch|gate_only|comm_only|experts)" $O/layer_f384.log | tee -a $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
