"""session 9 diagnostic: cProfile (tottime) of 50 normal dispatch + combine calls at 128 tokens, and of 50 expert
passes, rank 0, GPU idle before each call."""
import cProfile
import io
import os
import pstats
import sys

_root = os.path.dirname(os.path.abspath(__file__))
while not os.path.exists(os.path.join(_root, "bench", "_launch.py")):  # the repository root (run as ab/ or from here)
    _root = os.path.dirname(_root)
sys.path.insert(0, os.path.join(_root, "bench"))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _launch import run_ranks  # noqa: E402


def body(rank, world, args, dev):
    import largeep
    from largeep import ops
    from largeep.layers import MoELayer

    buf = largeep.Buffer(None, hidden=7168, num_experts=16, num_topk=8, max_tokens_per_rank=4096,
                         backend="nvshmem", num_sms=8)
    torch.manual_seed(1234)
    with dev:
        layer = MoELayer(buf, ffn_hidden=384, dtype=torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(1000 + rank)
    x = torch.randn(128, 7168, device=dev, generator=g).to(torch.bfloat16)
    out = {}
    with torch.no_grad():
        idx, w = layer.route(x)
        ready = ops.capture_event(dev)
        d = layer.send_chunk(x, idx, w, ready)
        y = layer.experts_chunk(d, 8)

        def rt():
            r = buf.dispatch(x, idx, w)
            buf.combine(r.x, r.handle)

        for name, fn in (("buffer_roundtrip", rt), ("experts_chunk", lambda: layer.experts_chunk(d, 8)),
                         ("ops_send_combine", lambda: layer.combine_chunk(y, layer.send_chunk(x, idx, w, ready)))):
            for _ in range(5):
                fn()
            pr = cProfile.Profile()
            for _ in range(50):
                torch.cuda.synchronize()
                dist.barrier()
                pr.enable()
                fn()
                pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(45)
            out[name] = s.getvalue()
    torch.cuda.synchronize()
    dist.barrier()
    buf.destroy()
    return out


if __name__ == "__main__":
    res = run_ranks(body, 2, {}, backend="nccl", timeout_s=200)
    for k, v in res.items():
        print(f"===== {k} (50 calls)\n{v}")
