#!/usr/bin/env bash
# r10 (2 GPUs): is the normal-mode combine slower than in session 5? r9 timed the fused combine at 289 us (BF16, 24
# SMs, 2 GPUs) where session 5 (ffd37ee) had 226 us, with the dispatch unchanged (238 us both). Builds this tree and
# ffd37ee (first: `mkdir -p ab/old5 && git archive ffd37ee CMakeLists.txt setup.py pyproject.toml csrc python | tar
# x -C ab/old5`; old into /tmp/A) and times both with this tree's bench/kernel_times.py, alternated: new, old, new,
# old (BF16, 16 and 24 SMs). Output: r10.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; R=$O/r10; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r10.tar.gz r10 && rm -rf r10); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
(cd ab/old5 && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $R/build_old.log 2>&1) || { tail -30 $R/build_old.log; pack; exit 1; }
echo "builds $(( $(date +%s) - t0 )) s"
for run in new1 old1 new2 old2; do
  P=; [[ $run == old* ]] && P=/tmp/A
  PYTHONPATH=$P timeout 100 python3 bench/kernel_times.py --nprocs 2 --num-sms 16,24 --dtypes bf16 --out $R/$run > $R/$run.log 2>&1
  echo "== $run rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(dispatch|combine) " $R/$run.log; grep -E "kernel medians" $R/$run.log | sed 's/.*medians (us)://'
done
pack
