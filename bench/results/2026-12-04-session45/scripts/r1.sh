#!/usr/bin/env bash
# Session 45, r1 (one GPU): session 44's review fixes to the copy-engine combine (copy streams destroyed without a
# wait, every started copy stream joined before an error is raised) and the chunked layers' split under
# torch.compile, on ranks sharing the GPU (results checked, nothing timed): every copy-engine test on 2 ranks, the
# normal-mode and mixed cases on 4, then the layers' and ops' GPU tests (chunked, strided, pipelined layers).
# usage: bash bench/results/2026-12-04-session45/scripts/r1.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r1}" emulate
build
tests ce2.log 200 test_gpu.py -k "copy_engines"
LARGEEP_TEST_EMULATE_GPUS=4 tests ce4.log 200 test_gpu.py -k "normal_gpu_copy_engines"
tests layers.log "$(left 560)" test_layers.py test_ops.py test_expert_tp.py
echo "all $(elapsed) s"
finish
