#!/usr/bin/env bash
# r1 (1 GPU): main as it landed (ea2afec): build; where a small normal round trip's host time goes on one rank
# (bench/host_profile.py at 128 tokens, with and without the layout call; 4096 tokens); the whole-call round trip
# of python -m largeep.bench at 128 and 4096 tokens (nvshmem and torch backends, one rank); the one-GPU tests.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; N=${2:-r1}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
for a in "--tokens 128" "--tokens 128 --no-layout" "--tokens 4096"; do
  tag=$(echo $a | tr -d ' -')
  timeout 120 python3 bench/host_profile.py --nprocs 1 --iters 200 $a --out $R/hp_$tag > $R/hp_$tag.log 2>&1
  grep -E "host time per call|native calls \(us, median" $R/hp_$tag.log
done
echo "profiles $(( $(date +%s) - t0 )) s"
timeout 200 python3 -m largeep.bench --modes normal --tokens 128,4096 --dtypes bf16 --backends nvshmem,torch --no-plots --out $R/bench > $R/bench.log 2>&1
grep -E "roundtrip" $R/bench.log | head -12
echo "bench $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 240 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "one_gpu" .) > $R/tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed" $R/tests.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
