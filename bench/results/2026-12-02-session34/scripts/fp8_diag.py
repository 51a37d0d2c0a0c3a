"""Session 34 diagnostic: the low-latency kernels' FP8 rows against largeep.fp8.quantize on CUDA and on CPU, for
the same bf16 tokens (one rank, one expert); saves the tensors for a look off the GPU machine."""
import os
import sys

import largeep
import torch
import torch.distributed as dist
from largeep import fp8

out = sys.argv[1]
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29561")
dist.init_process_group("nccl", rank=0, world_size=1)
torch.cuda.set_device(0)
tokens, hidden = 128, 7168
buf = largeep.Buffer(None, hidden=hidden, num_experts=1, num_topk=1, max_tokens_per_rank=tokens,
                     backend="nvshmem", low_latency=True)
g = torch.Generator(device="cuda").manual_seed(900)
mag = torch.exp2(torch.randint(-20, 20, (tokens, hidden // 128, 1), device="cuda", generator=g).float())
x = (torch.randn(tokens, hidden // 128, 128, device="cuda", generator=g) * mag).view(tokens, hidden).to(torch.bfloat16)
idx = torch.zeros(tokens, 1, dtype=torch.int64, device="cuda")
res = buf.low_latency_dispatch(x, idx, use_fp8=True)
q, s = res.x
n = int(res.num_tokens_per_expert[0])
order = res.src_info[0, :n, 1].long()
kq, ks = q[0, :n].clone(), s[0, :n].clone()
xo = x[order]
cq, cs = fp8.quantize(xo)
hq, hs = fp8.quantize(xo.cpu())
torch.save({"x": xo.cpu(), "kq": kq.cpu(), "ks": ks.cpu(), "cq": cq.cpu(), "cs": cs.cpu(), "hq": hq, "hs": hs},
           os.path.join(out, "fp8_diag.pt"))
u8 = lambda t: t.cpu().view(torch.uint8)  # noqa: E731
print("codes kernel!=cuda", int((u8(kq) != u8(cq)).sum()), "kernel!=cpu", int((u8(kq) != u8(hq)).sum()),
      "cuda!=cpu", int((u8(cq) != u8(hq)).sum()))
print("scales kernel!=cuda", int((ks.cpu() != cs.cpu()).sum()), "kernel!=cpu", int((ks.cpu() != hs).sum()),
      "cuda!=cpu", int((cs.cpu() != hs).sum()))
buf.destroy()
dist.destroy_process_group()
