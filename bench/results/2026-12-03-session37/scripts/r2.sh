#!/usr/bin/env bash
# Session 37, r2 (one GPU). Tree as r1's (HEAD with session 36's proposed/fp8_quantize_bf16_div.patch applied, and
# old_tree/ unpacked from HEAD before it), with the test harness's fix of the gpu marks (the largest need of a
# test's marks: r1 ran test_low_latency_fp8_not_finite's 2-rank cases on 1 GPU without the emulation).
# 1. Quantise/dequantise times, old tree against patched, alternating twice (scripts/fp8_cast.py: r1's copy of it
#    stubbed the native path with a one-argument function, which since session 36's last refactor takes two).
# 2. Two ranks sharing the GPU (emulate): what r1's test_gpu.py pass left out (its -k took the FP8 disagreement
#    test away too; the many-ranks tests it had no time for), then the other GPU-marked test files, for as long
#    as the call allows.
# usage: bash bench/results/2026-12-03-session37/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}"
build
build_tree old_tree /tmp/old_lp
cast=bench/results/2026-12-03-session37/scripts/fp8_cast.py
for i in 1 2; do
  run_for old$i.log 60 env PYTHONPATH=/tmp/old_lp python3 $cast "$SESSION_DIR/old$i.json"
  run_for new$i.log 60 python3 $cast "$SESSION_DIR/new$i.json"
done
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
tests gpu_rest.log 90 test_gpu.py -k "low_latency_fp8_disagree or low_latency_fp8_not_finite or previous_event_orders"
tests errors.log 120 test_errors.py
tests ops.log 100 test_ops.py
tests layers.log 200 test_layers.py
tests small.log 60 test_bench.py test_torch_backend.py
tests property.log "$(left 440)" test_property.py
tests long_run.log "$(left 500)" test_long_run.py
tests gpu_many.log "$(left 560)" test_gpu.py -k "shared_gpus"
echo "all $(elapsed) s"
finish
