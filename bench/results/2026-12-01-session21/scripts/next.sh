#!/usr/bin/env bash
# For the next session (not run yet): check session 21's untested GPU tests and time its low-latency kernels where
# they matter. Before the call, on the development machine: mkdir -p ab/oldtree && git archive ea2afec CMakeLists.txt
# setup.py pyproject.toml csrc python | tar x -C ab/oldtree   (the tree before session 21's kernels; never commit ab/)
# 1 GPU: build; test_low_latency_many_destinations_one_gpu (FP8 and BF16 with repeated experts past 8 destination
# ranks); test_missing_peer_times_out_low_latency with both ranks on the GPU (LARGEEP_TEST_EMULATE_GPUS=2).
# 2+ GPUs: the same tests (the second on 2 real GPUs), then low-latency kernel times at 2 ranks (1, 8, 128 tokens,
# FP8, H 7168, top-8, 288 experts), new against old (ea2afec) alternated n o n o n o.
# usage: bash bench/results/2026-12-01-session21/scripts/next.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-next}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
ngpu=$(nvidia-smi -L | wc -l)
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "$ngpu GPUs; build $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "many_destinations" test_gpu.py) > $R/tests_a.log 2>&1
echo "a rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_a.log | tail -4
EMU=; [ "$ngpu" -lt 2 ] && EMU="LARGEEP_TEST_EMULATE_GPUS=2"
(cd tests && env $EMU timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "missing_peer_times_out_low_latency" test_gpu.py) > $R/tests_b.log 2>&1
echo "b rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests_b.log | tail -4
if [ "$ngpu" -ge 2 ] && [ -d ab/oldtree ]; then
  rm -rf /tmp/oldsrc && cp -r ab/oldtree /tmp/oldsrc
  (cd /tmp/oldsrc && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $R/build_old.log 2>&1) || { tail -20 $R/build_old.log; pack; exit 1; }
  for run in n1 o1 n2 o2 n3 o3; do
    P=; [[ $run == o* ]] && P=/tmp/A
    PYTHONPATH=$P timeout 90 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,8,128 --iters 30 --out $R/ll_$run > $R/ll_$run.log 2>&1
    echo "== $run rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(dispatch|combine)_hook +(send|recv)|graph_back" $R/ll_$run.log
  done
fi
echo "all $(( $(date +%s) - t0 )) s"
pack
