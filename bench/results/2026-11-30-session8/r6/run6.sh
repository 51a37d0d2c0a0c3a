#!/usr/bin/env bash
# session 8 run6: can communication and expert compute overlap at all? comm_beside_experts (the two issued at once,
# no dependency) against comm_only and experts_only, at three SM / carveout settings (few-experts preset)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -40 $O/build.log; exit 1; }
for cfg in "24 24" "24 0" "8 8"; do
  set -- $cfg
  timeout 100 python3 bench/layer_times.py --preset few_experts --num-sms $1 --carveout $2 --variants no_overlap,chunked_2,comm_only,experts_only,comm_beside_experts --out $O/layer_s$1_c$2 > $O/layer_s$1_c$2.log 2>&1
  echo "== num_sms $1 carveout $2" | tee -a $O/summary.txt
  grep -E "^(no_overlap|chunked|comm|experts)|overlap_of" $O/layer_s$1_c$2.log | sed 's/.*"overlap_of_independent_parts": \([0-9.-]*\).*/overlap_of_independent_parts \1/' | tee -a $O/summary.txt
done
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
