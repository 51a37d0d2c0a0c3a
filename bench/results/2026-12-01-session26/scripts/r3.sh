#!/usr/bin/env bash
# Session 26, r3 (one GPU): r2's test_runtime_cycles[2] found device free memory falling by 4 MiB per Buffer
# create/destroy cycle with 2 ranks on the GPU (2 MiB per rank). Which part: raw symmetric alloc/free, a normal
# Buffer created and destroyed, with a round trip, a low-latency Buffer. Per cycle: (free KiB, torch reserved KiB).
# r4: the same script with a third argument r4 (see leak_main.py)
# usage: bash bench/results/2026-12-01-session26/scripts/r3.sh $OUT [name] [r4]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r3}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
S=$(pwd)/bench/results/2026-12-01-session26/scripts
(cd tests && timeout -s INT 200 python3 $S/leak_main.py ${3:-}) > $R/leak.log 2>&1
echo "leak rc=$? $(( $(date +%s) - t0 )) s"; cat $R/leak.log | grep -v "^\[largeep WARNING" | tail -20
pack
