#!/usr/bin/env bash
# r1 (1 GPU): HEAD 61eaaba. Build; the 40-rank normal test; the one-GPU tests; every normal-mode CASES entry with 4
# ranks on GPU 0 as one node (the fused combine's committed form), 2 x 2 and 4 x 1. Output: r1.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; R=$O/r1; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r1.tar.gz r1 && rm -rf r1); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
nvidia-smi -L > $R/gpus.txt
(cd /tmp && python3 -m largeep > $R/environment.txt 2>&1)
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 150 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "one_gpu" --durations=5 .) > $R/one_gpu_tests.log 2>&1
grep -E "passed|failed|FAILED" $R/one_gpu_tests.log | tail -8
echo "one-GPU tests $(( $(date +%s) - t0 )) s"
cat > /tmp/four_on_one.py <<'PY'
import sys
sys.path.insert(0, ".")
import bodies
from dist_pool import DistPool
from test_gpu import CASES, CASE_IDS, _tokens

def main():
    pool = DistPool(4, "gloo-cuda:0,0,0,0", timeout_s=600)
    fails = 0
    try:
        for rpn in (None, 2, 1):
            for case, cid in zip(CASES, CASE_IDS):
                hidden, experts, topk, dtype, fp8, align, worst = case
                tokens = _tokens(4, 300)
                try:
                    pool.run(bodies.normal_roundtrip, "nvshmem", tokens, hidden, experts, topk, dtype, fp8, align,
                             35, rpn, worst)
                    print(f"ok   ranks_per_node={rpn} {cid}", flush=True)
                except Exception as exc:  # noqa: BLE001
                    fails += 1
                    print(f"FAIL ranks_per_node={rpn} {cid}: {exc}", flush=True)
                    raise
    finally:
        pool.close(force=True)
    print(f"four ranks on one GPU: {fails} failed")

if __name__ == "__main__":
    main()
PY
(cd tests && LARGEEP_TIMEOUT_S=30 timeout 240 python3 /tmp/four_on_one.py) > $R/four_on_one.log 2>&1
grep -E "^(ok|FAIL)|failed" $R/four_on_one.log | tail -20
echo "all $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=90 timeout 200 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "normal_many_ranks" --durations=5 test_gpu.py) > $R/many_ranks.log 2>&1
grep -E "passed|failed|FAILED|Error|error" $R/many_ranks.log | tail -12
echo "all $(( $(date +%s) - t0 )) s"
pack
