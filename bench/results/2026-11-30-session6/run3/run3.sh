#!/usr/bin/env bash
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
(nvcc -O3 -std=c++17 -arch=sm_90 -I csrc/kernels bench/primitives.cu -o /tmp/primitives > $O/prim_build.log 2>&1) &
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -40 $O/build.log; exit 1; }
wait
/tmp/primitives 200 > $O/primitives.txt 2>&1; cat $O/primitives.txt
(cd tests && LARGEEP_TIMEOUT_S=20 timeout 400 python3 -m pytest -q -ra -m gpu -p no:cacheprovider . > $O/gpu_tests.log 2>&1; tail -3 $O/gpu_tests.log | tee -a $O/summary.txt)
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 timeout 200 python3 -m pytest -q -m gpu -k "low_latency_four" -p no:cacheprovider . > $O/ll_shared.log 2>&1; tail -2 $O/ll_shared.log | tee -a $O/summary.txt)
for sp in 1 0; do
  LARGEEP_TUNE=ll_spread=$sp timeout 200 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,32,128,256 --out $O/ll_sp$sp > $O/ll_sp$sp.log 2>&1
  echo "== ll_spread=$sp" >> $O/summary.txt; grep -E "^(dispatch|combine|graph)" $O/ll_sp$sp.log >> $O/summary.txt
done
cat $O/summary.txt
