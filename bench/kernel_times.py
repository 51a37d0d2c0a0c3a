"""Kernel times of the nvshmem backend's normal mode, read from the profiler (SPEC "Measuring": profiler kernel
timings), on every visible GPU.

`python -m largeep.bench` times whole calls with device events, which also counts the host's share (argument
checks, the count-exchange wait, allocations). This script reports what the GPU spends in largeep's own kernels
for each op, as DeepEP's figures are measured:
  layout   = layout_kernel (+ its memsets)
  dispatch = dispatch_prepare + dispatch_push + dispatch_copyout (the count exchange, `dispatch_notify`, is
             reported apart as op "send": it includes waiting for the slowest rank to arrive)
  combine  = combine_push + combine_reduce
Each iteration: L2 flush, barrier, then layout, dispatch, combine. Per iteration the slowest rank counts; records
give the median and p10/p90 over iterations.

usage: python bench/kernel_times.py --out bench/results/DIR [--tokens 4096] [--num-sms 8,16,24] [--dtypes bf16,fp8]
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

import torch
import torch.distributed as dist
from _launch import run_ranks, write_doc  # bench/ is the script's directory

_KERNELS = {
    "layout_kernel": "layout",
    "dispatch_prepare_kernel": "dispatch",
    "dispatch_push_kernel": "dispatch",
    "dispatch_copyout_kernel": "dispatch",
    "dispatch_fused_kernel": "dispatch",
    "dispatch_notify_kernel": "notify",
    "combine_push_kernel": "combine",
    "combine_reduce_kernel": "combine",
    "combine_fused_kernel": "combine",
}


def _kernel_of(name: str) -> str | None:
    m = re.search("|".join(_KERNELS), name)
    return m.group(0) if m else None


def _body(rank: int, world: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    import largeep
    from largeep import fp8
    from largeep._env import settings
    from largeep.bench import records as rec
    from torch.profiler import ProfilerActivity, profile

    fused = bool(settings().tune["fused"])  # LARGEEP_TUNE fused=1: fused dispatch and combine kernels
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    out = []
    for tokens in args.tokens:
        g = torch.Generator(device="cuda").manual_seed(1000 + rank)
        x = torch.randn(tokens, args.hidden, device="cuda", generator=g).to(torch.bfloat16)
        idx = torch.rand(tokens, args.experts, device="cuda", generator=g).topk(args.topk, dim=1).indices
        w = torch.rand(tokens, args.topk, device="cuda", generator=g)
        sent = rec.send_rows_normal(idx, args.experts, world).to("cuda")
        matrix = torch.empty(world, world, dtype=torch.int64, device="cuda")
        dist.all_gather_into_tensor(matrix.view(-1), sent)
        traffic = rec.Traffic.from_matrix(matrix.cpu())
        for sms in args.num_sms:
            buf = largeep.Buffer(None, hidden=args.hidden, num_experts=args.experts, num_topk=args.topk,
                                 max_tokens_per_rank=max(args.tokens), backend="nvshmem", num_sms=sms)
            for dtype in args.dtypes:
                xin = fp8.quantize(x) if dtype == "fp8" else x

                def step(buf: Any = buf, xin: Any = xin, dtype: str = dtype, idx: Any = idx, w: Any = w) -> None:
                    flush.zero_()
                    torch.cuda.synchronize()
                    dist.barrier()
                    buf.get_dispatch_layout(idx)
                    d = buf.dispatch(xin, idx, w)
                    y = d.x if dtype == "bf16" else torch.ones(d.x[0].shape, dtype=torch.bfloat16, device="cuda")
                    buf.combine(y, d.handle)

                for _ in range(args.warmup):
                    step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.iters):
                        step()
                    torch.cuda.synchronize()
                per_op: dict[str, list[float]] = {}
                counts: dict[str, int] = {}
                per_kernel: dict[str, list[float]] = {}
                for e in sorted(prof.events(), key=lambda e: e.time_range.start):
                    if e.device_type != torch.autograd.DeviceType.CUDA:
                        continue
                    kname = _kernel_of(e.name)
                    if kname is None:
                        continue
                    op = _KERNELS[kname]
                    per_kernel.setdefault(kname, []).append(e.time_range.elapsed_us())
                    lst = per_op.setdefault(op, [0.0] * args.iters)
                    n_per_iter = {"layout": 1, "dispatch": 2 if fused else 3, "notify": 1,
                                  "combine": 1 if fused else 2}[op]
                    i = counts.get(op, 0)
                    counts[op] = i + 1
                    lst[min(i // n_per_iter, args.iters - 1)] += e.time_range.elapsed_us()
                breakdown = {k: float(torch.tensor(v).median()) for k, v in per_kernel.items()}
                if rank == 0:
                    print(f"tokens={tokens} sms={sms} {dtype} rank0 kernel medians (us):",
                          {k: round(v, 1) for k, v in breakdown.items()}, flush=True)
                for op, times in per_op.items():
                    t = torch.tensor(times, dtype=torch.float64, device="cuda")
                    allt = torch.empty(world, args.iters, dtype=torch.float64, device="cuda")
                    dist.all_gather_into_tensor(allt.view(-1), t)
                    worst = allt.max(0).values.cpu()
                    q = torch.quantile(worst, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64))
                    med, p10, p90 = (float(v) for v in q)
                    row = rec.row_bytes(dtype, args.hidden) if op == "dispatch" else rec.row_bytes("bf16", args.hidden)
                    logical = rec.gbps(traffic.logical_bytes(row), med) if op in ("dispatch", "combine") else None
                    out.append({
                        "backend": "nvshmem", "mode": "normal", "op": "send" if op == "notify" else op,
                        "ep": world, "ranks_per_node": world, "num_tokens": tokens, "hidden": args.hidden,
                        "num_topk": args.topk, "num_experts": args.experts,
                        "dtype": dtype, "num_sms": sms, "time_us_median": med, "time_us_p10": p10,
                        "time_us_p90": p90, "logical_gbps": logical,
                        "bus_gbps": rec.gbps(traffic.bus_bytes(row), med) if logical else None,
                        "kernels": op, "tune": os.environ.get("LARGEEP_TUNE", ""),
                    })
            buf.destroy()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4096")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--num-sms", default="24")
    p.add_argument("--dtypes", default="bf16,fp8")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--nprocs", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    args.tokens = [int(v) for v in args.tokens.split(",")]
    args.num_sms = [int(v) for v in args.num_sms.split(",")]
    args.dtypes = args.dtypes.split(",")
    world = args.nprocs or torch.cuda.device_count()
    recs = run_ranks(_body, world, args)
    from tabulate import tabulate

    print(tabulate(
        [[r["op"], r["dtype"], r["ep"], r["num_tokens"], r["num_sms"], f"{r['time_us_median']:.1f}",
          f"{r['time_us_p10']:.1f}", f"{r['time_us_p90']:.1f}",
          f"{r['logical_gbps']:.1f}" if r["logical_gbps"] else "-"] for r in recs],
        headers=["op", "dtype", "ep", "tokens", "sms", "kernel us", "p10", "p90", "logical GB/s"],
    ))
    write_doc(args.out, f"kernel_times_ep{world}.json",
              "profiler kernel times of largeep's own kernels (see bench/kernel_times.py)", recs)


if __name__ == "__main__":
    main()
