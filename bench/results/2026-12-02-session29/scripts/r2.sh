#!/usr/bin/env bash
# Session 29, r2 (one GPU; 2 ranks share it). Build; then
#  (a) the rest of test_gpu.py that r1 did not reach (after test_failed_reduce_launch), by id;
#  (b) test_errors.py's GPU tests (refusals, missing peers, creation), as far as the time allows.
# usage: bash bench/results/2026-12-02-session29/scripts/r2.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r2}" emulate
build
(cd tests && python3 -m pytest -q -p no:cacheprovider --co -m gpu test_gpu.py 2>/dev/null | grep "::") > "$SESSION_DIR/all_ids.txt"
awk 'f{print} /test_failed_reduce_launch/{f=1}' "$SESSION_DIR/all_ids.txt" | sed 's#^tests/##' > "$SESSION_DIR/rest_ids.txt"
echo "ids: $(wc -l < "$SESSION_DIR/all_ids.txt") all, $(wc -l < "$SESSION_DIR/rest_ids.txt") left"
tests a_gpu_rest.log 300 $(cat "$SESSION_DIR/rest_ids.txt")
tests b_errors.log "$(left 560)" test_errors.py
echo "all $(elapsed) s"
finish
