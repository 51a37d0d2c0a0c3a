#!/usr/bin/env bash
# r3 (1 GPU): the merge positions in one pass for all rounds (a dozen ops, not a dozen per round); where a 2-round fresh dispatch's time goes on one rank
# (profile_rounds.py); bench/rounds_cost.py again; the tokens_per_round one-GPU test. Output: r3.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; R=$O/r3; mkdir -p $R
t0=$(date +%s)
S=$PWD/bench/results/2026-12-01-session20/scripts
pack() { (cd $O && tar czf r3.tar.gz r3 && rm -rf r3); }
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 || { tail -40 $R/build.log; pack; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd /tmp && timeout 120 python3 $S/profile_rounds.py $R) > $R/profile.log 2>&1
tail -5 $R/profile.log; head -30 $R/rounds_2.txt
(cd /tmp && timeout 90 python3 $OLDPWD/bench/rounds_cost.py --gpus 1 --iters 15 --json $R/rounds_cost_1rank.json) > $R/rounds_cost.log 2>&1
python3 -c "
import json; d=json.load(open('$R/rounds_cost_1rank.json'))
for r in d['rows']: print(r)"
(cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=20 LARGEEP_TEST_POOL_TIMEOUT_S=120 timeout 150 python3 -m pytest -v -ra -p no:cacheprovider -m gpu -k "tokens_per_round" .) > $R/tests.log 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests.log | tail -5
echo "all $(( $(date +%s) - t0 )) s"
pack
