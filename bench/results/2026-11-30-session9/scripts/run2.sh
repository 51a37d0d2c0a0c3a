#!/usr/bin/env bash
# session 9 run2: MoEPipeline's ends of (layer, chunk) on a side stream -- its GPU tests; the stack against the
# previous tree's layers.py (A, same native module) in one run, at 24/24 and 8/8; the chunk count at 8/8
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=$1; mkdir -p $O
LARGEEP_GPU_TESTS="-m gpu -k pipeline ." LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 200 bash scripts/device_check.sh $O/check build tests
cat $O/check/summary.txt >> $O/summary.txt; tail -3 $O/check/gpu_tests.log >> $O/summary.txt
SITE=$(cd /tmp && python3 -c "import largeep,os;print(os.path.dirname(largeep.__file__))")
mkdir -p /tmp/A && cp -r $SITE /tmp/A/largeep && cp ab/old/*.py /tmp/A/largeep/  # the previous layers.py = `git show a690dc1:python/largeep/layers.py`
V=stack_sequential,stack_pipeline
run() { # tag, then env; extra args via ARGS
  tag=$1; shift
  env "$@" timeout 90 python3 bench/layer_times.py --preset few_experts --variants $V $ARGS --out $O/layer_$tag > $O/layer_$tag.log 2>&1
  echo "== $tag $ARGS" | tee -a $O/summary.txt
  grep -E "^(stack)|stack_pipeline vs" $O/layer_$tag.log | tee -a $O/summary.txt
}
ARGS="" run A24 PYTHONPATH=/tmp/A
ARGS="" run N24 X=1
ARGS="--num-sms 8 --carveout 8" run A8 PYTHONPATH=/tmp/A
ARGS="--num-sms 8 --carveout 8" run N8 X=1
ARGS="--num-sms 8 --carveout 8 --stack-chunks 2" run N8c2 X=1
ARGS="--num-sms 8 --carveout 8 --stack-chunks 8" run N8c8 X=1
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
