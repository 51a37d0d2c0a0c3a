#!/usr/bin/env bash
# Session 25, r3 (one GPU): the result files' new layout on a GPU, and the two new tests against the code before
# their fixes. Build; the main job on one GPU (nvshmem and torch, one token count per mode) and the list file it
# writes; bench/kernel_times.py and bench/low_latency_times.py on one rank (their list files); then the tree at
# f79b79b (before the low-latency round words and the layer's strided-input fix; carried as out/old_src with this
# session's tests copied in) built and installed over it, and test_low_latency_rounds_past_2_31 and
# test_layer_strided_input_gpu[nvshmem] run against it (2 ranks on the GPU): both are expected to FAIL there.
# usage: bash bench/results/2026-12-01-session25/scripts/r3.sh $OUT [name]   (carry out/old_src)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=90
O=$1; N=${2:-r3}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
timeout 200 python3 -m largeep.bench --backends nvshmem,torch --tokens 256 --iters 10 --warmup 3 --out $R/main > $R/main.log 2>&1
echo "main rc=$? $(( $(date +%s) - t0 )) s"; tail -4 $R/main.log
python3 - $R/main/results.json <<'PY'
import json, sys
recs = json.load(open(sys.argv[1]))
assert isinstance(recs, list) and recs, type(recs)
print(len(recs), "records;", sorted({(r["backend"], r["mode"]) for r in recs}), "gpu:", recs[0]["gpu"])
PY
timeout 120 python3 bench/kernel_times.py --nprocs 1 --tokens 512 --num-sms 24 --iters 5 --warmup 2 --out $R/kt > $R/kt.log 2>&1
echo "kernel_times rc=$? $(( $(date +%s) - t0 )) s"; ls $R/kt
timeout 120 python3 bench/low_latency_times.py --nprocs 1 --tokens 8,128 --iters 5 --warmup 2 --graph-reps 5 --out $R/llt > $R/llt.log 2>&1
echo "low_latency_times rc=$? $(( $(date +%s) - t0 )) s"; ls $R/llt
(cd out/old_src && python3 -m pip install --no-build-isolation --no-deps . > $R/build_old.log 2>&1) || { tail -20 $R/build_old.log; }
echo "old build $(( $(date +%s) - t0 )) s"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
(cd out/old_src/tests && timeout 200 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_gpu.py test_layers.py -k "rounds_past_2_31 or (strided and nvshmem)") > $R/old_tests.log 2>&1
echo "old tests rc=$? (expected: failures) $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed|Error" $R/old_tests.log | tail -12
echo "all $(( $(date +%s) - t0 )) s"
pack
