#!/usr/bin/env bash
# session 7 run4: the native expert order (tests, host/GPU time by step of the expert path), the layer again
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -40 $O/build.log; exit 1; }
(cd tests && LARGEEP_TIMEOUT_S=20 timeout 240 python3 -m pytest -q -ra -p no:cacheprovider -m gpu test_ops.py test_layers.py test_expert_tp.py > $O/tests.log 2>&1; echo "ops/layer GPU tests: $(tail -1 $O/tests.log)" | tee -a $O/summary.txt; grep -E "^FAILED|Error" $O/tests.log | head -20)
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/expert_path.py --out $O/expert_path > $O/expert_path.log 2>&1; cat $O/expert_path.log | tee -a $O/summary.txt
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/expert_path.py --experts 128 --rows 8192 --local-share 0.5 --ffn 256 --out $O/expert_path > $O/expert_path_e128.log 2>&1; cat $O/expert_path_e128.log | tee -a $O/summary.txt
timeout 150 python3 bench/layer_times.py --preset few_experts --profile chunked_2,experts_only --out $O/layer > $O/layer_f384.log 2>&1
grep -E "^(no_overlap|chunked|two_batch|gate_only|comm_only|experts)|timeline" $O/layer_f384.log | tee -a $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
