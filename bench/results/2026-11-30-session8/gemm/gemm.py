"""Grouped GEMM layouts: torch._grouped_mm at the few_experts layer's sizes, B N-major (as stored) vs K-major."""
import statistics, sys, torch
torch.manual_seed(0)
H, F, E = 7168, 384, 8
def t(fn, iters=30):
    for _ in range(5): fn()
    evs = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); evs.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(x.elapsed_time(y) * 1000 for x, y in evs)
def row(name, us, flop):
    print(f"{name:44s} {us:8.1f} us  {flop / us / 1e6:6.0f} TFLOP/s", flush=True)
for R in (32768, 16384, 8192):
    x = torch.randn(R, H, device="cuda", dtype=torch.bfloat16)
    offs = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * (R // E)
    for n_out, name in ((F, "w1"), (2 * F, "w13")):
        wn = torch.randn(E, H, n_out, device="cuda", dtype=torch.bfloat16)
        wk = torch.randn(E, n_out, H, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        fl = 2 * R * H * n_out
        row(f"R{R} {name} N-major", t(lambda: torch._grouped_mm(x, wn, offs=offs)), fl)
        row(f"R{R} {name} K-major", t(lambda: torch._grouped_mm(x, wk, offs=offs)), fl)
        xs = x[: R // E]
        row(f"R{R} {name} dense mm x{E} (N-major)", t(lambda: [torch.mm(xs, wn[i]) for i in range(E)]), fl)
        row(f"R{R} {name} bmm", t(lambda: torch.bmm(x.view(E, R // E, H), wn)), fl)
    h = torch.randn(R, F, device="cuda", dtype=torch.bfloat16)
    w2n = torch.randn(E, F, H, device="cuda", dtype=torch.bfloat16)
    w2k = torch.randn(E, H, F, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    fl = 2 * R * H * F
    row(f"R{R} w2 N-major", t(lambda: torch._grouped_mm(h, w2n, offs=offs)), fl)
    row(f"R{R} w2 K-major", t(lambda: torch._grouped_mm(h, w2k, offs=offs)), fl)
    row(f"R{R} w2 bmm", t(lambda: torch.bmm(h.view(E, R // E, F), w2n)), fl)
xd = torch.randn(32768, H, device="cuda", dtype=torch.bfloat16); wd = torch.randn(H, 768, device="cuda", dtype=torch.bfloat16)
row("dense 32768x7168x768", t(lambda: torch.mm(xd, wd)), 2 * 32768 * H * 768)
print(torch.__version__, torch.cuda.get_device_name())
big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(big)
us = t(lambda: dst.copy_(big)); print(f"copy 1 GiB: {us:.0f} us = {2 * (1 << 30) / us / 1e6:.2f} TB/s (read+write)")
src = torch.randint(0, 8192, (8192,), device="cuda"); xx = torch.randn(8192, H, device="cuda", dtype=torch.bfloat16)
us = t(lambda: xx[src]); print(f"gather 8192 rows of 7168 bf16: {us:.1f} us = {2 * xx.numel() * 2 / us / 1e6:.2f} TB/s")
us = t(lambda: torch.index_select(xx, 0, src)); print(f"index_select: {us:.1f} us")
