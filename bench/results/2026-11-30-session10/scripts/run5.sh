#!/usr/bin/env bash
# session 10 run5: every GPU test on this tree (the host-time cuts, the no-side-stream dispatch, the valid-rows
# gather of the worst-size experts), then the stack variants of layer_times (few_experts, 8 SMs, carveout 8),
# this tree (new) against 9fde1c4 (old, built into /tmp/A), new / old / new
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $O/build_old.log 2>&1) &
LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 300 bash scripts/device_check.sh $O/check build tests
cat $O/check/summary.txt >> $O/summary.txt
grep -E "FAILED|ERROR|passed|failed" $O/check/gpu_tests.log | tail -25 >> $O/summary.txt
wait
V=stack_sequential,stack_pipeline,stack_sequential_graph,stack_pipeline_graph
run() { # tag pythonpath
  PYTHONPATH=$2 timeout 130 python3 bench/layer_times.py --preset few_experts --variants $V --num-sms 8 --carveout 8 \
    --out $O/layer_$1 > $O/layer_$1.log 2>&1
  echo "== $1" | tee -a $O/summary.txt
  grep -E "^(stack)|vs the eager|stack_pipeline vs|Error|error" $O/layer_$1.log | tail -8 | tee -a $O/summary.txt
}
run new1 ""
run old1 /tmp/A
run new2 ""
timeout 90 python3 bench/expert_path.py --rows 8192 --topk 8 --experts 8 --hidden 7168 --ffn 384 --out $O/expert_path > $O/expert_path.log 2>&1
tail -30 $O/expert_path.log >> $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
