"""Timing shared by every largeep benchmark (SPEC.md "Measuring").

One timed call, on every rank:
1. (GPU) flush L2: ``zero_()`` of a 256 MiB buffer, so no call finds its inputs in a warm cache;
2. align the ranks: device synchronize, ``dist.barrier()``, device synchronize;
3. (GPU) queue a short ``torch.cuda._sleep`` so the host can queue the call's kernels before the GPU reaches them:
   the start event then marks when the GPU is free to run the call, not when Python got there (calls that wait on
   the host, like a dispatch with a count exchange, still pay their wait);
4. record a start event on the current stream, make the call, record an end event (CPU: ``time.perf_counter``
   around the call).
Elapsed times are read only after the loop (one synchronize), so reading them costs nothing inside the loop.

Across ranks: each rank times its own call; :func:`reduce_over_ranks` all-gathers every rank's per-iteration times
and keeps, for each iteration, the slowest rank (the call is done when the last rank is done). The reported median
and p10/p90 are over those per-iteration maxima.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

FLUSH_BYTES = 256 << 20
# GPU idle time queued before each timed call; long enough for the host to queue a typical call's first kernels.
PRE_SLEEP_US = 30.0
# torch.cuda._sleep counts clock cycles; H100/H200 boost clocks are ~1.7-2 GHz.
_CYCLES_PER_US = 1800


@dataclass(frozen=True)
class Stats:
    """Median and 10th/90th percentiles of a list of times, in microseconds."""

    median: float
    p10: float
    p90: float
    n: int

    @staticmethod
    def of(times_us: list[float] | torch.Tensor) -> Stats:
        t = torch.as_tensor(times_us, dtype=torch.float64).flatten()
        if t.numel() == 0:
            raise ValueError("Stats.of: no times")
        q = torch.quantile(t, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64))
        return Stats(float(q[0]), float(q[1]), float(q[2]), int(t.numel()))


class Timer:
    """Times calls on one rank as the module docstring says; keeps the times per name.

    Args:
        group: the process group whose ranks are aligned before each call.
        device: where the calls run (cuda: device events and an L2 flush; cpu: perf_counter).
        flush: flush L2 before each call (GPU only).
    """

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device, *, flush: bool = True) -> None:
        self.group = group
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush_buf = (
            torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device) if self.cuda and flush else None
        )
        self._pending: dict[str, list[Any]] = {}

    def sync(self) -> None:
        """Waits for this rank's device work."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def align(self) -> None:
        """Flushes L2 (GPU), then returns on every rank at about the same time with an idle device."""
        if self._flush_buf is not None:
            self._flush_buf.zero_()
        self.sync()
        dist.barrier(group=self.group)
        self.sync()

    def time(self, name: str, fn: Callable[[], Any], *, record: bool = True) -> Any:
        """Aligns the ranks, runs ``fn()`` and, if ``record``, keeps its time under ``name``. Returns fn's result."""
        self.align()
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            t1 = time.perf_counter()
            if record:
                self._pending.setdefault(name, []).append((t1 - t0) * 1e6)
            return out
        torch.cuda._sleep(int(PRE_SLEEP_US * _CYCLES_PER_US))
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        if record:
            self._pending.setdefault(name, []).append((start, end))
        return out

    def take(self) -> dict[str, list[float]]:
        """This rank's times in microseconds per name, in call order; clears them."""
        self.sync()
        out: dict[str, list[float]] = {}
        for name, items in self._pending.items():
            if self.cuda:
                out[name] = [s.elapsed_time(e) * 1e3 for s, e in items]
            else:
                out[name] = list(items)
        self._pending.clear()
        return out


def reduce_over_ranks(
    times: dict[str, list[float]], group: dist.ProcessGroup | None, device: torch.device
) -> dict[str, Stats]:
    """Per name: all-gathers every rank's per-iteration times, takes the max over ranks of each iteration, and
    returns the statistics of those maxima. Collective: every rank must pass the same names and counts."""
    names = sorted(times)
    if not names:
        return {}
    lengths = {len(times[n]) for n in names}
    if len(lengths) != 1:
        # pad to a rectangle with NaN; NaNs are dropped after the max (every rank times the same calls)
        width = max(lengths)
    else:
        width = lengths.pop()
    mat = torch.full((len(names), width), float("nan"), dtype=torch.float64)
    for i, n in enumerate(names):
        mat[i, : len(times[n])] = torch.tensor(times[n], dtype=torch.float64)
    world = dist.get_world_size(group)
    local = mat.to(device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    worst = torch.stack(gathered).amax(dim=0).cpu()  # [names, iters]
    out: dict[str, Stats] = {}
    for i, n in enumerate(names):
        row = worst[i]
        out[n] = Stats.of(row[~torch.isnan(row)])
    return out
