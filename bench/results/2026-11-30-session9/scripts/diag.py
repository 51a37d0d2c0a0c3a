"""session 9 diagnostic: where one MoEPipeline call (few_experts preset, 4 layers) spends host and GPU time."""
import cProfile
import io
import os
import pstats
import sys
import time

_root = os.path.dirname(os.path.abspath(__file__))
while not os.path.exists(os.path.join(_root, "bench", "_launch.py")):  # the repository root (run as ab/ or from here)
    _root = os.path.dirname(_root)
sys.path.insert(0, os.path.join(_root, "bench"))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _launch import run_ranks  # noqa: E402


def body(rank, world, args, dev):
    import largeep
    from largeep.layers import MoELayer, MoEPipeline

    buf = largeep.Buffer(None, hidden=7168, num_experts=16, num_topk=8, max_tokens_per_rank=4096,
                         backend="nvshmem", num_sms=args["sms"])
    torch.manual_seed(1234)
    with dev:
        layer = MoELayer(buf, ffn_hidden=384, overlap_sm_carveout=args["carve"], dtype=torch.bfloat16)

    def between(a, b):
        return torch.nn.functional.rms_norm(a + b, (a.shape[-1],))

    g = torch.Generator(device=dev).manual_seed(1000 + rank)
    x = torch.randn(4096, 7168, device=dev, generator=g).to(torch.bfloat16)
    out = {}
    import largeep._C as C_mod
    waits = []
    orig_wait = C_mod.wait_host_word

    def timed_wait(*a):
        t0 = time.perf_counter()
        r = orig_wait(*a)
        waits.append(time.perf_counter() - t0)
        return r
    from largeep.backends import nvshmem_backend as nb
    for obj in (C_mod,):
        obj.wait_host_word = timed_wait
    for name, chunks, stack in (("layer_c4", 4, 1), ("pipe_c1", 1, 4), ("pipe_c4", 4, 4), ("layer_c4_worst", 4, 1),
                                ("pipe_c4_worst", 4, 4), ("pipe_c2_worst", 2, 4), ("pipe_c1_worst", 1, 4)):
        layer.num_worst_tokens = 4096 // chunks * world if name.endswith("worst") else 0
        if stack == 1:
            layer.num_chunks = chunks
            fn = lambda: layer(x)  # noqa: E731
        else:
            pipe = MoEPipeline([layer] * stack, [between] * (stack - 1), num_chunks=chunks)
            fn = lambda: pipe(x)  # noqa: E731
        log = []
        orig = {}
        for m in ("send_chunk", "experts_chunk", "combine_chunk", "route"):
            orig[m] = getattr(layer, m)

            def wrap(f, m=m):
                def w(*a, **k):
                    t0 = time.perf_counter()
                    r = f(*a, **k)
                    log.append((m, t0, time.perf_counter()))
                    return r
                return w
            object.__setattr__(layer, m, wrap(orig[m]))
        with torch.no_grad():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            dist.barrier()
            # GPU time of 5 calls
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(5):
                fn()
            e1.record()
            torch.cuda.synchronize()
            gpu_ms = e0.elapsed_time(e1) / 5
            dist.barrier()
            log.clear()
            waits.clear()
            pr = cProfile.Profile()
            t0 = time.perf_counter()
            pr.enable()
            fn()
            pr.disable()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
        for m in orig:
            object.__delattr__(layer, m)
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
        if name in ("pipe_c4", "pipe_c4_worst"):
            from torch.profiler import ProfilerActivity, profile
            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            s.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60))
        phases = [(m, round((a - t0) * 1e6), round((b - a) * 1e6)) for m, a, b in log]
        out[name] = {"waits_us": [round(w * 1e6) for w in waits], "gpu_ms_per_call": gpu_ms, "host_us": (t1 - t0) * 1e6, "host_to_gpu_done_us": (t2 - t0) * 1e6,
                     "phases(start_us,dur_us)": phases, "cprofile": s.getvalue()}
        torch.cuda.synchronize()
        dist.barrier()
    buf.destroy()
    return out


if __name__ == "__main__":
    sms, carve = int(sys.argv[1]), int(sys.argv[2])
    res = run_ranks(body, 2, {"sms": sms, "carve": carve}, backend="nccl", timeout_s=300)
    for name, r in res.items():
        print(f"===== {name}: GPU {r['gpu_ms_per_call']:.2f} ms/call; profiled call: host {r['host_us']:.0f} us, "
              f"done {r['host_to_gpu_done_us']:.0f} us")
        print("phases:", r["phases(start_us,dur_us)"])
        print("host waits (us):", r["waits_us"])
        print(r["cprofile"])
