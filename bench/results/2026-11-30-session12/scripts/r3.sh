#!/usr/bin/env bash
# session 12 run3: the normal round trip (fresh dispatch + combine, whole calls) with the id check folded into the
# count exchange (new) against the tree before it (old, 88f1f0f, built into /tmp/A), alternated, each run its own
# bench process; the torch backend once. First the GPU tests of refusals and the error table on the new tree. 2 GPUs, BF16, 256 experts, top-8, 24 SMs.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -30 $O/build.log; exit 1; }
(cd tests && LARGEEP_TIMEOUT_S=20 timeout 200 python3 -m pytest -q -ra -m gpu -k "one_rank_refuses or wrong_call" -p no:cacheprovider . > $O/gpu_tests.log 2>&1); tail -3 $O/gpu_tests.log
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $O/build_old.log 2>&1) || { tail -30 $O/build_old.log; exit 1; }
N="--modes normal --tokens 128,4096 --dtypes bf16 --experts 256 --no-plots --backends nvshmem"
for run in new1 old1 new2 old2 new3 old3; do
  if [[ $run == old* ]]; then P=/tmp/A; else P=; fi
  PYTHONPATH=$P timeout 60 python3 -m largeep.bench $N --out $O/n_$run > $O/n_$run.log 2>&1
  echo "== $run"; grep -E "^nvshmem +normal +(roundtrip|layout)" $O/n_$run.log | awk '{print $3,$6,$11}' | paste -sd' '
done
timeout 90 python3 -m largeep.bench --modes normal --tokens 128,4096 --dtypes bf16 --experts 256 --no-plots \
  --backends torch --out $O/n_torch > $O/n_torch.log 2>&1
echo "== torch"; grep -E "^torch +normal +roundtrip" $O/n_torch.log | awk '{print $3,$6,$11}' | paste -sd' '
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
