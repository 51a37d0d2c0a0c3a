#!/usr/bin/env bash
# r3 (1 GPU): r2's trace part, with the build folder removed first (CMake reads CUDAFLAGS only when it configures):
# a build with -DLARGEEP_TRACE and its low-latency phase marks (bench/trace_summary.py) at 1 rank, 1 and 128 tokens.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; N=${2:-r3}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
rm -rf build
CUDAFLAGS=-DLARGEEP_TRACE python3 -m pip install --no-build-isolation --no-deps . > $R/build_trace.log 2>&1 || { tail -40 $R/build_trace.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
timeout 150 python3 bench/low_latency_times.py --nprocs 1 --tokens 1,128 --iters 20 --out $R/tr1 > $R/trace1.log 2>&1
grep -c "^trace" $R/trace1.log
python3 bench/trace_summary.py $R/trace1.log > $R/trace1_summary.txt 2>&1; cat $R/trace1_summary.txt
echo "all $(( $(date +%s) - t0 )) s"
rm -rf $R/tr1 build
pack
