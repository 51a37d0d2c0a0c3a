"""Kernel times of the nvshmem backend's normal mode, read from the profiler (SPEC "Measuring": profiler kernel
timings), on every visible GPU.

`python -m largeep.bench` times whole calls with device events, which also counts the host's share (argument
checks, the count-exchange wait, allocations). This script reports what the GPU spends in largeep's own kernels
for each op, as DeepEP's figures are measured:
  layout   = layout_kernel (the memset of its counts past 256 tokens not counted; it clears is_token_in_rank itself)
  dispatch = dispatch_prepare + dispatch_push + dispatch_copyout (the count exchange, `dispatch_notify`, is
             reported apart as op "send": it includes waiting for the slowest rank to arrive)
  combine  = combine_fused (one node, the default) or combine_push + combine_reduce (LARGEEP_TUNE comb=0, or
             several nodes); with comb=8, combine_ce_prologue + combine_fused (its blocks only reduce, while the
             copy engines move the rows on other streams: the reduction waits for the last rows that come in, and
             a rank's own copies out end before its peers' reductions, so the slowest rank's time covers them)
With --ranks-per-node below the number of ranks (nodes emulated on one host), dispatch also counts
dispatch_rdma_send (the leg between nodes: NVSHMEM puts, once per destination node) and dispatch_forward (the
NVLink leg on the destination node), and combine counts combine_forward (partial sums put home); a second file,
legs_ep{N}_p{P}.json, gives each leg's kernel time and bytes, and the bytes that would cross between nodes if every
rank sent to every rank directly. On one host the "RDMA" leg runs over NVLink: its time is no network figure.
--node-limit L draws routings whose tokens reach at most L nodes (experts chosen among L random nodes).
Each iteration: L2 flush, barrier, layout, L2 flush, dispatch, L2 flush, barrier, combine (SPEC "Measuring": L2
flushed between calls). Per iteration the slowest rank counts; records give the median and p10/p90 over iterations.
Writes OUT/kernel_times_{tag}.json, a JSON list of SPEC.md records, each also with "bus_gbps", "kernels" (the op
whose kernels were summed), "tune" (LARGEEP_TUNE), "combine_eighths" (the fused combine's push share, 0: push +
reduce), "routing" ("uniform", or "node_limited_L" with --node-limit), the environment (gpu, driver, cuda, torch,
nccl, nvshmem, git) and "command"; kernel_times_{tag}.run.json beside it says what the times are
(largeep.bench.records); legs_{tag}.json is one object {command, env, what, records}.

usage: python bench/kernel_times.py --out bench/results/DIR [--tokens 4096] [--num-sms 8,16,24] [--dtypes bf16,fp8]
                                  [--ranks-per-node P] [--node-limit L]
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

import torch
import torch.distributed as dist
from _launch import run_ranks, write_doc, write_records  # bench/ is the script's directory

_KERNELS = {
    "layout_kernel": "layout",
    "dispatch_prepare_kernel": "dispatch",
    "dispatch_rdma_send_kernel": "dispatch",
    "dispatch_push_kernel": "dispatch",
    "dispatch_forward_kernel": "dispatch",
    "dispatch_copyout_kernel": "dispatch",
    "dispatch_notify_kernel": "notify",
    "combine_push_kernel": "combine",
    "combine_forward_kernel": "combine",
    "combine_reduce_kernel": "combine",
    "combine_fused_kernel": "combine",
    "combine_ce_prologue_kernel": "combine",
}


def _routing(tokens: int, experts: int, topk: int, world: int, p: int, node_limit: int | None,
             g: torch.Generator) -> torch.Tensor:
    """Random top-k expert ids [T, K]; with node_limit, every token's experts lie in at most that many nodes."""
    scores = torch.rand(tokens, experts, device="cuda", generator=g)
    if node_limit is not None:
        nodes, per_node = world // p, experts // (world // p)
        pick = torch.rand(tokens, nodes, device="cuda", generator=g).topk(node_limit, dim=1).indices
        allowed = torch.zeros(tokens, nodes, dtype=torch.bool, device="cuda").scatter_(1, pick, True)
        scores = scores.masked_fill(~allowed.repeat_interleave(per_node, dim=1), -1.0)
    return scores.topk(topk, dim=1).indices


def _leg_bytes(idx: torch.Tensor, experts: int, world: int, p: int, rank: int, row: int) -> dict[str, float]:
    """Bytes this rank sends per leg: between nodes once per (token, other node), between nodes if it sent to
    every rank directly, and over NVLink on its own node (its direct pushes)."""
    epr = experts // world
    ranks = torch.zeros(idx.shape[0], world, dtype=torch.bool, device=idx.device)
    ranks.scatter_(1, idx // epr, True)
    nodes = ranks.view(-1, world // p, p).any(2)
    me = rank // p
    off_nodes = torch.ones(world // p, dtype=torch.bool, device=idx.device)
    off_nodes[me] = False
    off_ranks = off_nodes.repeat_interleave(p)
    return {
        "rdma_bytes": float(nodes[:, off_nodes].sum()) * row,
        "direct_cross_node_bytes": float(ranks[:, off_ranks].sum()) * row,
        "nvlink_push_bytes": float(ranks[:, ~off_ranks].sum()) * row,
    }


def _kernel_of(name: str) -> str | None:
    m = re.search("|".join(_KERNELS), name)
    return m.group(0) if m else None


def _body(rank: int, world: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    import largeep
    from largeep import fp8
    from largeep.bench import records as rec
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    out: list[dict[str, Any]] = []
    legs: list[dict[str, Any]] = []
    for tokens in args.tokens:
        g = torch.Generator(device="cuda").manual_seed(1000 + rank)
        x = torch.randn(tokens, args.hidden, device="cuda", generator=g).to(torch.bfloat16)
        p = args.ranks_per_node or world
        idx = _routing(tokens, args.experts, args.topk, world, p, args.node_limit, g)
        w = torch.rand(tokens, args.topk, device="cuda", generator=g)
        sent = rec.send_rows_normal(idx, args.experts, world).to("cuda")
        matrix = torch.empty(world, world, dtype=torch.int64, device="cuda")
        dist.all_gather_into_tensor(matrix.view(-1), sent)
        traffic = rec.Traffic.from_matrix(matrix.cpu())
        for sms in args.num_sms:
            buf = largeep.Buffer(None, hidden=args.hidden, num_experts=args.experts, num_topk=args.topk,
                                 max_tokens_per_rank=max(args.tokens), backend="nvshmem", num_sms=sms,
                                 ranks_per_node=p)
            for dtype in args.dtypes:
                xin = fp8.quantize(x) if dtype == "fp8" else x

                def step(buf: Any = buf, xin: Any = xin, dtype: str = dtype, idx: Any = idx, w: Any = w) -> None:
                    flush.zero_()
                    torch.cuda.synchronize()
                    dist.barrier()
                    buf.get_dispatch_layout(idx)
                    flush.zero_()  # (the dispatch does not find topk_idx in L2 where the layout left it)
                    d = buf.dispatch(xin, idx, w)
                    y = d.x if dtype == "bf16" else torch.ones(d.x[0].shape, dtype=torch.bfloat16, device="cuda")
                    # nor the combine its input where the dispatch (or torch.ones) wrote it
                    flush.zero_()
                    # combine starts aligned too: otherwise one rank's later dispatch shows up as the other's
                    # reduction waiting for its rows
                    torch.cuda.synchronize()
                    dist.barrier()
                    buf.combine(y, d.handle)

                for _ in range(args.warmup):
                    step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.iters):
                        step()
                    torch.cuda.synchronize()
                per_kernel: dict[str, list[float]] = {}
                for e in sorted(prof.events(), key=lambda e: e.time_range.start):
                    if e.device_type != torch.autograd.DeviceType.CUDA:
                        continue
                    kname = _kernel_of(e.name)
                    if kname is not None:
                        per_kernel.setdefault(kname, []).append(e.time_range.elapsed_us())
                # every kernel runs once per iteration: an op's time in iteration i is the sum of its kernels' i-th
                per_op: dict[str, list[float]] = {}
                for kname, times in per_kernel.items():
                    assert len(times) == args.iters, f"{kname}: {len(times)} launches in {args.iters} iterations"
                    lst = per_op.setdefault(_KERNELS[kname], [0.0] * args.iters)
                    for i, v in enumerate(times):
                        lst[i] += v
                breakdown = {k: float(torch.tensor(v).median()) for k, v in per_kernel.items()}
                if rank == 0:
                    print(f"tokens={tokens} sms={sms} {dtype} rank0 kernel medians (us):",
                          {k: round(v, 1) for k, v in breakdown.items()}, flush=True)
                if p < world:
                    legs.append(_legs(idx, args, world, p, rank, tokens, sms, dtype, per_kernel))
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
                        "ep": world, "ranks_per_node": p, "num_tokens": tokens, "hidden": args.hidden,
                        "num_topk": args.topk, "num_experts": args.experts,
                        "dtype": dtype, "num_sms": sms, "time_us_median": med, "time_us_p10": p10,
                        "time_us_p90": p90, "logical_gbps": logical,
                        "bus_gbps": rec.gbps(traffic.bus_bytes(row), med) if logical else None,
                        "kernels": op, "tune": os.environ.get("LARGEEP_TUNE", ""),
                        # the fused combine's push share (LARGEEP_TUNE comb), 0 where push + reduce ran
                        "combine_eighths": (8 if buf._impl.ce_combine else buf._impl.fused_combine
                                            if "combine_fused_kernel" in per_kernel else 0),
                        # (the model's fit warns about records of routings other than uniform)
                        "routing": f"node_limited_{args.node_limit}" if args.node_limit else "uniform",
                    })
            buf.destroy()
    return {"records": out, "legs": legs}


_LEG_KERNELS = {
    "rdma_us": "dispatch_rdma_send_kernel", "forward_us": "dispatch_forward_kernel",
    "push_us": "dispatch_push_kernel", "copyout_us": "dispatch_copyout_kernel",
    "combine_push_us": "combine_push_kernel", "combine_forward_us": "combine_forward_kernel",
    "combine_reduce_us": "combine_reduce_kernel",
}


def _legs(idx: torch.Tensor, args: argparse.Namespace, world: int, p: int, rank: int, tokens: int, sms: int,
          dtype: str, per_kernel: dict[str, list[float]]) -> dict[str, Any]:
    """Per-leg kernel times and bytes (summed over ranks) of one configuration; a leg's time as the records' are:
    per iteration the slowest rank, then the median over iterations (0 for a leg whose kernel did not run)."""
    from largeep.bench import records as rec

    row = rec.row_bytes(dtype, args.hidden)
    mine = _leg_bytes(idx, args.experts, world, p, rank, row)
    iters = len(next(iter(per_kernel.values())))
    times = [per_kernel.get(k, [0.0] * iters) for k in _LEG_KERNELS.values()]
    vals = torch.tensor([mine[k] for k in sorted(mine)] + [v for t in times for v in t], dtype=torch.float64,
                        device=idx.device)
    allv = torch.empty(world, vals.numel(), dtype=torch.float64, device=idx.device)
    dist.all_gather_into_tensor(allv.view(-1), vals)
    allv = allv.cpu()
    nb = len(mine)
    out: dict[str, Any] = {"ep": world, "ranks_per_node": p, "num_tokens": tokens, "hidden": args.hidden,
                           "num_topk": args.topk, "num_experts": args.experts, "dtype": dtype, "num_sms": sms,
                           "node_limit": args.node_limit}
    for i, k in enumerate(sorted(mine)):
        out[k] = float(allv[:, i].sum())
    slowest = allv[:, nb:].view(world, len(_LEG_KERNELS), iters).amax(0)  # [leg, iteration]
    for j, k in enumerate(_LEG_KERNELS):
        out[k] = float(torch.quantile(slowest[j], 0.5))
    out["cross_node_saving"] = out["direct_cross_node_bytes"] / max(out["rdma_bytes"], 1.0)
    # per-GPU bandwidth of each dispatch leg: the bytes one rank sends on it over the leg's kernel time
    out["rdma_gbps_per_rank"] = out["rdma_bytes"] / world / max(out["rdma_us"], 1e-9) / 1e3
    out["nvlink_push_gbps_per_rank"] = out["nvlink_push_bytes"] / world / max(out["push_us"], 1e-9) / 1e3
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
    p.add_argument("--ranks-per-node", type=int, default=None, help="emulated node size (default: all ranks)")
    p.add_argument("--node-limit", type=int, default=None, help="tokens reach at most this many nodes")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    args.tokens = [int(v) for v in args.tokens.split(",")]
    args.num_sms = [int(v) for v in args.num_sms.split(",")]
    args.dtypes = args.dtypes.split(",")
    if not set(args.dtypes) <= {"bf16", "fp8"}:
        p.error(f"--dtypes: {sorted(set(args.dtypes) - {'bf16', 'fp8'})}, expected bf16 and/or fp8")
    world = args.nprocs or torch.cuda.device_count()
    rpn = args.ranks_per_node or world
    if world >= 1 and (rpn < 1 or world % rpn):
        p.error(f"--ranks-per-node {rpn} does not divide {world} ranks")
    if args.node_limit is not None and world >= 1 and not 1 <= args.node_limit <= world // rpn:
        p.error(f"--node-limit {args.node_limit}: between 1 and the {world // rpn} nodes")
    res = run_ranks(_body, world, args)
    recs, legs = res["records"], res["legs"]
    from tabulate import tabulate

    print(tabulate(
        [[r["op"], r["dtype"], r["ep"], r["num_tokens"], r["num_sms"], f"{r['time_us_median']:.1f}",
          f"{r['time_us_p10']:.1f}", f"{r['time_us_p90']:.1f}",
          f"{r['logical_gbps']:.1f}" if r["logical_gbps"] else "-"] for r in recs],
        headers=["op", "dtype", "ep", "tokens", "sms", "kernel us", "p10", "p90", "logical GB/s"],
    ))
    tag = (f"ep{world}" if rpn == world else f"ep{world}_p{rpn}") + (f"_nl{args.node_limit}" if args.node_limit else "")
    write_records(args.out, f"kernel_times_{tag}.json",
              "profiler kernel times of largeep's own kernels (see bench/kernel_times.py)", recs)
    if legs:
        for leg in legs:
            print({k: round(v, 2) if isinstance(v, float) else v for k, v in leg.items()})
        write_doc(args.out, f"legs_{tag}.json",
                  "per-leg kernel times (median over iterations of the slowest rank) and bytes (all ranks) of the "
                  "emulated multi-node dispatch; "
                  "the 'RDMA' leg runs over NVLink on one host (see bench/kernel_times.py)", legs)


if __name__ == "__main__":
    main()
