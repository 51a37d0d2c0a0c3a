"""Times one MoE layer (:class:`largeep.layers.MoELayer`) at prefill size on every visible GPU, with and without
overlap of communication and expert compute, and the parts alone (SPEC.md "Measuring").

Variants (all on one layer, the same weights and the same input on each rank; op "roundtrip", mode "layer"):
  no_overlap   MoELayer with num_chunks=1: gate, dispatch, experts, combine in sequence
  chunked_2    num_chunks=2: chunk i+1 dispatched and chunk i-1 combined on the Buffer's stream while the experts
  chunked_4    compute chunk i on the caller's stream (num_chunks=4)
  two_batch    two micro-batches, each with its own gate, in the two-batch-overlap order: A's dispatch overlaps B's
               gate, A's experts overlap B's dispatch, B's experts overlap A's combine (normal mode: the
               low-latency TwoBatchOverlap cannot hold prefill batches, so the same schedule is written with
               largeep.ops here)
Parts (same sizes, whole batch; "speedup" None):
  gate_only    the router alone
  comm_only    dispatch + combine of the layer's routing, no experts (the rows go straight back)
  experts_only the grouped SwiGLU experts on the rows one dispatch delivered, no communication
  experts_half the same on the first half of those rows: 2 x experts_half - experts_only is what a second chunk
               adds to the experts (every chunk's GEMMs read all local expert weights again)
  experts_carveout experts_only under the overlapped variants' SM carveout
  comm_beside_experts  comm_only and experts_carveout issued together, without a dependency between them (experts
               on the caller's stream, communication on the Buffer's): max(comm_only, experts_carveout) if they
               overlap perfectly, their sum if they cannot run at once (forward only: skipped with --backward)
Stack (--stack-layers L copies of this layer with a residual add + RMSNorm between them, token-wise):
  stack_sequential  the layer called L times (num_chunks=1), each call's output the next one's input
  stack_pipeline    the same L layers as one MoEPipeline with --stack-chunks C (default 2): chunk i is dispatched
               into layer l+1 while chunk i+1 is in layer l's experts, and the combines and dispatches of
               neighbouring chunks run beside the experts (see MoEPipeline)
  stack_sequential_graph / stack_pipeline_graph  the same two with num_worst_tokens set (fixed-size dispatches,
               no host wait: tokens per call x ranks rows), captured once in a CUDA graph and replayed (GPU, forward
               only). Eagerly, each (layer, chunk) costs the host ~1 ms of Python and launches on the 2-GPU
               machine, more than a 1024-token chunk's GPU work, so the eager pipeline is host-bound; the graphs
               take the host out and show what the schedule itself gives.
Writes OUT/layer_times_{backend}_ep{N}[...].json, a JSON list of SPEC.md records (mode "layer", op "roundtrip"),
each also with "variant", "speedup", "pass" ("forward" or "forward_backward"), the environment (gpu, driver, cuda,
torch, nccl, nvshmem, git) and "command"; the same name with .run.json holds "what", "settings" and "summary"
(largeep.bench.records).
"speedup" = no_overlap median / variant median for the layer variants; stack_sequential median / stack_pipeline
median for the stack (the summary's stack_speedup) and stack_sequential_graph / stack_pipeline_graph for the
graphs (stack_graph_speedup; stack_pipeline_graph_vs_eager_sequential: stack_sequential / stack_pipeline_graph).
The summary says whether communication and expert compute take similar time (the condition under which overlap
can pay 1.3x or more; "similar" here: the shorter is at least 2/3 of the longer), the best a perfect overlap
could give, (gate + comm + experts) / (gate + max(comm, experts)), and the largest difference of each overlapped
variant's output from no_overlap's (checked once before timing; the pipelined stack's, and the graphs', from the
sequential stack's, reported apart: the later layers gate per chunk, so near-ties in their routing may flip).

The overlapped variants run their expert GEMMs under an SM carveout (--carveout, default the Buffer's SMs) so that
the communication kernels beside them get SMs. The summary and the log say which grouped GEMM ran ("native":
torch._grouped_mm; "padded_bmm (why)": the fallback), per variant.

Presets: "prefill" (default): SPEC.md's DeepSeek-V3 prefill, F 2048 -- the experts take ~10x the communication, and
each rank holds 128 experts (11 GB of weights at EP2), so chunking mostly adds weight reads. "balanced": the same
with F 256, chosen when communication and expert compute took similar time; with the faster kernels of
bench/results/2026-11-29-session3 they no longer do on 2 GPUs (communication 0.82 ms, experts 3.0 ms), and the
summary says whether they are similar on the machine at hand. "few_experts": 16 experts (8 per rank at EP2, ~4096
rows each, so an expert GEMM on half the rows costs half: chunking adds no weight reads) with F 384, to show the
overlap where communication and experts take similar time on 2 GPUs (not SPEC's model). Explicit --ffn etc.
override the preset.

Timing (largeep.bench.timing): warm-up calls, then per timed call an L2 flush, device sync + barrier, device events
around the call; per iteration the slowest rank counts; median and p10/p90 over iterations. Forward-only runs under
torch.no_grad() (prefill); --backward times forward + backward (grads of x, the gate and the experts).

usage:
  python bench/layer_times.py --out bench/results/DIR [--preset prefill|balanced] [--backend nvshmem|torch]
                              [--backward] [--tokens 4096] [--ffn 256] [--carveout 24]
  python bench/layer_times.py --cpu --nprocs 2 --out /tmp/lt     # gloo + torch backend, tiny sizes (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from _launch import run_ranks

LAYER_VARIANTS = ("no_overlap", "chunked_2", "chunked_4", "two_batch")
STACK_VARIANTS = ("stack_sequential", "stack_pipeline", "stack_sequential_graph", "stack_pipeline_graph")
GRAPH_VARIANTS = ("stack_sequential_graph", "stack_pipeline_graph")  # GPU, forward only
STACK_DEFAULTS = (4, 2)  # --stack-layers, --stack-chunks (2 chunks: the fastest pipelined graph in session 10's sweep)
PART_VARIANTS = ("gate_only", "comm_only", "experts_only", "experts_half", "experts_carveout", "comm_beside_experts")
GPU_DEFAULTS = {"tokens": 4096, "hidden": 7168, "experts": 256, "topk": 8, "ffn": 2048, "warmup": 5, "iters": 20}
# changes to GPU_DEFAULTS
PRESETS = {"prefill": {}, "balanced": {"ffn": 256}, "few_experts": {"experts": 16, "ffn": 384}}
CHECK_TOL = 2e-2  # bf16 experts: chunking changes GEMM shapes, so the rounding of the outputs may differ slightly
CPU_DEFAULTS = {"tokens": 64, "hidden": 128, "experts": 8, "topk": 2, "ffn": 64, "warmup": 2, "iters": 5}


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


# largeep kernels that compute on the expert side (rows.cu), not communication
_EXPERT_SIDE = ("weighted_row_sum", "order_count", "order_scan", "order_assign")


def _is_comm(name: str) -> bool:
    """A communication kernel: largeep's dispatch, combine, layout and low-latency kernels, or NCCL's."""
    if "nccl" in name.lower():
        return True
    return "largeep" in name and not any(k in name for k in _EXPERT_SIDE)


def _timeline(prof: Any) -> dict[str, float]:
    """GPU timeline of one profiled call (us): its span (first kernel start to last kernel end), the time some
    communication kernel ran ("comm", _is_comm), some other kernel ran ("compute"), both at once ("both": the
    overlap), and none ("idle": launch gaps, host waits)."""
    comm: list[tuple[float, float]] = []
    other: list[tuple[float, float]] = []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.time_range.elapsed_us() <= 0:
            continue
        (comm if _is_comm(e.name) else other).append((float(e.time_range.start), float(e.time_range.end)))
    if not comm and not other:
        return {}
    uc, uo, ua = _union(comm), _union(other), _union(comm + other)
    both, i, j = 0.0, 0, 0
    while i < len(uc) and j < len(uo):
        lo, hi = max(uc[i][0], uo[j][0]), min(uc[i][1], uo[j][1])
        both += max(0.0, hi - lo)
        if uc[i][1] < uo[j][1]:
            i += 1
        else:
            j += 1
    span = ua[-1][1] - ua[0][0]
    busy = sum(b - a for a, b in ua)
    return {"span": span, "comm": sum(b - a for a, b in uc), "compute": sum(b - a for a, b in uo), "both": both,
            "idle": span - busy}


def _capture(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, layer: Any, worst: int) -> tuple[Any, Any]:
    """``fn(x)`` captured in a CUDA graph with ``layer.num_worst_tokens = worst`` (no host wait in the dispatches;
    restored to 0 after): one warm-up call on a side stream, as torch.cuda.graph wants, then the capture. Returns
    the graph and its (static) output. Collective: every rank captures the same calls."""
    layer.num_worst_tokens = worst
    try:
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(x)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(x)
    finally:
        layer.num_worst_tokens = 0
    return graph, out


def two_batch_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """Two micro-batches (the halves of x) through a normal-mode MoELayer in the two-batch-overlap order.

    Caller's stream: gate A, gate B, experts A, experts B; Buffer's stream: dispatch A (beside gate B), dispatch B
    (beside experts A), combine A (beside experts B), combine B. Experts A are queued before B is dispatched: a
    dispatch waits on the host for its count exchange, and the GPU should compute meanwhile (ops.dispatch issues
    it from a side stream, so that wait does not include experts A). The expert GEMMs leave the communication
    kernels their SMs (layer.overlap_carveout). Same result as ``layer(x)`` up to float rounding."""
    from largeep import ops

    bid = layer.buffer_id
    carveout = layer.overlap_carveout(x)

    def route(xm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ops.EventOverlap | None]:
        idx, w = layer.route(xm)
        return idx, w, ops.capture_event(xm.device)  # this micro-batch's gate is done; its dispatch waits for it

    def send(xm: torch.Tensor, r: tuple[torch.Tensor, torch.Tensor, ops.EventOverlap | None]) -> ops.DispatchOutput:
        return ops.dispatch(bid, xm.contiguous(), r[0], r[1], previous_event=r[2], async_finish=True,
                            use_fp8=layer.use_fp8)

    def experts(d: ops.DispatchOutput) -> torch.Tensor:
        ops.wait(d.event)
        pairs = sum(d.num_tokens_per_expert) if d.num_tokens_per_expert is not None else None
        with ops.sm_carveout(carveout):
            return layer.experts.forward_rows(d.x, d.topk_idx, d.topk_weights, pairs)  # type: ignore[no-any-return]

    xa, xb = x.tensor_split(2)
    da = send(xa, route(xa))
    rb = route(xb)  # B's gate runs beside A's dispatch
    ya = experts(da)
    db = send(xb, rb)  # beside A's experts
    ca = ops.combine(bid, ya, da.handle, async_finish=True)
    yb = experts(db)  # beside A's combine
    cb = ops.combine(bid, yb, db.handle, async_finish=True)
    shared = layer.shared_experts(x) if layer.shared_experts is not None else None  # beside B's combine
    ops.wait(ca.event)
    ops.wait(cb.event)
    out = torch.cat([ca.x, cb.x])
    return out + shared if shared is not None else out


def _measure(rank: int, world: int, args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    import largeep
    from largeep import ops
    from largeep.bench.timing import Timer, reduce_over_ranks
    from largeep.layers import MoELayer, MoEPipeline

    bf16 = torch.bfloat16
    buf = largeep.Buffer(
        None, hidden=args.hidden, num_experts=args.experts, num_topk=args.topk, max_tokens_per_rank=args.tokens,
        backend=args.backend, num_sms=args.num_sms if args.backend == "nvshmem" else None,
    )
    # no try/finally: after a failure the other ranks may sit in a collective; the parent process ends them
    torch.manual_seed(1234)  # the same gate on every rank; expert weights are per rank anyway
    with dev:
        layer = MoELayer(
            buf, ffn_hidden=args.ffn, shared_ffn_hidden=args.shared_ffn, overlap_sm_carveout=args.carveout, dtype=bf16,
            use_fp8=args.fp8,
        )
    bid = layer.buffer_id

    # the same layer L times: its weights are read again by every layer, as L distinct layers of this size would;
    # a residual add and an RMSNorm between them keep the activations (and so the routing) from fading layer by layer
    def between(xl: torch.Tensor, yl: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(xl + yl, (xl.shape[-1],))

    pipe = MoEPipeline([layer] * args.stack_layers, [between] * (args.stack_layers - 1), num_chunks=args.stack_chunks)

    def run_stack(xs: torch.Tensor) -> torch.Tensor:
        layer.num_chunks = 1
        for j in range(args.stack_layers):
            ys = layer(xs)
            xs = between(xs, ys) if j + 1 < args.stack_layers else ys
        return xs
    g = torch.Generator(device=dev).manual_seed(1000 + rank)
    x = torch.randn(args.tokens, args.hidden, device=dev, generator=g).to(bf16)
    grad_out = torch.randn(args.tokens, args.hidden, device=dev, generator=g).to(bf16)
    bwd = args.backward
    xin = x.clone().requires_grad_(bwd)

    # the parts' fixed inputs: the layer's routing of x, and the rows one dispatch of it delivers
    with torch.no_grad():
        idx, w = layer.route(x)
        d0 = ops.dispatch(bid, x, idx, w, use_fp8=args.fp8)
        pairs0 = sum(d0.num_tokens_per_expert) if d0.num_tokens_per_expert is not None else None
        rows = d0.x.detach().clone()
        rows_idx, rows_w = d0.topk_idx.detach(), d0.topk_weights.detach()
    recv_rows = torch.tensor([float(rows.shape[0]), float(pairs0 or 0)], dtype=torch.float64, device=dev)
    dist.all_reduce(recv_rows)
    recv_rows /= world
    rows_in = rows.clone().requires_grad_(bwd)
    grad_rows = torch.randn(rows.shape, device=dev, generator=g).to(bf16) if bwd else None
    half = rows.shape[0] // 2
    pairs_half = int((rows_idx[:half] >= 0).sum()) if pairs0 is not None else None
    grad_w = torch.randn(w.shape, device=dev, generator=g) if bwd else None

    # the overlapped variants must give the no-overlap output (up to the experts' bf16 rounding)
    with torch.no_grad():
        layer.num_chunks = 1
        ref = layer(x).float()
        outs = {}
        for chunks in (2, 4):
            layer.num_chunks = chunks
            outs[f"chunked_{chunks}"] = layer(x)
        layer.num_chunks = 1
        outs["two_batch"] = two_batch_forward(layer, x)
        seq = run_stack(x).float()
        piped = pipe(x).float()
        diffs = torch.stack([
            *((o.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30) for o in outs.values()),
            (piped - seq).abs().max() / seq.abs().max().clamp(min=1e-30),
        ]).to(torch.float64)
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        check = dict(zip(outs, diffs.tolist()[:-1], strict=True))
        stack_check = float(diffs[-1])
        del ref, outs, seq, piped
    if rank == 0:
        print(f"  outputs vs no_overlap (max relative difference): {check}; stack_pipeline vs stack_sequential: "
              f"{stack_check}", flush=True)

    # the stack captured in CUDA graphs (fixed-size dispatches), each checked once against the eager sequential stack
    graphs: dict[str, Any] = {}
    graph_check: dict[str, float] = {}
    if not args.cpu and not bwd:
        with torch.no_grad():
            ref_seq = run_stack(x).float()
        for name in GRAPH_VARIANTS:
            if args.variants and name not in args.variants:
                continue
            chunks = 1 if name == "stack_sequential_graph" else args.stack_chunks
            fn = run_stack if chunks == 1 else pipe
            graphs[name], gout = _capture(fn, x, layer, -(-args.tokens // chunks) * world)
            graphs[name].replay()
            diff = ((gout.float() - ref_seq).abs().max() / ref_seq.abs().max().clamp(min=1e-30)).to(torch.float64)
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            graph_check[name] = float(diff)
        del ref_seq
        if rank == 0 and graph_check:
            print(f"  graphs vs the eager stack_sequential (max relative difference): {graph_check}", flush=True)

    def finish(out: torch.Tensor, grad: torch.Tensor | None) -> None:
        if bwd:
            out.backward(grad)

    def layer_call(chunks: int) -> Callable[[], None]:
        def f() -> None:
            layer.num_chunks = chunks
            finish(layer(xin), grad_out)

        return f

    def two_batch() -> None:
        finish(two_batch_forward(layer, xin), grad_out)

    def gate_only() -> None:
        finish(layer.route(xin)[1], grad_w)

    def comm_only() -> None:
        d = ops.dispatch(bid, xin, idx, w, use_fp8=args.fp8)
        finish(ops.combine(bid, d.x, d.handle).x, grad_out)

    def experts_only() -> None:
        finish(layer.experts.forward_rows(rows_in, rows_idx, rows_w, pairs0), grad_rows)

    def stack_sequential() -> None:
        finish(run_stack(xin), grad_out)

    def stack_pipeline() -> None:
        finish(pipe(xin), grad_out)

    def carved_experts() -> torch.Tensor:
        with ops.sm_carveout(layer.overlap_carveout(xin)):
            return layer.experts.forward_rows(rows_in, rows_idx, rows_w, pairs0)  # type: ignore[no-any-return]

    def experts_carveout() -> None:
        finish(carved_experts(), grad_rows)

    def comm_beside_experts() -> None:
        # no data dependency between the two: the experts on the rows of an earlier dispatch (caller's stream,
        # under the overlapped variants' carveout) and a whole dispatch + combine (Buffer's stream, waiting only
        # for what was queued before the experts)
        ready = ops.capture_event(dev)
        y = carved_experts()
        d = ops.dispatch(bid, xin, idx, w, previous_event=ready, async_finish=True, use_fp8=args.fp8)
        c = ops.combine(bid, d.x, d.handle, previous_event=d.event, async_finish=True)
        ops.wait(c.event)
        finish(y, grad_rows)

    def experts_half() -> None:
        y = layer.experts.forward_rows(rows_in[:half], rows_idx[:half], rows_w[:half], pairs_half)
        finish(y, grad_rows[:half] if grad_rows is not None else None)

    plan: list[tuple[str, Callable[[], None]]] = [
        ("no_overlap", layer_call(1)), ("chunked_2", layer_call(2)), ("chunked_4", layer_call(4)),
        ("two_batch", two_batch), ("gate_only", gate_only), ("comm_only", comm_only),
        ("experts_only", experts_only), ("experts_half", experts_half), ("experts_carveout", experts_carveout),
        ("comm_beside_experts", comm_beside_experts), ("stack_sequential", stack_sequential),
        ("stack_pipeline", stack_pipeline), *((name, g.replay) for name, g in graphs.items()),
    ]
    if bwd:  # comm_beside_experts runs the experts' backward only
        plan = [p for p in plan if p[0] != "comm_beside_experts"]
    if args.variants:
        plan = [p for p in plan if p[0] in args.variants]

    def prep() -> None:
        for t in (xin, rows_in, *layer.parameters()):
            t.grad = None

    timer = Timer(None, dev)
    stats: dict[str, Any] = {}
    gmm: dict[str, dict[str, int]] = {}  # variant -> grouped GEMM backend -> calls per iteration (this rank)
    for name, fn in plan:
        t0 = time.perf_counter()
        ops.reset_grouped_mm_stats()
        with torch.set_grad_enabled(bwd):
            for i in range(args.warmup + args.iters):
                prep()
                timer.time(name, fn, record=i >= args.warmup)
        calls = ops.grouped_mm_stats()
        if calls:
            gmm[name] = {k: v // (args.warmup + args.iters) for k, v in calls.items()}
        stats.update(reduce_over_ranks(timer.take(), None, dev))
        if rank == 0:
            ran = f", grouped_mm {gmm[name]}" if name in gmm else ""
            print(f"  {name}: {stats[name].median:.1f} us (wall {time.perf_counter() - t0:.1f} s{ran})", flush=True)
    layer.num_chunks = 1
    profiles: dict[str, str] = {}
    timelines: dict[str, dict[str, float]] = {}
    for name, fn in plan:
        if name not in (args.profile or ()):
            continue
        # GPU time by kernel over 3 calls (every rank runs them; rank 0's table is kept)
        from torch.profiler import ProfilerActivity, profile

        with torch.set_grad_enabled(bwd), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                prep()
                fn()
            torch.cuda.synchronize()
        profiles[name] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70)
        # the timeline from a CUDA-only profile (host-side profiling would widen the launch gaps); the trace, with
        # the host's ops, from a call of its own
        with torch.set_grad_enabled(bwd), profile(activities=[ProfilerActivity.CUDA]) as prof1:
            prep()
            fn()
            torch.cuda.synchronize()
        timelines[name] = _timeline(prof1)
        if args.trace:
            with torch.set_grad_enabled(bwd), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as pt:
                prep()
                fn()
                torch.cuda.synchronize()
        if args.trace and rank == 0:
            import gzip

            os.makedirs(args.trace, exist_ok=True)
            tmp = os.path.join(args.trace, f"{name}.json")
            pt.export_chrome_trace(tmp)
            with open(tmp, "rb") as f, gzip.open(tmp + ".gz", "wb") as g:
                g.write(f.read())
            os.remove(tmp)
        if rank == 0:
            print(f"  profile of {name} (3 calls):\n{profiles[name]}", flush=True)
            print(f"  timeline of one {name} call (us): {timelines[name]}", flush=True)
    if args.sync_debug:
        # every host sync inside a call of each profiled variant, as torch reports it (warnings with the op)
        import warnings

        for name, fn in plan:
            if name not in (args.profile or ()):
                continue
            with warnings.catch_warnings(record=True) as caught, torch.set_grad_enabled(bwd):
                warnings.simplefilter("always")
                prep()
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode(1)
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
            if rank == 0:
                syncs = [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught
                         if "synchroniz" in str(w.message)]
                print(f"  host syncs in one {name} call: {len(syncs)}", flush=True)
                for line in syncs:
                    print(f"    {line}", flush=True)
    result = {
        "profiles": profiles,
        "timelines": timelines,
        "stats": {k: (s.median, s.p10, s.p90, s.n) for k, s in stats.items()},
        "num_sms": buf.ctx.num_sms if buf.backend_name == "nvshmem" else None,
        "backend": buf.backend_name,
        "ranks_per_node": buf.ctx.ranks_per_node,
        "recv_rows_per_rank": float(recv_rows[0]),
        "recv_pairs_per_rank": float(recv_rows[1]) if pairs0 is not None else None,
        "check": check,
        "stack_check": stack_check,
        "graph_check": graph_check,
        "grouped_mm": gmm,
        "carveout": layer.overlap_carveout(x),
    }
    if not args.cpu:
        torch.cuda.synchronize()
    dist.barrier()
    buf.destroy()
    return result


def build_records(args: argparse.Namespace, world: int, res: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per variant: SPEC.md's keys plus "variant", "speedup" and "pass"."""
    stats = res["stats"]
    base = stats.get("no_overlap", (None,))[0]
    stack_base = stats.get("stack_sequential", (None,))[0]
    graph_base = stats.get("stack_sequential_graph", (None,))[0]
    out = []
    for name in LAYER_VARIANTS + PART_VARIANTS + STACK_VARIANTS:
        if name not in stats:
            continue
        med, p10, p90, _ = stats[name]
        out.append({
            "backend": res["backend"], "mode": "layer", "op": "roundtrip", "ep": world,
            "ranks_per_node": res["ranks_per_node"], "num_tokens": args.tokens, "hidden": args.hidden,
            "num_topk": args.topk, "num_experts": args.experts, "dtype": "fp8" if args.fp8 else "bf16",
            "num_sms": res["num_sms"],
            "time_us_median": med, "time_us_p10": p10, "time_us_p90": p90, "logical_gbps": None,
            "variant": name,
            "speedup": (base / med if name in LAYER_VARIANTS and base and med > 0
                        else graph_base / med if name in GRAPH_VARIANTS and graph_base and med > 0
                        else stack_base / med if name in STACK_VARIANTS and stack_base and med > 0 else None),
            "pass": "forward_backward" if args.backward else "forward",
        })
    return out


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether communication and expert compute take similar time, and what overlap gave and could give."""
    t = {r["variant"]: r["time_us_median"] for r in records}
    s: dict[str, Any] = {"comm_us": t.get("comm_only"), "experts_us": t.get("experts_only"),
                         "gate_us": t.get("gate_only")}
    comm, exp, gate = s["comm_us"], s["experts_us"], s["gate_us"] or 0.0
    if comm and exp:
        s["comm_over_experts"] = comm / exp
        # "similar": the shorter part is at least 2/3 of the longer one
        s["similar"] = min(comm, exp) / max(comm, exp) >= 2 / 3
        s["ideal_speedup"] = (gate + comm + exp) / (gate + max(comm, exp))
    if exp and t.get("experts_half"):
        # what a second chunk adds to the experts: per-call costs, and every local expert's weights read again
        s["experts_second_chunk_extra_us"] = 2 * t["experts_half"] - exp
    beside, carved = t.get("comm_beside_experts"), t.get("experts_carveout")
    if comm and carved and beside:
        # 1: the shorter part hid entirely behind the longer; 0: they ran one after the other (or slowed each other
        # down by as much as they overlapped)
        s["overlap_of_independent_parts"] = (comm + carved - beside) / min(comm, carved)
    if comm and exp and beside:
        # the two together against each alone on the whole GPU, one after the other
        s["independent_parts_speedup"] = (comm + exp) / beside
    if t.get("stack_sequential") and t.get("stack_pipeline"):
        s["stack_speedup"] = t["stack_sequential"] / t["stack_pipeline"]
    if t.get("stack_sequential_graph") and t.get("stack_pipeline_graph"):
        s["stack_graph_speedup"] = t["stack_sequential_graph"] / t["stack_pipeline_graph"]
    if t.get("stack_sequential") and t.get("stack_pipeline_graph"):
        s["stack_pipeline_graph_vs_eager_sequential"] = t["stack_sequential"] / t["stack_pipeline_graph"]
    sp = {r["variant"]: r["speedup"] for r in records
          if r["speedup"] is not None and r["variant"] in LAYER_VARIANTS and r["variant"] != "no_overlap"}
    if sp:
        best = max(sp, key=lambda k: sp[k])
        s["best_variant"], s["best_speedup"] = best, sp[best]
        s["meets_1_3x"] = sp[best] >= 1.3
    return s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="gloo + torch backend on the CPU, tiny sizes (smoke test)")
    p.add_argument("--nprocs", type=int, default=None, help="ranks (default: visible GPUs; --cpu: 2)")
    p.add_argument("--backend", choices=("nvshmem", "torch"), default=None, help="default nvshmem (--cpu: torch)")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--fp8", action="store_true", help="the layer dispatches FP8 (MoELayer(use_fp8=True): quantised "
                   "before, dequantised after; the combine and the backward stay bf16); records' dtype \"fp8\"")
    p.add_argument("--preset", choices=tuple(PRESETS), default="prefill",
                   help="GPU sizes: prefill (SPEC.md's), balanced (F 256) or few_experts (16 experts, F 384); the "
                        "summary says whether communication ~ experts")
    for key in ("tokens", "hidden", "experts", "topk", "ffn", "warmup", "iters"):
        p.add_argument(f"--{key}", type=int, default=None, help=f"default {GPU_DEFAULTS[key]} ({CPU_DEFAULTS[key]} "
                       "with --cpu; the preset may change it)")
    p.add_argument("--carveout", type=int, default=None,
                   help="SMs the overlapped variants' expert GEMMs leave free (default: the Buffer's SMs; 0: none)")
    p.add_argument("--shared-ffn", type=int, default=0, help="F of a shared expert (default 0: none)")
    p.add_argument("--num-sms", type=int, default=24, help="SMs of the nvshmem kernels")
    p.add_argument("--stack-layers", type=int, default=STACK_DEFAULTS[0],
                   help="layers of the stack variants (the layer repeated)")
    p.add_argument("--stack-chunks", type=int, default=STACK_DEFAULTS[1], help="chunks of stack_pipeline")
    p.add_argument("--profile", default=None,
                   help="comma list of variants to profile after timing (GPU time by kernel over 3 calls; GPU only)")
    p.add_argument("--trace", default=None, help="directory: a chrome trace (CPU + CUDA, gzip) of one call of each "
                   "profiled variant, rank 0")
    p.add_argument("--sync-debug", action="store_true", help="list torch's host syncs in one call of each profiled "
                   "variant (torch.cuda.set_sync_debug_mode), rank 0; largeep's own host waits (the layout's id "
                   "check, the count exchange) are not among them")
    p.add_argument("--variants", default=None, help="comma list (default: all): " +
                   ",".join(LAYER_VARIANTS + PART_VARIANTS + STACK_VARIANTS))
    p.add_argument("--out", default="bench/results/layer_times", help="directory of the JSON file")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the ranks")
    args = p.parse_args(argv)
    base = CPU_DEFAULTS if args.cpu else GPU_DEFAULTS
    defaults = base if args.cpu else {**GPU_DEFAULTS, **PRESETS[args.preset]}
    for key, v in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, v)
    if args.backend is None:
        args.backend = "torch" if args.cpu else "nvshmem"
    if args.cpu and args.backend != "torch":
        p.error("--cpu runs the torch backend only")
    args.variants = args.variants.split(",") if args.variants else None
    args.profile = args.profile.split(",") if args.profile else None
    known = set(LAYER_VARIANTS + PART_VARIANTS + STACK_VARIANTS)
    if args.variants and not set(args.variants) <= known:
        p.error(f"--variants: unknown {sorted(set(args.variants) - known)}")
    # (the graphs: GPU and forward only; comm_beside_experts: forward only)
    cannot = {name: "--cpu" for name in GRAPH_VARIANTS if args.cpu}
    if args.backward:
        cannot.update({name: "--backward" for name in (*GRAPH_VARIANTS, "comm_beside_experts") if name not in cannot})
    if args.variants and set(args.variants) & set(cannot):
        p.error("--variants: " + ", ".join(f"{v} does not run with {cannot[v]}" for v in args.variants if v in cannot))
    # (checked before the timing: the profiles come after it, and a failure there would lose every figure)
    if args.profile and args.cpu:
        p.error("--profile (and --trace, --sync-debug) profiles the GPU: not with --cpu")
    timed = set(args.variants or known) - set(cannot)
    if args.profile and not set(args.profile) <= timed:
        why = "".join(f" ({v} does not run with {cannot[v]})" for v in args.profile if v in cannot)
        p.error(f"--profile: {sorted(set(args.profile) - timed)} not among the variants timed{why}")
    if (args.trace or args.sync_debug) and not args.profile:
        p.error("--trace and --sync-debug take the variants of --profile")
    world = args.nprocs or (2 if args.cpu else torch.cuda.device_count())
    if world < 1:
        p.error("no GPUs visible (use --cpu for the CPU smoke test)")
    if args.experts % world:
        p.error(f"--experts {args.experts} is not divisible by {world} ranks")
    if args.stack_layers < 1 or args.stack_chunks < 1:
        p.error("--stack-layers and --stack-chunks must be >= 1")
    if args.backward and args.stack_layers * args.stack_chunks > 256:
        p.error("--backward keeps a dispatch handle per (layer, chunk) alive: at most 256 (largeep.ops' default)")
    if args.carveout is not None and args.carveout < 0:
        p.error("--carveout must be >= 0")
    if args.fp8 and args.hidden % 128:
        p.error(f"--fp8 needs a hidden size that is a multiple of 128, got {args.hidden}")

    print(f"layer_times: {world} ranks, backend {args.backend}, {'forward+backward' if args.backward else 'forward'}"
          f"{', FP8 dispatch' if args.fp8 else ''}"
          f", tokens {args.tokens}/rank, H {args.hidden}, E {args.experts}, K {args.topk}, F {args.ffn}"
          f"{'' if args.cpu else f' (preset {args.preset})'}", flush=True)
    res = run_ranks(_measure, world, args, backend="gloo" if args.cpu else "nccl", timeout_s=args.timeout)

    from largeep.bench import records as rec

    recs = build_records(args, world, res)
    summary = summarize(recs)
    summary["max_rel_diff_vs_no_overlap"] = res["check"]
    summary["max_rel_diff_stack_pipeline_vs_sequential"] = res["stack_check"]
    summary["max_rel_diff_graphs_vs_stack_sequential"] = res["graph_check"]
    # which grouped GEMM the experts ran: "native" (torch._grouped_mm) or "padded_bmm (why)", calls per iteration
    summary["grouped_mm"] = res["grouped_mm"]
    summary["grouped_mm_backends"] = sorted({b for calls in res["grouped_mm"].values() for b in calls})
    summary["carveout_sms"] = res["carveout"]
    print(f"grouped_mm backends: {summary['grouped_mm_backends']}; overlapped expert GEMMs leave "
          f"{res['carveout']} SMs free")
    if any(not b.startswith("native") for b in summary["grouped_mm_backends"]) and not args.cpu:
        print("WARNING: the experts did not run torch._grouped_mm everywhere (see grouped_mm above)")
    bad = {k: v for k, v in res["check"].items() if not v <= CHECK_TOL}
    if bad:
        print(f"WARNING: outputs differ from no_overlap by more than {CHECK_TOL} (relative to max |out|): {bad}")
    from tabulate import tabulate

    def fmt(v: float | None, d: int = 1) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    print(tabulate(
        [[r["variant"], r["backend"], r["pass"], r["ep"], r["num_tokens"], fmt(r["time_us_median"]),
          fmt(r["time_us_p10"]), fmt(r["time_us_p90"]), fmt(r["speedup"], 2)] for r in recs],
        headers=["variant", "backend", "pass", "ep", "tokens", "time(us)", "p10", "p90", "speedup"],
        disable_numparse=True,
    ))
    print("summary:", json.dumps(rec.finite(summary)))
    command = shlex.join([sys.executable] + (sys.argv if argv is None else ["bench/layer_times.py", *argv]))
    run = {
        "what": "MoELayer times with and without communication/compute overlap (bench/layer_times.py)",
        "settings": {
            "preset": None if args.cpu else args.preset, "carveout_sms": res["carveout"],
            "ffn_hidden": args.ffn, "shared_ffn_hidden": args.shared_ffn, "warmup": args.warmup,
            "iters": args.iters, "pass": "forward_backward" if args.backward else "forward", "cpu": args.cpu,
            "stack_layers": args.stack_layers, "stack_chunks": args.stack_chunks,
            "dispatch_dtype": "fp8 (quantised before, dequantised to bf16 after)" if args.fp8 else "bf16",
            "routing": "LinearTopKRouter (softmax, same weights on every rank) of randn inputs",
            "recv_rows_per_rank": res["recv_rows_per_rank"], "recv_pairs_per_rank": res["recv_pairs_per_rank"],
            "timing": "largeep.bench.timing.Timer: L2 flush, barrier, device events; slowest rank per iteration",
            "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        },
        "summary": summary,
    }
    # e.g. the balanced preset: its own file
    stack = (args.stack_layers, args.stack_chunks)
    size = (f"_e{args.experts}" if args.experts != base["experts"] else "") + (
        f"_f{args.ffn}" if args.ffn != base["ffn"] else "") + (
        f"_stack{stack[0]}x{stack[1]}" if stack != STACK_DEFAULTS else "")
    name = (f"layer_times_{args.backend}_ep{world}{size}{'_fp8' if args.fp8 else ''}{'_bwd' if args.backward else ''}"
            f"{'_cpu' if args.cpu else ''}.json")
    written = rec.write_records(os.path.join(args.out, name), recs, env=rec.environment(), command=command,
                                cpu=args.cpu, **run)
    print(f"wrote {', '.join(str(w.resolve()) for w in written)}")


if __name__ == "__main__":
    main()
