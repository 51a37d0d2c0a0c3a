"""session 10 diagnostic: where the host time of one normal-mode dispatch / combine goes (2 GPUs, nvshmem, the
bench's roundtrip config). Every interesting Python function and native call is wrapped by a timer that adds its
inclusive time per call; a sync + barrier before each timed call."""
import collections
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

LOG = collections.defaultdict(list)


def wrap(owner, name, label=None):
    f = getattr(owner, name)
    label = label or f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"

    def w(*a, **k):
        t0 = time.perf_counter_ns()
        try:
            return f(*a, **k)
        finally:
            LOG[label].append(time.perf_counter_ns() - t0)
    setattr(owner, name, w)


class Proxy:
    def __init__(self, obj, prefix):
        self._o, self._p = obj, prefix

    def __getattr__(self, name):
        f = getattr(self._o, name)
        if not callable(f):
            return f
        label = self._p + name

        def w(*a, **k):
            t0 = time.perf_counter_ns()
            try:
                return f(*a, **k)
            finally:
                LOG[label].append(time.perf_counter_ns() - t0)
        return w


def body(rank, world, args, dev):
    import largeep
    from largeep import buffer as B, checks
    from largeep.backends import nvshmem_backend as NB
    from largeep.bench.routing import random_topk

    T = args["tokens"]
    buf = largeep.Buffer(None, hidden=7168, num_experts=256, num_topk=8, max_tokens_per_rank=4096,
                         backend="nvshmem", num_sms=24)
    g = torch.Generator(device=dev).manual_seed(1000 + rank)
    x = torch.randn(T, 7168, device=dev, generator=g).to(torch.bfloat16)
    idx = random_topk(T, 256, 8, seed=rank + 7).to(dev)
    w = torch.rand(T, 8, device=dev)
    res = {}

    def timed(name, fn, n=30, instrument=False):
        ts = []
        for i in range(n + 5):
            torch.cuda.synchronize()
            dist.barrier()
            torch.cuda.synchronize()
            if i == 5:
                LOG.clear()
            t0 = time.perf_counter_ns()
            r = fn()
            t1 = time.perf_counter_ns()
            if i >= 5:
                ts.append(t1 - t0)
        ts.sort()
        res[name] = {"median_us": ts[len(ts) // 2] / 1e3,
                     "parts": {k: (sorted(v)[len(v) // 2] / 1e3, len(v) / n) for k, v in LOG.items()}}
        LOG.clear()
        return r

    d = buf.dispatch(x, idx, w)
    y = d.x.clone()
    h = d.handle
    # plain (no wrappers)
    timed("plain buf.dispatch", lambda: buf.dispatch(x, idx, w))
    timed("plain buf.combine", lambda: buf.combine(y, h))
    timed("plain buf.dispatch(handle)", lambda: buf.dispatch(x, handle=h))
    timed("plain layout", lambda: buf.get_dispatch_layout(idx))
    timed("torch.empty", lambda: torch.empty(10, device=dev))
    timed("torch.empty x3 + split", lambda: torch.empty(3000, dtype=torch.int32, device=dev).split_with_sizes((1000, 1000, 1000)))
    timed("from_dlpack-free: x.view(dtype)", lambda: x.view(torch.int16))
    timed("torch.cuda.Stream(stream_id..)", lambda: torch.cuda.current_stream())
    timed("x.record_stream", lambda: x.record_stream(torch.cuda.current_stream()))
    timed("int(status word)", lambda: int(buf._impl.status[0]))
    # instrumented
    impl = buf._impl
    impl.kernels = Proxy(impl.kernels, "K.")
    impl.C = Proxy(impl.C, "C.")
    if buf._finished is not None:
        buf._finished.C = Proxy(buf._finished.C, "FC.")
        wrap(buf._finished, "run", "_Finished.run")
    for name in ("tokens", "topk_idx", "topk_weights", "take_checked", "needs_id_check", "positive_int",
                 "max_tokens", "tensor", "remember_checked"):
        if hasattr(checks, name):
            wrap(checks, name, "checks." + name)
    wrap(B, "_tensors_of", "buffer._tensors_of")
    wrap(B, "current_raw_stream", "buffer.current_raw_stream")
    wrap(NB, "record_zero_copy", "nv.record_zero_copy")
    wrap(NB, "current_raw_stream", "nv.current_raw_stream")
    for name in ("dispatch", "combine", "_send", "_id_check_words", "_wait_id_check", "_raise_if_failed", "_stream",
                 "get_dispatch_layout"):
        wrap(impl, name, "impl." + name)
    for name in ("_run", "_check_alive", "_check_mode", "_check_handle", "_is_finished_call"):
        wrap(buf, name, "buf." + name)
    wrap(torch, "empty", "torch.empty")
    wrap(torch, "from_dlpack", "torch.from_dlpack")
    timed("instr buf.dispatch", lambda: buf.dispatch(x, idx, w))
    timed("instr buf.combine", lambda: buf.combine(y, h))
    timed("instr layout", lambda: buf.get_dispatch_layout(idx))
    timed("instr buf.dispatch(handle)", lambda: buf.dispatch(x, handle=h))
    torch.cuda.synchronize()
    dist.barrier()
    del d
    buf.destroy()
    return res


if __name__ == "__main__":
    for tokens in (int(a) for a in sys.argv[1:]):
        res = run_ranks(body, 2, {"tokens": tokens}, backend="nccl", timeout_s=200)
        print(f"===== tokens {tokens} (rank 0, host us, median of 30; parts: median us per call, calls per op)")
        for k, v in res.items():
            print(f"{k:36s} {v['median_us']:8.1f}")
            for p, (m, c) in sorted(v["parts"].items(), key=lambda kv: -kv[1][0] * kv[1][1]):
                print(f"      {p:34s} {m:8.1f}  x{c:g}")
