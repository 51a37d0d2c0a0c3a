#!/usr/bin/env bash
# session 7 run5: the expert order kernel with more chunks and a warp-per-key scan; layer timelines; prefill layer
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -40 $O/build.log; exit 1; }
(cd tests && LARGEEP_TIMEOUT_S=20 timeout 240 python3 -m pytest -q -ra -p no:cacheprovider -m gpu test_ops.py test_layers.py test_expert_tp.py > $O/tests.log 2>&1; echo "ops/layer GPU tests: $(tail -1 $O/tests.log)" | tee -a $O/summary.txt; grep -E "^FAILED" $O/tests.log | head -20)
for e in 8 128; do
  f=384; [ $e = 128 ] && f=256
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/expert_path.py --experts $e --ffn $f --out $O/expert_path > $O/expert_path_e$e.log 2>&1; grep -E "order|all" $O/expert_path_e$e.log | sed "s/^/E=$e /" | tee -a $O/summary.txt
done
timeout 150 python3 bench/layer_times.py --preset few_experts --profile chunked_2,no_overlap --trace $O/trace --out $O/layer > $O/layer_f384.log 2>&1
grep -E "^(no_overlap|chunked|two_batch|gate_only|comm_only|experts)|timeline" $O/layer_f384.log | tee -a $O/summary.txt
timeout 200 python3 bench/layer_times.py --out $O/layer > $O/layer_prefill.log 2>&1
grep -E "^(no_overlap|chunked|two_batch|gate_only|comm_only|experts)" $O/layer_prefill.log | tee -a $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
