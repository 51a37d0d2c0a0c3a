"""Probe (session 16): why whole low-latency calls of `python -m largeep.bench` took about twice as long without
--ll-send-weights as with it (r7). One pair of processes, one Buffer, u (no weights) and w (weights) rounds
interleaved; for each hook-mode call: the host time of the Python call (perf_counter, no synchronize) and the
device-event time as the bench's Timer takes it (flush, align, 30 us sleep, events). Medians of the slowest rank.

usage: python probe_uw.py OUT.json [iters]   (run from the repository root; bench/ on sys.path)"""

from __future__ import annotations

import json
import sys
import time

sys.path.insert(0, "bench")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _launch import run_ranks  # noqa: E402


def _body(rank: int, world: int, iters: int, dev: torch.device) -> dict:
    import largeep
    from largeep.bench.routing import random_topk, random_weights
    from largeep.bench.timing import Timer

    T, H, K, E = 128, 7168, 8, 288
    buf = largeep.Buffer(None, hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=T, backend="nvshmem",
                         low_latency=True)
    x = torch.randn(T, H, device=dev).to(torch.bfloat16)
    idx = random_topk(T, E, K, seed=rank).to(dev)
    w = random_weights(T, K, seed=rank + 7).to(dev)
    y = torch.randn(E // world, world * T, H, device=dev).to(torch.bfloat16)
    timer = Timer(None, dev)
    host: dict[str, list[float]] = {}
    ev: dict[str, list[tuple]] = {}

    def timed(name: str, fn):  # noqa: ANN001, ANN202
        timer.align()
        torch.cuda._sleep(int(30 * 1800))
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        e.record()
        host.setdefault(name, []).append((t1 - t0) * 1e6)
        ev.setdefault(name, []).append((s, e))
        return out

    for i in range(3 + iters):
        for mode in ("u", "w"):
            sent = w if mode == "w" else None
            d = timed(f"{mode}.dispatch.send",
                      lambda: buf.low_latency_dispatch(x, idx, use_fp8=True, return_recv_hook=True, topk_weights=sent))
            timed(f"{mode}.dispatch.recv", d.hook)
            c = timed(f"{mode}.combine.send", lambda: buf.low_latency_combine(y, idx, w, d.handle,
                                                                              return_recv_hook=True))
            timed(f"{mode}.combine.recv", c.hook)
            if i < 3:
                for k in list(host):
                    if k.startswith(mode):
                        host[k].pop()
                        ev[k].pop()
    torch.cuda.synchronize()
    out = {}
    for name in sorted(host):
        h = torch.tensor(host[name], dtype=torch.float64, device=dev)
        g = torch.tensor([s.elapsed_time(e) * 1e3 for s, e in ev[name]], dtype=torch.float64, device=dev)
        both = torch.stack([h, g])
        allr = [torch.empty_like(both) for _ in range(world)]
        dist.all_gather(allr, both)
        worst = torch.stack(allr).max(0).values.cpu()
        out[name] = {"host_us": float(worst[0].median()), "event_us": float(worst[1].median())}
    buf.destroy()
    return out


if __name__ == "__main__":
    res = run_ranks(_body, torch.cuda.device_count(), int(sys.argv[2]) if len(sys.argv) > 2 else 30)
    for k, v in res.items():
        print(f"{k:22s} host {v['host_us']:8.1f} us   event {v['event_us']:8.1f} us")
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)
