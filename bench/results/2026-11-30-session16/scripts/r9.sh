#!/usr/bin/env bash
# r9 (2 GPUs): a snapshot of the current tree for the README's summary: normal-mode kernel times at 8, 16, 24 SMs
# (bench/kernel_times.py), low-latency kernel and CUDA-graph times at 1-256 tokens, without and with weights
# (bench/low_latency_times.py), and whole calls against the torch backend on NCCL in the same run
# (python -m largeep.bench: normal mode at 128 and 4096 tokens, low-latency mode at 128). Output: r9.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; R=$O/r9; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r9.tar.gz r9 && rm -rf r9); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
python3 -m largeep > $R/environment.txt 2>&1
echo "build $(( $(date +%s) - t0 )) s"
timeout 200 python3 bench/kernel_times.py --nprocs 2 --num-sms 8,16,24 --out $R/perf > $R/perf_normal.log 2>&1; echo "normal kernels rc=$? $(( $(date +%s) - t0 )) s"
tail -30 $R/perf_normal.log
timeout 120 python3 bench/low_latency_times.py --nprocs 2 --out $R/perf > $R/perf_ll.log 2>&1; echo "ll rc=$? $(( $(date +%s) - t0 )) s"
timeout 120 python3 bench/low_latency_times.py --nprocs 2 --weighted --out $R/perf_w > $R/perf_ll_w.log 2>&1; echo "ll w rc=$? $(( $(date +%s) - t0 )) s"
grep -E "^(dispatch_hook|combine_hook|graph_back)" $R/perf_ll.log | awk '$4==128 || $4==1'
grep -E "^(dispatch_hook|combine_hook|graph_back)" $R/perf_ll_w.log | awk '$4==128 || $4==1'
timeout 200 python3 -m largeep.bench --modes normal --backends nvshmem,torch --tokens 128,4096 --dtypes bf16 --no-plots --out $R/bench_normal > $R/bench_normal.log 2>&1; echo "bench normal rc=$? $(( $(date +%s) - t0 )) s"
grep -E "roundtrip" $R/bench_normal.log
timeout 120 python3 -m largeep.bench --modes low_latency --backends nvshmem,torch --no-plots --out $R/bench_ll > $R/bench_ll.log 2>&1; echo "bench ll rc=$? $(( $(date +%s) - t0 )) s"
grep -E "roundtrip" $R/bench_ll.log
pack
