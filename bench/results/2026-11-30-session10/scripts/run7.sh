#!/usr/bin/env bash
# session 10 run7: one layer (--stack-layers 1) as a CUDA graph, sequential against pipelined in 2 and 4 chunks,
# beside the eager single-layer variants (no_overlap, chunked_2/4, two_batch), at 8 and 24 SMs; and the eager
# 4-layer pipeline in 2 chunks at 8 SMs. few_experts preset. This tree (after 68a0769)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -30 $O/build.log; exit 1; }
one() { # tag args...
  tag=$1; shift
  timeout 70 python3 bench/layer_times.py --preset few_experts "$@" --out $O/$tag > $O/$tag.log 2>&1
  echo "== $tag $*" | tee -a $O/summary.txt
  grep -E "^(stack|no_overlap|chunked|two_batch|comm_only|experts_only)|Error|error" $O/$tag.log | tail -10 | tee -a $O/summary.txt
}
G=stack_sequential,stack_sequential_graph,stack_pipeline_graph
one l1_s8_c2 --stack-layers 1 --stack-chunks 2 --num-sms 8 --carveout 8 --variants no_overlap,comm_only,experts_only,chunked_2,chunked_4,two_batch,$G
one l1_s8_c4 --stack-layers 1 --stack-chunks 4 --num-sms 8 --carveout 8 --variants $G
one l1_s24_c2 --stack-layers 1 --stack-chunks 2 --num-sms 24 --carveout 24 --variants no_overlap,comm_only,experts_only,chunked_2,two_batch,$G
one l4_s8_c2_eager --stack-layers 4 --stack-chunks 2 --num-sms 8 --carveout 8 --variants stack_sequential,stack_pipeline
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
