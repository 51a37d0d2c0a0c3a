"""Does a kernel on another stream run beside torch._grouped_mm (with / without an SM carveout, stream priority)?"""
import statistics, torch
torch.manual_seed(0)
H, F, E, R = 7168, 384, 8, 32768
x = torch.randn(R, H, device="cuda", dtype=torch.bfloat16)
w = torch.randn(E, H, 2 * F, device="cuda", dtype=torch.bfloat16)
offs = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * (R // E)
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
def gmm(): return torch._grouped_mm(x, w, offs=offs)
def dense(): return a @ a
def med(fn, n=7):
    out = []
    for _ in range(n):
        torch.cuda.synchronize(); s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize(); out.append(s.elapsed_time(e) * 1000)
    return statistics.median(out)
cyc = int(getattr(torch.cuda.get_device_properties(0), "clock_rate", 1980000))  # kHz = cycles per ms
side_hi, side_lo = torch.cuda.Stream(priority=-(1 << 20)), torch.cuda.Stream()
for name, op in (("grouped_mm", gmm), ("dense mm", dense)):
    for carve in (None, 24):
        torch._C._set_sm_carveout_experimental(carve)
        for _ in range(3): op()
        alone = med(lambda: [op() for _ in range(5)])
        sleep_alone = med(lambda: torch.cuda._sleep(cyc))
        for sname, side in (("normal", side_lo), ("high", side_hi)):
            def both():
                main = torch.cuda.current_stream()
                for _ in range(5): op()
                side.wait_stream(main) if False else None
                with torch.cuda.stream(side):
                    torch.cuda._sleep(cyc)
                main.wait_stream(side)
            t = med(both)
            print(f"{name:10s} carveout {str(carve):4s} side {sname:6s}: 5 ops alone {alone:8.1f} us, 1-block sleep alone {sleep_alone:7.1f} us, together {t:8.1f} us -> {'OVERLAP' if t < alone + 0.5 * sleep_alone else 'SERIAL'}", flush=True)
torch._C._set_sm_carveout_experimental(None)
print(torch.__version__)
