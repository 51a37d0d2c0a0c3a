#!/usr/bin/env bash
# Session 36, r3 (one GPU; the tests' ranks share it). The FP8 cast kernels taking four groups per warp step (this
# tree) against one group per step (9b1c405, r2's, unpacked into old_tree/ by `git archive 9b1c405 | tar -x -C
# old_tree`, not committed), alternating twice (scripts/fp8_cast.py); then the FP8 tests again (the kernels' bits
# against the CPU's with r2's empty-shape test fixed, the FP8 dispatch through ops and the chunked layer).
# usage: bash bench/results/2026-12-03-session36/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
build
(cd old_tree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/old_lp . > "$SESSION_DIR/build_old.log" 2>&1) \
  || { tail -30 "$SESSION_DIR/build_old.log"; finish; exit 1; }
echo "old build $(elapsed) s"
cast=bench/results/2026-12-03-session36/scripts/fp8_cast.py
for i in 1 2; do
  run_for old$i.log 90 env PYTHONPATH=/tmp/old_lp python3 $cast "$SESSION_DIR/old$i.json"
  run_for new$i.log 90 python3 $cast "$SESSION_DIR/new$i.json"
done
tests fp8.log 150 test_gpu.py -k "fp8_native_kernels or low_latency_fp8_bits or low_latency_fp8_not_finite"
tests ops.log 120 test_ops.py -k "dispatch_fp8_gpu"
tests layers.log "$(left 570)" test_layers.py -k "chunked_gpu or decode_step"
echo "all $(elapsed) s"
finish
