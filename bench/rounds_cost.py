"""What moving a call in rounds costs (``Buffer(tokens_per_round=...)``): a fresh dispatch (host waits included), a
cached dispatch and a combine, timed on the host around a synchronised call, for several round sizes, against one
round; with the symmetric memory a Buffer of each size takes (the native layout's total).

usage: python bench/rounds_cost.py [--gpus N] [--tokens 4096] [--hidden 7168] [--experts 256] [--topk 8]
       [--per-round 4096,2048,1024,512] [--fp8] [--iters 20] [--json OUT]
One process per GPU (NCCL group, nvshmem backend). Times are medians over ``--iters`` calls after 3 warm-up calls,
ranks aligned by a barrier before each call; rank 0's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import run_ranks  # noqa: E402


def _timed(fn: Any, iters: int) -> float:
    out = []
    for i in range(iters + 3):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= 3:
            out.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(out)


def _measure(buf: Any, x: torch.Tensor, x_in: Any, idx: torch.Tensor, w: torch.Tensor, g: torch.Generator,
             args: Any) -> dict[str, float | None]:
    res = buf.dispatch(x_in, idx, w)
    y = torch.randn(res.handle.num_recv_tokens, args["hidden"], generator=g).to(torch.bfloat16).to(x.device)
    return {
        "dispatch_us": _timed(lambda: buf.dispatch(x_in, idx, w), args["iters"]),
        "cached_dispatch_us": None if args["fp8"] else _timed(lambda: buf.dispatch(x, handle=res.handle),
                                                              args["iters"]),
        "combine_us": _timed(lambda: buf.combine(y, res.handle), args["iters"]),
    }


def body(rank: int, world: int, args: Any, dev: torch.device) -> Any:
    import largeep
    from largeep import fp8, native

    g = torch.Generator(device="cpu").manual_seed(1 + rank)
    t, h, e, k = args["tokens"], args["hidden"], args["experts"], args["topk"]
    scores = torch.rand(t, e, generator=g)
    idx = scores.topk(k, dim=1).indices.to(dev)
    w = torch.rand(t, k, generator=g).to(dev)
    x = torch.randn(t, h, generator=g).to(torch.bfloat16).to(dev)
    x_in: Any = tuple(v.to(dev) for v in fp8.quantize(x.float())) if args["fp8"] else x
    rows = []
    for per_round in args["per_round"]:
        buf = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=t, backend="nvshmem",
                             tokens_per_round=per_round if per_round < t else None)
        sized = min(per_round, t)  # the symmetric memory of a Buffer sized for that many tokens per rank
        zc = int(os.environ.get("LARGEEP_ZERO_COPY_SLOTS", "2")) if world == buf.ctx.ranks_per_node else 0
        taken = int(native.module().normal_layout(world, e, k, h, sized, buf.ctx.ranks_per_node, zc)["total_bytes"])
        try:
            row = {"tokens_per_round": per_round, "rounds": buf.num_rounds, "memory_gib": round(taken / 2**30, 3),
                   **_measure(buf, x, x_in, idx, w, g, args)}
        finally:
            buf.destroy()
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--per-round", default="4096,2048,1024,512")
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    args = {"tokens": a.tokens, "hidden": a.hidden, "experts": a.experts, "topk": a.topk, "fp8": a.fp8,
            "iters": a.iters, "per_round": [int(v) for v in a.per_round.split(",")]}
    rows = run_ranks(body, a.gpus, args)
    out = {"config": {**args, "ep": a.gpus, "gpu": torch.cuda.get_device_name(0)}, "rows": rows}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
