"""Session 37 (for a later run): the FP8 casts' cost as scripts/fp8_cast.py measures it (CUDA events around each
call, median of 50 after 5 warm-ups: the host's launch path included, which dominates small calls), and back to back
(events around 20 calls in a row, median of 20 such, over 20: the host launches while the GPU works, so for large
calls this is the kernel's time). Native kernels only (fp8.quantize / fp8.dequantize to bf16); bytes over time.
usage: python3 fp8_cast2.py OUT.json"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from largeep import fp8


def timed(fn, iters: int = 50, warmup: int = 5, batch: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(batch):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / batch)
    return statistics.median(times)


def main() -> None:
    out = []
    hidden = 7168
    for rows in (128, 4096, 16384, 32768):
        x = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
        q, s = fp8.quantize(x)
        moved_q = rows * hidden * (2 + 1) + rows * hidden // 128 * 4
        moved_d = rows * hidden * (1 + 2) + rows * hidden // 128 * 4
        rec = {"rows": rows, "hidden": hidden}
        for name, fn, moved in (("quantize", lambda x=x: fp8.quantize(x), moved_q),
                                ("dequantize", lambda q=q, s=s: fp8.dequantize(q, s, torch.bfloat16), moved_d)):
            one = timed(fn)
            b2b = timed(fn, iters=20, batch=20)
            rec |= {f"{name}_us": round(one, 1), f"{name}_b2b_us": round(b2b, 1),
                    f"{name}_b2b_GBps": round(moved / b2b / 1e3, 1)}
        print(rec, flush=True)
        out.append(rec)
    json.dump(out, open(sys.argv[1], "w"), indent=1)


main()
