#!/usr/bin/env bash
# r4 (1 GPU): after the review: a refusal in a later round (error names it; rounds' outputs released in a finally);
# the tokens_per_round one-GPU test (now with a bad id in rank 0's last round); the model with rounds and its memory
# table at EP 8-512. Output: r4.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; R=$O/r4; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r4.tar.gz r4 && rm -rf r4); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 200 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "tokens_per_round or one_gpu" .) > $R/tests.log 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests.log | tail -25
python3 -m largeep.bench.sim --calibrate bench/results/2026-11-30-session16/r9/perf/kernel_times_ep2.json bench/results/2026-11-30-session6/run2/ep1/kernel_times_ep1.json bench/results/2026-11-30-session16/r9/perf/low_latency_times_ep2.json --holdout-sms 16 --holdout-tokens 32 --no-copy-phase --eps 8,16,32,64,128,256,512 --dispatch-dtypes bf16 --gpus-per-node 8 --tokens-per-round 1024 --out $R/model_rounds1024 > $R/model_rounds1024/sim.log 2>&1 || mkdir -p $R/model_rounds1024
python3 -m largeep.bench.sim --calibrate bench/results/2026-11-30-session16/r9/perf/kernel_times_ep2.json bench/results/2026-11-30-session6/run2/ep1/kernel_times_ep1.json bench/results/2026-11-30-session16/r9/perf/low_latency_times_ep2.json --holdout-sms 16 --holdout-tokens 32 --no-copy-phase --eps 8,16,32,64,128,256,512 --dispatch-dtypes bf16 --gpus-per-node 8 --tokens-per-round 1024 --out $R/model_rounds1024 > $R/sim_rounds1024.log 2>&1
tail -30 $R/sim_rounds1024.log
echo "all $(( $(date +%s) - t0 )) s"
pack
