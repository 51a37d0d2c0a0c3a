#!/usr/bin/env bash
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -40 $O/build.log; exit 1; }
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TEST_ROUNDS=10000 LARGEEP_TIMEOUT_S=60 timeout 330 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k shared_gpus test_long_run.py > $O/shared_long.log 2>&1; tail -3 $O/shared_long.log | tee -a $O/summary.txt)
timeout 150 python3 bench/kernel_times.py --nprocs 2 --num-sms 8,16,24 --out $O/perf > $O/perf_normal_ep2.log 2>&1
grep -E "^(layout|dispatch|combine|send) " $O/perf_normal_ep2.log >> $O/summary.txt
timeout 120 python3 bench/low_latency_times.py --nprocs 2 --out $O/perf > $O/perf_ll_ep2.log 2>&1
grep -E "^(dispatch|combine|graph)" $O/perf_ll_ep2.log >> $O/summary.txt
cat $O/summary.txt
