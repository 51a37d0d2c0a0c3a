#!/usr/bin/env bash
# Session 37, r1 (one GPU). Tree: HEAD with session 36's proposed/fp8_quantize_bf16_div.patch applied (`git apply`),
# and old_tree/ unpacked from HEAD before it (`git archive HEAD | tar -x -C old_tree`, its bench/results and docs
# removed; not committed).
# 1. The FP8 casts' bits (test_fp8_native_kernels; the low-latency kernels' FP8 against fp8.quantize), on the
#    patched tree: the first GPU run of the native casts after session 36's last refactor (checks.on, on_device).
# 2. Quantise/dequantise times, old tree against patched, alternating twice (session 36's scripts/fp8_cast.py).
# 3. Two ranks sharing the GPU (emulate): the FP8 dispatch with a gradient, then test_gpu.py as a regression pass
#    for as long as the call allows.
# usage: bash bench/results/2026-12-03-session37/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}"
build
build_tree old_tree /tmp/old_lp
tests fp8.log 100 test_gpu.py -k "fp8_native_kernels or low_latency_fp8_bits or low_latency_fp8_not_finite"
cast=bench/results/2026-12-03-session36/scripts/fp8_cast.py
for i in 1 2; do
  run_for old$i.log 60 env PYTHONPATH=/tmp/old_lp python3 $cast "$SESSION_DIR/old$i.json"
  run_for new$i.log 60 python3 $cast "$SESSION_DIR/new$i.json"
done
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
tests ops_fp8.log 120 test_ops.py -k "dispatch_fp8_gpu"
tests gpu.log "$(left 560)" test_gpu.py -k "not fp8_native_kernels and not low_latency_fp8"
echo "all $(elapsed) s"
finish
