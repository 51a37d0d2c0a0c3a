#!/usr/bin/env bash
# session 9 run10: the fixed reference of the normal-mode CUDA-graph test, with the id-check and pipeline tests;
# the 128- and 4096-token round trips against the torch backend in one run; host times of the calls
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=$1; mkdir -p $O
timeout 200 bash scripts/device_check.sh $O/check build
(cd tests && LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 200 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "worst_graph or layout_id_check or pipeline_gpu or worst_tokens or finished_calls" .) > $O/check/gpu_tests.log 2>&1
cat $O/check/summary.txt >> $O/summary.txt; grep -E "passed|failed" $O/check/gpu_tests.log | tail -2 >> $O/summary.txt
grep -E "^(FAILED|ERROR)" $O/check/gpu_tests.log | head -20 >> $O/summary.txt
timeout 150 python3 -m largeep.bench --modes normal --tokens 128,4096 --dtypes bf16 --backends nvshmem,torch --experts 256 --no-plots --out $O/bench > $O/bench.log 2>&1
grep -E "roundtrip" $O/bench.log | tee -a $O/summary.txt
timeout 100 python3 bench/results/2026-11-30-session9/scripts/diag_host.py 128 > $O/diag_host.log 2>&1
grep -E "^[a-z]" $O/diag_host.log | grep -v WARN | cut -c1-60 | tee -a $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
