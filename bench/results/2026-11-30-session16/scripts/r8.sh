#!/usr/bin/env bash
# r8 (2 GPUs): probe_uw.py (u and w whole low-latency calls interleaved in one process pair: host and event times),
# then the bench's low-latency sweep in the reverse order of r7 (w, u, w, u; nvshmem only, 30 iterations).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
O=$1; R=$O/r8; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r8.tar.gz r8 && rm -rf r8); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
timeout 120 python3 bench/results/2026-11-30-session16/scripts/probe_uw.py $R/probe.json 30 > $R/probe.log 2>&1; echo "probe rc=$?"; grep -v WARNING $R/probe.log | tail -12
for run in w1 u1 w2 u2; do
  W=; [[ $run == w* ]] && W=--ll-send-weights
  timeout 120 python3 -m largeep.bench --modes low_latency --backends nvshmem --tokens 128 --iters 30 --no-plots $W --out $R/bench_$run > $R/bench_$run.log 2>&1
  echo "== $run rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^nvshmem " $R/bench_$run.log | awk '{print $3, $11, $12, $13}' | tr '\n' ';'; echo
done
pack
