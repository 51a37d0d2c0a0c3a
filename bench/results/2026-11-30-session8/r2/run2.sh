#!/usr/bin/env bash
# session 8 run2: the chunked layer with (C) the Buffer's stream at high priority and the layer's ids checked once
# per batch, against (A) the previous tree's Python (same native module) and (B) C with LARGEEP_STREAM_PRIORITY=normal;
# A C B C A order; the GPU tests of the changed code
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -40 $O/build.log; exit 1; }
SITE=$(cd /tmp && python3 -c "import largeep,os;print(os.path.dirname(largeep.__file__))")
mkdir -p /tmp/A && cp -r $SITE /tmp/A/largeep && cp ab/old/*.py /tmp/A/largeep/  # ab/old/F = `git show a079c41:python/largeep/F` (layers.py checks.py buffer.py ops.py _env.py)
V=no_overlap,chunked_2,chunked_4,two_batch,comm_only,experts_only,experts_half
run() { # tag, then env
  tag=$1; shift
  env "$@" timeout 120 python3 bench/layer_times.py --preset few_experts --variants $V --out $O/layer_$tag > $O/layer_$tag.log 2>&1
  echo "== $tag" | tee -a $O/summary.txt
  grep -E "^(no_overlap|chunked|two_batch|comm_only|experts)" $O/layer_$tag.log | tee -a $O/summary.txt
}
run A1 PYTHONPATH=/tmp/A
run C1 X=1
run B1 LARGEEP_STREAM_PRIORITY=normal
run C2 X=1
run A2 PYTHONPATH=/tmp/A
timeout 120 python3 bench/layer_times.py --preset few_experts --variants no_overlap,chunked_2,two_batch --profile chunked_2,two_batch --out $O/layer_prof > $O/layer_prof.log 2>&1
grep -E "timeline|^(no_overlap|chunked|two_batch)" $O/layer_prof.log | tee -a $O/summary.txt
(cd tests && LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 300 python3 -m pytest -q -m gpu test_layers.py test_ops.py test_expert_tp.py "test_gpu.py::test_finished_calls_on_streams" -p no:cacheprovider > $O/tests.log 2>&1; tail -3 $O/tests.log | tee -a $O/summary.txt)
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
