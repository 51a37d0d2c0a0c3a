#!/usr/bin/env bash
# r8 (1 GPU): r7 found the fused combine's 3.5 us at one rank in reduce_token's rank indexing. This tree (f: the
# fused combine, one node only, indexes lanes by rank as before) against its parent (n, ab/headtree: mkdir -p
# ab/headtree && git archive HEAD CMakeLists.txt setup.py pyproject.toml csrc python | tar x -C ab/headtree, into
# /tmp/H). Kernel times on one rank (BF16, 24 SMs, 4096 tokens, H 7168), alternated n f n f; then f's one-GPU tests
# and bodies.normal_roundtrip with 4 ranks on GPU 0 as one node (the fused path) at H 7168 BF16 and FP8.
# Output: r8.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=8
O=$1; R=$O/r8; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r8.tar.gz r8 && rm -rf r8); }
rm -rf /tmp/headsrc && cp -r ab/headtree /tmp/headsrc
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 &
(cd /tmp/headsrc && python3 -m pip install --no-build-isolation --no-deps --target /tmp/H . > $R/build_head.log 2>&1) &
wait
(cd /tmp && python3 -c "import largeep._C" && PYTHONPATH=/tmp/H python3 -c "import largeep._C") || { tail -20 $R/build*.log; pack; exit 1; }
echo "builds $(( $(date +%s) - t0 )) s"
for run in n1 f1 n2 f2; do
  P=; [[ $run == n* ]] && P=/tmp/H
  PYTHONPATH=$P timeout 40 python3 bench/kernel_times.py --nprocs 1 --tokens 4096 --num-sms 24 --dtypes bf16 --out $R/kt_$run > $R/kt_$run.log 2>&1
  echo "== $run rc=$? $(( $(date +%s) - t0 )) s"; grep -E "kernel medians" $R/kt_$run.log | sed 's/.*medians (us)://'
done
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 60 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "one_gpu" .) > $R/one_gpu_tests.log 2>&1
grep -E "passed|failed|FAILED" $R/one_gpu_tests.log | tail -4
cat > /tmp/four_fused.py <<'PY'
import sys
sys.path.insert(0, ".")
import bodies
from dist_pool import DistPool
from test_gpu import CASES, CASE_IDS, _tokens

def main():
    pool = DistPool(4, "gloo-cuda:0,0,0,0", timeout_s=300)
    try:
        for case, cid in list(zip(CASES, CASE_IDS))[:2]:
            hidden, experts, topk, dtype, fp8, align, worst = case
            pool.run(bodies.normal_roundtrip, "nvshmem", _tokens(4, 300), hidden, experts, topk, dtype, fp8, align, 35,
                     None, worst)
            print(f"ok   one node {cid}", flush=True)
    finally:
        pool.close(force=True)

if __name__ == "__main__":
    main()
PY
(cd tests && LARGEEP_TIMEOUT_S=30 timeout 60 python3 /tmp/four_fused.py) > $R/four_fused.log 2>&1
grep -E "^ok|Error" $R/four_fused.log | tail -4
echo "all $(( $(date +%s) - t0 )) s"
pack
