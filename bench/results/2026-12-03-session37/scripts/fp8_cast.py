"""Session 36 (session 37: the torch-ops path stubs _native_for of any arity, which now takes q and scale): the
cost of the FP8 casts that ops.dispatch(use_fp8=True) adds (one GPU, no link): fp8.quantize of
the tokens [T, H] bf16 before the dispatch, fp8.dequantize of the received rows [R, H] to bf16 after it, each by
the native kernel and by the torch ops (the path without the native module), CUDA events, median of 50 after 5
warm-ups. Bytes over time: the native kernels read and write each value once.
usage: python3 fp8_cast.py OUT.json"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from largeep import fp8


def timed(fn, iters: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def main() -> None:
    out = []
    hidden = 7168
    native_for = fp8._native_for
    for rows in (128, 4096, 32768):
        x = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
        q, s = fp8.quantize(x)
        for path in ("native", "torch"):
            fp8._native_for = native_for if path == "native" else (lambda *tensors: None)
            tq = timed(lambda x=x: fp8.quantize(x))
            td = timed(lambda q=q, s=s: fp8.dequantize(q, s, torch.bfloat16))
            moved_q = rows * hidden * (2 + 1) + rows * hidden // 128 * 4
            moved_d = rows * hidden * (1 + 2) + rows * hidden // 128 * 4
            rec = {"rows": rows, "hidden": hidden, "path": path, "quantize_us": round(tq, 1),
                   "dequantize_us": round(td, 1), "quantize_GBps": round(moved_q / tq / 1e3, 1),
                   "dequantize_GBps": round(moved_d / td / 1e3, 1)}
            print(rec, flush=True)
            out.append(rec)
        fp8._native_for = native_for
    json.dump(out, open(sys.argv[1], "w"), indent=1)


main()
