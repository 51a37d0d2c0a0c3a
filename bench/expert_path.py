"""Host and GPU time of the local expert path of a normal-mode MoE layer, step by step (one GPU, no communication).

``GroupedExperts.forward_rows`` on the rows one dispatch delivers: the expert order (largeep's counting sort, or the
torch ops it replaces), the row gather, the grouped GEMMs (w13: gate and up in one; w2), the weighted sum; then the
path without the pair count on the host (``num_pairs=None``, as with ``num_worst_tokens``): a gather of all R*K
entries against largeep's gather of the valid ones, and the whole call. For each step: the host time of issuing it
(median over --iters, the GPU kept busy so that no launch waits) and its GPU time (CUDA events around it, queued
behind other work so that its kernels run back to back; median). Before session
7's last commit the GPU time was taken on an idle GPU and included the launch gaps of short steps.
Where the host takes longer than the GPU, the GPU idles unless other work is queued: what decides whether a chunked
layer can overlap communication with the experts.

    python bench/expert_path.py --rows 8192 --topk 8 --experts 8 --hidden 7168 --ffn 384 --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192, help="rows a dispatch delivered (R)")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=8, help="local experts")
    p.add_argument("--local-share", type=float, default=0.5, help="share of the K entries naming a local expert")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ffn", type=int, default=384)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from largeep import ops
    from largeep.layers import GroupedExperts

    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    r, k, e = args.rows, args.topk, args.experts
    idx = torch.randint(0, e, (r, k), generator=g)
    idx[torch.rand(r, k, generator=g) >= args.local_share] = -1
    idx = idx.to(dev)
    num_pairs = int((idx >= 0).sum())
    x = torch.randn(r, args.hidden, device=dev, dtype=torch.bfloat16)
    w = torch.rand(r, k, device=dev)
    experts = GroupedExperts(e, args.hidden, args.ffn, dtype=torch.bfloat16).to(dev)
    offs, src, pos, pad = ops.expert_order(idx, e, num_pairs)
    xs = x[src]
    f = args.ffn
    h13 = ops.grouped_mm(xs, experts.w13, offs, num_pairs)
    h = torch.nn.functional.silu(h13[:, :f]) * h13[:, f:]
    out = ops.grouped_mm(h, experts.w2, offs, num_pairs)
    wv = torch.where(idx >= 0, w, 0.0)
    # num_pairs not known on the host (num_worst_tokens): all R*K entries ordered, the valid ones first
    offs_n, src_n, _, _ = ops.expert_order(idx, e, None)
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("order (largeep)", lambda: ops.expert_order(idx, e, num_pairs)),
        ("order (torch ops)", lambda: ops._expert_order_torch(idx, e, num_pairs)),
        ("gather x[src]", lambda: x[src]),
        ("grouped_mm w13", lambda: ops.grouped_mm(xs, experts.w13, offs, num_pairs)),
        ("torch._grouped_mm w13 (raw)", lambda: torch._grouped_mm(xs, experts.w13, offs=offs)),
        ("grouped_mm w2", lambda: ops.grouped_mm(h, experts.w2, offs, num_pairs)),
        ("weighted_row_sum", lambda: ops.weighted_row_sum(out, pos, wv, pad)),
        ("forward_rows (all)", lambda: experts.forward_rows(x, idx, w, num_pairs)),
        ("gather x[src] (R*K rows)", lambda: x[src_n]),
        ("gather_rows (valid of R*K)", lambda: ops.gather_rows(x, src_n, offs_n[-1:])),
        ("forward_rows (pairs None)", lambda: experts.forward_rows(x, idx, w, None)),
    ]
    busy = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    res: dict[str, Any] = {"config": vars(args), "num_pairs": num_pairs, "steps": {}}
    with torch.no_grad():
        for name, fn in steps:
            for _ in range(3):
                fn()
            host, gpu = [], []
            for _ in range(args.iters):
                torch.cuda.synchronize()
                _ = busy @ busy  # keeps the GPU busy ~1 ms: the step's launches never wait for it
                t0 = time.perf_counter()
                fn()
                host.append((time.perf_counter() - t0) * 1e6)
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                _ = busy @ busy  # queued first: the step's kernels then run back to back, without launch gaps
                a.record()
                fn()
                b.record()
                b.synchronize()
                gpu.append(a.elapsed_time(b) * 1e3)
            hm, gm = statistics.median(host), statistics.median(gpu)
            res["steps"][name] = {"host_us": hm, "gpu_us": gm}
            print(f"{name:28s} host {hm:8.1f} us   gpu {gm:8.1f} us", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"expert_path_r{r}_e{e}_f{args.ffn}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
