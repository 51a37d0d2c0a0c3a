"""session 9 diagnostic: host (CPU) time of one normal-mode dispatch / combine / expert pass / gate, and of each
native call inside the dispatch, on an idle GPU (each timed call after a sync + barrier)."""
import collections
import os
import sys
import time

_root = os.path.dirname(os.path.abspath(__file__))
while not os.path.exists(os.path.join(_root, "bench", "_launch.py")):  # the repository root (run as ab/ or from here)
    _root = os.path.dirname(_root)
sys.path.insert(0, os.path.join(_root, "bench"))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _launch import run_ranks  # noqa: E402


class Proxy:
    def __init__(self, obj, log):
        self._o, self._log = obj, log

    def __getattr__(self, name):
        f = getattr(self._o, name)
        if not callable(f):
            return f

        def w(*a, **k):
            t0 = time.perf_counter_ns()
            r = f(*a, **k)
            self._log[name].append(time.perf_counter_ns() - t0)
            return r
        return w


def body(rank, world, args, dev):
    import largeep
    from largeep import ops
    from largeep.layers import MoELayer

    tokens = args["tokens"]
    buf = largeep.Buffer(None, hidden=7168, num_experts=16, num_topk=8, max_tokens_per_rank=4096,
                         backend="nvshmem", num_sms=8)
    torch.manual_seed(1234)
    with dev:
        layer = MoELayer(buf, ffn_hidden=384, dtype=torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(1000 + rank)
    x = torch.randn(tokens, 7168, device=dev, generator=g).to(torch.bfloat16)
    impl = buf._impl
    log = collections.defaultdict(list)
    impl.kernels = Proxy(impl.kernels, log)
    impl.C = Proxy(impl.C, log)
    bid = layer.buffer_id
    res = {}

    def timed(name, fn, n=20):
        ts = []
        for i in range(n + 3):
            torch.cuda.synchronize()
            dist.barrier()
            torch.cuda.synchronize()
            if i == 3:
                log.clear()
            t0 = time.perf_counter_ns()
            r = fn()
            t1 = time.perf_counter_ns()
            if i >= 3:
                ts.append(t1 - t0)
        ts.sort()
        res[name] = {"median_us": ts[len(ts) // 2] / 1e3,
                     "native_us": {k: sorted(v)[len(v) // 2] / 1e3 for k, v in log.items()}}
        return r

    with torch.no_grad():
        idx, w = layer.route(x)
        ready = ops.capture_event(dev)
        timed("route", lambda: layer.route(x))
        timed("buffer.dispatch", lambda: buf.dispatch(x, idx, w))
        timed("buffer.dispatch_async", lambda: buf.dispatch(x, idx, w, async_finish=True))
        timed("ops.dispatch(prev_event,async)", lambda: ops.dispatch(bid, x, idx, w, previous_event=ready,
                                                                      async_finish=True))
        d = layer.send_chunk(x, idx, w, ready)
        timed("layer.send_chunk", lambda: layer.send_chunk(x, idx, w, ready))
        torch.cuda.synchronize()
        y = timed("layer.experts_chunk", lambda: layer.experts_chunk(d, 8))
        timed("layer.combine_chunk", lambda: layer.combine_chunk(y, d))
        timed("empty_pybind_call(zc_busy)", lambda: impl.kernels.zc_busy())
        timed("torch.empty", lambda: torch.empty(10, device=dev))
        timed("one_add", lambda: x.add(1))
    torch.cuda.synchronize()
    dist.barrier()
    buf.destroy()
    return res


if __name__ == "__main__":
    for tokens in (int(a) for a in sys.argv[1:]):
        res = run_ranks(body, 2, {"tokens": tokens}, backend="nccl", timeout_s=200)
        print(f"===== tokens {tokens} (rank 0, host us, median of 20)")
        for k, v in res.items():
            nat = {a: round(b, 1) for a, b in v["native_us"].items()}
            print(f"{k:36s} {v['median_us']:8.1f}   native: {nat}")
