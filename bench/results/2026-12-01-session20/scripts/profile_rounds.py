"""Profiles a fresh dispatch of 4096 tokens (H 7168, top-8, 256 experts, bf16) on one rank in one round and in two
rounds (torch.profiler, CPU and CUDA): where the rounds' extra time goes. usage: python profile_rounds.py OUTDIR"""
import os
import sys
import tempfile

import torch
import torch.distributed as dist


def main() -> None:
    out = sys.argv[1]
    fd, f = tempfile.mkstemp()
    os.close(fd)
    os.unlink(f)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{f}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    import largeep
    g = torch.Generator().manual_seed(0)
    t, h, e, k = 4096, 7168, 256, 8
    idx = torch.rand(t, e, generator=g).topk(k, dim=1).indices.cuda()
    w = torch.rand(t, k, generator=g).cuda()
    x = torch.randn(t, h, generator=g).to(torch.bfloat16).cuda()
    for per in (None, 2048):
        buf = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=t, backend="nvshmem",
                             tokens_per_round=per)
        for _ in range(3):
            buf.dispatch(x, idx, w)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                buf.dispatch(x, idx, w)
            torch.cuda.synchronize()
        name = f"rounds_{buf.num_rounds}"
        with open(os.path.join(out, name + ".txt"), "w") as fh:
            fh.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
            fh.write("\n")
            fh.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        prof.export_chrome_trace(os.path.join(out, name + ".json"))
        buf.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
