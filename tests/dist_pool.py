"""A pool of N worker processes joined in one torch.distributed group, reused across tests.

Spawning N Python processes with torch costs seconds, so each world size is started once per test session and
then runs many test bodies. A body is a module-level function ``fn(rank, world_size, *args)``; the pool runs it on
every rank and returns the per-rank results, or raises with every failing rank's traceback.
"""

from __future__ import annotations

import datetime
import faulthandler
import importlib
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def pool_backend(backend: str, world: int, visible_gpus: int) -> str:
    """The process group a pool of ``world`` ranks makes for ``backend``: "nccl" becomes "gloo-cuda0" (every rank on
    GPU 0) where the ranks are more than the visible GPUs and LARGEEP_TEST_EMULATE_GPUS is set (conftest.gpu_count:
    the emulation stands in for the missing GPUs); otherwise ``backend`` itself."""
    emulate = os.environ.get("LARGEEP_TEST_EMULATE_GPUS", "").strip() not in ("", "0")
    return "gloo-cuda0" if backend == "nccl" and world > visible_gpus and emulate else backend


def _worker(rank: int, world: int, init_file: str, backend: str, tasks: Any, results: Any, timeout_s: float) -> None:
    os.environ.update(SAFE_ENV)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    faulthandler.enable()  # a crash (SIGSEGV, SIGABRT) prints this worker's Python stack on stderr
    backend = pool_backend(backend, world, torch.cuda.device_count())
    if backend == "nccl":
        torch.cuda.set_device(rank)
        kwargs: dict[str, Any] = {"device_id": torch.device("cuda", rank)}
    else:
        kwargs = {}
    if backend.startswith("gloo-cuda"):
        # ranks share the GPUs (gloo-cuda: rank % GPUs; gloo-cuda0: all on GPU 0, whatever the machine has;
        # gloo-cuda:0,1,0: rank r on the r-th GPU listed): NCCL refuses two ranks on one GPU, gloo does not; the
        # nvshmem backend runs on the current CUDA device of a gloo group (NVSHMEM hosts several PEs per GPU)
        if backend.startswith("gloo-cuda:"):
            gpu = int(backend.split(":")[1].split(",")[rank])
        else:
            gpu = 0 if backend == "gloo-cuda0" else rank % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
        backend = "gloo"
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
        **kwargs,
    )
    while True:
        item = tasks.get()
        if item is None:
            break
        mod, name, args = item
        # a body still running shortly before the parent gives up prints every thread's stack (stderr)
        faulthandler.dump_traceback_later(max(timeout_s - 10.0, 1.0), exit=False)
        try:
            fn = getattr(importlib.import_module(mod), name)
            results.put((rank, True, fn(rank, world, *args)))
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent
            results.put((rank, False, traceback.format_exc()))
        finally:
            faulthandler.cancel_dump_traceback_later()
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world: int, backend: str = "gloo", timeout_s: float | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        # LARGEEP_TEST_POOL_TIMEOUT_S: how long a body may run on any rank (default 180 s)
        self.timeout_s = timeout_s or float(os.environ.get("LARGEEP_TEST_POOL_TIMEOUT_S", "180"))
        # A file rendezvous: a TCP port picked in advance can be taken by someone else before rank 0 listens.
        fd, init_file = tempfile.mkstemp(prefix="largeep-pool-")
        os.close(fd)
        os.unlink(init_file)
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(r, world, init_file, backend, self.tasks[r], self.results, self.timeout_s),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self.broken = False
        self.hung = False  # a body ran past timeout_s with every worker alive (not a crash, not a failure)

    def run(self, fn: Callable[..., Any], *args: Any, exits: frozenset[int] = frozenset()) -> list[Any]:
        """``fn``'s result on each rank. ``exits``: ranks whose body ends their process (a peer that exits, for
        the others to detect): their result is ``("exited", exit code)``, and the pool is closed after the run
        (its group lost them)."""
        if self.broken:
            raise RuntimeError("the process pool broke in an earlier test")
        for q in self.tasks:
            q.put((fn.__module__, fn.__name__, args))
        out: list[Any] = [None] * self.world
        errors = []
        answered: set[int] = set()
        if exits:
            self.broken = True  # (whatever happens: its group lost a member)
        while len(answered) < self.world:
            deadline = time.monotonic() + self.timeout_s
            got = None
            while got is None:
                try:
                    got = self.results.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    for r in exits - answered:
                        if not self.procs[r].is_alive():
                            answered.add(r)
                            out[r] = ("exited", self.procs[r].exitcode)
                    if len(answered) == self.world:
                        break
                    # a worker that died (a crash, an abort, exit() inside a library) never answers and prints no
                    # stack: say so at once, with its exit code, and end the pool
                    dead = [f"rank {r} exited with code {p.exitcode}" for r, p in enumerate(self.procs)
                            if not p.is_alive() and r not in answered]
                    if dead or time.monotonic() >= deadline:
                        self.broken = True
                        self.hung = not dead
                        self.close(force=True)
                        raise TimeoutError(
                            f"{fn.__name__}: " + ("; ".join(dead) if dead else
                                                  f"a rank did not finish within {self.timeout_s} s (every worker "
                                                  "process was still alive"
                                                  + (", but for those allowed to exit" if exits else "") + ")")
                        ) from None
            if got is None:
                break
            rank, ok, value = got
            answered.add(rank)
            if ok:
                out[rank] = value
            else:
                # the other ranks may now wait forever in a collective: end the pool
                errors.append(f"--- rank {rank} ---\n{value}")
                self.broken = True
                self.close(force=True)
                break
        if exits:
            self.close(force=True)
        if errors:
            raise AssertionError(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return out

    def close(self, force: bool = False, grace_s: float = 30.0) -> None:
        """Stops the workers: each leaves its loop and destroys its process group, within ``grace_s`` seconds in
        all (then killed; at once with ``force``)."""
        if not force:
            self.stop()
        self.reap(time.monotonic() + (0.0 if force else grace_s))

    def stop(self) -> None:
        """Tells each worker to leave its loop (:meth:`reap` waits for them)."""
        for q in self.tasks:
            q.put(None)

    def reap(self, deadline: float) -> None:
        """Waits until ``deadline`` (time.monotonic) for the workers to end, then kills those still alive."""
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()


def run_in_own_pool(world: int, backend: str, fn: Callable[..., Any], *args: Any, timeout_s: float = 120,
                    exits: frozenset[int] = frozenset()) -> list[Any]:
    """``fn``'s results on a pool of its own (a fresh process group, NVSHMEM not started in its processes), killed
    afterwards: for bodies that leave a collective abandoned, a group short of a rank (``exits``: see
    :meth:`DistPool.run`) or NVSHMEM unusable in their processes."""
    pool = DistPool(world, backend, timeout_s=timeout_s)
    try:
        return pool.run(fn, *args, exits=exits)
    finally:
        pool.close(force=True)


class PoolCache:
    """The pools of a test session, one per (world, process-group backend), started on first use and again after
    one broke. Within one test (``test``: its id, set before each test), a pool whose bodies hung ``max_hangs``
    times is not started again: each hang costs the pool's whole timeout, and a hypothesis test would retry (and
    shrink) its failing example many times, each retry hanging. The next test starts it again."""

    def __init__(self, make: Callable[[int, str], DistPool] = DistPool, max_hangs: int = 2) -> None:
        self.make = make
        self.max_hangs = max_hangs
        self.test = ""
        self.pools: dict[tuple[int, str], DistPool] = {}
        self.hangs: dict[tuple[str, int, str], int] = {}

    def get(self, world: int, backend: str = "gloo") -> DistPool:
        key, counted = (world, backend), (self.test, world, backend)
        old = self.pools.get(key)
        if old is None or old.broken:
            if old is not None and old.hung:
                self.hangs[counted] = self.hangs.get(counted, 0) + 1
                old.hung = False  # counted once
            if self.hangs.get(counted, 0) >= self.max_hangs:
                raise RuntimeError(f"the pool of {world} ranks ({backend}) hung {self.hangs[counted]} times in this "
                                   "test (see the first of those failures); it is not started again for it")
            self.pools[key] = self.make(world, backend)
        return self.pools[key]

    def close_all(self) -> None:
        # (the session's end: a gloo group that still holds a collective abandoned by a refusal test can take its
        # whole timeout to destroy, which a worker killed after a few seconds does not wait for)
        # All pools are told at once and share the 2 s, rather than 2 s each.
        for p in self.pools.values():
            if not p.broken:
                p.stop()
        deadline = time.monotonic() + 2.0
        for p in self.pools.values():
            p.reap(deadline if not p.broken else 0.0)
        self.pools.clear()
