#!/usr/bin/env bash
# session 7 run6: where the host time of a 128-token round trip goes (Python pieces, native calls); round trip vs torch
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -40 $O/build.log; exit 1; }
timeout 120 python3 bench/host_profile.py --nprocs 2 --tokens 128 --iters 300 --out $O/host > $O/host_profile.log 2>&1
head -24 $O/host_profile.log | tee -a $O/summary.txt
timeout 150 python3 -m largeep.bench --modes normal --tokens 128 --dtypes bf16 --backends nvshmem,torch --experts 256 --no-plots --out $O/bench128 > $O/bench128.log 2>&1
grep -E "roundtrip|layout|dispatch|combine" $O/bench128.log | tail -12 | tee -a $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
