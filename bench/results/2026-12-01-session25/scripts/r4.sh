#!/usr/bin/env bash
# Session 25, r4 (one GPU): test_layer_strided_input_gpu with its checks after every call (r3: on the old code a
# failing rank left its peer waiting, and the destroy's timeout hid the assertion). Build; with 2 ranks on the GPU:
# the layers' and ops' GPU tests; then the tree at f79b79b (out/old_src, this session's tests copied in) built over
# it and the strided test run against it: expected to FAIL there.
# usage: bash bench/results/2026-12-01-session25/scripts/r4.sh $OUT [name]   (carry out/old_src)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=90 LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
O=$1; N=${2:-r4}; R=$O/$N; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf $N.tar.gz $N && rm -rf $N); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd tests && timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_layers.py test_ops.py) > $R/layers.log 2>&1
echo "layers rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed|strided" $R/layers.log | tail -8
(cd out/old_src && python3 -m pip install --no-build-isolation --no-deps . > $R/build_old.log 2>&1) || { tail -20 $R/build_old.log; }
echo "old build $(( $(date +%s) - t0 )) s"
(cd out/old_src/tests && timeout 100 python3 -m pytest -v -ra -p no:cacheprovider -m gpu test_layers.py -k "strided and nvshmem") > $R/old_tests.log 2>&1
echo "old tests rc=$? (expected: a failure) $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed|differ" $R/old_tests.log | tail -8
echo "all $(( $(date +%s) - t0 )) s"
pack
