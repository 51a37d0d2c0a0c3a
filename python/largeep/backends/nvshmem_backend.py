"""The ``nvshmem`` backend: SPEC.md's semantics on the native kernels of ``largeep._C``.

Process-level NVSHMEM state is joined once (a unique id made by group rank 0 and broadcast over the group) and kept
for the life of the process; each Buffer allocates its own region of the symmetric heap and frees it in
``destroy()``. Arguments reaching this module are already checked by ``largeep.buffer``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import re
import socket
import threading
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from largeep import _collective, checks, native
from largeep._env import Settings, logger
from largeep.backends.base import (
    GroupContext,
    LowLatencyDispatchOut,
    NormalDispatchOut,
    align_up,
    current_raw_stream,
)
from largeep.errors import ArgumentError, PeerRefusedError, PeerTimeoutError
from largeep.fp8 import FP8_DTYPE
from largeep.layout import Layout, one_hot_mask

# Words of the host-mapped status area (csrc/kernels/api.cuh, StatusWord).
_READY, _ERROR, _NUM_RECV, _REFUSED, _PER_EXPERT = 0, 1, 2, 3, 4
_OPS = {
    2: "dispatch (waiting for a peer's rows, or for receivers to free the previous round's)",
    3: "dispatch (count exchange)",
    4: "combine (waiting for a peer's rows, or for sources to free the previous round's)",
    5: "combine (waiting for rows)",
    6: "low_latency_dispatch",
    7: "low_latency_combine",
    15: "dispatch (waiting for a peer's rows)",  # kOpDispatchRows: the copy-out's wait
}
_OP_DISPATCH_ROWS = 15
_OP_WORST_TOO_SMALL = 8  # kOpWorstTooSmall: not a timeout
_OP_PEER_REFUSED = 9  # kOpPeerRefused: a rank refused a round this rank ran with num_worst_tokens (not a timeout)
_OP_RANKS_DISAGREE = 10  # kOpRanksDisagree: the ranks sent rows of different kinds (not a timeout)
_OP_LL_KINDS = 11  # kOpLowLatencyKinds: a low-latency dispatch got FP8 rows with use_fp8=False, or the reverse
_OP_LL_COUNTER = 12  # kOpLowLatencyCounter: a low-latency dispatch's row counter was not cleared (not a timeout)
_OP_LL_ROUND = 13  # kOpLowLatencyRound: a source's count word of another round under its rows word (not a timeout)
_OP_PREPARE = 14  # kOpPrepare: a dispatch's prepare blocks did not meet (two dispatches at once, or a timeout)
# the kinds of rows a fresh dispatch sends (api.cuh's kRowKind): dtype, FP8 scales or not
_ROW_KINDS = {1: (torch.bfloat16, False), 2: (torch.float32, False), 4: (FP8_DTYPE, True)}
_OP_ABANDONED = 16  # (host only) a call left its round open (_closes_open_round: a dispatch or a combine)
_OP_DISPATCH_KINDS = 17  # kOpDispatchKinds: a dispatch received rows of another kind than this rank's (not a timeout)
_OP_COMBINE_KINDS = 18  # kOpCombineKinds: a combine received rows of another kind than this rank's (not a timeout)
_OP_DISPATCH_FORWARD_KINDS = 19  # kOpDispatchForwardKinds: this node's forwarder of a source found another kind
_OP_COMBINE_FORWARD_KINDS = 20  # kOpCombineForwardKinds: a rank summing its node's rows for this one found another
_OP_DISPATCH_HANDLES = 21  # kOpDispatchHandles: a cached dispatch got rows sent with another dispatch's handle
_OP_COMBINE_HANDLES = 22  # kOpCombineHandles: a combine got rows sent with another dispatch's handle
_OP_LL_HANDLES = 23  # kOpLowLatencyHandles: a low-latency combine got rows sent with another dispatch's handle
_KIND_OPS = (_OP_DISPATCH_KINDS, _OP_COMBINE_KINDS, _OP_DISPATCH_FORWARD_KINDS, _OP_COMBINE_FORWARD_KINDS,
             _OP_DISPATCH_HANDLES, _OP_COMBINE_HANDLES)
# The host waits a little longer than the device, so that the device's report (which names the rank) comes first
# (unless the work queued before the call delays its kernel by more than this: the host's bound counts from the
# queueing, the device's from the kernel's start).
_HOST_GRACE_S = 5.0
# low-latency calls that ran as one kernel in this process (LARGEEP_TUNE ll_fuse=1), for tests and diagnostics
FUSED_LAUNCHES = [0]
# normal combines whose rows went by the copy engines (LARGEEP_TUNE comb=8): how tests see that the path ran
CE_LAUNCHES = [0]

_world: dict[str, Any] = {}
# This process's symmetric heap: bytes of the live Buffers' allocations, and the most they have held at once (what
# NVSHMEM has mapped: it keeps the memory it mapped for freed allocations and hands it out again).
_heap = {"live": 0, "peak": 0}


def _heap_growth(need: int) -> int:
    """About how many bytes NVSHMEM must map for an allocation of ``need`` more (0: the memory it mapped for
    Buffers since destroyed covers it; its allocator's fragmentation is not counted)."""
    return max(0, _heap["live"] + need - _heap["peak"])


def _heap_taken(nbytes: int) -> None:
    _heap["live"] += nbytes
    _heap["peak"] = max(_heap["peak"], _heap["live"])


# Group sizes the kernels support: normal mode (a thread per rank in the waits and the count exchange, a lane per
# node and a lane per rank of a node in the per-token loops: csrc/kernels/api.cuh),
# low-latency mode (loops over ranks; largeep's rendezvous kernel, csrc/runtime, is one block of at most 1024
# threads).
MAX_RANKS_NORMAL = 512
MAX_NODES_NORMAL = 64
MAX_RANKS_PER_NODE_NORMAL = 32
MAX_RANKS_LOW_LATENCY = 1024
MAX_TOKENS_LOW_LATENCY = 1 << 20  # (low_latency.cu's ll_round_word: more than 2**43 rounds of a Buffer fit)
# The largest groups that have run on GPUs (many ranks per GPU, tests/test_gpu.py's *_many_ranks_shared_gpus and
# test_normal_wide_nodes_shared_gpus: normal-mode nodes of 1, 2, 4, 8, 16 and 32 ranks and up to 40 nodes,
# low-latency nodes of up to 34; every node size goes through the same code, a lane per rank of the node):
# backend="auto" leaves larger groups to the torch backend, backend="nvshmem" takes them.
TESTED_RANKS_NORMAL = 40
TESTED_RANKS_LOW_LATENCY = 34
MAX_LAYOUT_WORDS = 48 * 1024 // 4  # (layout.cu's and intranode.cu's shared-memory counters)
# the dispatch's prepare kernel (intranode.cu) counts each local expert in the same 48 KiB, beside its own static
# shared memory (a scan's per-warp sums and a few flags, under 200 bytes); this keeps 256 bytes for them
MAX_LOCAL_EXPERTS_NORMAL = MAX_LAYOUT_WORDS - 64


def layout_words(ctx: GroupContext) -> int:
    """The layout kernel's shared-memory counters: one per expert, rank and node (at most MAX_LAYOUT_WORDS)."""
    return ctx.num_experts + ctx.num_ranks + ctx.num_ranks // ctx.ranks_per_node


def unsupported_reason(ctx: GroupContext) -> str | None:
    """None when this backend implements ``ctx``'s configuration, else why not."""
    if ctx.low_latency:
        if ctx.num_ranks > MAX_RANKS_LOW_LATENCY:
            return (f"the nvshmem low-latency kernels support at most {MAX_RANKS_LOW_LATENCY} ranks "
                    f"(got {ctx.num_ranks})")
        if ctx.max_tokens_per_rank > MAX_TOKENS_LOW_LATENCY:
            return ("the nvshmem low-latency kernels keep a round's number beside its row counts in one 64-bit word: "
                    f"max_tokens_per_rank must be at most 2**20 (got {ctx.max_tokens_per_rank})")
        copies = ctx.num_ranks * ctx.max_tokens_per_rank * max(ctx.num_topk, 32)
        if copies > checks.MAX_ROWS:
            return ("the nvshmem low-latency kernels number a rank's received copies (and rows times 32 lanes) with "
                    f"32-bit integers: ranks x max_tokens_per_rank x max(num_topk, 32) = {copies} must be at most "
                    "2**31 - 2**20")
        out_rows = ctx.num_experts * ctx.max_tokens_per_rank
        if out_rows > checks.MAX_ROWS:
            return ("the nvshmem low-latency kernels number a rank's output rows (its experts x ranks x "
                    f"max_tokens_per_rank) with 32-bit integers: num_experts x max_tokens_per_rank = {out_rows} must "
                    "be at most 2**31 - 2**20")
    elif ctx.num_ranks * ctx.max_tokens_per_rank > checks.MAX_ROWS:
        return ("the nvshmem normal-mode kernels number a rank's received rows with 32-bit integers: ranks x "
                f"max_tokens_per_rank = {ctx.num_ranks * ctx.max_tokens_per_rank} must be at most 2**31 - 2**20")
    elif ctx.num_ranks > MAX_RANKS_NORMAL:
        return (f"the nvshmem normal-mode kernels support at most {MAX_RANKS_NORMAL} ranks (got {ctx.num_ranks}; "
                f"low-latency Buffers take up to {MAX_RANKS_LOW_LATENCY})")
    elif ctx.num_ranks // ctx.ranks_per_node > MAX_NODES_NORMAL:
        return (f"the nvshmem normal-mode kernels support at most {MAX_NODES_NORMAL} nodes (got "
                f"{ctx.num_ranks // ctx.ranks_per_node}: {ctx.num_ranks} ranks, ranks_per_node={ctx.ranks_per_node})")
    elif ctx.ranks_per_node > MAX_RANKS_PER_NODE_NORMAL:
        return (f"the nvshmem normal-mode kernels support at most {MAX_RANKS_PER_NODE_NORMAL} ranks per node "
                f"(got ranks_per_node={ctx.ranks_per_node})")
    if not ctx.low_latency:
        # the layout kernel keeps a count per expert, rank and node in 48 KiB of shared memory (layout.cu; the
        # dispatch's prepare one per local expert, fewer)
        words = layout_words(ctx)
        if words > MAX_LAYOUT_WORDS:
            return (f"the nvshmem normal-mode layout kernel counts experts, ranks and nodes in 48 KiB of shared "
                    f"memory: num_experts + ranks + nodes = {words} must be at most {MAX_LAYOUT_WORDS}")
        local = ctx.num_experts // ctx.num_ranks
        if local > MAX_LOCAL_EXPERTS_NORMAL:
            return (f"the nvshmem normal-mode dispatch counts a rank's experts in 48 KiB of shared memory: "
                    f"num_experts / ranks = {local} must be at most {MAX_LOCAL_EXPERTS_NORMAL}")
    if ctx.hidden % 8:
        return f"hidden must be a multiple of 8 for the nvshmem backend (got {ctx.hidden})"
    if ctx.num_topk > 32:
        return f"num_topk must be <= 32 for the nvshmem backend (got {ctx.num_topk})"
    return None


def threads_reason(num_ranks: int, threads: list[int]) -> str | None:
    """None when every rank's LARGEEP_TUNE threads (``threads``, in rank order) exceeds the group's rank count, as
    the normal-mode kernels need (a thread per rank in their waits); else which ranks set too few."""
    few = [r for r, t in enumerate(threads) if t <= num_ranks]
    if not few:
        return None
    return (f"the normal-mode kernels give each of the {num_ranks} ranks a thread of a block: LARGEEP_TUNE threads "
            f"must exceed {num_ranks}, and rank(s) {few} set {sorted({threads[r] for r in few})} (the default, 1024, "
            "fits any normal-mode group)")


def memory_reason(need: int, places: list[tuple[Any, ...]], max_tokens: int = 0, in_rounds: bool = False
                  ) -> str | None:
    """None unless some GPU cannot hold the symmetric allocation of ``need`` bytes for each of its ranks;
    ``places``: (host, GPU, free bytes as that rank saw them[, the bytes its symmetric heap must grow by]) of each
    rank, in rank order (without the fourth: ``need``). NVSHMEM maps its heap's memory as allocations ask for it
    (and keeps what it mapped once, which the free memory does not count), so an allocation that a GPU cannot hold
    fails there only, and the other ranks would be left inside the collective allocation: refuse it on every rank
    first. ``max_tokens``: the tokens per rank the buffers are sized for (max_tokens_per_rank, or tokens_per_round
    when ``in_rounds``), to suggest a size that would fit (the memory grows about in proportion to it)."""
    gpus: dict[tuple[str, str], list[int]] = {}
    for rank, (host, gpu, *_) in enumerate(places):
        gpus.setdefault((host, gpu), []).append(rank)

    def grow(r: int) -> int:
        return int(places[r][3]) if len(places[r]) > 3 else need

    short = []
    fits = 1.0
    for (host, gpu), ranks in gpus.items():
        free = min(places[r][2] for r in ranks)
        more = sum(grow(r) for r in ranks)
        if more > free:
            short.append(f"GPU {gpu} of host {host} ({len(ranks)} rank(s): {ranks}) has {free / 2**30:.1f} GiB free")
            # a smaller Buffer needs need' per rank, of which (need - grow) the heap holds already
            kept = min(need - grow(r) for r in ranks)
            fits = min(fits, (free / len(ranks) + kept) / need)
    if not short:
        return None
    size = int(max_tokens * fits)
    most = max(grow(r) for r in range(len(places)))
    held = f" (of which NVSHMEM's heap holds {(need - most) / 2**30:.2f} GiB already)" if most < need else ""
    head = (f"the Buffer needs {need / 2**30:.2f} GiB of symmetric memory per rank{held}, more than "
            + "; ".join(short) + ". ")
    if in_rounds:
        return head + ("Its receive buffers hold num_ranks x tokens_per_round rows: lower tokens_per_round"
                       + (f" (about {size} or fewer would fit)" if size else "") + ", or free GPU memory first")
    if not size:
        return head + ("Its receive buffers hold num_ranks x max_tokens_per_rank rows: lower max_tokens_per_rank "
                       "or tokens_per_round, or free GPU memory first")
    return head + (
        "Its receive buffers hold num_ranks x max_tokens_per_rank rows: pass tokens_per_round="
        f"{size} or fewer (calls then move in rounds of that many tokens per rank, each round a count exchange, "
        f"with buffers for one round), or lower max_tokens_per_rank to about {size} and pass larger batches in "
        "chunks of at most that many tokens (largeep.layers.MoELayer(num_chunks=...) does), or free GPU memory first"
    )


def _gpu_of(device: torch.device) -> str:
    """This process's GPU, named so that the ranks of one host can tell whether they share it."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is not None:
        return str(uuid)
    return f"device {device.index} of CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(all)')}"


def uneven_gpus_reason(places: list[tuple[str, str]]) -> str | None:
    """None when, on every host, every GPU that ranks use carries the same number of them; else what is uneven.
    ``places``: (host, GPU) of each rank. NVSHMEM's initialisation was seen never to return when the GPUs of one
    host carried different numbers of PEs (2 ranks on one GPU and 1 on the other, 2x H200); one rank per GPU,
    or several on every GPU alike, work."""
    hosts: dict[str, dict[str, list[int]]] = {}
    for rank, (host, gpu) in enumerate(places):
        hosts.setdefault(host, {}).setdefault(gpu, []).append(rank)
    for host, gpus in hosts.items():
        if len({len(r) for r in gpus.values()}) > 1:
            share = "; ".join(f"ranks {r} on GPU {g}" for g, r in gpus.items())
            return (f"the GPUs of host {host} carry different numbers of ranks ({share}), and NVSHMEM's "
                    "initialisation does not finish then: put the same number of ranks on every GPU of a host "
                    "(one each is the fast layout), or use backend='torch'")
    return None


_SIZE_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _heap_bytes(value: str | None) -> int | str | None:
    """NVSHMEM_SYMMETRIC_SIZE as bytes (a number with an optional k, m, g or t suffix, any case), else as given."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)[bB]?\s*", value)
    return int(float(m.group(1)) * _SIZE_SUFFIX[m.group(2).lower()]) if m else value


def heap_size_reason(sizes: list[str | None], chosen: list[bool] | None = None) -> str | None:
    """None when every rank's NVSHMEM_SYMMETRIC_SIZE (``sizes``, in rank order; None: unset) is the same size; else
    what differs. ``chosen[r]``: rank r's value is the one largeep picked (the variable was not set there).
    NVSHMEM's symmetric allocations are collective: on heaps of different sizes one that fails on some ranks only
    leaves the others waiting inside NVSHMEM, where no timeout reaches."""
    if len({_heap_bytes(v) for v in sizes}) <= 1:
        return None
    groups: dict[str, list[int]] = {}
    for rank, v in enumerate(sizes):
        label = "unset" if v is None else repr(v)
        if chosen is not None and chosen[rank]:
            label = f"unset, so largeep's {label}"
        groups.setdefault(label, []).append(rank)
    share = "; ".join(f"ranks {r}: {v}" for v, r in groups.items())
    return (f"NVSHMEM_SYMMETRIC_SIZE differs between ranks ({share}); an allocation that fails on some ranks only "
            "would leave the others waiting inside NVSHMEM: set the same value on every rank, or leave it unset on "
            "every rank (largeep then sizes the heap from the first Buffer and LARGEEP_NVSHMEM_HEAP_MARGIN, which "
            "must agree too)")


def untested_reason(ctx: GroupContext) -> str | None:
    """Why backend="auto" does not pick nvshmem for a configuration it supports: groups larger than any that has run
    on GPUs (TESTED_RANKS_*); None otherwise."""
    if ctx.low_latency:
        if ctx.num_ranks > TESTED_RANKS_LOW_LATENCY:
            return (f"low-latency groups of more than {TESTED_RANKS_LOW_LATENCY} ranks have not run on GPUs yet "
                    "(backend='nvshmem' takes them)")
    elif ctx.num_ranks > TESTED_RANKS_NORMAL:
        return (f"normal-mode groups of more than {TESTED_RANKS_NORMAL} ranks have not run on GPUs yet "
                "(backend='nvshmem' takes them)")
    return None


def _in_thread(fn: Callable[[], None], name: str, timeout_s: float) -> tuple[bool, BaseException | None]:
    """fn() in a daemon thread, waited for at most timeout_s: whether it ended in time, and what it raised (a thread
    still inside fn after the timeout is left behind)."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return not worker.is_alive(), (failure[0] if failure else None)


def _init_bounded(C: Any, uid: Any, ctx: GroupContext, timeout_s: float) -> None:
    """C.init (collective over the group) in a helper thread, waited for at most timeout_s
    (LARGEEP_INIT_TIMEOUT_S): an initialisation that does not finish (a placement NVSHMEM cannot serve) raises
    PeerTimeoutError instead of hanging. Unless it returned, NVSHMEM is unusable in this process from then on (after
    a timeout its thread is still inside; after an error or an interrupt its state is unknown): every later Buffer
    raises at once instead of entering it again."""
    where = f"on rank {ctx.rank} of {ctx.num_ranks}"
    done = False
    try:
        ended, failure = _in_thread(lambda: C.init(uid, ctx.rank, ctx.num_ranks, ctx.device.index),
                                    "largeep-nvshmem-init", timeout_s)
        if not ended:
            _world["init_failed"] = (PeerTimeoutError, (
                f"NVSHMEM's initialisation did not finish within {timeout_s:g} s (LARGEEP_INIT_TIMEOUT_S) {where}: "
                "a placement NVSHMEM cannot serve, or a rank that stopped during it (NVSHMEM_DEBUG=INFO says how far "
                "it got). NVSHMEM cannot be used in this process any more; restart the processes"
            ))
            raise PeerTimeoutError(f"Buffer: {_world['init_failed'][1]}")
        if failure is not None:
            _world["init_failed"] = (RuntimeError, (
                f"NVSHMEM's initialisation failed {where} ({failure}). NVSHMEM cannot be used in this process any "
                "more; restart the processes"
            ))
            raise failure
        # C.init made the device current in its thread (cudaSetDevice); the caller's thread has it too, as before
        torch.cuda.set_device(ctx.device)
        done = True
    finally:
        if not done and "init_failed" not in _world:  # interrupted while waiting
            _world["init_failed"] = (RuntimeError, f"NVSHMEM's initialisation was interrupted {where}; restart the "
                                                   "processes")


def _synchronize_bounded(device: torch.device, timeout_s: float, op: str) -> None:
    """torch.cuda.synchronize(device), waited for at most timeout_s: a device whose queued work does not finish
    raises PeerTimeoutError (the waiting thread is left behind, a daemon)."""
    ended, failure = _in_thread(lambda: torch.cuda.synchronize(device), "largeep-synchronize", timeout_s)
    if not ended:
        raise PeerTimeoutError(
            f"{op}: the work queued on {device} did not finish within {timeout_s:g} s (LARGEEP_TIMEOUT_S and a "
            "grace); a kernel there waits for something that does not come (a collective of a peer that stopped?). "
            "Nothing was freed"
        )
    if failure is not None:
        raise failure


def _gather(ctx: GroupContext, obj: Any, timeout_s: float) -> list[Any]:
    """Every rank's ``obj``, in rank order, over the Buffer's group: bounded by ``timeout_s`` where gloo carries it
    (a rank lost or stalled ends in PeerTimeoutError naming Buffer creation, not the process group's own 30
    minutes), and the group marked out of step when it fails."""
    with _collective.marks_out_of_step(ctx.group):
        return _collective.all_gather_object(obj, ctx.group, "Buffer", timeout_s)


def _join(ctx: GroupContext, heap_bytes: int, settings: Settings) -> Any:
    """Initialises NVSHMEM for this process on ctx's group (once), and returns largeep._C."""
    if "init_failed" in _world:
        kind, why = _world["init_failed"]
        raise kind(f"Buffer: an earlier Buffer's {why}")
    C = native.module()
    if C.initialized():  # (on this group: _join_reason judged the group NVSHMEM serves on every rank first)
        return C
    ranks = dist.get_process_group_ranks(ctx.group)
    user_size = os.environ.get("NVSHMEM_SYMMETRIC_SIZE")
    if user_size is None:
        gib = 1 << 30
        size = max(2 * gib, math.ceil(heap_bytes * settings.heap_margin / gib) * gib)
        os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(size)
    # Refuse, on every rank, a placement whose initialisation would not finish and heaps of different sizes (before
    # NVSHMEM sees them).
    try:
        mine = (socket.gethostname(), _gpu_of(ctx.device), os.environ["NVSHMEM_SYMMETRIC_SIZE"], user_size is None)
        places = _gather(ctx, mine, settings.timeout_s)
        reason = uneven_gpus_reason([(host, gpu) for host, gpu, _, _ in places]) or heap_size_reason(
            [size for _, _, size, _ in places], [chosen for _, _, _, chosen in places])
        if reason is not None:
            raise ArgumentError(f"Buffer: backend 'nvshmem': {reason}")
    except BaseException:
        if user_size is None:  # ours: the next Buffer sizes the heap again
            os.environ.pop("NVSHMEM_SYMMETRIC_SIZE", None)
        raise
    if user_size is None:
        size = int(os.environ["NVSHMEM_SYMMETRIC_SIZE"])
        (logger.warning if ctx.rank == 0 else logger.debug)(
            "NVSHMEM_SYMMETRIC_SIZE was not set: largeep sets it to %d bytes (%.1f GiB) from the first Buffer's "
            "needs; set it yourself if later Buffers need more", size, size / (1 << 30),
        )
    # rank 0's id, or why it could not make one: every rank learns which (a rank 0 raising alone would leave the
    # others in the broadcast)
    uid: list[Any] = [None]
    if ctx.rank == 0:
        try:
            uid[0] = (C.unique_id(), None)
        except Exception as exc:  # noqa: BLE001 - sent to every rank, raised there
            uid[0] = (None, f"{type(exc).__name__}: {exc}")
    try:
        uid = _gather(ctx, uid[0], settings.timeout_s)[:1]  # (rank 0's; the others send None)
    except BaseException:
        if user_size is None:
            os.environ.pop("NVSHMEM_SYMMETRIC_SIZE", None)
        raise
    if uid[0][1] is not None:
        if user_size is None:  # ours: the next Buffer sizes the heap again
            os.environ.pop("NVSHMEM_SYMMETRIC_SIZE", None)
        raise RuntimeError(f"Buffer: rank 0 could not make NVSHMEM's unique id ({uid[0][1]}); nothing was started")
    assert ctx.device.index is not None
    _init_bounded(C, uid[0][0], ctx, settings.init_timeout_s)
    _world["ranks"] = ranks
    _world["device"] = ctx.device.index
    return C


def _process_state(C: Any, ctx: GroupContext) -> tuple[bool, tuple[int, ...], str | None, bool]:
    """This process's NVSHMEM, as ``_join_reason`` reads it on every rank: started, the global ranks of the group it
    serves, why an earlier initialisation failed (None: it did not), and whether ctx's device is the one it runs on
    (or none yet)."""
    failed = _world.get("init_failed")
    return (bool(C.initialized()), tuple(_world.get("ranks") or ()), failed[1] if failed else None,
            _world.get("device") in (None, ctx.device.index))


def _join_reason(ctx: GroupContext, states: list[tuple[bool, tuple[int, ...], str | None, bool]]) -> bool:
    """Raises, on every rank alike, where some rank's process cannot serve this group with NVSHMEM: its
    initialisation failed earlier, it serves another group, its current device is not the one NVSHMEM runs on, or
    some ranks started NVSHMEM on this group and others did not. Returns whether NVSHMEM is started (on every rank,
    then)."""
    ranks = tuple(dist.get_process_group_ranks(ctx.group))
    me = ctx.rank
    failed = [r for r, st in enumerate(states) if st[2] is not None]
    if failed:
        if me in failed:
            kind, why = _world["init_failed"]
            raise kind(f"Buffer: an earlier Buffer's {why}")
        raise RuntimeError(
            f"Buffer: NVSHMEM's initialisation failed earlier in the process(es) of rank(s) {failed} of this group "
            f"(rank {failed[0]}: {states[failed[0]][2]}); no nvshmem Buffer can be made on this group: restart the "
            "processes"
        )
    other = [r for r, st in enumerate(states) if st[0] and st[1] != ranks]
    if other:
        raise RuntimeError(
            f"Buffer: NVSHMEM already serves another process group (global ranks {list(states[other[0]][1])}) in the "
            f"process(es) of rank(s) {other} of this group (global ranks {list(ranks)}); a Buffer with backend "
            "'nvshmem' on another group cannot share it. Use backend='torch' for the second group, or one group per "
            "process."
        )
    moved = [r for r, st in enumerate(states) if not st[3]]
    if moved:
        raise ArgumentError(
            f"Buffer: on rank(s) {moved} the current CUDA device is not the one NVSHMEM runs on in that process (it "
            "was current when the first nvshmem Buffer was made); make every Buffer with that device current "
            "(torch.cuda.set_device)"
        )
    on = [r for r, st in enumerate(states) if st[0]]
    if on and len(on) < len(states):
        off = [r for r, st in enumerate(states) if not st[0]]
        raise RuntimeError(
            f"Buffer: NVSHMEM is started on this group in the processes of rank(s) {on} but not of rank(s) {off} (an "
            "earlier Buffer failed on some ranks only?); restart the processes"
        )
    return bool(on)


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _lead_ints(c: Any) -> int:
    """int32 words of a low-latency handle's `lead` (one per output row), rounded up to 16 bytes: the rowmap's
    16-byte entries follow it in the same tensor."""
    return (c.experts_per_rank * c.num_ranks * c.max_tokens_per_rank + 3) // 4 * 4


def _rowmap_ptrs(rowmap: torch.Tensor, c: Any) -> tuple[int, int]:
    """The device addresses of a low-latency handle's `lead` and of the rowmap entries after it."""
    return rowmap.data_ptr(), rowmap.data_ptr() + 4 * _lead_ints(c)


@dataclass
class _Hier:
    """The parts of a normal dispatch's handle that only groups of several nodes (M nodes of P ranks) have.
    Source side: node_pos int32 [T, M] (position of token t among the tokens sent to node m, -1 if none).
    Forwarder side (rows this rank forwards from its RDMA peer on node m): fwd_count int32
    [M], fwd_off int32 [M, P] (where that peer's rows start in the receive buffer of each rank of this node),
    fwd_pos int32 [M, max_tokens, P] (position of forwarded row j in each local rank's list, -1 if not sent)."""

    node_pos: torch.Tensor
    fwd_off: torch.Tensor
    fwd_count: torch.Tensor
    fwd_pos: torch.Tensor


@dataclass
class _NvState:
    """Handle of one normal dispatch. Source side: send_pos int32 [T, N] (row of token t among the rows for rank r,
    -1 if not sent), send_off int32 [N] (where this rank's rows start in each receiver's slot), self_token int32 [T]
    (the token of each of this rank's rows for itself, which a copy-slot dispatch copies straight from the inputs).
    Receiver side: recv_src int32 [rows, 2] (source rank, token), recv_off int32 [N + 1] (first row of each source).
    hier: the inter-node parts (None inside one node). Each receiver's slot of the round (send_slot) is not kept: a
    cached dispatch sends to the copy slots.

    send_pos, send_off, recv_off, self_token and tag are device addresses inside ``ws`` (one int32 allocation, which
    this state keeps alive): only the kernels read them, and a view each would cost host time on every call."""

    ws: torch.Tensor
    send_pos: int
    send_off: int
    recv_src: torch.Tensor
    recv_off: int
    num_rows: int
    num_tokens: int
    worst: bool
    self_token: int
    hier: _Hier | None = None
    # the handle's tag: int32 in ws, the round of its dispatch modulo 2**12 (written by the notify kernel), which the
    # kernels of its cached dispatches and combines put into their data flags beside their kind of rows
    tag: int = 0
    # rows from each source (a variable-size dispatch's count exchange, read on the host), where the copy engines
    # combine (LARGEEP_TUNE comb=8); else None
    recv_counts: list[int] | None = None

    # A copy shares the original: its addresses point into the original's ws (a copy of ws would leave them
    # pointing at memory freed with the original). The routing is never changed after the dispatch.
    def __copy__(self) -> _NvState:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _NvState:
        return self


@dataclass
class _LLState:
    """Handle of one low-latency dispatch: seq int64 [1] (its round, written by the send kernel), count int32
    [E/N], meta int32 [E/N, N*M] (source * M*K + token*K + k of each packed row, -1 past the count), rowmap int32
    (lead [E/N * N*M] then [N*M, min(K, E/N), 4]: which rows the combine sums here, csrc/kernels/low_latency.cu),
    weights_kept float32 [T, K] or None (this rank sent its weights, so the experts' ranks sum its tokens' rows:
    the send kernel's copy of them, which the combine applies, the weights the experts' ranks applied); sum_one:
    with weights, those ranks send each sum as one bf16 row (bf16_partial_sums), not two; ids_sent int32 [T, K]
    (the send kernel's copy of the ids it sent, -1 where it sent nothing: the combine takes from it which copies
    come back, and the combine's topk_idx only masks them; a CUDA graph's replays of the send rewrite it)."""

    seq: torch.Tensor
    count: torch.Tensor
    meta: torch.Tensor
    rowmap: torch.Tensor
    num_tokens: int
    ids_sent: torch.Tensor
    weights_kept: torch.Tensor | None = None
    sum_one: bool = False

    @property
    def merged(self) -> int:
        """The combine receive's mode: 0 (no weights sent), 1 (sums in two bf16 rows), 2 (in one)."""
        return 0 if self.weights_kept is None else 2 if self.sum_one else 1


# The zero-copy regions [first, last) byte of live backends, for record_zero_copy: a tuple rebuilt when a backend
# comes or goes (this is read on every call, so no weak-set iteration there); weak references, so that a Buffer
# never destroyed still goes away.
_ZC_REGIONS: tuple[tuple[int, int, weakref.ref[NvshmemBackend]], ...] = ()


def _zc_register(backend: NvshmemBackend, live: bool) -> None:
    global _ZC_REGIONS
    keep = [(lo, hi, ref) for lo, hi, ref in _ZC_REGIONS if ref() is not None and ref() is not backend]
    if live:
        keep.append((*backend.zc_region, weakref.ref(backend)))
    _ZC_REGIONS = tuple(keep)


def record_zero_copy(t: torch.Tensor, stream: int) -> None:
    """If ``t`` is a zero-copy dispatch output of a live Buffer (any Buffer of this process), its slot's release
    also waits for ``stream``: what ``Tensor.record_stream`` does for tensors of torch's allocator."""
    regions = _ZC_REGIONS
    if not regions or not t.is_cuda:
        return
    ptr = t.data_ptr()
    for lo, hi, ref in regions:
        if lo <= ptr < hi:
            b = ref()
            if b is not None:  # a dead backend's range may have been reused by a live one
                b.zc_add_stream(ptr, stream)
                return


# where a guarded call (_closes_open_round) stopped with its round open
_OPEN_ROUND = {"dispatch": "after its sends were queued and before its copy-out",
               "combine": "after its push was queued and before its reduce",
               "low_latency_dispatch": "after its send was queued and before its receive",
               "low_latency_combine": "after its send was queued and before its receive"}

_R = TypeVar("_R")


def _closes_open_round(fn: Callable[..., _R]) -> Callable[..., _R]:
    """For NvshmemBackend.dispatch and combine, and the low-latency ones: a round the call leaves open marks the
    Buffer unusable. An exception between queuing a dispatch's sends and its copy-out, or a combine's push and its
    reduce, or a low-latency send and the setting up of its receive (``_round_open``: a failed launch,
    KeyboardInterrupt; not out of memory for a fresh dispatch's outputs, whose round dispatch drains itself) leaves
    this rank's sequence number and flags behind its peers', so a later call would take this round's counts or rows
    as its own (a combine: the previous round's rows, summed without an error) and the peers' next calls would wait
    for this rank until LARGEEP_TIMEOUT_S. (A low-latency receive run later by its hook: _ll_closes_round.)"""

    @functools.wraps(fn)
    def wrapper(self: NvshmemBackend, *args: Any, **kwargs: Any) -> _R:
        self._round_open = False
        try:
            return fn(self, *args, **kwargs)
        except BaseException as exc:
            if self._round_open:
                self._mark_abandoned(fn.__name__, exc)
            raise

    return wrapper


class NvshmemBackend:
    name = "nvshmem"

    def __init__(self, ctx: GroupContext, settings: Settings, in_rounds: bool = False,
                 stream: torch.cuda.Stream | None = None) -> None:
        """``in_rounds``: ``ctx`` sizes the buffers for tokens_per_round tokens per rank (RoundsBackend runs
        this backend's calls), which the memory refusal names. ``stream``: the Buffer's stream, where every call's
        kernels run (the tensors the kernels keep using are allocated on it; None: the current stream)."""
        reason = unsupported_reason(ctx)
        if reason is not None:
            raise RuntimeError(f"Buffer: backend 'nvshmem': {reason}")
        self.ctx = ctx
        self.settings = settings
        C = native.module()
        n = ctx.num_ranks
        sizes = (n, ctx.num_experts, ctx.num_topk, ctx.hidden, ctx.max_tokens_per_rank)
        # zero-copy receive slots: normal mode inside one node (groups of several nodes receive through the
        # forwarders into the copy slot)
        self.zc_slots = settings.zero_copy_slots if not ctx.low_latency and ctx.ranks_per_node == n else 0
        # the fused combine (LARGEEP_TUNE comb >= 1, one node) and push + reduce speak different flag protocols; the
        # copy engines' combine (comb=8: handles of variable-size dispatches; the others take the fused kernel at
        # comb=3) speaks the fused kernel's
        comb = settings.tune["comb"]  # (0..8: LARGEEP_TUNE's values are checked when the settings are read)
        one_node = not ctx.low_latency and ctx.ranks_per_node == n
        self.ce_combine = one_node and comb == 8 and n > 1
        self.fused_combine = (3 if comb == 8 else comb) if one_node else 0
        # a round a dispatch or combine has half queued (_closes_open_round), and what ended one there and in which
        self._round_open = False
        self._abandoned, self._abandoned_in = "", "dispatch"
        # Every rank must lay out its symmetric memory the same way (one collective allocation; peers compute
        # addresses in each other's memory) and speak the same combine protocol: refuse, on every rank, a group
        # whose ranks disagree.
        config = (*sizes, ctx.ranks_per_node, ctx.low_latency, self.zc_slots, self.fused_combine > 0)
        # (with each rank's LARGEEP_TUNE threads, and its GPU's free memory for the symmetric allocation below)
        free = int(torch.cuda.mem_get_info(ctx.device)[0])
        lay = (C.low_latency_layout(*sizes, ctx.ranks_per_node) if ctx.low_latency else
               C.normal_layout(*sizes, ctx.ranks_per_node, self.zc_slots))
        need = int(lay["total_bytes"])
        gathered = _gather(ctx, (config, settings.tune["threads"], (socket.gethostname(), _gpu_of(ctx.device), free,
                                                                    _heap_growth(need)), _process_state(C, ctx)),
                           settings.timeout_s)
        # NVSHMEM's state in each rank's process, judged on every rank (a rank refusing alone would leave the
        # others waiting in the collectives that follow)
        _join_reason(ctx, [g[3] for g in gathered])
        every = [g[0] for g in gathered]
        if any(e != config for e in every):
            names = ("(ranks, experts, topk, hidden, max_tokens_per_rank, ranks_per_node, low_latency, "
                     "zero-copy slots, fused combine)")
            raise ArgumentError(
                f"Buffer: the ranks of the group disagree on the Buffer's configuration {names}: "
                + "; ".join(f"rank {r}: {e}" for r, e in enumerate(every))
                + " (LARGEEP_ZERO_COPY_SLOTS, and LARGEEP_TUNE's comb being 0 or not, must be the same on every rank)"
            )
        if not ctx.low_latency:
            reason = threads_reason(n, [g[1] for g in gathered])
            if reason is not None:
                raise ArgumentError(f"Buffer: {reason}")
        # (every Buffer: a later one that grows the heap past what NVSHMEM mapped for earlier ones, on a GPU that
        # cannot hold it, would fail inside the collective allocation on that rank alone)
        reason = memory_reason(need, [g[2] for g in gathered], ctx.max_tokens_per_rank, in_rounds)
        if reason is not None:
            raise ArgumentError(f"Buffer: {reason}")
        self.C = _join(ctx, need, settings)
        self.zc_region = (0, 0)  # [first, last) byte of the zero-copy slots, once allocated
        self.base = int(self._collective("Buffer", self.C.alloc, need, settings.timeout_s))
        self.heap_bytes = need
        _heap_taken(need)  # (given back where C.free returns)
        # Peers on this rank's node are written through NVLink; NVSHMEM's puts reach the others, so their peer
        # pointers are left 0 even where NVLink would reach them (several nodes emulated on one host).
        node = ctx.rank // ctx.ranks_per_node
        mine = range(node * ctx.ranks_per_node, (node + 1) * ctx.ranks_per_node)
        peers = [int(self.C.peer_ptr(self.base, r)) if r in mine else 0 for r in range(n)]
        # This rank's own part (small tensors, the host-mapped status words, the kernels) is made before every rank's
        # verdict: a rank that alone failed there (out of memory, ...), or found a peer unreachable, and freed the
        # heap would wait in free's rendezvous for peers that went on, and leave them a Buffer whose first call
        # times out; with the verdicts every rank frees it and raises.
        self.host_ptr = 0
        failure: BaseException | None = None
        try:
            # On the Buffer's stream: its kernels read and write these tensors, so their blocks must go back to that
            # stream's pool. Made on the caller's stream, a Buffer dropped without destroy() would hand them to the
            # caller's next allocations while its kernels, queued on its own stream, may still use them.
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self._make_parts(ctx, settings, peers)
        except BaseException as exc:  # noqa: BLE001 - told to every rank, raised below
            failure = exc
        said = None if failure is None else f"{type(failure).__name__}: {failure}"[:300]
        try:
            verdicts = _gather(ctx, ([r for r in mine if peers[r] == 0], said), settings.timeout_s)
        except BaseException:
            # (the group failed or the caller interrupted: the peers' state is unknown, so the heap cannot be freed
            # collectively; this rank's own part is undone, and its heap memory is lost to this process)
            self._drop_parts(self._idle_after_failed_creation(ctx, settings))
            logger.warning("Buffer: the verdicts' exchange after the symmetric allocation failed on rank %d; its "
                           "%.2f GiB of symmetric memory stay allocated", ctx.rank, need / 2**30)
            raise
        unreachable = {r: v[0] for r, v in enumerate(verdicts) if v[0]}
        broken = {r: v[1] for r, v in enumerate(verdicts) if v[1]}
        if unreachable or broken:
            idle = self._idle_after_failed_creation(ctx, settings)
            self._drop_parts(idle)
            if failure is not None:
                try:
                    if idle:
                        self._collective("Buffer", self.C.free, self.base, settings.timeout_s)
                        _heap["live"] -= need
                except Exception:  # noqa: BLE001 - this rank's own failure is the one to raise
                    logger.debug("Buffer: freeing the symmetric memory after a failed creation failed too",
                                 exc_info=True)
                raise failure
            if not idle:
                raise PeerTimeoutError(
                    "Buffer: creation failed after the symmetric allocation (on another rank, or ranks unreachable "
                    f"over NVLink), and the work queued on rank {ctx.rank}'s device {ctx.device} did not finish "
                    f"within {settings.timeout_s + _HOST_GRACE_S:g} s (LARGEEP_TIMEOUT_S and a grace), so its "
                    "symmetric memory could not be freed; the other ranks' free times out waiting for this rank"
                )
            self._collective("Buffer", self.C.free, self.base, settings.timeout_s)
            _heap["live"] -= need
            if unreachable:
                raise RuntimeError(
                    "Buffer: ranks of one node are not reachable from each other over NVLink (NVSHMEM gave no peer "
                    "pointer): " + "; ".join(f"from rank {r}: ranks {v}" for r, v in unreachable.items())
                    + " (NVSHMEM_DISABLE_P2P or another P2P setting on some processes?)"
                )
            r0 = min(broken)
            raise RuntimeError(
                f"Buffer: rank(s) {sorted(broken)} could not make their part of the Buffer after the symmetric "
                f"allocation (rank {r0}: {broken[r0]}); it was freed on every rank"
            )
        self.alive = True
        if self.zc_slots:
            first = self.base + int(lay["off_zc"])
            self.zc_region = (first, first + self.zc_slots * int(lay["zc_slot_bytes"]))
            _zc_register(self, True)

    def _make_parts(self, ctx: GroupContext, settings: Settings, peers: list[int]) -> None:
        """This rank's own part of the Buffer, after the symmetric allocation: the device words, the host-mapped
        status words and the kernels bound to them (nothing collective). Its tensors are allocated on the current
        stream, the Buffer's (see __init__)."""
        n = ctx.num_ranks
        dev = ctx.device
        self.peer_base = torch.tensor(peers, dtype=torch.int64, device=dev)
        self.seq = torch.zeros(5, dtype=torch.int64, device=dev)  # api.cuh SeqKind
        self.counters = torch.zeros(8, dtype=torch.int32, device=dev)
        # status words (csrc/kernels/api.cuh): ready, error, rows, refusers, per-expert rows [E/N], the layout check
        # (done, lowest, highest id), each rank's part in a void round [N]
        self._layout_word = _PER_EXPERT + ctx.experts_per_rank
        self._layout_token = 0
        self._refusal_word = self._layout_word + 3
        self._recv_counts_word = self._refusal_word + n  # (rows from each source: a reporting notify's)
        words = self._recv_counts_word + n
        self.host_ptr, self.status_dev = (int(v) for v in self.C.host_alloc(8 * words))
        # The kernels poll this device word for errors (reading the host-mapped status costs a PCIe round trip).
        self.error_word = torch.zeros(1, dtype=torch.int64, device=dev)
        self.layout_scratch = torch.zeros(3, dtype=torch.int64, device=dev)  # the layout check's atomics
        self.status = (ctypes.c_int64 * words).from_address(self.host_ptr)
        common = (
            ctx.rank, n, ctx.num_experts, ctx.num_topk, ctx.hidden, ctx.max_tokens_per_rank, self.base,
            self.peer_base.data_ptr(), self.seq.data_ptr(), self.counters.data_ptr(), self.status_dev,
            self.error_word.data_ptr(), settings.timeout_s,
        )
        if ctx.low_latency:
            self.ll_fuse = bool(settings.tune["ll_fuse"])  # 1: the fused launchers (see below; default 0)
            self.ll = self.C.LowLatencyKernels(*common, ctx.ranks_per_node, settings.tune["ll_spread"])
        else:
            # the prepare kernel's scratch for long calls (several blocks per destination; zero, kept so)
            self.prep_scratch = torch.zeros(self.C.prep_scratch_words(ctx.num_experts), dtype=torch.int64, device=dev)
            self.kernels = self.C.NormalKernels(
                *common, ctx.ranks_per_node, settings.tune["threads"], settings.tune["unroll"],
                self.zc_slots, dev.index, self.prep_scratch.data_ptr(),
            )
            if self.ce_combine:
                self.kernels.copy_engines(peers)
                # the flag words the copy engines copy (csrc/kernels/intranode.cu's combine_ce_prologue_kernel)
                chunks = -(-ctx.max_tokens_per_rank // self.C.comb_chunk)
                self.ce_flags = torch.zeros(2 * chunks, dtype=torch.int64, device=dev)

    def _idle_after_failed_creation(self, ctx: GroupContext, settings: Settings) -> bool:
        """Waits, bounded, for the device before a failed creation frees anything: cudaFreeHost (the host-mapped
        words) and C.free (the heap) wait for the device without a bound, and work of the caller's that never ends
        (a collective stuck on a dead peer) would hang creation there. False (logged) when it did not become idle:
        nothing may be freed then."""
        try:
            _synchronize_bounded(ctx.device, settings.timeout_s + _HOST_GRACE_S, "Buffer")
        except Exception:  # noqa: BLE001 - the creation's own failure is the one to raise
            logger.warning("Buffer: rank %d's device did not become idle after its creation failed; this rank's "
                           "host-mapped words and %.2f GiB of symmetric memory stay allocated", ctx.rank,
                           self.heap_bytes / 2**30, exc_info=True)
            return False
        return True

    def _drop_parts(self, idle: bool) -> None:
        """Undoes what ``_make_parts`` made (after a failed creation, before the heap is freed); the host-mapped
        words only when the device is ``idle`` (else they stay allocated: see _idle_after_failed_creation)."""
        for name in ("kernels", "ll", "status"):
            if hasattr(self, name):
                delattr(self, name)
        if self.host_ptr and idle:
            self.C.host_free(self.host_ptr)
            self.host_ptr = 0

    # -- lifetime and errors ------------------------------------------------------------------------------------
    def destroy(self) -> None:
        if not self.alive:
            return
        self.alive = False
        c = self.ctx
        idle = False
        try:
            # (the device's work, which may read this memory, finishes first: waited for at most the timeout, so that
            # a kernel that never ends (a user's collective stuck on a dead peer) cannot hang destroy)
            _synchronize_bounded(c.device, self.settings.timeout_s + _HOST_GRACE_S, "Buffer.destroy")
            idle = True
            _zc_register(self, False)
            held = 0
            if not c.low_latency:
                # (slots with live outputs only: a slot a failed dispatch still holds without outputs is no view)
                held = int(self.kernels.zc_held())
                self.kernels.zc_close()
            # collective: a bounded rendezvous, then NVSHMEM's barrier, so no peer still reads this memory. A rank
            # whose dispatch outputs (views of this memory) are alive votes to keep it: freed, the next Buffer's
            # allocation would reuse it under those tensors (its slots and flag words written through them).
            freed = self._collective("destroy", self.C.free, self.base, self.settings.timeout_s, held > 0)
            if freed:
                _heap["live"] -= self.heap_bytes
            else:
                why = (f"the outputs of {held} dispatch(es) on this rank are still alive" if held else
                       "another rank's dispatch outputs are still alive")
                logger.warning(
                    "Buffer.destroy() on rank %d: %s; they are views of this Buffer's symmetric memory, so every rank "
                    "keeps its %.2f GiB allocated until the process ends (clone dispatch outputs that must outlive "
                    "the Buffer, or drop them before destroy)", c.rank, why, self.heap_bytes / 2**30,
                )
        finally:
            # the host-mapped status words that kernels write: freed once the device is idle; while work is still
            # queued or running they stay allocated (a few bytes for the process's life): cudaFreeHost would wait
            # for that work without a bound, and freed, the kernels would write into released memory
            if idle:
                self.C.host_free(self.host_ptr)

    @staticmethod
    def _collective(op: str, fn: Any, *args: Any) -> Any:
        """Runs a collective of the runtime; its bounded rendezvous failing (a rank missing) is a PeerTimeoutError."""
        try:
            return fn(*args)
        except RuntimeError as exc:
            if any(m in str(exc) for m in ("did not arrive within", "gave up waiting", "an earlier rendezvous")):
                raise PeerTimeoutError(f"{op}: {exc}") from None
            raise

    def zc_add_stream(self, addr: int, stream: int) -> bool:
        """The zero-copy output at device address ``addr`` is used on ``stream`` too (False: not a zero-copy output)."""
        if self.ctx.low_latency or not self.alive:
            return False
        return bool(self.kernels.zc_add_stream(addr, stream))

    def _raise_if_failed(self, op: str, *, earlier: bool = True) -> None:
        """Raises for a failure the device (or a host wait) reported in the status word: ``earlier`` (at the start
        of a call) that of an earlier call, False right after this call's own host wait."""
        code = int(self.status[_ERROR])
        if code == 0:
            return
        what, rank = _OPS.get(code // 65536, f"op {code // 65536}"), code % 65536 - 1
        if code // 65536 == _OP_PEER_REFUSED:
            bad = self._reported_bad_id() if rank == self.ctx.rank else None  # (this rank's own check, if it ran)
            which = f"expert id {bad}, outside" if bad is not None else "an expert id outside"
            raise PeerRefusedError(
                f"{op}: rank {rank} refused a dispatch ({which} [-1, num_experts)) in a round that rank "
                f"{self.ctx.rank} ran with num_worst_tokens, which has no host wait to raise from; that call's outputs "
                "hold no rows (ids -1) and the Buffer is unusable now (destroy it on every rank; check the ids before "
                "a num_worst_tokens dispatch)",
                buffer_usable=False,
            )
        if code // 65536 == _OP_RANKS_DISAGREE:
            raise RuntimeError(
                f"{op}: in an earlier dispatch that rank {self.ctx.rank} ran with num_worst_tokens, which has no host "
                f"wait to raise from, rank {rank} sent another kind of rows (dtype, or FP8 scales or not) than this "
                "rank; that call's outputs hold no rows (ids -1) and the Buffer is unusable now (destroy it on every "
                "rank; every rank must dispatch the same kind of rows)"
            )
        if code // 65536 == _OP_LL_KINDS:
            raise RuntimeError(
                f"{op}: an earlier low_latency_dispatch on rank {self.ctx.rank} received rows of the other kind from "
                f"rank {rank} (FP8 and BF16: the ranks passed different use_fp8), which it left unread; that call's "
                "outputs are undefined and the Buffer is unusable now (destroy it on every rank; every rank must "
                "pass the same use_fp8)"
            )
        if code // 65536 == _OP_LL_COUNTER:
            raise RuntimeError(
                f"{op}: an earlier low_latency_dispatch on rank {self.ctx.rank} found its count of the rows it sends "
                f"to rank {rank} already at max_tokens_per_rank when it began: the dispatch before it did not clear "
                "it (it stopped midway, or two dispatches of this Buffer ran at once, e.g. a CUDA graph replayed "
                "beside an eager call); the copies past it were not sent and the Buffer is unusable now (destroy it "
                "on every rank)"
            )
        if code // 65536 == _OP_LL_HANDLES:
            raise RuntimeError(
                f"{op}: in an earlier low_latency_combine on rank {self.ctx.rank}, rank {rank} sent rows with the "
                "handle of another low_latency_dispatch than this rank's (the ranks passed handles of different "
                "dispatches, e.g. two micro-batches combined in another order on some ranks). No row of it was read: "
                "that call's output is undefined, and the Buffer is unusable now (destroy it on every rank; every "
                "rank must combine the handle of the same dispatch in one call; handles of dispatches a multiple of "
                "4096 rounds apart are not told apart)"
            )
        if code // 65536 == _OP_LL_ROUND:
            raise RuntimeError(
                f"{op}: an earlier low_latency_dispatch on rank {self.ctx.rank} found, beside rank {rank}'s row count "
                "of its round, a per-expert count of another round: that rank's state is broken (its dispatch "
                "stopped midway, or its memory was overwritten); nothing of it was read, the call's outputs are "
                "undefined and the Buffer is unusable now (destroy it on every rank)"
            )
        if code // 65536 == _OP_PREPARE:
            raise RuntimeError(
                f"{op}: an earlier dispatch's prepare kernel on rank {self.ctx.rank} found its blocks out of step: two "
                "dispatches of this Buffer ran at once (e.g. a CUDA graph replayed beside an eager call, or on two "
                "streams), or one block waited more than LARGEEP_TIMEOUT_S for another; its positions are undefined "
                "and the Buffer is unusable now (destroy it on every rank)"
            )
        if code // 65536 == _OP_ABANDONED:
            where = self._abandoned_in
            raise RuntimeError(
                f"{op}: an earlier {where} on rank {self.ctx.rank} raised {_OPEN_ROUND.get(where, 'mid-round')} "
                f"({self._abandoned}); its round was left open, so the Buffer is unusable now (destroy it on every "
                "rank: the other ranks' next calls wait for this rank until LARGEEP_TIMEOUT_S)"
            )
        if code // 65536 in _KIND_OPS:
            raise RuntimeError(self._kinds_message(op, code // 65536, rank))
        if code // 65536 == _OP_WORST_TOO_SMALL:
            raise RuntimeError(
                f"{op}: an earlier dispatch with num_worst_tokens received more rows on rank {self.ctx.rank} than "
                "num_worst_tokens; nothing was copied and the Buffer is unusable now (destroy it; num_worst_tokens "
                "must be at least the rows any rank can receive, e.g. num_ranks * max_tokens_per_rank)"
            )
        c = self.ctx
        # (the rows of a source on another node arrive through its RDMA peer on this node, which raises their flag;
        # a source of this node is its own: fwd == rank)
        fwd = rank
        if code // 65536 == _OP_DISPATCH_ROWS and rank >= 0:
            fwd = self._forwarder_of(rank)
        if fwd not in (rank, c.rank):
            whom = (f"rank {rank}'s rows, which reach this node through rank {fwd} (it forwards them; either rank may "
                    "be the one that did not make the call)")
        elif rank >= 0:
            whom = f"rank {rank}"
        else:
            whom = (
            f"a peer (the host gave up first, {_HOST_GRACE_S:g} s past that bound after it queued the call: a peer "
            "did not make the call, a kernel failed, or the work queued before the call on the Buffer's stream, an "
            "earlier call's waits included, took that long)")
        raise PeerTimeoutError(
            f"{op}: {'an earlier ' if earlier else ''}{what} on rank {self.ctx.rank} waited more than "
            f"LARGEEP_TIMEOUT_S={self.settings.timeout_s:g} s "
            f"for {whom}; the Buffer is unusable now (destroy it). A rank waited for does not answer when it stopped "
            "calling the Buffer, failed, or made another call than this one (every rank makes the same calls in the "
            "same order: a fresh dispatch, a cached one, a combine, a low-latency call)"
        )

    def _forwarder_of(self, source: int) -> int:
        """The rank of this node that forwards the dispatch rows of ``source`` (its RDMA peer here, the rank with
        its local index; a source of this node is its own)."""
        p = self.ctx.ranks_per_node
        return self.ctx.rank - self.ctx.rank % p + source % p

    def _kinds_message(self, op: str, kind_op: int, rank: int) -> str:
        """The error of a dispatch or combine that met rows of another call than this rank's (the kernels compare the
        signature in each sender's data flag, its kind of rows and its handle's tag, with their own before reading
        its rows): another kind from ``rank`` (ops 17, 18), another handle from ``rank`` (21, 22), or either found by
        the rank that forwards them (19: rank is the source; 20: rank is that forwarder)."""
        c = self.ctx
        dispatch = kind_op in (_OP_DISPATCH_KINDS, _OP_DISPATCH_FORWARD_KINDS, _OP_DISPATCH_HANDLES)
        what = "dispatch" if dispatch else "combine"
        kinds = ("x's dtype, or an FP8 pair against plain rows" if dispatch
                 else "y's dtype (bf16 or float32), topk_weights given against none, or bf16_partial_sums against "
                 "not")
        handles = "the handle of another dispatch than this rank's (the ranks passed handles of different dispatches)"
        either = (f"rows of another kind than its own ({kinds}), or sent with the handle of another dispatch than "
                  "its own")
        if kind_op == _OP_DISPATCH_FORWARD_KINDS:
            met = (f"rank {self._forwarder_of(rank)}, which forwards the rows of ranks on other nodes to this rank "
                   f"(rank {rank}'s among them), found {either}")
        elif kind_op == _OP_COMBINE_FORWARD_KINDS:
            met = f"rank {rank}, which sums the rows of its node's ranks for this rank, found {either}"
        elif kind_op in (_OP_DISPATCH_HANDLES, _OP_COMBINE_HANDLES):
            met = f"rank {rank} sent rows with {handles}"
        else:
            met = f"received rows of another kind from rank {rank} than its own ({kinds})"
        return (
            f"{op}: in an earlier {what} on rank {c.rank}, {met}; a cached dispatch and a combine have no count "
            "exchange that would compare them. No row of it was read: that call's outputs are undefined, and the "
            "Buffer is unusable now (destroy it on every rank; every rank must pass the same kind of data and the "
            "handle of the same dispatch to one call)"
        )

    @staticmethod
    def _fused(launched: bool) -> bool:
        """Counts the fused low-latency launches (FUSED_LAUNCHES: how tests see that ll_fuse=1 took effect)."""
        if launched:
            FUSED_LAUNCHES[0] += 1
        return launched

    def _stream(self) -> int:
        return current_raw_stream(self.ctx.device)

    # -- normal mode --------------------------------------------------------------------------------------------
    # get_dispatch_layout checks the expert ids itself (``check=True``): the layout kernel finds the ids out of
    # range and the host waits for it on a host-mapped word, instead of a separate min/max and a device copy.
    checks_layout_ids = True
    # dispatch(check_ids=True) checks them in its prepare kernel likewise, before anything moves (see dispatch)
    checks_dispatch_ids = True
    # ... with num_worst_tokens too, where no host wait follows (the refusal then surfaces at the next call)
    checks_ids_without_wait = True

    def get_dispatch_layout(self, topk_idx: torch.Tensor, check: bool = False) -> Layout:
        """``check``: raise ArgumentError (nothing else launched, the Buffer still usable) if an id is outside
        [-1, num_experts); waits on the host for the layout kernel, which runs on the Buffer's stream (after the
        caller's stream and the Buffer's earlier work). Needs at least one token."""
        op = "get_dispatch_layout"
        self._raise_if_failed(op)
        c = self.ctx
        words = layout_words(c)
        if words > MAX_LAYOUT_WORDS:  # (a normal-mode Buffer is refused at creation for this)
            raise ArgumentError(
                f"{op}: this low-latency Buffer's sizes are too large for the nvshmem layout kernel, which counts "
                f"experts, ranks and nodes in 48 KiB of shared memory: num_experts + ranks + nodes = {words} must be "
                f"at most {MAX_LAYOUT_WORDS} (largeep.layout.compute_layout computes the same layout in torch)"
            )
        dev = c.device
        t = topk_idx.shape[0]
        counts = torch.empty(c.num_ranks + c.num_nodes + c.num_experts, dtype=torch.int32, device=dev)
        per_rank, per_node, per_expert = counts.split_with_sizes((c.num_ranks, c.num_nodes, c.num_experts))
        in_rank = torch.empty(t, c.num_ranks, dtype=torch.bool, device=dev)
        words = self._id_check_words(check, t)
        self.C.layout(
            topk_idx.data_ptr(), t, c.num_topk, c.num_ranks, c.num_experts, c.ranks_per_node, per_rank.data_ptr(),
            per_node.data_ptr(), per_expert.data_ptr(), in_rank.data_ptr(),
            self.layout_scratch.data_ptr() if check else 0, words, self._layout_token, self._stream(),
        )
        if check:
            self._wait_id_check(op)
        return Layout(per_rank, per_node, per_expert, in_rank)

    def _id_check_words(self, check: bool, num_tokens: int) -> int:
        """For a kernel about to check ids (``check``): a new token (the kernel writes it when done; an earlier
        call's kernel writes a smaller one) and the device address of the host-mapped words it reports into;
        0 without a check."""
        if not check:
            return 0
        assert num_tokens > 0, "an id check needs tokens"
        self._layout_token += 1
        return self.status_dev + 8 * self._layout_word

    def _wait_id_check(self, op: str) -> None:
        """Waits for the id check of the kernel just launched on the current stream (its token in the layout
        word), raises on a bad id."""
        c, lw = self.ctx, self._layout_word
        rc = self.C.wait_host_word(
            self.host_ptr, lw, self._layout_token, _ERROR, self.settings.timeout_s + _HOST_GRACE_S, self._stream()
        )
        self._raise_if_failed(op, earlier=False)
        self._raise_if_cuda_fault(op, rc, "the expert-id check")
        if rc == 2:
            raise PeerTimeoutError(
                f"{op}: the expert-id check of rank {c.rank} did not finish within "
                f"LARGEEP_TIMEOUT_S={self.settings.timeout_s:g} s (a kernel before it on the stream is stuck?)"
            )
        bad = self._reported_bad_id()
        if bad is not None:
            raise checks.bad_expert_id(op, bad, c.num_experts)

    def _raise_if_cuda_fault(self, op: str, rc: int, waited_for: str) -> None:
        """A host wait that ended on a CUDA error (``rc`` < 0: minus the cudaError_t): a kernel on the stream, or
        before it, failed and never writes the word waited for. RuntimeError naming the error, not a
        PeerTimeoutError blaming a peer after the bound."""
        if rc < 0:
            raise RuntimeError(
                f"{op}: while rank {self.ctx.rank}'s host waited for {waited_for}, its device {self.ctx.device} "
                f"reported a CUDA error: {self.C.cuda_error_name(-rc)}. A kernel on the Buffer's stream, or queued "
                "before it, failed (this process's GPU, not a peer); the Buffer is unusable now, and most CUDA "
                "errors leave the process's CUDA context unusable too (restart the processes)"
            )

    def _reported_bad_id(self) -> int | None:
        """The id check's report (the host-mapped words after its token): the lowest id below -1, else the highest
        id >= E; None when every id was in range."""
        lw = self._layout_word
        low, high = int(self.status[lw + 1]), int(self.status[lw + 2])
        return low if low < -1 else high if high >= self.ctx.num_experts else None

    @_closes_open_round
    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        state: _NvState | None,
        expert_alignment: int,
        num_worst_tokens: int,
        caller_stream: int | None = None,
        check_ids: bool = False,
    ) -> NormalDispatchOut:
        """``caller_stream``: the raw handle of the stream the caller is on; zero-copy outputs record their
        release on it (None: the current stream). ``check_ids`` (a fresh dispatch of at least one token): raise
        ArgumentError if an id in topk_idx is outside [-1, num_experts). The prepare kernel finds them and tells the
        count exchange, which makes the round void on every rank: no row moves anywhere, each rank's host learns it
        with the counts it waits for anyway (no wait of its own for the check), this rank raises ArgumentError and
        the others PeerRefusedError at once, and every Buffer stays usable. A rank that runs the round with
        num_worst_tokens has no host wait: the call returns (its outputs hold no rows), and its Buffer is unusable
        from then on, its next call raising PeerRefusedError (see _raise_if_failed)."""
        self._raise_if_failed("dispatch")
        c = self.ctx
        dev = c.device
        n, t = c.num_ranks, x.shape[0]
        nodes, p = c.num_nodes, c.ranks_per_node
        stream = self._stream()
        sms = c.num_sms
        elem = x.element_size()
        cached = state is not None
        worst = num_worst_tokens > 0 or (state is not None and state.worst)
        k = self.kernels
        per_expert_list: list[int] = []
        per_expert_t: torch.Tensor | None = None
        out_s: torch.Tensor | None
        out_idx: torch.Tensor | None
        out_w: torch.Tensor | None
        # A fresh dispatch of bf16/e4m3 rows that waits on the host receives into a free zero-copy slot when there
        # is one (its outputs are then that slot's planes, no copy-out); slot 0 is the copy slot. A round that ends
        # without outputs (a refusal, outputs that could not be made, a failed count wait) gives its slot back.
        slot = 0
        if state is None:
            assert topk_idx is not None and topk_weights is not None
            i32 = torch.int32
            report = not worst
            # one int32 allocation for every array of the call, addressed by offset (the kernels take addresses;
            # views would cost host time): send_slot int64 [N] first (8-byte aligned; this call's only, see
            # _NvState), send_pos [T, N], recv_off [N + 1], send_off [N], the handle's tag [1], self_token
            # [max(T, 1)], and the reported per-expert counts last (the one part the caller gets as a tensor)
            epr = c.experts_per_rank if report else 0
            ws = torch.empty(2 * n + t * n + (n + 1) + n + 1 + max(t, 1) + epr, dtype=i32, device=dev)
            send_slot = ws.data_ptr()
            assert send_slot % 8 == 0, "dispatch: an allocation not 8-byte aligned (send_slot is int64)"
            send_pos = send_slot + 8 * n
            recv_off = send_pos + 4 * t * n
            send_off = recv_off + 4 * (n + 1)
            tag = send_off + 4 * n
            self_token = tag + 4
            hier = None
            if nodes > 1:
                hier = _Hier(
                    node_pos=torch.empty(t, nodes, dtype=i32, device=dev),
                    fwd_off=torch.empty(nodes, p, dtype=i32, device=dev),
                    fwd_count=torch.empty(nodes, dtype=i32, device=dev),
                    fwd_pos=torch.empty(nodes, c.max_tokens_per_rank, p, dtype=i32, device=dev),
                )
            if report:
                self.status[_READY] = 0
                per_expert_t = ws[ws.shape[0] - epr:]
            words = self._id_check_words(check_ids, t)  # (the layout check's words)
            # One native call queues prepare, takes a zero-copy slot (if one is free and wanted), the count exchange
            # (notify) and the sends (the native send, as _send_cached's): the sends need no host decision, so they
            # run while the host waits for the counts below. (No wait for the id check here: a refusal voids the round
            # on every rank, and the host learns of it with the counts; a void round's slot is released before
            # raising.)
            self._round_open = True
            slot = int(k.start(
                topk_idx.data_ptr(), t, send_pos, _ptr(hier.node_pos if hier else None), self_token, words,
                self._layout_token, not worst and bool(self.zc_slots) and elem <= 2, recv_off, send_off, send_slot,
                _ptr(hier.fwd_off if hier else None), _ptr(hier.fwd_count if hier else None),
                _ptr(hier.fwd_pos if hier else None), report, _ptr(per_expert_t), expert_alignment, x.data_ptr(),
                elem, _ptr(x_scales), x_scales is not None, topk_weights.data_ptr(), tag, c.num_sms, stream))
            if report:
                rc = self.C.wait_host_word(self.host_ptr, _READY, 1, _ERROR, self.settings.timeout_s + _HOST_GRACE_S,
                                           stream)
                try:
                    self._raise_if_failed("dispatch", earlier=False)
                    self._raise_if_cuda_fault("dispatch", rc, "the count exchange")
                    if rc == 2:
                        # the abandoned round's kernels may still finish later and write this round's counts: the
                        # next call must not read them as its own, so the Buffer is unusable from here (as after a
                        # device report; op 3, no rank known)
                        if int(self.status[_ERROR]) == 0:  # (a device report that came meanwhile names the rank)
                            self.status[_ERROR] = 3 << 16
                        self._raise_if_failed("dispatch", earlier=False)
                except BaseException:
                    # No outputs were made: the slot goes back (after what is queued on the stream; no later call
                    # takes it, the Buffer being unusable now), rather than stay taken, as if outputs held it
                    if slot:
                        self._give_back_quietly(slot, stream)
                    raise
                if int(self.status[_REFUSED]):
                    self._end_round_without_outputs(x, recv_off, self_token, tag, slot, stream)
                    self._round_open = False
                    self._raise_refused(
                        "dispatch", self.status[self._refusal_word:self._refusal_word + c.num_ranks], check_ids
                    )
                rows = int(self.status[_NUM_RECV])
                raw = self.status[_PER_EXPERT:_PER_EXPERT + c.experts_per_rank]  # ctypes slice: a list of ints
                w = self._recv_counts_word
                recv_counts = self.status[w:w + c.num_ranks] if self.ce_combine else None
                a = expert_alignment
                per_expert_list = raw if a == 1 else [align_up(v, a) for v in raw]
            else:
                rows = num_worst_tokens
                recv_counts = None
            # Out of memory for the outputs (or any error making them) drains the round: its copy-out waits for the
            # rows, copies none and frees the round for every peer, whose calls complete; this call raises and every
            # Buffer stays in step for the next dispatch (this rank has no handle: the peers must not combine the
            # round, see docs/usage.md).
            try:
                state = _NvState(
                    ws, send_pos, send_off, torch.empty(rows, 2, dtype=i32, device=dev), recv_off, rows, t, worst,
                    self_token, hier, tag, recv_counts,
                )
                if slot:
                    rel = caller_stream if caller_stream is not None else self._stream()
                    out_x, out_s, out_idx, out_w = self._zero_copy_outputs(slot, rows, x, x_scales, rel)
                else:
                    out_x, out_s, out_idx, out_w = self._dispatch_outputs(x, x_scales, rows, True)
            except BaseException as exc:
                # the frames that made a zero-copy slot's planes let go of them now (their slot goes back when they
                # die; else _end_round_without_outputs gives it back)
                traceback.clear_frames(exc.__traceback__)
                self._end_round_without_outputs(x, recv_off, self_token, tag, slot, stream)
                self._round_open = False
                raise
        else:
            # (its outputs made before its sends: nothing can fail between its sends and its copy-out but a launch)
            out_x, out_s, out_idx, out_w = self._dispatch_outputs(x, x_scales, state.num_rows, False)
        rows = state.num_rows
        if cached:  # every rank receives into its copy slot
            self._round_open = True
            self._send_cached(x, x_scales, t, state, stream)
        k.copyout(
            out_x.data_ptr(), elem, _ptr(out_s), x_scales is not None, _ptr(out_idx), _ptr(out_w),
            state.recv_src.data_ptr(), state.recv_off, rows, cached, x.data_ptr(), _ptr(x_scales),
            _ptr(None if cached else topk_idx), _ptr(None if cached else topk_weights),
            state.self_token, slot, state.tag, sms, stream,
        )
        self._round_open = False
        if per_expert_t is None:  # (a reporting notify wrote it) counted from the ids, or none for a cached call
            if out_idx is not None:
                raw_t = one_hot_mask(out_idx, c.experts_per_rank).sum(0, dtype=torch.int32)
                per_expert_t = align_up(raw_t, expert_alignment)
            else:
                per_expert_t = torch.empty(0, dtype=torch.int32, device=dev)
        return NormalDispatchOut(
            out_x, out_s, out_idx, out_w, per_expert_list, per_expert_t, None if worst else rows, state
        )

    def recv_offsets(self, state: _NvState) -> torch.Tensor:
        """int32 [N + 1] on the device (a view of the handle's recv_off): the first row a dispatch (``state``)
        received from each source rank, then its rows."""
        first = (state.recv_off - state.ws.data_ptr()) // 4
        return state.ws[first:first + self.ctx.num_ranks + 1]

    def _zero_copy_outputs(
        self, slot: int, rows: int, x: torch.Tensor, x_scales: torch.Tensor | None, release_stream: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """A fresh dispatch's outputs as the planes of zero-copy slot ``slot`` (x, its FP8 scales if x_scales,
        the expert ids and weights), which goes back once they are all gone (after ``release_stream``'s work)."""
        c = self.ctx
        planes = self.kernels.zc_outputs(slot, rows, c.hidden * x.element_size(), x_scales is not None, True,
                                         release_stream)
        out_x = torch.from_dlpack(planes[0]).view(x.dtype)
        out_s = torch.from_dlpack(planes[1]) if x_scales is not None else None
        return out_x, out_s, torch.from_dlpack(planes[2]), torch.from_dlpack(planes[3])

    def _dispatch_outputs(
        self, x: torch.Tensor, x_scales: torch.Tensor | None, rows: int, with_meta: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """A copied dispatch's outputs of ``rows`` rows: x, its FP8 scales (if x_scales), and (``with_meta``: a
        fresh dispatch) the expert ids and weights."""
        c, dev = self.ctx, self.ctx.device
        out_x = torch.empty(rows, c.hidden, dtype=x.dtype, device=dev)
        out_s = None if x_scales is None else torch.empty(rows, c.hidden // 128, dtype=torch.float32, device=dev)
        if not with_meta:
            return out_x, out_s, None, None
        out_idx = torch.empty(rows, c.num_topk, dtype=torch.int64, device=dev)
        out_w = torch.empty(rows, c.num_topk, dtype=torch.float32, device=dev)
        return out_x, out_s, out_idx, out_w

    def _end_round_without_outputs(self, x: torch.Tensor, recv_off: int, self_token: int, tag: int, slot: int,
                                   stream: int) -> None:
        """Ends a fresh dispatch round that has no outputs: a void one (a rank refused it; every count is 0), or
        one whose outputs could not be made. Its copy-out drains the round (num_rows -1: waits for the rows, copies
        none), which frees it for every peer as any copy-out does; ``slot`` (non-zero: the zero-copy slot this call
        took) is given back unless planes of it are alive (it goes back when they die)."""
        k = self.kernels
        k.copyout(0, x.element_size(), 0, False, 0, 0, 0, recv_off, -1, False, x.data_ptr(), 0, 0, 0, self_token, slot,
                  tag, self.ctx.num_sms, stream)
        if slot:
            k.zc_give_back(slot, stream)

    def _give_back_quietly(self, slot: int, stream: int) -> None:
        """zc_give_back on an error path: its own failure is logged, the call's error is the one to raise."""
        try:
            self.kernels.zc_give_back(slot, stream)
        except Exception:  # noqa: BLE001 - the caller re-raises the call's error
            logger.debug("dispatch: giving zero-copy slot %d back after a failed count wait failed", slot,
                         exc_info=True)

    def _raise_refused(self, op: str, words: Sequence[int], checked: bool) -> None:
        """Raises for a void round (``words``: each rank's part in it, bit 0 for a rank that refused it, bit 1 for
        one that ran it without a host wait, bits 2-4 the kind of rows it sent): ArgumentError (the bad id) where
        this rank refused it, else PeerRefusedError naming the ranks that did; with no refusal, ArgumentError naming
        each rank's kind of rows (they disagreed)."""
        c = self.ctx
        refused = [r for r, w in enumerate(words) if w & 1]
        no_wait = [r for r, w in enumerate(words) if w & 2]
        if not refused:
            kinds = [w >> 2 & 7 for w in words]
            calls = [checks.rows_kind(*_ROW_KINDS[k]) if k in _ROW_KINDS else f"rows of kind {k}" for k in kinds]
            raise checks.calls_disagree(op, calls, "dispatch the same kind of rows", no_wait)
        bad = None
        if c.rank in refused:
            bad = self._reported_bad_id() if checked and int(self.status[self._layout_word]) == self._layout_token \
                else None
            if bad is None:
                raise RuntimeError(f"{op}: the id check's report on rank {c.rank} is missing (an internal error)")
        raise checks.refused_round(op, c.rank, refused, bad, c.num_experts, no_wait)

    def _send_cached(self, x: torch.Tensor, x_scales: torch.Tensor | None, t: int, state: _NvState,
                     stream: int) -> None:
        """Queues the sends of a cached dispatch through the native ``send`` that a fresh one's ``start`` calls
        too (the RDMA leg, the NVLink push into this node's ranks' copy slots, the forwarding of the rows my RDMA
        peers sent), with no ids or weights."""
        h = state.hier
        self.kernels.send(
            x.data_ptr(), x.element_size(), _ptr(x_scales), x_scales is not None, 0, 0, True, t, state.send_pos,
            _ptr(h.node_pos if h else None), state.send_off, 0, False, _ptr(h.fwd_off if h else None),
            _ptr(h.fwd_count if h else None), _ptr(h.fwd_pos if h else None), state.tag, self.ctx.num_sms, stream,
        )

    @_closes_open_round
    def combine(
        self, y: torch.Tensor, state: _NvState, topk_weights: torch.Tensor | None, part_bf16: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """part_bf16 (bf16 y, several nodes): the forwarders' partial sums come home as bf16 (Buffer.combine's
        bf16_partial_sums)."""
        self._raise_if_failed("combine")
        c = self.ctx
        dev = c.device
        stream = self._stream()
        out = torch.empty(state.num_tokens, c.hidden, dtype=y.dtype, device=dev)
        out_w = (
            torch.empty(state.num_tokens, c.num_topk, dtype=torch.float32, device=dev)
            if topk_weights is not None
            else None
        )
        with_w = topk_weights is not None
        k, hier = self.kernels, state.hier
        if state.recv_counts is not None:  # (self.ce_combine: one node)
            # (a prologue, the copies on the copy streams and the reduction: several calls, so the round is open
            # until they are all queued)
            self._round_open = True
            k.combine_ce(
                out.data_ptr(), out.element_size(), _ptr(out_w), state.send_pos, state.num_tokens, with_w,
                y.data_ptr(), _ptr(topk_weights), state.recv_off, state.recv_counts, self.ce_flags.data_ptr(),
                state.tag, c.num_sms, stream,
            )
            self._round_open = False
            CE_LAUNCHES[0] += 1
            return out, out_w
        if self.fused_combine:
            k.combine_fused(
                out.data_ptr(), out.element_size(), _ptr(out_w), state.send_pos, state.num_tokens, with_w,
                y.data_ptr(), _ptr(topk_weights), state.recv_src.data_ptr(), state.recv_off,
                state.num_rows, state.tag, c.num_sms, self.fused_combine, stream,
            )
            return out, out_w
        # (push, forward and reduce: three launches; the round counts as this rank's only once the reduce is queued)
        self._round_open = True
        part_bf16 = part_bf16 and hier is not None
        k.combine_push(
            y.data_ptr(), y.element_size(), _ptr(topk_weights), with_w, part_bf16, state.recv_src.data_ptr(),
            state.recv_off, state.num_rows, state.tag, c.num_sms, stream,
        )
        if hier is not None:
            k.combine_forward(y.element_size(), with_w, part_bf16, hier.fwd_count.data_ptr(), hier.fwd_pos.data_ptr(),
                              state.tag, c.num_sms, stream)
        k.combine_reduce(
            out.data_ptr(), out.element_size(), _ptr(out_w), state.send_pos,
            _ptr(hier.node_pos if hier else None), state.num_tokens, with_w, part_bf16, y.data_ptr(),
            _ptr(topk_weights), state.recv_off, state.tag, c.num_sms, stream,
        )
        self._round_open = False
        return out, out_w

    # -- low-latency mode ---------------------------------------------------------------------------------------
    # low_latency_dispatch(check_ids=True) checks them in a kernel of its own before the send, the host waiting on
    # a host-mapped word (as the layout's check), instead of a min/max, a device copy and a sync of the device
    checks_low_latency_ids = True

    def _mark_abandoned(self, op: str, exc: BaseException) -> None:
        """A round left open by ``op``'s error ``exc``: the Buffer is unusable from here (unless an error is already
        reported, which names its rank), and its later calls raise naming ``exc``."""
        if int(self.status[_ERROR]) == 0:
            self._abandoned = f"{type(exc).__name__}: {exc}"[:300]
            self._abandoned_in = op
            self.status[_ERROR] = _OP_ABANDONED << 16

    def _ll_closes_round(self, op: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
        """For a low-latency call's receive (``finish``, run at once or by its hook): if it raises, the send it
        follows has taken the round on every rank and this rank never frees its slots nor reads its rows, so the
        Buffer is marked unusable (as _closes_open_round does for the normal mode), and every later call raises
        naming the error instead of waiting for peers that wait for this rank, or reading the handle's never-written
        counts."""

        def wrap(finish: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    finish()
                except BaseException as exc:
                    self._mark_abandoned(op, exc)
                    raise

            return run

        return wrap

    @_closes_open_round
    def low_latency_dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, use_fp8: bool, round_scale: bool, async_recv: bool,
        check_ids: bool = False, topk_weights: torch.Tensor | None = None, bf16_partial_sums: bool = False,
    ) -> LowLatencyDispatchOut:
        """``check_ids`` (at least one id; not while capturing a CUDA graph): raise ArgumentError, nothing sent, if
        an id in topk_idx is outside [-1, num_experts) (on this rank only: the other ranks are not told, see
        docs/usage.md). ``topk_weights``: sent with the
        tokens (the combine sums on the experts' ranks; ``bf16_partial_sums``: each sum sent as one bf16 row)."""
        op = "low_latency_dispatch"
        self._raise_if_failed(op)
        c = self.ctx
        dev = c.device
        epr, rows = c.experts_per_rank, c.num_ranks * c.max_tokens_per_rank
        t = x.shape[0]
        if check_ids:
            assert not torch.cuda.is_current_stream_capturing(), "low_latency_dispatch: no id check in a CUDA graph"
            words = self._id_check_words(True, topk_idx.numel())
            self.C.id_check(topk_idx.data_ptr(), topk_idx.numel(), c.num_experts, self.layout_scratch.data_ptr(),
                            words, self._layout_token, self._stream())
            self._wait_id_check(op)
        seq = torch.empty(1, dtype=torch.int64, device=dev)
        x_out = torch.empty(epr, rows, c.hidden, dtype=FP8_DTYPE if use_fp8 else torch.bfloat16, device=dev)
        s_out = torch.empty(epr, rows, c.hidden // 128, dtype=torch.float32, device=dev) if use_fp8 else None
        count = torch.empty(epr, dtype=torch.int32, device=dev)
        src_info = torch.empty(epr, rows, 2, dtype=torch.int32, device=dev)
        meta = torch.empty(epr, rows, dtype=torch.int32, device=dev)
        # any source may send its weights, so every receive records where the combine finds the rows it sums
        # (a received row names at most min(K, E/N) local experts)
        rowmap = torch.empty(_lead_ints(c) + rows * min(c.num_topk, epr) * 4, dtype=torch.int32, device=dev)
        lead, pairs = _rowmap_ptrs(rowmap, c)
        w_ptr = _ptr(topk_weights)
        kept = torch.empty(t, c.num_topk, dtype=torch.float32, device=dev) if topk_weights is not None else None
        sent = torch.empty(t, c.num_topk, dtype=torch.int32, device=dev)
        sum_one = bool(bf16_partial_sums and topk_weights is not None)
        state = _LLState(seq, count, meta, rowmap, t, sent, kept, sum_one)
        self._round_open = True
        # without a hook, send and unpack may run as one kernel (LARGEEP_TUNE ll_fuse=1)
        if not async_recv and self.ll_fuse and self._fused(self.ll.dispatch_fused(
            x.data_ptr(), topk_idx.data_ptr(), w_ptr, _ptr(kept), sent.data_ptr(), t, use_fp8, round_scale, sum_one,
            seq.data_ptr(), x_out.data_ptr(),
            s_out.data_ptr() if s_out is not None else 0, count.data_ptr(), src_info.data_ptr(), meta.data_ptr(),
            lead, pairs, self._stream(),
        )):
            return LowLatencyDispatchOut(x_out, s_out, count, src_info, state, None)
        self.ll.dispatch_send(x.data_ptr(), topk_idx.data_ptr(), w_ptr, _ptr(kept), sent.data_ptr(), t, use_fp8,
                              round_scale, sum_one, seq.data_ptr(), self._stream())

        @self._ll_closes_round(op)
        def finish() -> None:
            # (the closure holds every tensor the receive writes: rowmap through state, for a caller that drops the
            # state before it runs the receive)
            self.ll.dispatch_recv(
                x_out.data_ptr(), s_out.data_ptr() if s_out is not None else 0, count.data_ptr(),
                src_info.data_ptr(), meta.data_ptr(), lead, pairs, use_fp8, state.seq.data_ptr(), self._stream(),
            )

        if async_recv:
            return LowLatencyDispatchOut(x_out, s_out, count, src_info, state, finish)
        finish()
        return LowLatencyDispatchOut(x_out, s_out, count, src_info, state, None)

    @_closes_open_round
    def low_latency_combine(
        self,
        y: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        state: _LLState,
        out: torch.Tensor,
        async_recv: bool,
    ) -> Any:
        op = "low_latency_combine"
        self._raise_if_failed(op)
        c = self.ctx
        seq = torch.empty(1, dtype=torch.int64, device=c.device)
        lead, pairs = _rowmap_ptrs(state.rowmap, c)
        # weights sent with the dispatch: the combine applies that copy (the Buffer checked that topk_weights is the
        # same tensor, unchanged where torch can tell), so both sides of every token use the same weights
        w = state.weights_kept if state.weights_kept is not None else topk_weights
        w_ptr = w.data_ptr()
        # which copies come back is the dispatch's (state.ids_sent); topk_idx masks them (not read with weights sent)
        sent = state.ids_sent
        # the round of the handle's dispatch: its tag goes with this rank's rows, and the peers' must match it
        dseq = state.seq
        self._round_open = True
        # without a hook, send and sum may run as one kernel (LARGEEP_TUNE ll_fuse=1)
        if not async_recv and self.ll_fuse and self._fused(self.ll.combine_fused(
            y.data_ptr(), state.count.data_ptr(), state.meta.data_ptr(), lead, pairs, seq.data_ptr(),
            dseq.data_ptr(), sent.data_ptr(), topk_idx.data_ptr(), w_ptr, out.data_ptr(), state.num_tokens,
            state.merged, self._stream(),
        )):
            return None
        self.ll.combine_send(y.data_ptr(), state.count.data_ptr(), state.meta.data_ptr(), lead, pairs,
                             seq.data_ptr(), dseq.data_ptr(), self._stream())

        @self._ll_closes_round(op)
        def finish() -> None:
            # (the closure holds every tensor the receive reads, the weights too: a caller's temporary freed before
            # the hook runs would otherwise be reused meanwhile)
            self.ll.combine_recv(sent.data_ptr(), topk_idx.data_ptr(), w.data_ptr(), out.data_ptr(), state.num_tokens,
                                 state.merged, seq.data_ptr(), dseq.data_ptr(), self._stream())

        if async_recv:
            return finish
        finish()
        return None
