#!/usr/bin/env bash
# Session 47, r2 (one GPU): the lean gather_global_experts (dst=, device=) with CUDA weights, two ranks sharing
# the GPU (a gloo group); the FSDP2 forward refusal, the checkpoint at another EP size, the lean gather and the
# Hugging Face ports as CPU tests under the GPU machine's torch; the layers' DDP and serving GPU tests beside them.
# usage: bash bench/results/2026-12-04-session47/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}" emulate
build
tests gpu.log 300 test_layers.py -k "lean or ddp or serve or global_experts"
run_for cpu.log 300 bash -c 'cd tests && python3 -m pytest -v -ra -p no:cacheprovider test_hf_port.py test_layers.py -k "hf or fsdp or another_ep or lean or global_experts or ddp"'
echo "all $(elapsed) s"
finish
