#!/usr/bin/env bash
# Session 47, r7 (one GPU): the own-layer recipe's variants again after r6 (the compiled one failed in the test's
# namespace under torch 2.11), on CUDA (2 ranks sharing the GPU) and on CPU under the GPU machine's torch.
# usage: bash bench/results/2026-12-04-session47/scripts/r7.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r7}" emulate
build
tests own_layer.log 200 test_ops.py -k "own_layer"
run_for own_layer_cpu.log 200 bash -c 'cd tests && python3 -m pytest -q -ra -p no:cacheprovider test_ops.py -k "own_layer and not gpu"'
echo "all $(elapsed) s"
finish
