#!/usr/bin/env bash
# Reproduces tests/test_gpu.py::test_destroy_without_peer outside the test pool; a crash prints its native stack
# (LARGEEP_SEGV_BACKTRACE; the GPU machine has no gdb). Session 4: rank 0 died with SIGSEGV inside the runtime's
# free on the bounded rendezvous's failure path; session 5 found it in ostream::_M_insert<long> (formatting the error
# message with a libstdc++ linked statically and exported), fixed on main by Msg and --exclude-libs, not re-run.
# usage (GPU machine, 2 GPUs): bash scripts/repro_destroy_without_peer.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: scripts/repro_destroy_without_peer.sh OUTDIR}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 WORLD_SIZE=2 LARGEEP_TIMEOUT_S=5 PYTHONFAULTHANDLER=1 LARGEEP_SEGV_BACKTRACE=1
body='
import os, sys, time, torch, torch.distributed as dist
sys.path.insert(0, "tests")
rank = int(os.environ["RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda", rank))
import gpu_bodies
try:
    print(rank, gpu_bodies.destroy_without_peer(rank, 2, 5.0), flush=True)
except BaseException as exc:
    print(rank, "raised", repr(exc), flush=True)
if rank == 1:
    time.sleep(30)  # stays alive (as the test pool worker does) while rank 0 destroys
'
RANK=1 timeout 120 python3 -c "$body" > "$OUT/rank1.log" 2>&1 &
RANK=0 timeout 120 python3 -c "$body" > "$OUT/rank0.log" 2>&1
wait
tail -60 "$OUT/rank0.log"
