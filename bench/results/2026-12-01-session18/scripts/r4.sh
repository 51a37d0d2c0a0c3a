#!/usr/bin/env bash
# r4 (2 GPUs): the normal mode beyond 32 ranks (b16ce2e) and the comb buffer by rank of the node (e03bcfd) at
# 2 ranks. Build this tree (new) and OLD (19b84e6, the tree before both, made beforehand: mkdir -p ab/oldtree &&
# git archive 19b84e6 CMakeLists.txt setup.py pyproject.toml csrc python | tar x -C ab/oldtree; into /tmp/A);
# the 2-GPU normal-mode tests; then kernel times of new against old with this tree's bench/kernel_times.py
# (4096 tokens, H 7168, top-8, 256 experts, BF16 and FP8, 24 SMs), alternated n o n o n o, and once each with 2
# nodes of 1 emulated. Output: r4.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; R=$O/r4; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r4.tar.gz r4 && rm -rf r4); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
rm -rf /tmp/oldsrc && cp -r ab/oldtree /tmp/oldsrc
(cd /tmp/oldsrc && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $R/build_old.log 2>&1) || { tail -20 $R/build_old.log; pack; exit 1; }
echo "builds $(( $(date +%s) - t0 )) s"
nvidia-smi -L > $R/gpus.txt
(cd tests && LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 220 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "normal or refus or zero_copy or internode or missing_peer or layer" --durations=5 .) > $R/tests.log 2>&1
grep -E "passed|failed|FAILED" $R/tests.log | tail -8
echo "tests $(( $(date +%s) - t0 )) s"
for run in n1 o1 n2 o2 n3 o3 ni oi; do
  P=; A=
  [[ $run == o* ]] && P=/tmp/A
  [[ $run == ?i ]] && A="--ranks-per-node 1"
  PYTHONPATH=$P timeout 60 python3 bench/kernel_times.py --nprocs 2 --tokens 4096 --num-sms 24 $A --out $R/kt_$run > $R/kt_$run.log 2>&1
  echo "== $run rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(layout|dispatch|combine) " $R/kt_$run.log | head -6
done
echo "all $(( $(date +%s) - t0 )) s"
pack
