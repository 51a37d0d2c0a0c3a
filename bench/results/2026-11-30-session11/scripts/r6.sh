#!/usr/bin/env bash
# session 11 run6: whole-call times against the torch backend, each backend in its own bench process (as session
# 10's run8): low latency (1..256 tokens, FP8, 288 experts) and the normal round trip (128, 4096 tokens, BF16)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -30 $O/build.log; exit 1; }
L="--modes low_latency --tokens 1,8,32,128,256 --hidden 7168 --topk 8 --experts 288 --dtypes fp8 --no-plots"
N="--modes normal --tokens 128,4096 --dtypes bf16 --experts 256 --no-plots"
for run in "nvshmem 1" "torch 1" "nvshmem 2"; do
  set -- $run
  timeout 90 python3 -m largeep.bench $L --backends $1 --out $O/ll_$1$2 > $O/ll_$1$2.log 2>&1
  echo "== ll $1 $2"; grep -E "^$1 +low_latency +(dispatch|combine) " $O/ll_$1$2.log | awk '{print $3,$6,$11}' | paste -sd' '
  timeout 60 python3 -m largeep.bench $N --backends $1 --out $O/n_$1$2 > $O/n_$1$2.log 2>&1
  echo "== normal $1 $2"; grep -E "^$1 +normal +roundtrip" $O/n_$1$2.log | awk '{print $6,$11}' | paste -sd' '
done
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
