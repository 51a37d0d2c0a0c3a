"""Waits for process-group collectives that the library issues outside a Buffer (expert TP, the gate's load sum,
the replicas' gradient sum), bounded by LARGEEP_TIMEOUT_S where gloo moves the tensors (a gloo group, CPU or CUDA
tensors; CPU tensors of a "cpu:gloo,cuda:nccl" group): a rank that raised before the collective, or never makes
the call, ends the others' wait in PeerTimeoutError instead of the process group's own timeout (30 minutes on
gloo). Where NCCL moves them the group's own timeout applies (its waits are not bounded from the host)."""

from __future__ import annotations

import contextlib
import pickle
import re
import weakref
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from largeep import _env
from largeep.errors import PeerTimeoutError

# The groups whose collectives, on this rank, no longer pair with the other ranks': a Buffer's call or creation failed
# in a wait on this rank (timed out, or a peer's connection closed), and its peers' next collectives on the group
# belong to that call or to the Buffer they made, not to this rank's next one. Why, by group. Buffer creation on
# one of them raises at once; the entry goes with the group object.
_OUT_OF_STEP: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def mark_out_of_step(group: dist.ProcessGroup | None, why: str) -> None:
    """Remembers that ``group`` (None: the default group) is out of step on this rank, and why (the first reason
    stays)."""
    g = group if group is not None else dist.group.WORLD
    try:
        _OUT_OF_STEP.setdefault(g, why)
    except TypeError:  # (an object that takes no weak reference: not remembered)
        pass


@contextlib.contextmanager
def marks_out_of_step(group: dist.ProcessGroup | None) -> Iterator[None]:
    """Marks ``group`` out of step (``mark_out_of_step``, with the error's first line) when the block's waits fail
    (a RuntimeError: PeerTimeoutError, or gloo's own, a peer's connection closed) or are interrupted (Ctrl-C), and
    lets the error go on."""
    try:
        yield
    except (RuntimeError, KeyboardInterrupt) as exc:
        mark_out_of_step(group, first_line(exc)[:300])
        raise


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name where the message is empty."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def out_of_step(group: dist.ProcessGroup | None) -> str | None:
    """Why ``group`` is out of step on this rank (``mark_out_of_step``), or None."""
    g = group if group is not None else dist.group.WORLD
    try:
        return _OUT_OF_STEP.get(g)
    except TypeError:
        return None


def on_gloo(group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether gloo moves ``device``'s tensors in collectives over ``group`` (None: the default group), whose waits
    ``wait_all`` then bounds: every tensor of a gloo group (CUDA ones too, as the nvshmem backend's on a gloo
    group), only the tensors of the device types that a mixed group ("cpu:gloo,cuda:nccl") gives to gloo."""
    # (the backend's config, e.g. "cpu:gloo,cuda:nccl": the backend's name alone is "undefined" for a group made
    # without naming one, which maps the CPU to gloo all the same)
    config = getattr(dist, "get_backend_config", None)
    name = str(config(group) if config is not None else dist.get_backend(group)).lower()
    if ":" not in name:
        return "gloo" in name
    for part in name.split(","):
        dev, _, backend = part.partition(":")
        if dev.strip() == device.type:
            return "gloo" in backend
    return False


# gloo's words for a connection to a peer that is gone: the peer exited or crashed, or closed it on giving up
# (its own timeout); a wait on that peer then fails at once. ("pair closure" is this rank's own doing: see
# lost_connection.)
_LOST_WORDS = ("closed by peer", "reset by peer", "broken pipe")


def lost_connection(exc: BaseException) -> str | None:
    """Why the connections of a failed gloo wait are gone, where ``exc`` says they are (else None): a peer's
    doing, or this rank's own earlier wait that ran past gloo's own timeout (gloo then closes every connection of
    the group on this rank, and later waits there fail with "pair closure")."""
    msg = str(exc).lower()
    if "pair closure" in msg:
        return ("an earlier wait of this rank on the group ran past the process group's own timeout, which closed "
                "its connections")
    if any(w in msg for w in _LOST_WORDS):
        return "a peer exited or crashed, or gave up waiting for this rank"
    return None


def gloo_words(exc: BaseException) -> str:
    """``exc``'s first line without gloo's source location and advice (at most 300 characters): "Read error
    [127.0.0.1]:1935: Connection reset by peer." """
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first_line(exc))
    return line.split(" This is typically")[0][:300]


def bound_s(group: dist.ProcessGroup | None, device: torch.device) -> float | None:
    """LARGEEP_TIMEOUT_S where gloo moves ``device``'s tensors over ``group`` (``on_gloo``), else None (NCCL's
    waits: the group's own timeout). Read before a collective is issued, so that a bad setting refuses the call
    before it starts rather than leaving it to complete without this rank's wait."""
    return _env.settings().timeout_s if on_gloo(group, device) else None


def wait_all(works: list[Any], timeout_s: float | None, head: str, tail: str) -> None:
    """Waits for every work (None: nothing to wait for). With ``timeout_s`` (the works are gloo's: ``bound_s``): a
    wait past it raises PeerTimeoutError(f"{head} (LARGEEP_TIMEOUT_S=... s; gloo: ...){tail}"), and so does a wait
    whose connections are gone (``lost_connection``: "(gloo lost a connection: ...; why)"), at once; None: the
    works are waited for without a bound (NCCL's: the group's own timeout)."""
    bound = timedelta(seconds=timeout_s) if timeout_s is not None else None
    for wk in works:
        if wk is None:
            continue
        if bound is None:
            wk.wait()
            continue
        try:
            wk.wait(timeout=bound)
        except RuntimeError as exc:
            why = lost_connection(exc)
            if why is not None:
                raise PeerTimeoutError(f"{head} (gloo lost a connection: {gloo_words(exc)}; {why}){tail}") from None
            if "timed out" not in str(exc).lower():
                raise
            raise PeerTimeoutError(
                f"{head} (LARGEEP_TIMEOUT_S={bound.total_seconds():g} s; gloo: {gloo_words(exc)}){tail}"
            ) from None


# how the waits of the collectives below end their timeout message
_TAIL = ": a rank did not make the same call, or failed before it; the group may be out of step now"


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, what: str, direct: bool = False) -> None:
    """dist.all_reduce (sum) of ``t`` in place over ``group``, waited for as ``wait_all`` does; ``what`` names the
    call in the error. Synchronous while torch.compile traces (Dynamo traces only synchronous collectives).

    ``direct`` (for small tensors, such as the gate's loads): where gloo moves ``t`` (``bound_s``), every rank sends
    its ``t`` to every other rank (one all-to-all of n copies of it) and adds the n tensors it holds then in rank
    order (the same sum on every rank, bit for bit), instead of gloo's ring all-reduce. Each rank then waits on
    every peer directly, so a peer that exits ends every other rank's wait at once. In the ring a rank waits on
    one neighbour at a time: when the other neighbour, having lost its own connection to the exited peer, raised
    and left the collective first, that wait ends only at LARGEEP_TIMEOUT_S."""
    if torch.compiler.is_compiling():
        dist.all_reduce(t, group=group)
        return
    timeout_s = bound_s(group, t.device)
    n = dist.get_world_size(group)
    if direct and timeout_s is not None and n > 1:
        mine = t.detach().reshape(1, -1)
        every = torch.empty((n, mine.shape[1]), dtype=t.dtype, device=t.device)
        work = dist.all_to_all_single(every, mine.expand(n, -1).contiguous(), group=group, async_op=True)
        wait_all([work], timeout_s, f"{what}: rank {dist.get_rank(group)} waited for the group in vain", _TAIL)
        total = every[0].clone()
        for p in range(1, n):
            total += every[p]
        t.copy_(total.view_as(t))
        return
    work = dist.all_reduce(t, group=group, async_op=True)
    # (not marked out of step on a timeout: a late peer can still complete this one collective, and then the
    # group's next ones pair again)
    wait_all([work], timeout_s, f"{what}: rank {dist.get_rank(group)} waited for the group in vain",
             _TAIL)


def all_to_all_rows(out: torch.Tensor, inp: torch.Tensor, out_rows: list[int], in_rows: list[int],
                    group: dist.ProcessGroup | None, what: str) -> None:
    """dist.all_to_all_single along dim 0 over ``group``: ``in_rows[p]`` rows of ``inp`` (consecutive, in rank
    order) go to rank p, and ``out`` receives ``out_rows[p]`` rows from rank p, in rank order; waited for as
    ``wait_all`` does; ``what`` names the call in the error. Every rank must make the call with matching counts."""
    timeout_s = bound_s(group, inp.device)
    work = dist.all_to_all_single(out, inp.contiguous(), out_rows, in_rows, group=group, async_op=True)
    wait_all([work], timeout_s, f"{what}: rank {dist.get_rank(group)} waited for the group's all-to-all in vain",
             _TAIL)


def all_gather(t: torch.Tensor, group: dist.ProcessGroup | None, what: str) -> list[torch.Tensor]:
    """dist.all_gather of ``t`` (the same shape and dtype on every rank) over ``group``: every rank's tensor in rank
    order, waited for as ``wait_all`` does; ``what`` names the call in the error."""
    n = dist.get_world_size(group)
    timeout_s = bound_s(group, t.device)
    out = [torch.empty_like(t) for _ in range(n)]
    work = dist.all_gather(out, t.contiguous(), group=group, async_op=True)
    wait_all([work], timeout_s, f"{what}: rank {dist.get_rank(group)} waited for the group's gather in vain",
             _TAIL)
    return out


def all_gather_object(obj: Any, group: dist.ProcessGroup, what: str, timeout_s: float) -> list[Any]:
    """dist.all_gather_object of ``obj`` over ``group``, each rank's object in rank order; on a group where gloo
    moves CPU tensors, as two gathers (the pickled sizes, then the padded bytes) whose waits are bounded by
    ``timeout_s``: PeerTimeoutError naming ``what`` instead of the process group's own timeout (30 minutes on gloo)
    on a group whose ranks' collectives no longer pair. On NCCL the group's own timeout applies."""
    n = dist.get_world_size(group)
    if n == 1 or not on_gloo(group, torch.device("cpu")):
        every: list[Any] = [None] * n
        dist.all_gather_object(every, obj, group=group)
        return every
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    head = f"{what}: rank {dist.get_rank(group)} waited for the group's gather in vain"
    tail = ": a rank did not make the same call, or failed before it; the group is out of step now"
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(n)]
    wait_all([dist.all_gather(sizes, torch.tensor([data.numel()]), group=group, async_op=True)], timeout_s, head,
             tail)
    width = int(max(int(t.item()) for t in sizes))
    got = [torch.empty(width, dtype=torch.uint8) for _ in range(n)]
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[: data.numel()] = data
    wait_all([dist.all_gather(got, padded, group=group, async_op=True)], timeout_s, head, tail)
    return [pickle.loads(t[: int(sz.item())].numpy().tobytes()) for t, sz in zip(got, sizes, strict=True)]


def broadcast(t: torch.Tensor, src: int, group: dist.ProcessGroup, what: str) -> None:
    """dist.broadcast of ``t`` in place from ``src`` (a rank of ``group``, in the group's numbering) to every rank
    of ``group``, waited for as ``wait_all`` does; ``what`` names the call in the error."""
    me = dist.get_rank(group)
    timeout_s = bound_s(group, t.device)
    work = dist.broadcast(t, src=dist.get_global_rank(group, src), group=group, async_op=True)
    head = f"rank {me} waited in vain for the group to receive its broadcast" if me == src else \
        f"rank {me} waited for rank {src}'s broadcast in vain"
    wait_all([work], timeout_s, f"{what}: {head}", _TAIL)


def gather(t: torch.Tensor, dst: int, group: dist.ProcessGroup, what: str) -> list[torch.Tensor] | None:
    """dist.gather of ``t`` (the same shape and dtype on every rank) to ``dst`` (a rank of ``group``, in the
    group's numbering): every rank's tensor in rank order there, None on the others; waited for as ``wait_all``
    does; ``what`` names the call in the error."""
    me = dist.get_rank(group)
    timeout_s = bound_s(group, t.device)
    staged = _host_staged(group, t)
    sent = t.cpu() if staged else t.contiguous()
    out = [torch.empty_like(sent) for _ in range(dist.get_world_size(group))] if me == dst else None
    work = dist.gather(sent, out, dst=dist.get_global_rank(group, dst), group=group, async_op=True)
    wait_all([work], timeout_s, f"{what}: rank {me} waited for the group's gather to rank {dst} in vain", _TAIL)
    return [o.to(t.device) for o in out] if staged and out is not None else out


def send_recv(t: torch.Tensor, src: int, dst: int, group: dist.ProcessGroup, what: str) -> None:
    """Moves ``t`` from rank ``src`` to rank ``dst`` of ``group`` (the group's numbering): ``src`` sends its ``t``
    (contiguous), ``dst`` receives into its ``t`` (contiguous, of the same shape and dtype), the other ranks do
    nothing, nor does ``src == dst``; waited for as ``wait_all`` does; ``what`` names the call in the error."""
    me = dist.get_rank(group)
    if src == dst or me not in (src, dst):
        return
    timeout_s = bound_s(group, t.device)
    staged = _host_staged(group, t)
    moved = t.cpu() if staged else t
    if me == src:
        work = dist.isend(moved, dst=dist.get_global_rank(group, dst), group=group)
        head = f"{what}: rank {me} waited in vain for rank {dst} to receive"
    else:
        work = dist.irecv(moved, src=dist.get_global_rank(group, src), group=group)
        head = f"{what}: rank {me} waited in vain for rank {src}'s send"
    wait_all([work], timeout_s, head, _TAIL)
    if staged and me == dst:
        t.copy_(moved)


def _host_staged(group: dist.ProcessGroup | None, t: torch.Tensor) -> bool:
    """Whether ``t`` travels through a host copy: a CUDA tensor on a group where gloo moves it, whose point-to-point
    and gather calls take host memory only (handed a device pointer, gloo aborts the process)."""
    return t.is_cuda and on_gloo(group, t.device)
