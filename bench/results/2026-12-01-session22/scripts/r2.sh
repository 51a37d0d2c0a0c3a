#!/usr/bin/env bash
# Session 22, r2 (one GPU): host time of small normal calls, new tree against 37602e8 (session 22's start), both
# built here, alternated n o n o n o in one run: bench/host_profile.py at 128 tokens (one rank, 300 round trips;
# host time per call and per native call) and python -m largeep.bench's normal round trip at 128 tokens (nvshmem).
# Then the layout / normal GPU tests on the new tree (2 ranks on the GPU, LARGEEP_TEST_EMULATE_GPUS=2).
# Before the call, on the development machine: mkdir -p ab/base && git archive 37602e8 CMakeLists.txt setup.py
# pyproject.toml csrc python | tar x -C ab/base   (never commit ab/)
# usage: bash bench/results/2026-12-01-session22/scripts/r2.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r2}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
rm -rf /tmp/oldsrc && cp -r ab/base /tmp/oldsrc
(cd /tmp/oldsrc && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $R/build_old.log 2>&1) || { tail -20 $R/build_old.log; pack; exit 1; }
echo "builds $(( $(date +%s) - t0 )) s"
for run in n1 o1 n2 o2 n3 o3; do
  P=; [[ $run == o* ]] && P=/tmp/A
  PYTHONPATH=$P timeout 60 python3 bench/host_profile.py --nprocs 1 --iters 300 --tokens 128 --out $R/hp_$run > $R/hp_$run.log 2>&1
  echo "== $run rc=$? $(( $(date +%s) - t0 )) s"; grep -E "host time per call|native calls \(us, median" $R/hp_$run.log
  PYTHONPATH=$P timeout 90 python3 -m largeep.bench --modes normal --tokens 128 --dtypes bf16 --backends nvshmem --no-plots --out $R/bench_$run > $R/bench_$run.log 2>&1
  grep -E "roundtrip|layout" $R/bench_$run.log | head -4
done
(cd tests && LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1 timeout 280 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "layout or test_normal_gpu or zero_copy or worst or finished_calls or round" test_gpu.py) > $R/tests.log 2>&1
echo "tests rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
