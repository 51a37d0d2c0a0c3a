#!/usr/bin/env bash
# Session 47, r3 (one GPU): the lean gather on CUDA again after its host copies on gloo groups (r2: gloo aborted the
# process on a CUDA tensor's send); MoELayer.set_placement on the nvshmem backend; two ranks sharing the GPU (gloo
# groups). Then the whole of test_layers.py and test_hf_port.py under the GPU machine's torch (GPU and CPU tests).
# usage: bash bench/results/2026-12-04-session47/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}" emulate
build
tests gpu.log 300 test_layers.py -k "lean or set_placement"
run_for all.log 420 bash -c 'cd tests && python3 -m pytest -q -ra -p no:cacheprovider test_layers.py test_hf_port.py'
echo "all $(elapsed) s"
finish
