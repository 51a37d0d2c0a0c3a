"""Session 26, r3's driver: run from tests/ as python3 ../bench/results/2026-12-01-session26/scripts/leak_main.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.getcwd())

if __name__ == "__main__":
    import leak_bodies
    from dist_pool import DistPool

    # r3: each variant 8 cycles; r4 (argument "r4"): the round trip 40 cycles (past the 32 streams of torch's
    # stream pool, from which each Buffer takes its stream), then 12 with torch.cuda.empty_cache() before each reading
    r4 = sys.argv[1:] == ["r4"]
    runs = [("roundtrip", 40, False), ("roundtrip", 12, True)] if r4 else [
        (v, 8, False) for v in ("raw", "create", "roundtrip", "ll")]
    for variant, n, empty in runs:
        pool = DistPool(2, "gloo-cuda0", timeout_s=120)
        try:
            res = pool.run(leak_bodies.cycles, variant, n, empty)
        finally:
            pool.close(force=True)
        free = [f for f, _ in res[0]]
        print(variant, "empty_cache" if empty else "", "free KiB fall:", [free[0] - f for f in free],
              "reserved KiB:", [r for _, r in res[0]],
              [r for _, r in res[1]], flush=True)
