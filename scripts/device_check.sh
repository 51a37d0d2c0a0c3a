#!/usr/bin/env bash
# One round of GPU checks on the GPU machine: build, GPU tests, benchmarks. Logs and JSON go to OUTDIR.
# usage: scripts/device_check.sh OUTDIR [stage ...]
#   stages: build tests bench perf internode layer longrun tune comb shared primitives (default: build tests bench)
#   bench: python -m largeep.bench (whole-call event times, every backend; LARGEEP_BENCH_ARGS overrides the preset)
#   perf:  kernel times (normal) and kernel + CUDA-graph times (low-latency) of the nvshmem backend, on all GPUs,
#          on GPUs 0,1 and (normal only) on GPU 0 (LARGEEP_PERF_SMS: the normal mode's SM counts, default 8,16,24)
#   internode: kernel and per-leg times of the normal mode with nodes emulated on one host (bench/kernel_times.py)
#   layer: bench/layer_times.py (one MoE layer at prefill size, with and without overlap, and a stack of it
#          pipelined) on all GPUs, at SPEC.md's sizes, with the balanced preset (F 256; its summary says whether
#          communication ~ experts) and with the few_experts preset (16 experts) at F 384 and 768, and at 8
#          communication SMs with a carveout of 8
#   longrun: 10,000 checked rounds of random sizes on the nvshmem backend, on 2 GPUs and (if present) 4
#   tune: LARGEEP_TUNE settings other than the defaults: normal kernels with 512 threads per block (kernel times),
#         the low-latency receive and combine send with one block per local expert (ll_spread=0: its GPU tests)
#   comb: the combine's LARGEEP_TUNE comb settings: GPU tests at comb 0, 1, 7; kernel times at LARGEEP_COMB_SWEEP
#   shared: the 4-rank GPU tests with 2 ranks per GPU (LARGEEP_TEST_SHARED_GPUS=1; NVSHMEM's several PEs per GPU),
#          the long run and create/destroy cycles among them (LARGEEP_TEST_ROUNDS rounds), and the one-GPU tests
#          (2-4 ranks on GPU 0: refusals, unchecked ids, property edge cases)
#   primitives: bench/primitives.cu (fence, flag and NVLink store costs; needs 2 GPUs)
set -uo pipefail
OUT=${1:?usage: scripts/device_check.sh OUTDIR [stage ...]}
shift
STAGES=${*:-build tests bench}
mkdir -p "$OUT"
# Never let NCCL, PyTorch or NVSHMEM use NVLink multicast on the shared host.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 LARGEEP_BUILD_NATIVE=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
PY=${PYTHON:-python3}
# Each command's limit: SIGINT first (pytest prints its summary and closes its process pools), then SIGKILL 30 s
# later; in the foreground, so that a SIGINT that cuts this script (scripts/four_gpu.sh) reaches the command too.
TO="timeout --foreground -s INT -k 30"
# lim SECONDS: SECONDS, or less where LARGEEP_DEADLINE (epoch seconds; scripts/four_gpu.sh sets it to when its own
# limit cuts this script) leaves less: each command's own SIGINT then comes first, and only one reaches pytest
# (two, the outer limit's and this one's, could cut pytest's summary short)
lim() {
  local want=$1 left
  if [ -n "${LARGEEP_DEADLINE:-}" ]; then
    left=$(( LARGEEP_DEADLINE - $(date +%s) - 40 ))
    (( want < left )) || want=$(( left > 1 ? left : 1 ))
  fi
  echo "$want"
}
ngpu=$(nvidia-smi -L | grep -c '^GPU ')
# The GPU tests end at once (exit status 3) where the native module does not load or torch sees fewer GPUs than
# nvidia-smi, rather than skipping quietly (tests/conftest.py); never emulate GPUs the machine has.
visible=$ngpu  # (the GPUs CUDA_VISIBLE_DEVICES leaves, where it is set)
[ -z "${CUDA_VISIBLE_DEVICES+x}" ] || visible=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
export LARGEEP_TEST_REQUIRE_NATIVE=${LARGEEP_TEST_REQUIRE_NATIVE:-1} LARGEEP_TEST_REQUIRE_GPUS=${LARGEEP_TEST_REQUIRE_GPUS:-$visible}
echo "== $(date -u +%FT%TZ) $ngpu GPUs, stages: $STAGES" | tee "$OUT/summary.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
rc=0
for stage in $STAGES; do
  case $stage in
    build)
      start=$(date +%s)
      if ! $PY -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1; then
        tail -60 "$OUT/build.log"; echo "BUILD FAILED" | tee -a "$OUT/summary.txt"; exit 1
      fi
      echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
      (cd /tmp && $PY -c "import largeep.native as n; print('native:', n.unavailable_reason() or 'ok')") | tee -a "$OUT/summary.txt"
      (cd /tmp && $PY -m largeep > "$OUT/environment.txt" 2>&1)  # versions, GPUs, peer access, settings
      ;;
    tests)
      (cd tests && $TO $(lim 1500) $PY -m pytest -q -ra --durations=25 ${LARGEEP_GPU_TESTS:--m gpu .} -p no:cacheprovider) \
        > "$OUT/gpu_tests.log" 2>&1 || rc=1
      tail -25 "$OUT/gpu_tests.log"
      ;;
    bench)
      if $PY -c "import largeep.bench" 2>/dev/null; then
        $TO $(lim 900) $PY -m largeep.bench ${LARGEEP_BENCH_ARGS:---preset quick} --out "$OUT" > "$OUT/bench.log" 2>&1 || rc=1
        tail -40 "$OUT/bench.log"
      fi
      ;;
    perf)
      # every GPU, then 2 GPUs, then 1 (the cost model's calibration uses all sizes; low latency needs 2)
      for n in $(printf '%s\n' "$ngpu" 2 1 | sort -rnu); do
        [ "$n" -le "$ngpu" ] || continue
        vis=$(seq -s, 0 $((n - 1)))
        CUDA_VISIBLE_DEVICES=$vis $TO $(lim 300) $PY bench/kernel_times.py --nprocs "$n" --num-sms ${LARGEEP_PERF_SMS:-8,16,24} \
          --out "$OUT/perf" > "$OUT/perf_normal_ep$n.log" 2>&1 || rc=1
        [ "$n" -ge 2 ] || continue
        CUDA_VISIBLE_DEVICES=$vis $TO $(lim 300) $PY bench/low_latency_times.py --nprocs "$n" \
          --out "$OUT/perf" > "$OUT/perf_ll_ep$n.log" 2>&1 || rc=1
        tail -12 "$OUT/perf_ll_ep$n.log"
      done
      ;;
    internode)
      # nodes emulated on one host: 2 x (N/2), and on 4+ GPUs N x 1 with tokens reaching at most 2 nodes
      CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((ngpu - 1))) $TO $(lim 300) $PY bench/kernel_times.py --nprocs "$ngpu" \
        --ranks-per-node $((ngpu / 2)) --num-sms 24 --out "$OUT/internode" > "$OUT/internode_p$((ngpu / 2)).log" 2>&1 || rc=1
      tail -8 "$OUT/internode_p$((ngpu / 2)).log"
      if [ "$ngpu" -ge 4 ]; then
        $TO $(lim 300) $PY bench/kernel_times.py --nprocs "$ngpu" --ranks-per-node 1 --node-limit 2 --num-sms 24 \
          --out "$OUT/internode" > "$OUT/internode_p1_nl2.log" 2>&1 || rc=1
        tail -8 "$OUT/internode_p1_nl2.log"
      fi
      ;;
    layer)
      $TO $(lim 600) $PY bench/layer_times.py --out "$OUT/layer" > "$OUT/layer.log" 2>&1 || rc=1
      tail -20 "$OUT/layer.log"
      $TO $(lim 600) $PY bench/layer_times.py --preset balanced --profile no_overlap,experts_only,experts_half \
        --out "$OUT/layer" > "$OUT/layer_balanced.log" 2>&1 || rc=1
      tail -20 "$OUT/layer_balanced.log"
      for f in 384 768; do
        $TO $(lim 600) $PY bench/layer_times.py --preset few_experts --ffn $f --out "$OUT/layer" \
          > "$OUT/layer_few_experts_f$f.log" 2>&1 || rc=1
        tail -14 "$OUT/layer_few_experts_f$f.log"
      done
      # the communication's SMs against the experts' carveout (8 / 8 lost least in session 8), stacks included
      $TO $(lim 600) $PY bench/layer_times.py --preset few_experts --num-sms 8 --carveout 8 --out "$OUT/layer_sm8" \
        > "$OUT/layer_few_experts_sm8.log" 2>&1 || rc=1
      tail -20 "$OUT/layer_few_experts_sm8.log"
      ;;
    longrun)
      for w in 2 4; do
        [ "$ngpu" -ge "$w" ] || continue
        (cd tests && LARGEEP_TEST_ROUNDS=10000 $TO $(lim 400) $PY -m pytest -q -ra -p no:cacheprovider \
          "test_long_run.py::test_long_run[$w-nvshmem-nccl]") > "$OUT/long_run_10000_ep$w.log" 2>&1 || rc=1
        tail -3 "$OUT/long_run_10000_ep$w.log"
      done
      ;;
    tune)
      CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((ngpu - 1))) LARGEEP_TUNE=threads=512 $TO $(lim 200) $PY bench/kernel_times.py \
        --nprocs "$ngpu" --num-sms 8,16,24 --out "$OUT/tune_threads512" > "$OUT/tune_threads512.log" 2>&1 || rc=1
      grep -E "kernel medians|^(dispatch|combine) " "$OUT/tune_threads512.log" | tail -12
      (cd tests && LARGEEP_TUNE=ll_spread=0 $TO $(lim 200) $PY -m pytest -q -ra -p no:cacheprovider -m gpu \
        -k "low_latency" .) > "$OUT/tune_ll_spread0_tests.log" 2>&1 || rc=1
      tail -3 "$OUT/tune_ll_spread0_tests.log"
      ;;
    primitives)
      # costs of fences, flags, the last-block pattern and NVLink row stores (warps' stores and TMA), 2 GPUs
      if nvcc -O3 -std=c++17 -arch=sm_90 -I csrc/kernels bench/primitives.cu -o "$OUT/primitives.bin" \
          > "$OUT/primitives_build.log" 2>&1; then
        $TO $(lim 120) "$OUT/primitives.bin" 200 > "$OUT/primitives.txt" 2>&1 || rc=1
        rm -f "$OUT/primitives.bin"
        tail -35 "$OUT/primitives.txt"
      else
        tail -20 "$OUT/primitives_build.log"; rc=1
      fi
      ;;
    shared)
      # 4 ranks on 2 GPUs (2 per GPU, a gloo group): the 4-rank paths for correctness when no 4-GPU machine is lent
      # (on 4 GPUs, one rank per GPU of a gloo group); and 2-4 ranks on GPU 0 (the one-GPU tests; their ids say
      # one_gpu or one-gpu)
      (cd tests && LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=${LARGEEP_TIMEOUT_S:-60} $TO $(lim 900) $PY -m pytest -q -ra \
        -p no:cacheprovider -m gpu -k "shared_gpus or one_gpu or one-gpu" .) > "$OUT/shared_gpus_tests.log" 2>&1 || rc=1
      echo "shared-GPU tests: $(tail -1 "$OUT/shared_gpus_tests.log")" | tee -a "$OUT/summary.txt"
      ;;
    comb)
      # the combine's settings (LARGEEP_TUNE comb): 0 = push kernel then reduce kernel, 1..7 = one fused kernel
      # with comb/8 of its blocks pushing. GPU tests of the normal mode at the extremes, then kernel times.
      for cb in 0 1 7; do
        (cd tests && LARGEEP_TUNE=comb=$cb $TO $(lim 300) $PY -m pytest -q -ra -p no:cacheprovider -m gpu \
          -k "normal_gpu or zero_copy or property" .) > "$OUT/comb${cb}_tests.log" 2>&1 || rc=1
        echo "comb=$cb tests: $(tail -1 "$OUT/comb${cb}_tests.log")" | tee -a "$OUT/summary.txt"
      done
      for cb in ${LARGEEP_COMB_SWEEP:-0 2 4 5}; do
        CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((ngpu - 1))) LARGEEP_TUNE=comb=$cb $TO $(lim 200) $PY bench/kernel_times.py \
          --nprocs "$ngpu" --num-sms ${LARGEEP_PERF_SMS:-8,16,24} --dtypes bf16 --out "$OUT/comb$cb" \
          > "$OUT/comb$cb.log" 2>&1 || rc=1
        grep -E "^combine " "$OUT/comb$cb.log" | sed "s/^/comb=$cb /" | tee -a "$OUT/summary.txt"
      done
      ;;
    *)
      echo "unknown stage $stage" | tee -a "$OUT/summary.txt"; rc=1
      ;;
  esac
done
# One file holding everything, for transports that bring back few files.
tar czf "$OUT.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "wrote $OUT.tar.gz"
exit $rc
