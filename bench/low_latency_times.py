"""Low-latency mode of the nvshmem backend: profiler kernel times and CUDA-graph replay times, every visible GPU.

Whole-call event timings (`python -m largeep.bench`) of the low-latency ops are dominated by the host (Python,
launches). Decoding runs these ops inside CUDA graphs, so this script reports what that costs:
  kernels: ll_dispatch_send / ll_dispatch_recv / ll_combine_send / ll_combine_recv, profiler durations
           (op "send"/"recv" of dispatch and combine, op "dispatch"/"combine" = send + recv);
  hook:    the same kernels in hook mode with a synchronize and a barrier between send and receive (of
           "dispatch_hook"/"combine_hook"): a receive's own time, without waiting for the slower rank's sends;
           op "dispatch"/"combine" of them = send + receive (what the cost model fits: no rank skew in it);
  graph:   one CUDA graph holding dispatch + combine, replay time measured with events (op "roundtrip"), once
           per barrier ("graph") and averaged over --graph-reps replays back to back ("graph_back_to_back"); a
           short sleep queued before the start event keeps the host's launch of the graph out of the time (as
           largeep.bench.timing's).
Per iteration the slowest rank counts; records give median and p10/p90. Before each iteration L2 is flushed and
the ranks are aligned by a barrier. Every record's dtype is the dispatch's (a combine always sends BF16 rows; its
logical_gbps counts BF16 rows), so a run's dispatch and combine records share their shape keys. logical_gbps: every
(token, expert) copy (SPEC) over the time, for the send phases too (largeep.bench.records' convention); None for a
receive phase and the graph's round trip.

--weighted gives low_latency_dispatch the weights (topk_weights=): the combine then sums each token's rows on the
experts' rank (record key "weights_sent"); logical_gbps stays the per-copy bytes of SPEC's combine.
--bf16-partial-sums (with --weighted): those sums come back as one bf16 row each (record key "bf16_partial_sums").
Writes OUT/low_latency_times_{tag}.json, a JSON list of SPEC.md records, each also with "of" (how the op was timed,
above), "tune" (LARGEEP_TUNE), "weights_sent", "bf16_partial_sums", the environment (gpu, driver, cuda, torch,
nccl, nvshmem, git) and "command"; low_latency_times_{tag}.run.json beside it says what the times are
(largeep.bench.records).

usage: python bench/low_latency_times.py --out DIR [--tokens 1,8,32,128,256] [--experts 288] [--no-fp8] [--weighted]
       [--bf16-partial-sums]
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

import torch
import torch.distributed as dist
from _launch import run_ranks, write_records  # bench/ is the script's directory

# the kernels of each op (LARGEEP_TUNE ll_fuse=1: a call without a hook is ll_dispatch_fused_kernel /
# ll_combine_fused_kernel alone where the fused kernel can run; ll_fuse=0, the default: always the send and receive
# kernels)
_KERNELS = ("ll_dispatch_send_kernel", "ll_dispatch_recv_kernel", "ll_combine_send_kernel",
            "ll_combine_recv_kernel", "ll_dispatch_fused_kernel", "ll_combine_fused_kernel")


def _stats(per_rank: torch.Tensor) -> tuple[float, float, float]:
    """per_rank float64 [world, iters] -> median, p10, p90 over iterations of the slowest rank."""
    worst = per_rank.max(0).values
    q = torch.quantile(worst, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _gather(values: list[float], world: int) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64, device="cuda")
    out = torch.empty(world, len(values), dtype=torch.float64, device="cuda")
    dist.all_gather_into_tensor(out.view(-1), t)
    return out.cpu()


def _kernel_times(prof: Any) -> dict[str, list[float]]:
    """Each of _KERNELS' durations (us) in the profile, in launch order."""
    per_kernel: dict[str, list[float]] = {k: [] for k in _KERNELS}
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        hit = re.search("|".join(_KERNELS), e.name)
        if hit:
            per_kernel[next(k for k in _KERNELS if re.fullmatch(k, hit.group(0)))].append(e.time_range.elapsed_us())
    return per_kernel


def _graph_times(replay: Any, flush: Any, iters: int, reps: int) -> tuple[list[float], list[float]]:
    """This rank's times (us) of ``iters`` replays of a captured graph, each alone, and of ``iters`` batches of
    ``reps`` replays back to back, per replay (the launch skew paid once per batch). Each as every largeep timing
    (largeep.bench.timing.Timer): L2 flushed, the ranks aligned, and a short sleep queued before the start event, so
    the time is the GPU's from when the replay could start, not the host's launch of it; no flush between the
    replays of a batch (those after the first may find warm lines)."""
    from largeep.bench.timing import Timer

    timer = Timer(None, torch.device("cuda"), flush=False)  # (flush.zero_() queued first: align waits for it)

    def batch() -> None:
        for _ in range(reps):
            replay()

    for _ in range(iters):
        flush.zero_()
        timer.time("alone", replay)
    for _ in range(iters):
        flush.zero_()
        timer.time("batch", batch)
    times = timer.take()
    return times["alone"], [t / reps for t in times["batch"]]


def _body(rank: int, world: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    import largeep
    from largeep.bench import records as rec
    from torch.profiler import ProfilerActivity, profile

    m = max(args.tokens)
    buf = largeep.Buffer(None, hidden=args.hidden, num_experts=args.experts, num_topk=args.topk,
                         max_tokens_per_rank=m, backend="nvshmem", low_latency=True)
    out: list[dict[str, Any]] = []
    # SPEC's Measuring: L2 flushed before each timed call (zero_() of 256 MiB, queued before the timed work and
    # outside it: a profiled kernel's duration and the graph's events do not include it)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for tokens in args.tokens:
        g = torch.Generator(device="cuda").manual_seed(2000 + rank)
        x = torch.randn(tokens, args.hidden, device="cuda", generator=g).to(torch.bfloat16)
        idx = torch.rand(tokens, args.experts, device="cuda", generator=g).topk(args.topk, dim=1).indices
        w = torch.rand(tokens, args.topk, device="cuda", generator=g)
        copies = torch.tensor([float(tokens * args.topk)], device="cuda")
        dist.all_reduce(copies)
        mean_copies = float(copies) / world
        row = rec.row_bytes("fp8" if args.fp8 else "bf16", args.hidden)

        sent: dict[str, Any] = {"topk_weights": w} if args.weighted else {}  # (none: a tree without the option)
        if args.bf16_partial_sums:
            sent["bf16_partial_sums"] = True

        def step(x: Any = x, idx: Any = idx, w: Any = w, sent: Any = sent) -> Any:
            d = buf.low_latency_dispatch(x, idx, use_fp8=args.fp8, **sent)
            y = torch.empty(d.x[0].shape if args.fp8 else d.x.shape, dtype=torch.bfloat16, device="cuda")
            return buf.low_latency_combine(y, idx, w, d.handle)

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                flush.zero_()
                dist.barrier()
                step()
            torch.cuda.synchronize()
        per_kernel = _kernel_times(prof)
        ops = {
            ("dispatch", "send"): per_kernel[_KERNELS[0]],
            ("dispatch", "recv"): per_kernel["ll_dispatch_recv_kernel"],
            ("combine", "send"): per_kernel["ll_combine_send_kernel"],
            ("combine", "recv"): per_kernel["ll_combine_recv_kernel"],
        }
        for kind in ("dispatch", "combine"):
            fused = per_kernel[f"ll_{kind}_fused_kernel"]
            if fused:  # one kernel: no send and receive apart
                del ops[(kind, "send")], ops[(kind, "recv")]
                ops[(kind, kind)] = fused
            else:
                ops[(kind, kind)] = [a + b for a, b in zip(ops[(kind, "send")], ops[(kind, "recv")], strict=True)]
        # hook mode with every rank's sends complete before any receive starts: the receive kernels' own time
        # (above, a receive also waits for the slower rank's sends)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                flush.zero_()
                dist.barrier()
                d = buf.low_latency_dispatch(x, idx, use_fp8=args.fp8, return_recv_hook=True, **sent)
                torch.cuda.synchronize()
                dist.barrier()
                d.hook()
                y = torch.empty(d.x[0].shape if args.fp8 else d.x.shape, dtype=torch.bfloat16, device="cuda")
                c = buf.low_latency_combine(y, idx, w, d.handle, return_recv_hook=True)
                torch.cuda.synchronize()
                dist.barrier()
                c.hook()
            torch.cuda.synchronize()
        hooked = _kernel_times(prof)
        ops[("dispatch_hook", "send")] = hooked[_KERNELS[0]]
        ops[("dispatch_hook", "recv")] = hooked["ll_dispatch_recv_kernel"]
        ops[("combine_hook", "send")] = hooked["ll_combine_send_kernel"]
        ops[("combine_hook", "recv")] = hooked["ll_combine_recv_kernel"]
        for kind in ("dispatch_hook", "combine_hook"):  # the op without waiting for the slower rank's sends
            ops[(kind, kind.split("_")[0])] = [a + b for a, b in zip(ops[(kind, "send")], ops[(kind, "recv")],
                                                                    strict=True)]
        # CUDA graph of dispatch + combine, replayed
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(args.warmup):
            graph.replay()
        torch.cuda.synchronize()
        # also back to back: the ranks' launch skew after the barrier is paid once per `graph_reps` replays instead of
        # once per replay (decoding replays its step graph back to back too)
        ops[("graph", "roundtrip")], ops[("graph_back_to_back", "roundtrip")] = _graph_times(
            graph.replay, flush, args.iters, args.graph_reps)
        for (kind, op), times in ops.items():
            med, p10, p90 = _stats(_gather(times[: args.iters], world))
            nbytes = mean_copies * (row if kind.startswith("dispatch") else rec.row_bytes("bf16", args.hidden))
            out.append({
                "backend": "nvshmem", "mode": "low_latency", "op": op, "of": kind, "ep": world,
                "ranks_per_node": world, "num_tokens": tokens, "hidden": args.hidden, "num_topk": args.topk,
                "num_experts": args.experts, "dtype": "fp8" if args.fp8 else "bf16", "num_sms": None,
                "time_us_median": med, "time_us_p10": p10, "time_us_p90": p90,
                # (a send phase carries the copies too, as largeep.bench.records counts; a receive and the graph's
                # round trip of both ops have none of their own)
                "logical_gbps": rec.gbps(nbytes, med) if op in ("dispatch", "combine", "send") else None,
                "tune": os.environ.get("LARGEEP_TUNE", ""), "weights_sent": bool(args.weighted),
                "bf16_partial_sums": bool(args.bf16_partial_sums),
            })
        del graph
    dist.barrier()
    buf.destroy()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,8,32,128,256")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=288)
    p.add_argument("--no-fp8", dest="fp8", action="store_false")
    p.add_argument("--weighted", action="store_true", help="the dispatch carries the weights (combine sums there)")
    p.add_argument("--bf16-partial-sums", action="store_true", help="with --weighted: each sum as one bf16 row")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--graph-reps", type=int, default=20, help="back-to-back replays per timed graph iteration")
    p.add_argument("--nprocs", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    args.tokens = [int(v) for v in args.tokens.split(",")]
    if args.bf16_partial_sums and not args.weighted:
        p.error("--bf16-partial-sums needs --weighted")
    world = args.nprocs or torch.cuda.device_count()
    recs = run_ranks(_body, world, args)
    from tabulate import tabulate

    print(tabulate(
        [[r["of"], r["op"], r["ep"], r["num_tokens"], r["dtype"], f"{r['time_us_median']:.1f}",
          f"{r['time_us_p10']:.1f}", f"{r['time_us_p90']:.1f}"] for r in recs],
        headers=["of", "op", "ep", "tokens", "dtype", "us", "p10", "p90"],
    ))
    # (the options in the name: a second run into the same --out with others must not replace this one)
    tag = f"ep{world}" + ("" if args.fp8 else "_bf16") + ("_weighted" if args.weighted else "") + \
        ("_partial" if args.bf16_partial_sums else "")
    write_records(args.out, f"low_latency_times_{tag}.json",
              "low-latency kernel and CUDA-graph replay times (bench/low_latency_times.py)", recs)


if __name__ == "__main__":
    main()
