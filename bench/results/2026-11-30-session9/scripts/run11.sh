#!/usr/bin/env bash
# session 9 run11: the 128-token round trip with the dispatch's id check in its prepare kernel (new, this tree)
# against the tree before it (old: ac94c51, built into /tmp/A), alternated in one run; the torch backend once
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build_new.log 2>&1 || { tail -30 $O/build_new.log; exit 1; }
# ab/oldtree = `git archive ac94c51 CMakeLists.txt setup.py pyproject.toml csrc python | tar -x -C ab/oldtree`
(cd ab/oldtree && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $O/build_old.log 2>&1) || { tail -30 $O/build_old.log; exit 1; }
(cd /tmp && python3 -c "import largeep.native as n; print('new', n.__file__, n.unavailable_reason())"; PYTHONPATH=/tmp/A python3 -c "import largeep.native as n; print('old', n.__file__, n.unavailable_reason())") | tee -a $O/summary.txt
B="--modes normal --tokens 128 --dtypes bf16 --experts 256 --no-plots"
for i in 1 2 3; do
  for v in new old; do
    if [ $v = old ]; then P=/tmp/A; else P=; fi
    PYTHONPATH=$P timeout 60 python3 -m largeep.bench $B --backends nvshmem --out $O/b_${v}$i > $O/b_${v}$i.log 2>&1
    echo "== $v $i" | tee -a $O/summary.txt; grep -E "^nvshmem +normal" $O/b_${v}$i.log | tee -a $O/summary.txt
  done
done
timeout 60 python3 -m largeep.bench $B --backends torch --out $O/b_torch > $O/b_torch.log 2>&1
echo "== torch" | tee -a $O/summary.txt; grep -E "^torch +normal" $O/b_torch.log | tee -a $O/summary.txt
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
