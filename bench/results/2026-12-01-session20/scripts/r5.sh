#!/usr/bin/env bash
# r5 (2 GPUs): build; test_normal_tokens_per_round (NCCL group, nvshmem and torch backends, against one round);
# bench/rounds_cost.py on 2 GPUs. Output: r5.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; R=$O/r5; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r5.tar.gz r5 && rm -rf r5); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
nvidia-smi -L > $R/gpus.txt
(cd tests && LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "test_normal_tokens_per_round" test_gpu.py) > $R/tests.log 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests.log | tail -5
(cd /tmp && timeout 120 python3 $OLDPWD/bench/rounds_cost.py --gpus 2 --iters 15 --json $R/rounds_cost_2gpus.json) > $R/rounds_cost.log 2>&1
python3 -c "
import json; d=json.load(open('$R/rounds_cost_2gpus.json'))
for r in d['rows']: print(r)" || tail -20 $R/rounds_cost.log
echo "all $(( $(date +%s) - t0 )) s"
pack
