"""The test harness's process pools: a body that hangs, one that kills its worker, and the cache that stops
restarting a pool whose bodies keep hanging (each hang costs the pool's whole timeout)."""

from __future__ import annotations

import os
import time

import pytest
from dist_pool import DistPool, PoolCache


def sleeps(rank: int, world: int, seconds: float) -> int:
    time.sleep(seconds)
    return rank


def exits(rank: int, world: int) -> None:
    os._exit(3)


def test_hang_and_crash_are_told_apart() -> None:
    pool = DistPool(1, "gloo", timeout_s=60.0)
    try:
        assert pool.run(sleeps, 0.0) == [0]  # (the worker's start, within the generous limit)
        pool.timeout_s = 1.0
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="did not finish within 1.0 s"):
            pool.run(sleeps, 30.0)
        assert time.monotonic() - start < 10.0
        assert pool.broken and pool.hung
    finally:
        pool.close(force=True)
    pool = DistPool(1, "gloo", timeout_s=60.0)
    try:
        with pytest.raises(TimeoutError, match="rank 0 exited with code 3"):
            pool.run(exits)
        assert pool.broken and not pool.hung
    finally:
        pool.close(force=True)


class FakePool:
    def __init__(self, world: int, backend: str) -> None:
        self.world, self.backend = world, backend
        self.broken = self.hung = self.stopped = False
        self.deadline: float | None = None

    def stop(self) -> None:
        self.stopped = True

    def reap(self, deadline: float) -> None:
        self.deadline = deadline


def test_cache_stops_restarting_a_pool_that_keeps_hanging() -> None:
    made: list[FakePool] = []

    def make(world: int, backend: str) -> FakePool:
        made.append(FakePool(world, backend))
        return made[-1]

    cache = PoolCache(make, max_hangs=2)  # type: ignore[arg-type]
    a = cache.get(2, "gloo")
    assert cache.get(2, "gloo") is a and len(made) == 1
    a.broken = True  # a failed body (not a hang): restarted, nothing counted
    b = cache.get(2, "gloo")
    assert b is not a and cache.hangs == {}
    b.broken = b.hung = True
    c = cache.get(2, "gloo")  # the first hang: restarted
    assert c is not b and cache.hangs == {("", 2, "gloo"): 1}
    assert cache.get(3, "gloo") is made[-1] and len(made) == 4  # other keys are independent
    c.broken = c.hung = True
    with pytest.raises(RuntimeError, match=r"pool of 2 ranks \(gloo\) hung 2 times"):
        cache.get(2, "gloo")
    with pytest.raises(RuntimeError, match="hung 2 times"):  # and stays refused, without counting again
        cache.get(2, "gloo")
    assert cache.hangs == {("", 2, "gloo"): 2} and len(made) == 4
    cache.test = "the next test"  # which starts it again
    d = cache.get(2, "gloo")
    assert d is made[-1] and len(made) == 5 and cache.hangs == {("", 2, "gloo"): 2}
    before = time.monotonic()
    cache.close_all()
    # every pool told first, then one 2 s deadline shared by all (a broken one killed at once)
    assert made[-2].stopped and made[-1].stopped and cache.pools == {}
    assert made[-2].deadline == made[-1].deadline and before + 2.0 <= made[-1].deadline <= time.monotonic() + 2.0

    e = cache.get(4, "gloo")
    e.broken = True
    cache.close_all()
    assert not e.stopped and e.deadline == 0.0
