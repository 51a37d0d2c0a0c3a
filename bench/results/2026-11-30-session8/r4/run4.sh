#!/usr/bin/env bash
# session 8 run4: w13 (gate and up in one grouped GEMM) -- every GPU test; the expert path; the few-experts layer
# against the previous tree's Python (A, same native module) in one run; the layer at 8 SMs with a carveout of 8
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=$1; mkdir -p $O
LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 330 bash scripts/device_check.sh $O/check build tests
cat $O/check/summary.txt >> $O/summary.txt; tail -3 $O/check/gpu_tests.log >> $O/summary.txt
SITE=$(cd /tmp && python3 -c "import largeep,os;print(os.path.dirname(largeep.__file__))")
mkdir -p /tmp/A && cp -r $SITE /tmp/A/largeep && cp ab/old/*.py /tmp/A/largeep/  # ab/old/F = `git show a079c41:python/largeep/F` (layers.py checks.py buffer.py ops.py _env.py)
CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/expert_path.py --out $O/expert_path > $O/expert_path.log 2>&1; tee -a $O/summary.txt < $O/expert_path.log
V=no_overlap,chunked_2,two_batch,comm_only,experts_only,experts_half
run() { # tag, then env and extra args via ARGS
  tag=$1; shift
  env "$@" timeout 100 python3 bench/layer_times.py --preset few_experts --variants $V $ARGS --out $O/layer_$tag > $O/layer_$tag.log 2>&1
  echo "== $tag $ARGS" | tee -a $O/summary.txt
  grep -E "^(no_overlap|chunked|two_batch|comm_only|experts)" $O/layer_$tag.log | tee -a $O/summary.txt
}
ARGS="" run A1 PYTHONPATH=/tmp/A
ARGS="" run N1 X=1
ARGS="" run A2 PYTHONPATH=/tmp/A
ARGS="" run N2 X=1
ARGS="--num-sms 8 --carveout 8" run N8 X=1
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
