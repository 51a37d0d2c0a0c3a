#!/usr/bin/env bash
# The 4-GPU round the open issues still need, in parts that each fit one device call (under 10 minutes), in the
# order of what they settle. Run from the repository root on the 4-GPU machine: scripts/four_gpu.sh PART OUTDIR
#   perf:    build; normal-mode kernel times at 8/16/24 SMs on 4, 2 and 1 GPUs and low-latency kernel and graph
#            times on 4 and 2 GPUs, and on 4 with the weights sent (issues 3, 4, 8: the 4-GPU tables and the
#            model's held-out EP4 records)
#   calls:   build; whole calls against the torch backend on NCCL, each backend in its own process, nvshmem /
#            torch / nvshmem: the normal round trip at 128 and 4096 tokens (issue 3's 10x and 2x) and low latency
#            at 1-256 tokens (issue 4's 10x)
#   tests1:  build; the GPU tests but the layers', the property and the refusal (test_errors.py) tests, on 4 GPUs
#            (the 4-rank cases skipped on 2)
#   tests2:  build; the layers' and the property tests on 4 GPUs
#   tests3:  build; the refusal tests (test_errors.py) on 4 GPUs, the torch backend on NCCL among them
#   shared:  build; the tests written for several ranks per GPU (LARGEEP_TEST_SHARED_GPUS=1), on GPUs 0 and 1 only
#            (CUDA_VISIBLE_DEVICES=0,1: 4 ranks on 2 GPUs; 2-40 ranks on GPU 0 or on GPUs 0 and 1), which the parts
#            above skip
#   layer:   build; the prefill layer without overlap, chunked and two-batch (issue 7's 1.3x) on 4 GPUs, at F 2048
#            and at F 256 (the balanced preset)
#   layer_fp8: build; the same layer dispatching FP8 (prefill: the layer variants and parts; balanced: all)
#   longrun: build; 10,000 checked rounds of random sizes on 4 GPUs (issue 9; fails on fewer)
#   nodes:   build; normal-mode kernel and per-leg times with nodes emulated on one host (2 x 2 and 4 x 1)
#   split:   build; the fused combine's push share (LARGEEP_TUNE comb, eighths of its blocks; default 3) at 8/16/24
#            SMs, BF16: 3, 4, 5, 2 on 4 GPUs, then 3, 4 on 2 (the model fitted on 2 GPUs at comb 3 predicts 4 GPUs
#            at comb 4 about 13% faster, 531 against 612 us at 24 SMs; session 5 measured comb 4 slower on 2 GPUs).
#            Kernel times only, the default in the same call; scripts/device_check.sh's `comb` stage adds the GPU
#            tests at the extreme splits (longer than one call)
#   ce:      build; the copy engines' transfers between GPUs (bench/micro/ce_copy_bench.cu: strided copies in
#            pieces to 1 and 3 peers at once), then the combine's kernel times with the copy engines pushing
#            (LARGEEP_TUNE comb=8) and the fused default (comb=3) alternated, at 8/16/24 SMs, BF16, on 4 then 2 GPUs
# Every command runs under what is left of a 560 s budget (LARGEEP_PART_S), so that OUTDIR.tar.gz is written before
# a 600 s device limit (a command cut there gets SIGINT first, so that pytest prints its summary), and OUTDIR is
# removed once packed (the device machine hands back only a few files: run it as `four_gpu.sh PART $OUT/PART`); the
# exit status is 1 where a command failed or was cut (their codes in summary.txt), else 0. DRY=1 prints the commands
# (on stderr). The GPU tests end at once where the native
# module does not load (scripts/device_check.sh), and LARGEEP_TEST_EMULATE_GPUS is cleared: the real GPUs only.
set -uo pipefail
PART=${1:?usage: scripts/four_gpu.sh perf|calls|tests1|tests2|tests3|shared|layer|layer_fp8|longrun|nodes|split|ce OUTDIR}
OUT=${2:?usage: scripts/four_gpu.sh PART OUTDIR}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export LARGEEP_TIMEOUT_S=${LARGEEP_TIMEOUT_S:-20} LARGEEP_TEST_POOL_TIMEOUT_S=${LARGEEP_TEST_POOL_TIMEOUT_S:-120}
unset LARGEEP_TEST_EMULATE_GPUS
DEADLINE=$(( $(date +%s) + ${LARGEEP_PART_S:-560} ))
RC=0
# run SECONDS CMD...: CMD under the smaller of SECONDS and what is left of the budget, told when that limit cuts it
# (LARGEEP_DEADLINE, epoch seconds: scripts/device_check.sh ends its own commands before it, so that pytest gets one
# SIGINT, its own command's, and prints its summary)
exec 3>&2  # (DRY's commands go here: the commands' own output may be redirected to a log)
run() {
  local want=$1; shift
  local left=$(( DEADLINE - $(date +%s) ))
  (( want < left )) || want=$left
  if [ "${DRY:-0}" = 1 ]; then
    echo "${CUDA_VISIBLE_DEVICES:+CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES }${LARGEEP_GPU_TESTS:+LARGEEP_GPU_TESTS=\"$LARGEEP_GPU_TESTS\" }timeout -s INT -k 30 $want $*" >&3
    return 0
  fi
  if (( want <= 0 )); then echo "out of time: $*" | tee -a "$OUT/summary.txt" >&3; RC=1; return 1; fi
  local rc=0
  LARGEEP_DEADLINE=$(( $(date +%s) + want )) timeout -s INT -k 30 "$want" "$@" || rc=$?
  if (( rc != 0 )); then echo "rc $rc from: $*" | tee -a "$OUT/summary.txt" >&3; RC=1; fi
  return $rc
}
check() { run 530 bash scripts/device_check.sh "$OUT" build "$@"; }  # (30 s for the kill after SIGINT)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # (absolute: commands below run from other folders)
case $PART in
  perf)
    run 430 bash scripts/device_check.sh "$OUT" build perf  # (leaves the weighted run below its time)
    # the low-latency combine with the weights sent (issue 4's combine on 4 GPUs: about a quarter fewer bytes)
    run 120 python3 bench/low_latency_times.py --nprocs 4 --weighted --out "$OUT/perf_w" > "$OUT/perf_ll_w_ep4.log" 2>&1
    tail -12 "$OUT/perf_ll_w_ep4.log"
    ;;
  calls)
    check
    L="--modes low_latency --tokens 1,8,32,128,256 --hidden 7168 --topk 8 --experts 288 --dtypes fp8 --no-plots"
    N="--modes normal --tokens 128,4096 --dtypes bf16 --experts 256 --no-plots"
    for b in nvshmem torch nvshmem2; do
      run 100 python3 -m largeep.bench $L --backends ${b%2} --out "$OUT/ll_$b" > "$OUT/ll_$b.log" 2>&1
      run 70 python3 -m largeep.bench $N --backends ${b%2} --out "$OUT/normal_$b" > "$OUT/normal_$b.log" 2>&1
      grep -hE "^${b%2} +(low_latency|normal) +(dispatch|combine|roundtrip) " "$OUT/ll_$b.log" "$OUT/normal_$b.log" \
        2>/dev/null
    done
    ;;
  tests1) LARGEEP_GPU_TESTS="-m gpu --ignore=test_layers.py --ignore=test_property.py --ignore=test_errors.py ." check tests ;;
  tests2) LARGEEP_GPU_TESTS="-m gpu test_layers.py test_property.py" check tests ;;
  tests3) LARGEEP_GPU_TESTS="-m gpu test_errors.py" check tests ;;
  shared) CUDA_VISIBLE_DEVICES=0,1 check shared ;;  # (2 GPUs: the 4-rank pools put 2 ranks on each)
  layer)
    check
    run 250 python3 bench/layer_times.py --out "$OUT/layer" > "$OUT/layer.log" 2>&1
    tail -20 "$OUT/layer.log"
    # F 256: communication nearer the experts' time, where overlap can pay
    run 250 python3 bench/layer_times.py --preset balanced --out "$OUT/layer_balanced" > "$OUT/layer_balanced.log" 2>&1
    tail -20 "$OUT/layer_balanced.log"
    ;;
  layer_fp8)
    check
    # the same layer dispatching FP8 (MoELayer(use_fp8=True)): against `layer`'s bf16 records of the same machine
    run 250 python3 bench/layer_times.py --fp8 --variants no_overlap,chunked_2,two_batch,comm_only,experts_only \
      --out "$OUT/layer_fp8" > "$OUT/layer_fp8.log" 2>&1
    tail -20 "$OUT/layer_fp8.log"
    run 250 python3 bench/layer_times.py --fp8 --preset balanced --out "$OUT/layer_fp8_balanced" \
      > "$OUT/layer_fp8_balanced.log" 2>&1
    tail -20 "$OUT/layer_fp8_balanced.log"
    ;;
  longrun)
    if [ "${DRY:-0}" != 1 ] && [ "$(nvidia-smi -L | grep -c '^GPU ')" -lt 4 ]; then
      echo "longrun needs 4 GPUs" | tee -a "$OUT/summary.txt"; RC=1
    else
      check
      (cd tests && LARGEEP_TEST_ROUNDS=10000 LARGEEP_TEST_REQUIRE_NATIVE=1 LARGEEP_TEST_REQUIRE_GPUS=4 \
        run 480 python3 -m pytest -q -ra -p no:cacheprovider "test_long_run.py::test_long_run[4-nvshmem-nccl]") \
        > "$OUT/long_run_10000_ep4.log" 2>&1 || RC=1
      tail -3 "$OUT/long_run_10000_ep4.log"
    fi
    ;;
  nodes) check internode ;;
  split)
    check
    for nc in 4:3 4:4 4:5 4:2 2:3 2:4; do
      n=${nc%:*} c=${nc#*:}
      run 75 env CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((n - 1)))" LARGEEP_TUNE="comb=$c" python3 bench/kernel_times.py \
        --nprocs "$n" --num-sms 8,16,24 --dtypes bf16 --out "$OUT/split_comb$c" > "$OUT/split_comb${c}_ep$n.log" 2>&1
      grep -hE "^combine " "$OUT/split_comb${c}_ep$n.log" | sed "s/^/ep$n comb=$c: /"
    done
    ;;
  ce)
    check
    run 60 nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/ce_copy_bench bench/micro/ce_copy_bench.cu \
      && run 120 /tmp/ce_copy_bench > "$OUT/ce_copy_bench.log" 2>&1
    grep -E "^peer|^dest" "$OUT/ce_copy_bench.log"
    for nc in 4:8 4:3 2:8 2:3; do
      n=${nc%:*} c=${nc#*:}
      run 75 env CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((n - 1)))" LARGEEP_TUNE="comb=$c" python3 bench/kernel_times.py \
        --nprocs "$n" --num-sms 8,16,24 --dtypes bf16 --out "$OUT/ce_comb$c" > "$OUT/ce_comb${c}_ep$n.log" 2>&1
      grep -hE "^combine " "$OUT/ce_comb${c}_ep$n.log" | sed "s/^/ep$n comb=$c: /"
    done
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
# (the folder goes once packed: the device machine hands back only a few files from $OUT)
[ "${DRY:-0}" = 1 ] || { tar czf "$OUT.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")" && rm -rf "$OUT"; }
exit $RC
