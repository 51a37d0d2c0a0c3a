#!/usr/bin/env bash
# session 11 run8 (the machine of run7, still held: /tmp/A = the old tree): whole-call low-latency times again,
# alternated old / new x3 (each its own bench process)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
O=$OUT/r8; mkdir -p $O
L="--modes low_latency --tokens 1,128 --hidden 7168 --topk 8 --experts 288 --dtypes fp8 --no-plots --no-hook"
i=0
for v in old new old new old new; do
  i=$((i+1)); if [ $v = old ]; then PP=/tmp/A; else PP=; fi
  PYTHONPATH=$PP timeout 30 python3 -m largeep.bench $L --backends nvshmem --out $O/ll_${v}_$i > $O/ll_${v}_$i.log 2>&1
  echo "== $v $i"; grep -E "^nvshmem +low_latency +(dispatch|combine) " $O/ll_${v}_$i.log | awk '{print $3,$6,$11,$12,$13}' | paste -sd' '
done
