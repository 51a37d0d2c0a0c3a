#!/usr/bin/env bash
# session 7 run2: where the layer's chunked overlap loses (profile + timeline), fewer SMs for the overlap,
# host time of a 128-token round trip, the two-kernel low-latency path's test
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -40 $O/build.log; exit 1; }
(cd tests && LARGEEP_TIMEOUT_S=20 timeout 150 python3 -m pytest -q -ra -p no:cacheprovider -m gpu -k "low_latency_fused" test_gpu.py > $O/fused_tests.log 2>&1; echo "fused tests: $(tail -1 $O/fused_tests.log)" | tee -a $O/summary.txt)
timeout 150 python3 bench/layer_times.py --preset few_experts --profile chunked_2,experts_only,experts_half --out $O/layer > $O/layer_f384.log 2>&1
grep -E "^(no_overlap|chunked|two_batch|gate_only|comm_only|experts)|timeline" $O/layer_f384.log | tee -a $O/summary.txt
timeout 120 python3 bench/layer_times.py --preset few_experts --num-sms 8 --carveout 8 --variants no_overlap,chunked_2,two_batch,comm_only,experts_only,experts_half --profile chunked_2 --out $O/layer_sm8 > $O/layer_f384_sm8.log 2>&1
grep -E "^(no_overlap|chunked|two_batch|gate_only|comm_only|experts)|timeline" $O/layer_f384_sm8.log | tee -a $O/summary.txt
timeout 100 python3 bench/host_profile.py --nprocs 2 --tokens 128 --iters 300 --out $O/host > $O/host_profile.log 2>&1
head -4 $O/host_profile.log | tee -a $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
