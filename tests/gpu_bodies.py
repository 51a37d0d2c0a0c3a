"""Bodies for the GPU-only tests (NVSHMEM runtime, buffer lifetime)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import largeep
from largeep import native


def _roundtrip_small(buf: largeep.Buffer, seed: int) -> None:
    c = buf.ctx
    g = torch.Generator(device="cuda").manual_seed(seed + c.rank)
    t = 33
    x = torch.randn(t, c.hidden, device="cuda", generator=g).to(torch.bfloat16)
    idx = torch.randint(0, c.num_experts, (t, c.num_topk), device="cuda", generator=g)
    w = torch.rand(t, c.num_topk, device="cuda", generator=g)
    d = buf.dispatch(x, idx, w)
    y = torch.ones_like(d.x)
    out = buf.combine(y, d.handle)
    # each token's row is 1 per rank that received it
    want = buf.get_dispatch_layout(idx).is_token_in_rank.sum(1, dtype=torch.float32)
    assert torch.equal(out.x[:, 0].float(), want), "combine of ones must count the ranks each token reached"


def runtime_and_cycles(rank: int, world: int, cycles: int) -> dict[str, float]:
    torch.cuda.synchronize()
    C = native.module()
    free0 = None
    for i in range(cycles):
        buf = largeep.Buffer(None, hidden=256, num_experts=4 * world, num_topk=2, max_tokens_per_rank=64,
                             backend="nvshmem")
        assert C.initialized() and C.rank() == rank and C.num_ranks() == world
        impl = buf._impl
        peers = [C.peer_ptr(impl.base, r) for r in range(world)]
        assert all(p != 0 for p in peers), f"peer pointers {peers}"
        assert peers[rank] == impl.base
        C.barrier()
        _roundtrip_small(buf, i)
        buf.destroy()
        torch.cuda.synchronize()
        if i == 0:
            free0 = torch.cuda.mem_get_info()[0]
    free1 = torch.cuda.mem_get_info()[0]
    assert free0 is not None
    leak = free0 - free1
    assert leak < 64 << 20, f"device memory fell by {leak} bytes over {cycles - 1} create/destroy cycles"
    # after destroy every call is refused
    try:
        buf.dispatch(torch.zeros(1, 256, device="cuda", dtype=torch.bfloat16), handle=None)
    except largeep.BufferDestroyedError:
        pass
    else:
        raise AssertionError("a destroyed Buffer accepted a call")
    return {"leak_bytes": float(leak)}


def second_group_refused(rank: int, world: int) -> None:
    sub = dist.new_group([0])
    if rank == 0:
        try:
            largeep.Buffer(sub, hidden=128, num_experts=4, num_topk=2, max_tokens_per_rank=8, backend="nvshmem")
        except RuntimeError as exc:
            assert "already serves" in str(exc), str(exc)
        else:
            raise AssertionError("a second NVSHMEM group was accepted")
    dist.barrier()
