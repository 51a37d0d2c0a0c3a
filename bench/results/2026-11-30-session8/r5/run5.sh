#!/usr/bin/env bash
# session 8 run5: w13 at the prefill preset (SPEC's DeepSeek-V3 layer, F 2048, 128 experts per rank at EP2) against
# the previous tree's Python (A) in one run; the expert path with 128 local experts at F 2048
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=16
O=$1; mkdir -p $O
python3 -m pip install --no-build-isolation --no-deps . > $O/build.log 2>&1 || { tail -40 $O/build.log; exit 1; }
SITE=$(cd /tmp && python3 -c "import largeep,os;print(os.path.dirname(largeep.__file__))")
mkdir -p /tmp/A && cp -r $SITE /tmp/A/largeep && cp ab/old/*.py /tmp/A/largeep/  # ab/old/F = `git show a079c41:python/largeep/F` (layers.py checks.py buffer.py ops.py _env.py)
CUDA_VISIBLE_DEVICES=0 timeout 90 python3 bench/expert_path.py --experts 128 --ffn 2048 --out $O/expert_path > $O/expert_path_e128_f2048.log 2>&1; tee -a $O/summary.txt < $O/expert_path_e128_f2048.log
for tag in A N A2 N2; do
  case $tag in A*) E="PYTHONPATH=/tmp/A";; *) E="X=1";; esac
  env $E timeout 150 python3 bench/layer_times.py --variants no_overlap,experts_only --out $O/layer_$tag > $O/layer_$tag.log 2>&1
  echo "== prefill $tag" | tee -a $O/summary.txt
  grep -E "^(no_overlap|experts)" $O/layer_$tag.log | tee -a $O/summary.txt
done
cd $(dirname $O) && tar czf $O.tgz $(basename $O)
