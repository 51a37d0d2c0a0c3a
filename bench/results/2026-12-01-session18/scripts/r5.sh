#!/usr/bin/env bash
# r5 (1 GPU; the 2-GPU kind was not lent): this tree (new) against 19b84e6 (old: the tree before the normal mode's
# change to many ranks; made beforehand: mkdir -p ab/oldtree && git archive 19b84e6 CMakeLists.txt setup.py
# pyproject.toml csrc python | tar x -C ab/oldtree; into /tmp/A). The one-GPU tests, then kernel times on one rank
# (no NVLink traffic: the kernels' own cost, where spills and index arithmetic would show) with this tree's
# bench/kernel_times.py at SPEC's normal size (4096 tokens, H 7168, top-8, 256 experts, BF16 and FP8, 24 SMs),
# alternated n o n o n o. Output: r5.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; R=$O/r5; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r5.tar.gz r5 && rm -rf r5); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
rm -rf /tmp/oldsrc && cp -r ab/oldtree /tmp/oldsrc
(cd /tmp/oldsrc && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $R/build_old.log 2>&1) || { tail -20 $R/build_old.log; pack; exit 1; }
echo "builds $(( $(date +%s) - t0 )) s"
nvidia-smi -L > $R/gpus.txt
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 150 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "one_gpu" --durations=5 .) > $R/one_gpu_tests.log 2>&1
grep -E "passed|failed|FAILED" $R/one_gpu_tests.log | tail -8
echo "one-GPU tests $(( $(date +%s) - t0 )) s"
for run in n1 o1 n2 o2 n3 o3; do
  P=; [[ $run == o* ]] && P=/tmp/A
  PYTHONPATH=$P timeout 60 python3 bench/kernel_times.py --nprocs 1 --tokens 4096 --num-sms 24 --out $R/kt_$run > $R/kt_$run.log 2>&1
  echo "== $run rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(layout|dispatch|combine) |kernel medians" $R/kt_$run.log | head -8
done
echo "all $(( $(date +%s) - t0 )) s"
pack
