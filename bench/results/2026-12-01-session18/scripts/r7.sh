#!/usr/bin/env bash
# r7 (1 GPU): where the fused combine's 3.5 us at one rank (r5) comes from. Three trees: this one (n), 19b84e6 (o,
# ab/oldtree as in r5) and a (ab/varA: this tree with reduce_token's rank indexing as in 19b84e6, one node only;
# an experiment, not committed code: mkdir -p ab/varA && git archive HEAD CMakeLists.txt setup.py pyproject.toml
# csrc python | tar x -C ab/varA, then the two lines of reduce_token patched). Kernel times on one rank, BF16, 24
# SMs, 4096 tokens, H 7168, alternated n o a n o a. Output: r7.tar.gz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=8
O=$1; R=$O/r7; mkdir -p $R
t0=$(date +%s)
pack() { (cd $O && tar czf r7.tar.gz r7 && rm -rf r7); }
rm -rf /tmp/oldsrc /tmp/varsrc && cp -r ab/oldtree /tmp/oldsrc && cp -r ab/varA /tmp/varsrc
python3 -m pip install --no-build-isolation --no-deps . > $R/build.log 2>&1 &
(cd /tmp/oldsrc && python3 -m pip install --no-build-isolation --no-deps --target /tmp/A . > $R/build_old.log 2>&1) &
(cd /tmp/varsrc && python3 -m pip install --no-build-isolation --no-deps --target /tmp/V . > $R/build_var.log 2>&1) &
wait
(cd /tmp && python3 -c "import largeep._C" && PYTHONPATH=/tmp/A python3 -c "import largeep._C" && PYTHONPATH=/tmp/V python3 -c "import largeep._C") || { tail -20 $R/build*.log; pack; exit 1; }
echo "builds $(( $(date +%s) - t0 )) s"
for run in n1 o1 a1 n2 o2 a2 n3 o3 a3; do
  P=; [[ $run == o* ]] && P=/tmp/A; [[ $run == a* ]] && P=/tmp/V
  PYTHONPATH=$P timeout 40 python3 bench/kernel_times.py --nprocs 1 --tokens 4096 --num-sms 24 --dtypes bf16 --out $R/kt_$run > $R/kt_$run.log 2>&1
  echo "== $run rc=$? $(( $(date +%s) - t0 )) s"; grep -E "kernel medians" $R/kt_$run.log | sed 's/.*medians (us)://'
done
echo "all $(( $(date +%s) - t0 )) s"
pack
