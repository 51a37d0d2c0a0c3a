"""Session 26, r3: where the device memory of a Buffer create/destroy cycle goes (2 ranks on one GPU)."""

from __future__ import annotations

import gc

import largeep
import torch
import torch.distributed as dist
from largeep import native


def _mem(empty: bool = False) -> tuple[int, int]:
    gc.collect()
    torch.cuda.synchronize()
    if empty:
        torch.cuda.empty_cache()
    dist.barrier()
    free = torch.cuda.mem_get_info()[0]
    dist.barrier()
    return free >> 10, torch.cuda.memory_reserved() >> 10


def _small(buf: largeep.Buffer, seed: int) -> None:
    c = buf.ctx
    g = torch.Generator(device="cuda").manual_seed(seed + c.rank)
    x = torch.randn(33, c.hidden, device="cuda", generator=g).to(torch.bfloat16)
    idx = torch.randint(0, c.num_experts, (33, c.num_topk), device="cuda", generator=g)
    w = torch.rand(33, c.num_topk, device="cuda", generator=g)
    d = buf.dispatch(x, idx, w)
    buf.combine(torch.ones_like(d.x), d.handle)


def cycles(rank: int, world: int, variant: str, n: int, empty: bool = False) -> list[tuple[int, int]]:
    kw = dict(hidden=256, num_experts=4 * world, num_topk=2, max_tokens_per_rank=64, backend="nvshmem")
    keep = largeep.Buffer(None, **kw)  # NVSHMEM initialised, and one Buffer alive throughout
    C = native.module()
    out = [_mem(empty)]
    for i in range(n):
        if variant == "raw":
            p = C.alloc(1 << 22, 30.0)
            C.free(p, 30.0)
        elif variant == "ll":
            b = largeep.Buffer(None, low_latency=True, **kw)
            b.destroy()
            del b
        else:
            b = largeep.Buffer(None, **kw)
            if variant == "roundtrip":
                _small(b, i)
            b.destroy()
            del b
        out.append(_mem(empty))
    keep.destroy()
    return out
