"""session 13 probe (run4: single bodies; run5: the random test's 12 examples): the nvshmem backend with 3 and 4 ranks on GPU 0 (a gloo group; NVSHMEM's several PEs per GPU).
Run 3's random refusals on 3 ranks on one GPU ran past their time; this runs single bodies, each with a short pool
limit and LARGEEP_TIMEOUT_S=10, printing each outcome (the library's bounded waits name what they waited for)."""
import os
import sys
import time
import traceback

os.environ.setdefault("LARGEEP_TIMEOUT_S", "8")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../../tests"))
import error_bodies  # noqa: E402
from dist_pool import DistPool  # noqa: E402

# the 12 examples test_some_ranks_refuse_random draws on 3 ranks (hypothesis, derandomized), in its order
PROBES = [
    (3, "tokens [0, 0, 0] bad [] id 12 fp8 False", error_bodies.some_ranks_refuse, ("nvshmem", [], 12, [0, 0, 0], False)),
    (3, "tokens [7, 0, 0] bad [] id 12 fp8 False", error_bodies.some_ranks_refuse, ("nvshmem", [], 12, [7, 0, 0], False)),
    (3, "tokens [7, 15, 13] bad [0] id -136 fp8 False", error_bodies.some_ranks_refuse, ("nvshmem", [0], -136, [7, 15, 13], False)),
    (3, "tokens [9, 14, 10] bad [2, 1, 0] id -223 fp8 False", error_bodies.some_ranks_refuse, ("nvshmem", [2, 1, 0], -223, [9, 14, 10], False)),
    (3, "tokens [16, 6, 3] bad [] id -711 fp8 False", error_bodies.some_ranks_refuse, ("nvshmem", [], -711, [16, 6, 3], False)),
    (3, "tokens [14, 1, 10] bad [2, 1] id -4294967296 fp8 False", error_bodies.some_ranks_refuse, ("nvshmem", [2, 1], -4294967296, [14, 1, 10], False)),
    (3, "tokens [0, 1, 7] bad [] id 20421840 fp8 False", error_bodies.some_ranks_refuse, ("nvshmem", [], 20421840, [0, 1, 7], False)),
    (3, "tokens [12, 6, 7] bad [2] id -12075 fp8 True", error_bodies.some_ranks_refuse, ("nvshmem", [2], -12075, [12, 6, 7], True)),
    (3, "tokens [3, 16, 6] bad [] id 16271 fp8 False", error_bodies.some_ranks_refuse, ("nvshmem", [], 16271, [3, 16, 6], False)),
    (3, "tokens [1, 13, 13] bad [2] id -17131 fp8 False", error_bodies.some_ranks_refuse, ("nvshmem", [2], -17131, [1, 13, 13], False)),
    (3, "tokens [12, 13, 9] bad [0, 1, 2] id 3288 fp8 False", error_bodies.some_ranks_refuse, ("nvshmem", [0, 1, 2], 3288, [12, 13, 9], False)),
    (3, "tokens [12, 0, 0] bad [] id 12 fp8 True", error_bodies.some_ranks_refuse, ("nvshmem", [], 12, [12, 0, 0], True)),
]

def main() -> None:
    pools: dict[int, DistPool] = {}
    for world, name, fn, args in PROBES:
        if world not in pools or pools[world].broken:
            pools[world] = DistPool(world, "gloo-cuda", timeout_s=25)
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
