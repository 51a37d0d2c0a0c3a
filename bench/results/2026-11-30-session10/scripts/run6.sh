#!/usr/bin/env bash
# session 10 run6: the stack captured in CUDA graphs (few_experts preset: 4 layers, 4096 tokens/rank, H 7168,
# 16 experts, top-8, F 384) against the eager sequential stack, over chunks {2, 4, 8} and communication SMs /
# carveout {8, 16, 24}; this tree (6d611b0's valid-rows gather in the worst-size experts)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -30 $O/build.log; exit 1; }
V=stack_sequential,stack_sequential_graph,stack_pipeline_graph
for s in 8 16 24; do
  for c in 2 4 8; do
    timeout 60 python3 bench/layer_times.py --preset few_experts --variants $V --num-sms $s --carveout $s \
      --stack-chunks $c --out $O/layer_s${s}_c$c > $O/layer_s${s}_c$c.log 2>&1
    echo "== sms $s carveout $s chunks $c" | tee -a $O/summary.txt
    grep -E "^(stack)|Error|error" $O/layer_s${s}_c$c.log | tail -4 | tee -a $O/summary.txt
  done
done
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
