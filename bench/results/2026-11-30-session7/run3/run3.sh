#!/usr/bin/env bash
# session 7 run3: the chunked layer's timeline (chrome traces, host syncs), with the default and a large carveout;
# native calls' mean and p90 host times
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -40 $O/build.log; exit 1; }
timeout 120 python3 bench/layer_times.py --preset few_experts --variants no_overlap,chunked_2,experts_only --profile chunked_2,experts_only --trace $O/trace --sync-debug --out $O/layer > $O/layer_trace.log 2>&1
grep -E "^(no_overlap|chunked|experts)|timeline|host syncs|^    /" $O/layer_trace.log | tee -a $O/summary.txt
timeout 100 python3 bench/layer_times.py --preset few_experts --carveout 66 --variants no_overlap,chunked_2 --profile chunked_2 --trace $O/trace66 --out $O/layer66 > $O/layer_c66.log 2>&1
grep -E "^(no_overlap|chunked|experts)|timeline" $O/layer_c66.log | tee -a $O/summary.txt
timeout 100 python3 bench/host_profile.py --nprocs 2 --tokens 128 --iters 300 --out $O/host > $O/host_profile.log 2>&1
head -5 $O/host_profile.log | tee -a $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
