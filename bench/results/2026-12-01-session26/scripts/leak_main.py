"""Session 26, r3's driver: run from tests/ as python3 ../bench/results/2026-12-01-session26/scripts/leak_main.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.getcwd())

if __name__ == "__main__":
    import leak_bodies
    from dist_pool import DistPool

    for variant in ("raw", "create", "roundtrip", "ll"):
        pool = DistPool(2, "gloo-cuda0", timeout_s=120)
        try:
            res = pool.run(leak_bodies.cycles, variant, 8)
        finally:
            pool.close(force=True)
        free = [f for f, _ in res[0]]
        print(variant, "free KiB fall:", [free[0] - f for f in free], "reserved KiB:", [r for _, r in res[0]],
              [r for _, r in res[1]], flush=True)
