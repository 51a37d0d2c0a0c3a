#!/usr/bin/env bash
# Session 38, r2 (one GPU): the working tree's FP8 quantiser (the group's maximum taken on packed bf16 pairs, two
# values per instruction; no branch around the shuffles; 47-48 registers against 57-58) as A, and A with eight
# pairs of groups per warp step instead of four (62 registers) as B, against the committed kernel (old_tree/,
# unpacked from HEAD: `git archive HEAD | tar -x -C old_tree`, then rm -rf old_tree/bench/results old_tree/docs;
# not committed). First their bits (test_fp8_native_kernels and the low-latency FP8 tests on A, the casts on B),
# then their times, alternating twice (session 37's fp8_cast2.py: per call and back to back).
# Prediction: A and B quantise at 32768 x 7168 in 200-210 us back to back (r1: 218-221), dequantise unchanged.
# Then the new test of a low-latency combine that leaves out the k it skips (inf there), on 1 rank and on 2 ranks
# sharing the GPU, and Buffer creation after dd494b1 (num_sms's bound and default): the error table's creation rows
# and the normal-mode tests, two ranks sharing the GPU.
# usage: bash bench/results/2026-12-03-session38/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}"
build
build_tree old_tree /tmp/old_lp
mkdir -p /tmp/u8_tree
tar --exclude=./bench/results --exclude=./docs --exclude=./old_tree --exclude=./.git -cf - . | tar -xf - -C /tmp/u8_tree
sed -i 's/^constexpr int kFp8Unroll = 4;/constexpr int kFp8Unroll = 8;/' /tmp/u8_tree/csrc/kernels/rows.cu
grep -n "^constexpr int kFp8Unroll" /tmp/u8_tree/csrc/kernels/rows.cu
build_tree /tmp/u8_tree /tmp/u8_lp
tests fp8.log 100 test_gpu.py -k "fp8_native_kernels or low_latency_fp8_bits or low_latency_fp8_not_finite or skipped_not_finite"
export PYTHONPATH=/tmp/u8_lp
tests fp8_u8.log 60 test_gpu.py -k "fp8_native_kernels"
unset PYTHONPATH
cast=bench/results/2026-12-03-session37/scripts/fp8_cast2.py
for i in 1 2; do
  run_for old$i.log 60 env PYTHONPATH=/tmp/old_lp python3 $cast "$SESSION_DIR/old$i.json"
  run_for a$i.log 60 python3 $cast "$SESSION_DIR/a$i.json"
  run_for b$i.log 60 env PYTHONPATH=/tmp/u8_lp python3 $cast "$SESSION_DIR/b$i.json"
done
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1
tests skipped2.log 100 test_gpu.py -k "skipped_not_finite"
tests create.log 120 test_errors.py -k "create or num_sms or worst"
tests normal.log "$(left 540)" test_gpu.py -k "test_normal and not four and not many"
echo "all $(elapsed) s"
finish
