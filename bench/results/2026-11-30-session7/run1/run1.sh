#!/usr/bin/env bash
# session 7 run1: verify session 6's untested changes, then the experimental ll_fuse against the default
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=$1; mkdir -p $O
LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 420 bash scripts/device_check.sh $O/check build tests shared primitives
(cd tests && LARGEEP_TUNE=ll_fuse=1 timeout 120 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "low_latency" . > $O/fuse_tests.log 2>&1; echo "ll_fuse=1 LL tests: $(tail -1 $O/fuse_tests.log)" | tee -a $O/summary.txt)
i=0
for v in 0 1 0 1; do
  i=$((i+1))
  LARGEEP_TUNE=ll_fuse=$v timeout 60 python3 bench/low_latency_times.py --nprocs 2 --out $O/fuse${v}_$i > $O/ll_fuse${v}_$i.log 2>&1
done
grep -H -E "^(dispatch|combine|graph)" $O/ll_fuse*.log | tee -a $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
