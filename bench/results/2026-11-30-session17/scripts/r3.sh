#!/usr/bin/env bash
# r3 (2 GPUs): the rowmap entry carrying its row's meta (one dependent load less in the weighted combine send).
# GPU tests of the weighted low-latency paths, then kernel times of this tree (new) against OLD (default dbab4ea,
# the tree of r2's figures) with the weights sent, two-row sums (w) and bf16 partial sums (b), alternated; then the
# main benchmark's --ll-bf16-partial-sums on nvshmem. Output: r3.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=32
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; OLD=${OLD:-dbab4ea}; R=$O/r3; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r3.tar.gz r3 && rm -rf r3); }
git log --oneline -1 > $R/tree.txt
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
# (the old tree, made beforehand: mkdir -p ab/oldtree && git archive $OLD CMakeLists.txt setup.py pyproject.toml csrc python | tar x -C ab/oldtree)
rm -rf /tmp/oldsrc && cp -r ab/oldtree /tmp/oldsrc
(cd /tmp/oldsrc && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $R/build_old.log 2>&1) || { tail -20 $R/build_old.log; pack; exit 1; }
echo "builds $(( $(date +%s) - t0 )) s"
(cd tests && timeout 240 python3 -m pytest -q -ra -m gpu -k "bf16_partial_sums or low_latency_weighted or ops_weighted or property or decode_step" --durations=5 . -p no:cacheprovider) > $R/tests.log 2>&1
grep -E "passed|failed|FAILED|Error" $R/tests.log | tail -8
echo "tests $(( $(date +%s) - t0 )) s"
for run in nw1 ow1 nb1 ob1 nw2 ow2 nb2 ob2; do
  W=--weighted; P=
  [[ $run == ?b* ]] && W="--weighted --bf16-partial-sums"
  [[ $run == o* ]] && P=/tmp/A
  PYTHONPATH=$P timeout 50 python3 bench/low_latency_times.py --nprocs 2 --tokens 1,32,128 $W --out $R/ll_$run > $R/ll_$run.log 2>&1
  echo "== $run rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^combine_hook +send" $R/ll_$run.log
done
timeout 90 python3 -m largeep.bench --modes low_latency --backends nvshmem --tokens 1,128 --no-plots --ll-send-weights --ll-bf16-partial-sums --out $R/bench_b > $R/bench_b.log 2>&1
echo "== bench rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^ *nvshmem " $R/bench_b.log | head -16
echo "all $(( $(date +%s) - t0 )) s"
pack
