#!/usr/bin/env bash
# Session 28, r3 (one GPU; 2 ranks share it where the tests use several). Build; then
#  (a) the nvshmem refusals with every rank on the GPU (new: a layout's refusal voids the others' dispatch,
#      variants layout / layout_fp8 / layout_tokens) and the bounded creation / library-collective tests;
#  (b) the ops' zero-copy training test and the expert-TP GPU tests (the TP check's new refusal path);
#  (c) bench/kernel_times.py on one rank (its new L2 flushes between calls): a smoke run, no link in it;
#  (d) the rest of test_errors.py's GPU tests, as far as the time allows.
# usage: bash bench/results/2026-12-02-session28/scripts/r3.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=90 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r3}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
P="python3 -m pytest -v -ra -p no:cacheprovider --durations=8 -m gpu"
(cd tests && timeout -s INT -k 20 150 $P test_errors.py -k "one_rank_refuses or creation or bounded or missing_peer") > $R/a_refusals.log 2>&1
echo "a rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/a_refusals.log | tail -10
(cd tests && timeout -s INT -k 20 100 $P test_ops.py test_expert_tp.py -k "zero_copy or tp") > $R/b_ops_tp.log 2>&1
echo "b rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/b_ops_tp.log | tail -8
(unset LARGEEP_TEST_EMULATE_GPUS LARGEEP_TEST_SHARED_GPUS; timeout 90 python3 bench/kernel_times.py --nprocs 1 --tokens 128,4096 \
   --num-sms 24 --iters 10 --warmup 3 --out $R/kt1) > $R/c_kernel_times.log 2>&1
echo "c rc=$? $(( $(date +%s) - t0 )) s"; tail -12 $R/c_kernel_times.log
left=$(( 470 - ($(date +%s) - t0) ))
(cd tests && timeout -s INT -k 15 $left $P test_errors.py -k "not (one_rank_refuses or creation or bounded or missing_peer)") > $R/d_errors.log 2>&1
echo "d rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/d_errors.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
