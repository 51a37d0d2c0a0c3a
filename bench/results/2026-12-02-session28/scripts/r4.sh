#!/usr/bin/env bash
# Session 28, r4 (one GPU; 2 ranks share it). Build; then the creation and teardown paths after the host-side
# review: NVSHMEM's state judged on every rank (new test_nvshmem_other_group_first), the allocation's second
# rendezvous (every Buffer creation), create/destroy cycles, the second group, heap sizes; then the refusals again.
# usage: bash bench/results/2026-12-02-session28/scripts/r4.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=90 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r4}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
P="python3 -m pytest -v -ra -p no:cacheprovider --durations=8 -m gpu"
(cd tests && timeout -s INT -k 15 110 $P test_errors.py test_gpu.py -k "other_group_first or heap_sizes or second_group or runtime_cycles or create_destroy or init_timeout") > $R/a_creation.log 2>&1
echo "a rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/a_creation.log | tail -10
left=$(( 230 - ($(date +%s) - t0) ))
(cd tests && timeout -s INT -k 10 $left $P test_errors.py -k "one_rank_refuses_one_gpu or creation or bounded") > $R/b_refusals.log 2>&1
echo "b rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/b_refusals.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
