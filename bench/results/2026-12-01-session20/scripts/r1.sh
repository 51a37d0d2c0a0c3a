#!/usr/bin/env bash
# r1 (1 GPU): build; the one-GPU tests (with the new tokens_per_round test, 4 ranks on GPU 0); the 40-rank and the
# 32-rank wide-node tests (the kMany kernels changed); what rounds cost on one rank (bench/rounds_cost.py); the
# symmetric memory of 256-rank Buffers (32 x 8) by round size. Output: r1.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; R=$O/r1; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r1.tar.gz r1 && rm -rf r1); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
nvidia-smi -L > $R/gpus.txt
(cd /tmp && python3 -m largeep > $R/environment.txt 2>&1)
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 200 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "one_gpu" --durations=5 .) > $R/one_gpu_tests.log 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed" $R/one_gpu_tests.log | tail -30
echo "one-GPU tests $(( $(date +%s) - t0 )) s"
(cd /tmp && timeout 90 python3 $OLDPWD/bench/rounds_cost.py --gpus 1 --iters 15 --json $R/rounds_cost_1rank.json) > $R/rounds_cost.log 2>&1
tail -40 $R/rounds_cost.log
python3 - > $R/memory_256_ranks.txt 2>&1 <<'PY'
from largeep import native
C = native.module()
for t in (4096, 2048, 1024, 512):
    b = int(C.normal_layout(256, 256, 8, 7168, t, 8, 0)["total_bytes"])
    print(f"256 ranks (32 x 8), H 7168, top-8, E 256, buffers for {t} tokens per rank: {b / 2**30:.1f} GiB per rank")
PY
cat $R/memory_256_ranks.txt
echo "rounds $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=90 timeout $(( 560 - ($(date +%s) - t0) )) python3 -m pytest -v -ra --tb=short -p no:cacheprovider -m gpu -k "normal_many_ranks or wide_nodes" --durations=5 test_gpu.py) > $R/many_ranks.log 2>&1
grep -E "PASSED|FAILED|passed|failed|Error" $R/many_ranks.log | tail -12
echo "all $(( $(date +%s) - t0 )) s"
pack
