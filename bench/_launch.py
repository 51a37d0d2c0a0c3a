"""One process per rank for the standalone scripts in bench/: spawn, join a group, run a body, return rank 0's result.

A body is a module-level function ``body(rank, world, args, device) -> value``; rank 0's value comes back to the
parent. ``write_records`` writes SPEC.md records as the benchmark does (a list file and its run file beside it),
``write_doc`` anything else as one JSON object. The group rendezvous goes through a file (a TCP port picked in
advance can be taken before rank 0 listens).
Every spawned process gets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 unless
the caller set them.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in SAFE_ENV.items():
    os.environ.setdefault(_k, _v)

Body = Callable[[int, int, Any, torch.device], Any]


def _entry(body: Body, rank: int, world: int, args: Any, init_file: str, backend: str, results: Any) -> None:
    try:
        url = f"file://{init_file}"
        if backend == "nccl":
            torch.cuda.set_device(rank)
            dev = torch.device("cuda", rank)
            dist.init_process_group("nccl", init_method=url, rank=rank, world_size=world, device_id=dev)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
            dev = torch.device("cpu")
            dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world)
        out = body(rank, world, args, dev)
        if rank == 0:
            results.put(("ok", out))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        raise


def run_ranks(body: Body, world: int, args: Any, *, backend: str = "nccl", timeout_s: float = 1200.0) -> Any:
    """Runs ``body`` on ``world`` new processes (NCCL, one GPU each; or gloo) and returns rank 0's value. Raises
    with the failing rank's traceback, or when no result came within ``timeout_s``. The rendezvous file is removed
    when it returns or raises. Raises ValueError at once for fewer than one rank (e.g. no GPU visible): no process
    would ever answer."""
    if world < 1:
        raise ValueError(f"run_ranks: {world} ranks to start (no GPU visible?)")
    fd, init_file = tempfile.mkstemp(prefix="largeep-bench-")
    os.close(fd)
    os.unlink(init_file)
    try:
        return _run(body, world, args, backend, timeout_s, init_file)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(init_file)


def _run(body: Body, world: int, args: Any, backend: str, timeout_s: float, init_file: str) -> Any:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(body, r, world, args, init_file, backend, results))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no result within {timeout_s:g} s (exit codes {[p.exitcode for p in procs]})")
            try:
                kind, payload = results.get(timeout=1.0)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"a rank died (exit codes {[p.exitcode for p in procs]})") from None
                continue
            if kind == "error":
                raise RuntimeError(payload)
            break
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    for p in procs:
        p.join()
    return payload


def _command() -> str:
    return shlex.join([sys.executable] + sys.argv)


def write_records(out_dir: str, name: str, what: str, records: list[dict[str, Any]], **run: Any) -> str:
    """Writes SPEC.md records (with the script's own per-record keys) as OUT_DIR/NAME, a JSON list whose records
    also carry the environment and the command, and {schema, results, command, env, what, **run} beside it as
    NAME.run.json (largeep.bench.records, module docstring). Returns the list file's path."""
    from largeep.bench import records as rec

    path = os.path.join(out_dir, name)
    rec.write_records(path, records, env=rec.environment(), command=_command(), what=what, **run)
    return path


def write_doc(out_dir: str, name: str, what: str, records: list[dict[str, Any]], **extra: Any) -> str:
    """Writes rows that are not SPEC records (e.g. kernel_times.py's per-leg bytes) as one object {command, env,
    what, records, **extra} at OUT_DIR/NAME and returns the path."""
    from largeep.bench import records as rec

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    doc = {"command": _command(), "env": rec.environment(), "what": what, "records": records, **extra}
    tmp = path + ".tmp"  # (atomically: a run cut short leaves the earlier file whole)
    with open(tmp, "w") as f:
        json.dump(rec.finite(doc), f, indent=1, allow_nan=False)
    os.replace(tmp, path)
    return path
