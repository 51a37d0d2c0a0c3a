#!/usr/bin/env bash
# session 11 run7: the low-latency dispatch's native id check (new) against 626f30f (old: torch min/max + sync):
# GPU tests of the low-latency paths and the error table on nvshmem, then whole-call low-latency times (nvshmem
# only, each run its own bench process), alternated new / old / new / old
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build_new.log 2>&1 || { tail -40 $O/build_new.log; exit 1; }
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $O/build_old.log 2>&1) || { tail -40 $O/build_old.log; exit 1; }
echo built
(cd tests && timeout 240 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "low_latency or wrong_call or id_check or layout" .) > $O/tests.log 2>&1
tail -3 $O/tests.log; grep -E "^(FAILED|ERROR)" $O/tests.log | head
L="--modes low_latency --tokens 1,128 --hidden 7168 --topk 8 --experts 288 --dtypes fp8 --no-plots --no-hook"
i=0
for v in new old new old; do
  i=$((i+1)); if [ $v = old ]; then PP=/tmp/A; else PP=; fi
  PYTHONPATH=$PP timeout 60 python3 -m largeep.bench $L --backends nvshmem --out $O/ll_${v}_$i > $O/ll_${v}_$i.log 2>&1
  echo "== $v $i"; grep -E "^nvshmem +low_latency +(dispatch|combine) " $O/ll_${v}_$i.log | awk '{print $3,$6,$11,$12,$13}' | paste -sd' '
done
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
