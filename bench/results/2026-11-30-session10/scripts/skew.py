"""session 10 diagnostic: the bench's normal roundtrip (fresh dispatch + combine, 128 tokens, H 7168, E 256, top-8,
2 GPUs) timed as largeep.bench times it (L2 flush, sync, barrier, sync, 30 us sleep, events), plus each rank's
wall clock (time.time_ns, one clock for every process of the host) when it leaves the alignment and when the call
returns: how much of the event time is this rank's host time, and how far apart the ranks start."""
import os
import sys
import time

_root = os.path.dirname(os.path.abspath(__file__))
while not os.path.exists(os.path.join(_root, "bench", "_launch.py")):
    _root = os.path.dirname(_root)
sys.path.insert(0, os.path.join(_root, "bench"))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _launch import run_ranks  # noqa: E402


def body(rank, world, args, dev):
    import largeep
    from largeep.bench.routing import random_topk

    T = args["tokens"]
    backend = args["backend"]
    buf = largeep.Buffer(None, hidden=7168, num_experts=256, num_topk=8, max_tokens_per_rank=4096,
                         backend=backend, num_sms=24)
    g = torch.Generator(device=dev).manual_seed(1000 + rank)
    x = torch.randn(T, 7168, device=dev, generator=g).to(torch.bfloat16)
    idx = random_topk(T, 256, 8, seed=rank + 7).to(dev)
    w = torch.rand(T, 8, device=dev)
    d = buf.dispatch(x, idx, w)
    y = d.x.clone()
    flush = torch.empty(64 << 20, dtype=torch.int32, device=dev)
    rows = []
    for i in range(45):
        flush.zero_()
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        ta = time.time_ns()
        torch.cuda._sleep(int(30 * 1800))
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        h = buf.dispatch(x, idx, w).handle
        tb = time.time_ns()
        buf.combine(y, h)
        e.record()
        tc = time.time_ns()
        rows.append((ta, tb, tc, s, e))
    torch.cuda.synchronize()
    loc = torch.tensor([[r[0], r[1], r[2], int(r[3].elapsed_time(r[4]) * 1e3)] for r in rows[5:]],
                       dtype=torch.int64, device=dev)
    allv = [torch.empty_like(loc) for _ in range(world)]
    dist.all_gather(allv, loc)
    del d
    buf.destroy()
    a = torch.stack(allv).cpu()  # [world, iters, 4]
    ta, tb, tc, ev = a[..., 0], a[..., 1], a[..., 2], a[..., 3].double()
    t0 = ta.min(0).values
    med = lambda v: float(v.double().median())  # noqa: E731
    return {
        "event_us(max over ranks)": med(ev.max(0).values),
        "start skew_us (ta max - min)": med((ta.max(0).values - t0)) / 1e3,
        **{f"rank{r} start_after_first_us": med(ta[r] - t0) / 1e3 for r in range(world)},
        **{f"rank{r} dispatch_host_us": med(tb[r] - ta[r]) / 1e3 for r in range(world)},
        **{f"rank{r} combine_host_us": med(tc[r] - tb[r]) / 1e3 for r in range(world)},
        **{f"rank{r} event_us": med(ev[r]) for r in range(world)},
    }


if __name__ == "__main__":
    for backend in sys.argv[1].split(","):
        for tokens in (int(a) for a in sys.argv[2:]):
            res = run_ranks(body, 2, {"tokens": tokens, "backend": backend}, backend="nccl", timeout_s=200)
            print(f"===== {backend} tokens {tokens} (medians of 40)")
            for k, v in res.items():
                print(f"  {k:34s} {v:9.1f}")
