"""GPU time of one rank's routed experts (``GroupedExperts`` on rows sorted by expert, one GPU, no communication):
plain SwiGLU against experts with biases (``bias=True``) and with GPT-OSS's clamped activation
(``activation=ClampedSwiGLU()``), forward and forward + backward, bf16.

Each variant runs on the same rows (``--rows`` spread evenly over ``--experts`` experts) and weights; the time is
that of CUDA events around the call, queued behind a matmul so that its kernels run back to back (median over
``--iters``). The extra work of the biases is one gather-and-add pass over the [rows, 2F] and [rows, H] GEMM outputs
(and in the backward an index_put sum of each); the clamped activation's is a few elementwise passes over [rows, F]
where SwiGLU has one. Writes a JSON list of records to --out and prints a table.

    python bench/expert_mlp_cost.py --rows 32768 --experts 64 --hidden 7168 --ffn 2048 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch


def _time(fn: Any, iters: int, busy: torch.Tensor) -> float:
    """Median GPU time (us) of fn() between two events, the GPU kept busy by a matmul queued before each."""
    times = []
    for _ in range(iters + 3):
        busy @ busy
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times[3:])


def _measure(ex: Any, x: torch.Tensor, offs: torch.Tensor, grad: torch.Tensor, iters: int,
             busy: torch.Tensor) -> tuple[float, float]:
    """(forward, forward + backward) median GPU times in us of ``ex`` on the sorted rows ``x``."""
    rows = x.shape[0]
    xi = x.clone().requires_grad_()

    def fwd() -> None:
        with torch.no_grad():
            ex(x, offs, rows)

    def fwd_bwd() -> None:
        ex.zero_grad(set_to_none=True)  # (no accumulation into earlier grads)
        ex(xi, offs, rows).backward(grad)

    return _time(fwd, iters, busy), _time(fwd_bwd, iters, busy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32768, help="rows (token, expert) pairs on this rank")
    p.add_argument("--experts", type=int, default=64, help="local experts")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from largeep import ops
    from largeep.layers import ClampedSwiGLU, GroupedExperts

    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows, e, h, f = args.rows, args.experts, args.hidden, args.ffn
    offs = torch.tensor([(i + 1) * rows // e for i in range(e)], dtype=torch.int32, device=dev)
    x = torch.randn(rows, h, device=dev, dtype=torch.bfloat16)
    grad = torch.randn(rows, h, device=dev, dtype=torch.bfloat16)
    busy = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    with torch.device(dev):  # (drawn on the GPU: GBs of weights)
        base = GroupedExperts(e, h, f, dtype=torch.bfloat16)
    variants: list[tuple[str, dict[str, Any]]] = [
        ("swiglu", {}), ("swiglu+bias", {"bias": True}),
        ("clamped+bias", {"bias": True, "activation": ClampedSwiGLU()}),
    ]
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    records = []
    for name, kw in variants:
        with torch.device(dev):
            ex = GroupedExperts(e, h, f, dtype=torch.bfloat16, init=False, **kw)
        with torch.no_grad():
            ex.w13.copy_(base.w13)
            ex.w2.copy_(base.w2)
            for b in (ex.b13, ex.b2):
                if b is not None:
                    b.normal_(std=0.1)
        ops.reset_grouped_mm_stats()
        t_fwd, t_both = _measure(ex, x, offs, grad, args.iters, busy)
        flops = 2.0 * rows * h * 3 * f
        records.append({"variant": name, "rows": rows, "experts": e, "hidden": h, "ffn": f, "dtype": "bf16",
                        "forward_us_median": round(t_fwd, 1), "forward_backward_us_median": round(t_both, 1),
                        "forward_tflops": round(flops / t_fwd / 1e6, 1), "grouped_mm": ops.grouped_mm_stats(),
                        **env})
        del ex
        torch.cuda.empty_cache()
    plain = records[0]
    print(f"{'variant':14} {'forward us':>11} {'x plain':>8} {'fwd+bwd us':>11} {'x plain':>8} {'fwd TFLOP/s':>12}")
    for r in records:
        print(f"{r['variant']:14} {r['forward_us_median']:11.1f} "
              f"{r['forward_us_median'] / plain['forward_us_median']:8.3f} {r['forward_backward_us_median']:11.1f} "
              f"{r['forward_backward_us_median'] / plain['forward_backward_us_median']:8.3f} "
              f"{r['forward_tflops']:12.1f}")
    with open(args.out, "w") as fh:
        json.dump(records, fh, indent=1)


if __name__ == "__main__":
    main()
