#!/usr/bin/env bash
# r2: where the low-latency kernels' time goes. Builds with CUDAFLAGS=-DLARGEEP_TRACE (phase marks, printed by the
# kernels) and runs bench/low_latency_times.py on 2 GPUs at 1 and 128 tokens; trace_summary.py takes the medians.
set -uo pipefail
OUT=${1:?usage: r2.sh OUT}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
CUDAFLAGS=-DLARGEEP_TRACE python3 -m pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
timeout 300 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,128 --iters 20 --out "$OUT/ll" \
  > "$OUT/ll.log" 2>&1
tail -15 "$OUT/ll.log"
python3 bench/trace_summary.py "$OUT/ll.log" | tee "$OUT/trace_summary.txt"
