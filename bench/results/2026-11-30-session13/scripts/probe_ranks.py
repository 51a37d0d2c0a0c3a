"""session 13 probe: the nvshmem backend with 3 and 4 ranks on GPU 0 (a gloo group; NVSHMEM's several PEs per GPU).
Run 3's random refusals on 3 ranks on one GPU ran past their time; this runs single bodies, each with a short pool
limit and LARGEEP_TIMEOUT_S=10, printing each outcome (the library's bounded waits name what they waited for)."""
import os
import sys
import time
import traceback

os.environ.setdefault("LARGEEP_TIMEOUT_S", "10")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../../tests"))
import error_bodies  # noqa: E402
from dist_pool import DistPool  # noqa: E402

PROBES = [
    (3, "plain round", error_bodies.some_ranks_refuse, ("nvshmem", [], 100, [5, 5, 5], False)),
    (3, "rank 1 refuses", error_bodies.some_ranks_refuse, ("nvshmem", [1], 100, [5, 5, 5], False)),
    (2, "2 ranks, rank 1 refuses", error_bodies.some_ranks_refuse, ("nvshmem", [1], 100, [5, 5], False)),
    (4, "4 ranks one_rank_refuses bf16", error_bodies.one_rank_refuses, ("nvshmem", "bf16")),
    (4, "4 ranks plain round", error_bodies.some_ranks_refuse, ("nvshmem", [], 100, [5, 5, 5, 5], False)),
]

def main() -> None:
    pools: dict[int, DistPool] = {}
    for world, name, fn, args in PROBES:
        if world not in pools or pools[world].broken:
            pools[world] = DistPool(world, "gloo-cuda", timeout_s=45)
        t = time.monotonic()
        try:
            res = pools[world].run(fn, *args)
            print(f"== {name}: {time.monotonic() - t:.1f} s, failures {[r['failures'] for r in res]}", flush=True)
        except Exception:  # noqa: BLE001
            print(f"== {name}: {time.monotonic() - t:.1f} s, EXCEPTION\n{traceback.format_exc()}", flush=True)
    for p in pools.values():
        p.close(force=True)


if __name__ == "__main__":
    main()
