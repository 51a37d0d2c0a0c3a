#!/usr/bin/env bash
# Session 26, r6 (one GPU): this session's CPU-tested changes on the GPU. Build; then
#  (a) 3 ranks on the GPU (no emulation): test_too_many_tokens_on_some_ranks (nvshmem: a rank over
#      max_tokens_per_rank voids the round on every rank);
#  (b) one rank on NCCL: the torch backend's GPU tests (ordered combine sums, the num_worst_tokens overflow flag,
#      graph capture) and the one-rank torch tests of test_gpu.py;
#  (c) 2 ranks on the GPU (emulation): the ops' and layers' GPU tests (second derivatives, checkpointing, expert TP);
#  (d) the main job on one GPU (records: git field, hook-mode receive records), low_latency_times.py (L2 flush).
# timeout -s INT: pytest still prints its summary when cut.
# usage: bash bench/results/2026-12-01-session26/scripts/r6.sh $OUT [name]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=30 LARGEEP_TEST_POOL_TIMEOUT_S=120
O=$1; N=${2:-r6}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
P="python3 -m pytest -v -ra -p no:cacheprovider --durations=5"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 timeout -s INT -k 20 90 $P test_errors.py -k "too_many_tokens_on_some and one-gpu") > $R/a_refuse.log 2>&1
echo "a rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/a_refuse.log | tail -6
(cd tests && timeout -s INT -k 20 90 $P -m gpu test_torch_backend.py test_gpu.py -k "torch_one_rank or sum_blocks") > $R/b_torch.log 2>&1
echo "b rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/b_torch.log | tail -6
(cd tests && LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1 timeout -s INT -k 20 150 $P -m gpu test_ops.py test_layers.py test_expert_tp.py) > $R/c_layers.log 2>&1
echo "c rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" $R/c_layers.log | tail -8
timeout -s INT 90 python3 -m largeep.bench --backends nvshmem,torch --tokens 128 --iters 5 --warmup 2 --no-plots --out $R/bench > $R/d_bench.log 2>&1
echo "d bench rc=$? $(( $(date +%s) - t0 )) s"; tail -3 $R/d_bench.log
timeout -s INT 60 python3 bench/low_latency_times.py --out $R/ll --tokens 8,128 --iters 10 --warmup 3 --graph-reps 5 > $R/d_ll.log 2>&1
echo "d ll rc=$? $(( $(date +%s) - t0 )) s"; tail -3 $R/d_ll.log
python3 - "$R" <<'PY' 2>&1 | tee $R/d_check.txt
import json, sys, glob
R = sys.argv[1]
recs = json.load(open(f"{R}/bench/results.json"))
print("records", len(recs), "git", sorted({r.get("git") for r in recs}))
print("recv logical_gbps", sorted({str(r["logical_gbps"]) for r in recs if r["op"] == "recv"}))
for f in glob.glob(f"{R}/ll/*.json"):
    if not f.endswith(".run.json"):
        print(f, len(json.load(open(f))), "records")
PY
echo "all $(( $(date +%s) - t0 )) s"
pack
