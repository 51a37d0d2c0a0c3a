#!/usr/bin/env bash
# Session 27, r2 (one GPU; 2 ranks sharing it unless said). Build; then
#  (a) the low-latency GPU tests r1 did not reach (put path at 320 tokens, many ranks / destinations, 4 ranks);
#  (b) the error table's low-latency rows on nvshmem and the weighted-combine id refusals on both backends;
#  (c) the compiled checkpointing test r1 failed (the alignment copy now eager only), the layers' chunk tests;
#  (d) odd num_sms (1, 3; 5 on two nodes of one rank); the NVLink reachability check (normal Buffers made);
#  (e) test_normal_wide_nodes_shared_gpus (cut in r1), as far as the time allows.
# usage: bash bench/results/2026-12-02-session27/scripts/r2.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=90 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r2}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
P="python3 -m pytest -v -ra -p no:cacheprovider --durations=8 -m gpu"
step() { local name=$1 secs=$2; shift 2; (cd tests && timeout -s INT -k 15 $secs $P "$@") > $R/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/$name.log | tail -6; }
step a_ll 150 test_gpu.py -k "put_path and 320 or low_latency and (many_ranks or many_destinations or four_ranks)"
step b_errors 90 test_errors.py -k "nvshmem and ll_ or ll_combine_idx"
step c_layers 90 test_ops.py test_layers.py -k "second_derivative or chunk or unaligned or interleaved"
step d_sms 70 test_gpu.py -k "odd_sms or test_normal_gpu_one_rank"
left=$(( 560 - ($(date +%s) - t0) ))
step e_wide $left test_gpu.py -k "wide_nodes"
echo "all $(( $(date +%s) - t0 )) s"
pack
