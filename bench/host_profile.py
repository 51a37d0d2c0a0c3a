"""Where the host time of small normal-mode calls goes: one rank's Python profile of a dispatch/combine round trip.

At 128 tokens per rank the kernels take tens of microseconds, so a round trip (layout, dispatch with its count
exchange, combine) costs what the host does around them. This runs ``--iters`` round trips on every rank (ranks
aligned before each) and prints, for rank 0: the host time of each call (median, ranks aligned before each round
trip), then the same under cProfile with the functions that took most time (cumulative, then own). With
``--no-layout`` the round trip is a dispatch (which then checks the expert ids itself) and a combine.

    python bench/host_profile.py --nprocs 2 --tokens 128 --out OUT

Writes OUT/host_profile_ep{ranks}_t{tokens}[_nolayout].json: the figures printed, with "settings" (the run's
arguments and rank count) and "command", so that runs of other settings in one folder keep their own files.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import _command, run_ranks  # noqa: E402


class _Timed:
    """Forwards to ``inner``, timing every method call on the host into ``into[name]`` (microseconds)."""

    def __init__(self, inner: Any, into: dict[str, list[float]]) -> None:
        self._inner, self._into = inner, into

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._inner, name)
        if not callable(fn):
            return fn

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._into.setdefault(name, []).append((time.perf_counter() - t0) * 1e6)

        return timed


def _wrap_pieces(into: dict[str, list[float]]) -> list[Any]:
    """Times (inclusive, microseconds) the Python functions a round trip runs through, by name; returns undo
    callables. A recursive function (``_tensors_of``) is timed at every level; inclusive times carry the wrappers
    of the pieces inside them (about 1 us each)."""
    from largeep import buffer as bmod
    from largeep import checks
    from largeep.backends import nvshmem_backend as nb

    targets: list[tuple[Any, str]] = [
        (checks, "tensor"), (checks, "tokens"), (checks, "topk_idx"), (checks, "topk_weights"),
        (checks, "remember_checked"), (bmod, "_tensors_of"), (bmod.Buffer, "_run"),
        (bmod._FinishedCalls, "run"), (nb.NvshmemBackend, "get_dispatch_layout"), (nb.NvshmemBackend, "dispatch"),
        (nb.NvshmemBackend, "_send_cached"), (nb.NvshmemBackend, "combine"), (nb, "record_zero_copy"),
    ]
    undo = []
    for owner, name in targets:
        if not hasattr(owner, name):  # (a tree before or after this function existed)
            continue
        orig = getattr(owner, name)
        label = f"{getattr(owner, '__name__', owner)}.{name}"

        def wrapped(*a: Any, _orig: Any = orig, _label: str = label, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _orig(*a, **kw)
            finally:
                into.setdefault(_label, []).append((time.perf_counter() - t0) * 1e6)

        setattr(owner, name, wrapped)
        undo.append(lambda owner=owner, name=name, orig=orig: setattr(owner, name, orig))
    return undo


def _body(rank: int, world: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import largeep

    g = torch.Generator(device="cuda").manual_seed(1000 + rank)
    x = torch.randn(args.tokens, args.hidden, device="cuda", generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(args.experts, device="cuda", generator=g)[: args.topk]
                       for _ in range(args.tokens)])
    w = torch.rand(args.tokens, args.topk, device="cuda", generator=g)
    buf = largeep.Buffer(None, hidden=args.hidden, num_experts=args.experts, num_topk=args.topk,
                         max_tokens_per_rank=args.tokens, backend="nvshmem", num_sms=24)
    host: dict[str, list[float]] = {"layout": [], "dispatch": [], "combine": []}

    def roundtrip(timed: bool) -> None:
        t0 = time.perf_counter()
        if args.layout:
            buf.get_dispatch_layout(idx)
        t1 = time.perf_counter()
        d = buf.dispatch(x, idx, w)
        t2 = time.perf_counter()
        buf.combine(d.x, d.handle)
        t3 = time.perf_counter()
        if timed:
            host["layout"].append((t1 - t0) * 1e6)
            host["dispatch"].append((t2 - t1) * 1e6)
            host["combine"].append((t3 - t2) * 1e6)

    for _ in range(10):
        roundtrip(False)
    # first without the profiler (its hooks inflate every figure), then under cProfile
    for _ in range(args.iters):
        torch.cuda.synchronize()
        dist.barrier()
        roundtrip(True)
    plain = {k: statistics.median(v) for k, v in host.items()}
    for v in host.values():
        v.clear()
    # each native call's host time (kernel launches, the count-exchange wait), through a timing proxy
    native: dict[str, list[float]] = {}
    impl = buf._impl
    kernels, module = impl.kernels, impl.C
    impl.kernels, impl.C = _Timed(kernels, native), _Timed(module, native)
    for _ in range(args.iters):
        torch.cuda.synchronize()
        dist.barrier()
        roundtrip(False)
    impl.kernels, impl.C = kernels, module
    # the Python pieces of the calls, each timed inclusively (its callees included) by a wrapper
    pieces: dict[str, list[float]] = {}
    restore = _wrap_pieces(pieces)
    try:
        for _ in range(args.iters):
            torch.cuda.synchronize()
            dist.barrier()
            roundtrip(False)
    finally:
        for undo in restore:
            undo()
    pieces_med = {k: (round(statistics.median(v), 1), round(statistics.fmean(v), 1), len(v) // args.iters)
                  for k, v in pieces.items()}
    native_med = {k: statistics.median(v) for k, v in native.items()}
    # medians hide calls that sometimes block (a launch that waits, a peer that is late): mean and p90 too
    native_tail = {k: (round(statistics.fmean(v), 1), round(sorted(v)[int(0.9 * (len(v) - 1))], 1))
                   for k, v in native.items()}
    prof = cProfile.Profile()
    for _ in range(args.iters):
        torch.cuda.synchronize()
        dist.barrier()
        prof.enable()
        roundtrip(True)
        prof.disable()
    torch.cuda.synchronize()
    buf.destroy()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(35)
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    return {"host_us_median": plain, "native_call_us_median": native_med, "native_call_us_mean_p90": native_tail,
            "python_pieces_us_median_mean_calls": pieces_med,
            "host_us_median_profiled": {k: statistics.median(v) for k, v in host.items()},
            "profile": s.getvalue()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--layout", action=argparse.BooleanOptionalAction, default=True,
                   help="call get_dispatch_layout before each dispatch (which then skips its own id check: the "
                        "layout's memo); --no-layout: the dispatch checks the ids itself")
    p.add_argument("--nprocs", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ranks = args.nprocs or torch.cuda.device_count()
    res = run_ranks(_body, ranks, args)
    print("host time per call (us, median, rank 0):", res["host_us_median"])
    print("native calls (us, median, rank 0):", {k: round(v, 1) for k, v in res["native_call_us_median"].items()})
    print("native calls (us, mean and p90, rank 0):", res["native_call_us_mean_p90"])
    print("python pieces (us, inclusive: median, mean, calls per round trip; rank 0):")
    for k, v in res["python_pieces_us_median_mean_calls"].items():
        print(f"  {k:40s} {v}")
    print("the same under cProfile:", res["host_us_median_profiled"])
    print(res["profile"])
    os.makedirs(args.out, exist_ok=True)
    res["settings"] = {**{k: v for k, v in vars(args).items() if k != "out"}, "ranks": ranks}
    res["command"] = _command()
    name = f"host_profile_ep{ranks}_t{args.tokens}{'' if args.layout else '_nolayout'}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
