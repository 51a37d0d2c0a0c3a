#!/usr/bin/env bash
# session 9 run8: normal-mode num_worst_tokens dispatch + combine in a CUDA graph (new GPU test), MoEPipeline on
# CUDA (its side stream, now also under capture), and the stack captured in CUDA graphs (layer_times *_graph)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=$1; mkdir -p $O
LARGEEP_GPU_TESTS="-m gpu -k pipeline_gpu|worst_graph|layer_chunked|decode_step ." LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 200 bash scripts/device_check.sh $O/check build tests
cat $O/check/summary.txt >> $O/summary.txt; grep -E "passed|failed|Error" $O/check/gpu_tests.log | tail -5 >> $O/summary.txt
V=stack_sequential,stack_pipeline,stack_sequential_graph,stack_pipeline_graph
run() { # tag; extra args via ARGS
  tag=$1
  timeout 120 python3 bench/layer_times.py --preset few_experts --variants $V $ARGS --out $O/layer_$tag > $O/layer_$tag.log 2>&1
  echo "== $tag $ARGS" | tee -a $O/summary.txt
  grep -E "^(stack)|vs the eager|stack_pipeline vs|Error|error" $O/layer_$tag.log | tail -8 | tee -a $O/summary.txt
}
ARGS="--num-sms 8 --carveout 8" run s8
ARGS="" run s24
ARGS="--num-sms 8 --carveout 8 --stack-chunks 8" run s8c8
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
