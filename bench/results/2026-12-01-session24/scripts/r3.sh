#!/usr/bin/env bash
# Session 24, r3 (one GPU): (a) weighted_row_sum with positions outside src (the kernel's new bound) and the row and
# layer GPU tests; the refusal tests (void rounds, now ended by the copy-out's drain) with the ranks on the GPU, and
# test_normal_worst_graph_torch_one_rank, both without the 2-ranks-per-GPU emulation (it turns NCCL pools into gloo);
# (b) the same tree with block_raises_data_flags always true (the flags as before this session), rebuilt, and
# test_late_peer_gets_no_stale_sums run against it: it must fail where the old flags let stale sums through.
# usage: bash bench/results/2026-12-01-session24/scripts/r3.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r3}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 100 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_ops.py -k "weighted_row_sum or gather or expert_order or forward_rows") > $R/tests_rows.log 2>&1
echo "rows rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_rows.log | tail -6
(cd tests && timeout 100 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "one_rank_refuses_one_gpu or unchecked_out_of_range" test_errors.py) > $R/tests_refusals.log 2>&1
echo "refusals rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_refusals.log | tail -6
(cd tests && timeout 60 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "worst_graph_torch_one_rank or normal_gpu_one_rank" test_gpu.py) > $R/tests_one_rank.log 2>&1
echo "one rank rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_one_rank.log | tail -4
(cd tests && LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1 timeout 120 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_layers.py) > $R/tests_layers.log 2>&1
echo "layers rc=$? $(( $(date +%s) - t0 )) s"; grep -E "FAILED|ERROR|passed|failed" $R/tests_layers.log | tail -6
# (b) the flags as before: every data flag raised after an error too
sed -i 's/raise = void_round || !has_error(c.err);/raise = 1;/' csrc/kernels/normal.cuh
grep -n "raise = " csrc/kernels/normal.cuh > $R/old_flags.txt
python3 -m pip install --no-build-isolation --no-deps . > $R/build_old_flags.log 2>&1 || { tail -40 $R/build_old_flags.log; pack; exit 1; }
echo "build (old flags) $(( $(date +%s) - t0 )) s"
(cd tests && LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1 timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_gpu.py -k "late_peer") > $R/tests_late_peer_old_flags.log 2>&1
echo "late peer, old flags rc=$? $(( $(date +%s) - t0 )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed|stale" $R/tests_late_peer_old_flags.log | tail -10
echo "all $(( $(date +%s) - t0 )) s"
pack
