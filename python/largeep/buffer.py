"""The public ``Buffer`` of SPEC.md: one per process group, owning every communication buffer.

Every argument is checked here, once, before a backend launches anything. Communication runs on the Buffer's own
CUDA stream; ``previous_event`` orders it after an event, ``async_finish`` returns at once with an event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Union

import torch
import torch.distributed as dist

from largeep import _collective, _env, checks
from largeep._env import logger
from largeep.backends.base import RAW_STREAM, GroupContext, current_raw_stream
from largeep.backends.rounds import RoundsBackend
from largeep.backends.torch_backend import TorchBackend
from largeep.errors import ArgumentError, BufferDestroyedError, PeerRefusedError, PeerTimeoutError
from largeep.layout import Layout

Tokens = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]  # noqa: UP007 - a runtime alias (Python 3.10)
_buffer_ids = itertools.count(1)
# the ids of the Buffers destroyed in this process, so that a handle of one is refused saying so (an int each)
_destroyed_ids: set[int] = set()

# torch's own calls under torch.cuda.current_stream / set_stream, which take and give plain ints (no Stream objects,
# no device lookups): the finished-call path below uses them; a torch without them takes the general path.
_GET_STREAM = getattr(torch._C, "_cuda_getCurrentStream", None)
_SET_STREAM = getattr(torch._C, "_cuda_setStream", None)


class _FinishedCalls:
    """How a call that returns finished (no ``async_finish``, no ``previous_event``) runs on the Buffer's stream,
    cheaply (small calls are host-bound): the Buffer's stream waits for what is queued on the caller's through a
    native event, the call runs with the Buffer's stream current (its allocations and torch ops go there, as on
    the general path), then the caller's stream waits for the Buffer's through a second event. Inputs need no
    ``record_stream``: the caller's stream is ordered after every kernel that reads them before anything else runs
    there. Outputs still get ``record_stream`` on the caller's stream (made on the Buffer's stream, they may be
    used and freed on the caller's while a later call from another stream allocates on the Buffer's)."""

    def __init__(self, native: Any, stream: torch.cuda.Stream) -> None:
        self.C = native
        self.index = stream.device.index
        self.stream_id, self.device_type = stream.stream_id, stream.device_type
        self.raw = int(stream.cuda_stream)
        with torch.cuda.device(stream.device):
            self.ev_in, self.ev_out = native.event_create(), native.event_create()
        # the caller's Stream objects by stream id: making one costs ~5 us of host time on the GPU machine, and a
        # caller uses few streams (bounded: an id past the bound gets a fresh object each call, as before)
        self._callers: dict[tuple[int, int], torch.cuda.Stream] = {}

    def usable(self) -> bool:
        """The caller is on the Buffer's device (launches need it current)."""
        return torch.cuda.current_device() == self.index

    def run(self, fn: Callable[[], Any]) -> Any:
        assert _GET_STREAM is not None and _SET_STREAM is not None and RAW_STREAM is not None
        stream_id, device_index, device_type = _GET_STREAM(self.index)
        caller_raw = int(RAW_STREAM(self.index))
        self.C.stream_wait(self.raw, caller_raw, self.ev_in)
        _SET_STREAM(stream_id=self.stream_id, device_index=self.index, device_type=self.device_type)
        try:
            result = fn()
        except BaseException:
            _SET_STREAM(stream_id=stream_id, device_index=device_index, device_type=device_type)
            try:
                self.C.stream_wait(caller_raw, self.raw, self.ev_out)
            except Exception:  # noqa: BLE001 - the call's own error is the one to raise
                # (a CUDA fault that ended the call fails this event record too: it must not hide the call's error,
                # which names the fault and where it was met)
                logger.debug("ordering the caller's stream after a failed call failed too", exc_info=True)
            raise
        _SET_STREAM(stream_id=stream_id, device_index=device_index, device_type=device_type)
        self.C.stream_wait(caller_raw, self.raw, self.ev_out)
        outputs = _tensors_of(result)
        if outputs:
            key = (stream_id, device_type)
            caller = self._callers.get(key)
            if caller is None:  # (the device is always this Buffer's: _GET_STREAM(self.index))
                caller = torch.cuda.Stream(stream_id=stream_id, device_index=device_index, device_type=device_type)
                if len(self._callers) < 64:
                    self._callers[key] = caller
            for t in outputs:
                t.record_stream(caller)
        return result

    def close(self) -> None:
        self.C.event_destroy(self.ev_in)
        self.C.event_destroy(self.ev_out)


class EventOverlap:
    """An event on the Buffer's stream. ``event`` is None on CPU, and on the nvshmem backend for a call without
    ``async_finish`` (and without ``previous_event``): the caller's stream is then already ordered after the call,
    and the two methods fall back to the Buffer's stream as it is when they are called (later work on it included).
    The torch backend on CUDA records an event for every call. The caller's stream is the current stream of the
    event's device (the Buffer's), whichever device is current when the methods are called."""

    def __init__(
        self,
        event: torch.cuda.Event | None = None,
        stream: torch.cuda.Stream | None = None,
        *,
        device: torch.device | None = None,
    ) -> None:
        self.event = event
        self._stream = stream
        self._device = device if device is not None or stream is None else stream.device

    def current_stream_wait(self) -> None:
        """Orders the caller's current stream (on the event's device) after the event. Does not block the host."""
        if self.event is not None:
            torch.cuda.current_stream(self._device).wait_event(self.event)
        elif self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)

    def __enter__(self) -> EventOverlap:
        """``with event:`` runs its block, then orders the caller's current stream after the event
        (:meth:`current_stream_wait`): the block is the work that overlaps the call."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.current_stream_wait()

    def synchronize(self) -> None:
        """Blocks the host until the event has happened."""
        if self.event is not None:
            self.event.synchronize()
        elif self._stream is not None:
            self._stream.synchronize()


@dataclass
class DispatchHandle:
    """Opaque routing of one normal dispatch. Give it back to ``dispatch`` (cached) or to ``combine``."""

    buffer_id: int
    num_tokens: int  # T on this rank (source side)
    num_recv_tokens: int  # rows of the dispatch output (R, or num_worst_tokens)
    state: Any = field(repr=False)
    num_worst_tokens: int = 0  # as given to the dispatch that made the handle (0: variable size)
    # the dispatch's rows per local expert (its result's num_tokens_per_expert and the tensor): a cached dispatch
    # moves the same rows and returns them too
    counts: list[int] = field(default_factory=list, repr=False)
    counts_tensor: torch.Tensor | None = field(default=None, repr=False)
    expert_alignment: int = 1  # the alignment of ``counts`` (the handle's dispatch's)


@dataclass
class LowLatencyHandle:
    buffer_id: int
    num_tokens: int
    state: Any = field(repr=False)
    # False until the dispatch's receive is issued (at once, or by its hook): a combine before it would read
    # receive slots that hold nothing yet
    received: bool = True
    # what the dispatch's receive hook raised, if it did (the receive may not have run: the handle stays unreceived)
    hook_error: str | None = field(default=None, repr=False)
    # the topk_weights given to the dispatch (and their version counter then): the combine must get them unchanged
    weights: torch.Tensor | None = field(default=None, repr=False)
    weights_version: int | None = None
    # with weights, the dispatch's topk_idx too (and its version then): the experts' ranks sum a token's outputs
    # over the k they got, which no other ids can mask
    topk_idx: torch.Tensor | None = field(default=None, repr=False)
    topk_idx_version: int | None = None


def _refuse_unless_kept(op: str, arg: str, t: Any, kept: Any, version: int | None, why: str) -> None:
    """A low-latency combine of a dispatch given topk_weights: ``t`` must be the tensor the dispatch kept
    (``kept``; None: nothing kept, nothing to check), unchanged since (``version``)."""
    if kept is not None and (t is not kept or _version_of(t) != version):
        what = "another tensor" if t is not kept else "the same tensor, changed in place since"
        raise ArgumentError(
            f"Buffer.{op}: argument '{arg}' is {what}: the handle's low_latency_dispatch was given topk_weights, "
            + why
        )


def _version_of(t: torch.Tensor) -> int | None:
    """t's version counter (bumped by every in-place change); None for an inference tensor, which has none."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


@dataclass
class DispatchResult:
    """x: [R, H] in x's dtype, or the FP8 pair (e4m3 [R, H], float32 [R, H/128]).
    topk_idx: int64 [R, K] local expert ids (-1 where the expert is not on this rank); None for a cached dispatch.
    topk_weights: float32 [R, K]; None for a cached dispatch.
    num_tokens_per_expert: rows naming each local expert, rounded up to expert_alignment (empty list when
    num_worst_tokens > 0 on GPUs: no host sync happens then; use num_tokens_per_expert_tensor). A cached dispatch
    returns those of its handle's dispatch, whose rows it moves (aligned as that dispatch aligned them).
    num_tokens_per_expert_tensor: the same counts as int32 [E/N] on the device (for a cached dispatch, the tensor its
    handle's dispatch returned).

    On the nvshmem backend inside one node the outputs may be views of the Buffer's receive slots (zero-copy, see
    docs/usage.md): use :meth:`record_stream` rather than ``Tensor.record_stream`` when they are used on a stream
    other than the one current at the call.
    """

    x: Tokens
    topk_idx: torch.Tensor | None
    topk_weights: torch.Tensor | None
    num_tokens_per_expert: list[int]
    handle: DispatchHandle
    event: EventOverlap
    num_tokens_per_expert_tensor: torch.Tensor

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """The outputs are used on ``stream`` too: their memory is not reused before the work queued there by the
        time they die has run (``Tensor.record_stream`` for every output, and the same for a zero-copy receive
        slot, which torch's allocator does not manage)."""
        xs = self.x if isinstance(self.x, tuple) else (self.x,)
        for t in (*xs, self.topk_idx, self.topk_weights, self.num_tokens_per_expert_tensor):
            if isinstance(t, torch.Tensor) and t.is_cuda:
                _record_stream(t, stream)


@dataclass
class CombineResult:
    """x: [T, H] in y's dtype; topk_weights: float32 [T, K] or None."""

    x: torch.Tensor
    topk_weights: torch.Tensor | None
    event: EventOverlap


@dataclass
class LowLatencyDispatchResult:
    """x: [E/N, N*max_tokens_per_rank, H] (bf16, or the FP8 pair with scales [E/N, N*M, H/128]);
    num_tokens_per_expert: int32 [E/N] on the device; src_info: int32 [E/N, N*M, 2], (source rank, source token)
    of each valid row, -1 elsewhere. hook: with return_recv_hook, call it to complete the receive."""

    x: Tokens
    num_tokens_per_expert: torch.Tensor
    src_info: torch.Tensor
    handle: LowLatencyHandle
    event: EventOverlap
    hook: Callable[[], None] | None


@dataclass
class LowLatencyCombineResult:
    x: torch.Tensor
    event: EventOverlap
    hook: Callable[[], None] | None


def _group_device(group: dist.ProcessGroup) -> torch.device:
    name = str(dist.get_backend(group)).lower()
    if "nccl" in name:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Buffer:
    """Dispatch and combine for one expert-parallel process group (SPEC.md).

    Args:
        group: the process group (None: the default group). N = its size, one GPU per rank.
        hidden: H. num_experts: E (divisible by N). num_topk: K.
        max_tokens_per_rank: the most tokens a rank passes to one call (sizes every buffer).
        backend: "nvshmem", "torch" or "auto" (nvshmem when the native module and GPUs are there and the group's
            size has run on GPUs, else torch; on GPUs rank 0 logs a warning saying why it took torch).
        ranks_per_node: P (default: ranks sharing a host); may be set lower to emulate several nodes on one host.
        num_sms: SMs each normal-mode native kernel may use (default 24, or the GPU's SMs if fewer; at most those).
            The low-latency kernels size their grids from the device's SMs instead (docs/usage.md).
        low_latency: build the low-latency buffers (decoding) instead of the normal ones.
        tokens_per_round: normal mode: size the receive buffers for this many tokens per rank, and move every
            dispatch and combine in ceil(max_tokens_per_rank / tokens_per_round) rounds (default: one round of
            max_tokens_per_rank). For groups whose receive buffers (num_ranks x max_tokens_per_rank rows) would not
            fit in GPU memory; each round costs a count exchange (largeep/backends/rounds.py, docs/usage.md).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        *,
        hidden: int,
        num_experts: int,
        num_topk: int,
        max_tokens_per_rank: int,
        backend: str = "auto",
        ranks_per_node: int | None = None,
        num_sms: int | None = None,
        low_latency: bool = False,
        tokens_per_round: int | None = None,
    ) -> None:
        op = "Buffer"
        if not dist.is_initialized():
            raise ArgumentError(f"{op}: torch.distributed is not initialised; call init_process_group first")
        group = group if group is not None else dist.group.WORLD
        # (dist.new_group gives the ranks outside the group a sentinel, refused below naming this rank)
        if not isinstance(group, dist.ProcessGroup) and group is not dist.GroupMember.NON_GROUP_MEMBER:
            raise ArgumentError(f"{op}: argument 'group' must be a torch.distributed.ProcessGroup (or None: the "
                                f"default group), got {type(group).__name__}")
        n = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if rank < 0:
            raise ArgumentError(
                f"{op}: argument 'group' does not contain this rank (global rank {dist.get_rank()}); create the "
                "Buffer only on the group's ranks"
            )
        stale = _collective.out_of_step(group)
        if stale is not None:
            # (the other ranks' next collective on it is still that call's: the gather below would wait forever;
            # they time out waiting for this rank's arrival instead, naming it)
            raise ArgumentError(
                f"{op}: argument 'group' is out of step on rank {rank}: an earlier call on it failed ({stale[:300]}); "
                "its collectives no longer pair with the other ranks', so no Buffer can be made on it: destroy its "
                "Buffers and give the next Buffer a new group"
            )
        # Each rank checks its own arguments, then every rank learns every rank's verdict, host and arguments in
        # one gather: a refusal on one rank is a refusal on all (no rank goes on into a collective the others never
        # join), and ranks that disagree on the Buffer's arguments are refused too.
        given = (hidden, num_experts, num_topk, max_tokens_per_rank, backend, ranks_per_node, num_sms, low_latency,
                 tokens_per_round)
        local_error: str | None = None
        try:
            checks.positive_int(op, "hidden", hidden)
            checks.positive_int(op, "num_experts", num_experts)
            checks.positive_int(op, "num_topk", num_topk)
            checks.positive_int(op, "max_tokens_per_rank", max_tokens_per_rank)
            checks.flags(op, low_latency=low_latency)
            if num_experts % n:
                raise ArgumentError(
                    f"{op}: argument 'num_experts' = {num_experts} is not divisible by the group size {n}"
                )
            if num_topk > num_experts:
                raise ArgumentError(f"{op}: argument 'num_topk' = {num_topk} exceeds num_experts = {num_experts}")
            if tokens_per_round is not None:
                checks.positive_int(op, "tokens_per_round", tokens_per_round, maximum=max_tokens_per_rank)
                if low_latency:
                    raise ArgumentError(
                        f"{op}: argument 'tokens_per_round' applies to the normal mode only (low-latency buffers "
                        "hold max_tokens_per_rank tokens per rank and expert; lower max_tokens_per_rank instead)"
                    )
            if backend not in ("auto", "torch", "nvshmem"):
                raise ArgumentError(
                    f"{op}: argument 'backend' = {backend!r}, expected 'auto', 'torch' or 'nvshmem'"
                )
            if ranks_per_node is not None:
                checks.positive_int(op, "ranks_per_node", ranks_per_node)
                if n % ranks_per_node:
                    raise ArgumentError(
                        f"{op}: argument 'ranks_per_node' = {ranks_per_node} must divide the group size {n}"
                    )
            if num_sms is not None:
                checks.positive_int(op, "num_sms", num_sms)
                # where the normal-mode kernels may take it: more blocks than SMs would queue a kernel's blocks
                # behind blocks that wait for them (the torch backend and the low-latency kernels ignore it)
                sms = _gpu_sms() if backend != "torch" and not low_latency else None
                if sms is not None and num_sms > sms:
                    raise ArgumentError(f"{op}: argument 'num_sms' = {num_sms} is more than the GPU's {sms} SMs")
            # the LARGEEP_* variables, read now (a bad value on one rank refuses the Buffer on every rank)
            settings = _env.settings()
        except (ArgumentError, ValueError) as exc:  # (the settings raise ValueError)
            local_error = str(exc)
        except RuntimeError as exc:  # (CUDA's start in _gpu_sms: every rank hears it, none waits for this one)
            local_error = f"{op}: the GPU's SM count could not be read for 'num_sms': {_collective.first_line(exc)}"
        # whether this rank could run the native module: "auto" picks the same backend on every rank, and
        # "nvshmem" is refused on every rank when one rank cannot
        native_ok = True
        if backend != "torch" and local_error is None:
            from largeep import native

            native_ok = native.unavailable_reason() is None
        wait_s = settings.timeout_s if local_error is None else _env.DEFAULT_TIMEOUT_S
        # (a wait that fails here leaves the group out of step: a later Buffer on it is refused at once)
        with _collective.marks_out_of_step(group):
            _all_arrive(group, op, rank, wait_s)
            every = _collective.all_gather_object((socket.gethostname(), local_error, given, native_ok), group, op,
                                                  wait_s)
        without_native = [r for r, e in enumerate(every) if not e[3]]
        if local_error is not None:
            raise ArgumentError(local_error)
        refused = {r: e[1] for r, e in enumerate(every) if e[1] is not None}
        if refused:
            r0 = min(refused)
            raise ArgumentError(
                f"{op}: rank(s) {sorted(refused)} refused their arguments, so no rank makes the Buffer (rank {r0}: "
                f"{refused[r0]})"
            )
        differ = {r: e[2] for r, e in enumerate(every) if e[2] != given}
        if differ:
            names_ = ("hidden", "num_experts", "num_topk", "max_tokens_per_rank", "backend", "ranks_per_node",
                      "num_sms", "low_latency", "tokens_per_round")
            raise ArgumentError(
                f"{op}: the ranks of the group disagree on the Buffer's arguments {names_}: rank {rank}: {given}; "
                + "; ".join(f"rank {r}: {v}" for r, v in sorted(differ.items()))
            )
        names = [e[0] for e in every]
        given_per_node = ranks_per_node is not None
        if ranks_per_node is None:
            ranks_per_node = names.count(names[0])  # the ranks that share the first host
            if n % ranks_per_node:
                raise ArgumentError(
                    f"{op}: ranks must fill hosts in equal contiguous blocks (got hosts {names}: {ranks_per_node} "
                    f"on the first, which does not divide the group size {n}); pass ranks_per_node explicitly"
                )
        # a node's ranks reach each other over NVLink: each block of ranks_per_node ranks on one host (hosts need
        # not be filled in order when it is given; without it, they must hold equal contiguous blocks of ranks)
        for r, name in enumerate(names):
            first = (r // ranks_per_node) * ranks_per_node
            if name != names[first]:
                if not given_per_node:
                    raise ArgumentError(
                        f"{op}: ranks must fill hosts in equal contiguous blocks (got hosts {names}); pass "
                        "ranks_per_node explicitly"
                    )
                raise ArgumentError(
                    f"{op}: argument 'ranks_per_node' = {ranks_per_node}: ranks {first}..{first + ranks_per_node - 1}"
                    f" are on different hosts ({names[first:first + ranks_per_node]}); each block of ranks_per_node "
                    "consecutive ranks must share a host"
                )
        device = _group_device(group)
        if backend == "nvshmem" and device.type == "cpu" and torch.cuda.is_available():
            # NVSHMEM uses the group only for a few object collectives (its start, the configuration check), which
            # gloo carries as well: the data lives on this process's current CUDA device
            device = torch.device("cuda", torch.cuda.current_device())
        self._settings = settings
        self.ctx = GroupContext(
            group=group, rank=rank, num_ranks=n, ranks_per_node=ranks_per_node, device=device, hidden=hidden,
            num_experts=num_experts, num_topk=num_topk, max_tokens_per_rank=max_tokens_per_rank,
            num_sms=num_sms or min(DEFAULT_SMS, _gpu_sms(device) or DEFAULT_SMS), low_latency=low_latency,
        )
        self.backend_name = self._choose_backend(backend, without_native)
        # high priority (LARGEEP_STREAM_PRIORITY): a dispatch queued behind expert GEMMs on another stream gets SMs
        # as they free up instead of after all the GEMMs' waiting blocks. Made before the backend, which is the
        # last step: nothing that could fail on this rank alone comes after its collective allocation (a Buffer
        # failing there would leave the memory allocated, and its peers holding Buffers that wait on it)
        self._stream = (
            torch.cuda.Stream(device, priority=self._settings.stream_priority) if device.type == "cuda" else None
        )
        self._finished: _FinishedCalls | None = None
        if self._stream is not None and self.backend_name == "nvshmem" and _int_level_streams(device):
            from largeep import native

            self._finished = _FinishedCalls(native.module(), self._stream)
        # in rounds (tokens_per_round): the backend is sized for one round and runs inside RoundsBackend
        per_round = tokens_per_round or max_tokens_per_rank
        self.num_rounds = -(-max_tokens_per_rank // per_round)
        inner = dataclasses.replace(self.ctx, max_tokens_per_rank=per_round) if self.num_rounds > 1 else self.ctx
        self._impl: Any
        try:
            if self.backend_name == "nvshmem":
                from largeep.backends.nvshmem_backend import NvshmemBackend

                self._impl = NvshmemBackend(inner, self._settings, in_rounds=self.num_rounds > 1,
                                            stream=self._stream)
            else:
                self._impl = TorchBackend(inner, self._settings.timeout_s)
        except BaseException:
            if self._finished is not None:  # (its two events)
                self._finished.close()
                self._finished = None
            raise
        if self.num_rounds > 1:
            self._impl = RoundsBackend(self._impl, self.ctx, self.num_rounds)
        self._id = next(_buffer_ids)
        self._alive = True
        # low-latency calls per op issued outside graph capture, and those whose receive hook is still due: a call
        # reuses the receive slots of the call two before it, which that call's hook frees (_check_in_flight)
        self._ll_calls = {"low_latency_dispatch": 0, "low_latency_combine": 0}
        self._ll_pending: dict[str, set[int]] = {"low_latency_dispatch": set(), "low_latency_combine": set()}

    # -- properties --------------------------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        return self.ctx.num_ranks

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def num_local_experts(self) -> int:
        return self.ctx.experts_per_rank

    @property
    def stream(self) -> torch.cuda.Stream | None:
        """The Buffer's communication stream (None on CPU)."""
        return self._stream

    def _choose_backend(self, backend: str, without_native: list[int]) -> str:
        """``without_native``: the ranks that cannot load the native module ("auto" then takes torch on every
        rank)."""
        from largeep import native

        if backend == "torch":
            return "torch"
        reason = native.unavailable_reason()
        if reason is None and without_native:
            reason = f"rank(s) {without_native} cannot load the native module or see a CUDA device" + (
                " (every rank takes 'torch')" if backend == "auto" else "")
        if reason is None and self.ctx.device.type != "cuda":
            reason = "the process group is not an NCCL group on CUDA devices"
        if reason is None:
            from largeep.backends.nvshmem_backend import unsupported_reason, untested_reason

            reason = unsupported_reason(self.ctx)
        if backend == "nvshmem":
            if reason is not None:
                raise RuntimeError(f"Buffer: backend 'nvshmem' is not available: {reason}")
            return "nvshmem"
        if reason is None:
            reason = untested_reason(self.ctx)
        if reason is not None:
            # on GPUs the torch backend (NCCL all-to-all) is much slower than the kernels: say so where it is seen
            # (rank 0, at WARNING); on the CPU it is the only backend
            level = logging.WARNING if self.ctx.device.type == "cuda" and self.ctx.rank == 0 else logging.INFO
            logger.log(level, "Buffer: backend 'auto' uses 'torch': %s (backend='torch' silences this)", reason)
            return "torch"
        return "nvshmem"

    # -- lifetime -----------------------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict[int, Any]) -> Buffer:
        """A Buffer is a shared communication resource (its group, its device memory): a deep copy of a model that
        holds one (an EMA copy, a frozen reference) shares it."""
        return self

    def __reduce__(self) -> Any:
        raise TypeError("a largeep.Buffer cannot be pickled (it holds a process group and device memory); save the "
                        "model's state_dict instead, and make a new Buffer when loading")

    def destroy(self) -> None:
        """Frees every buffer (collective on the group for the nvshmem backend). Idempotent."""
        if not self._alive:
            return
        self._alive = False
        _destroyed_ids.add(self._id)
        if self._finished is not None:
            self._finished.close()
            self._finished = None
        destroy = getattr(self._impl, "destroy", None)
        if destroy is not None:
            destroy()
        self._impl = None

    def _check_alive(self, op: str) -> None:
        if not self._alive:
            raise BufferDestroyedError(f"Buffer.{op}: the Buffer was destroyed")

    def _check_mode(self, op: str, low_latency: bool) -> None:
        if self.ctx.low_latency != low_latency:
            want = "low_latency=True" if low_latency else "low_latency=False"
            calls = ("get_dispatch_layout, dispatch and combine (largeep.ops.dispatch / combine)" if low_latency else
                     "low_latency_dispatch and low_latency_combine (largeep.ops.low_latency_dispatch / "
                     "low_latency_combine)")
            raise ArgumentError(f"Buffer.{op}: needs a Buffer created with {want}; this Buffer's calls are {calls}")

    def _check_handle(self, op: str, handle: object, cls: type) -> Any:
        if not isinstance(handle, cls):
            raise ArgumentError(f"Buffer.{op}: argument 'handle' must be a {cls.__name__}, got {type(handle).__name__}")
        owner = handle.buffer_id  # type: ignore[attr-defined]
        if owner != self._id:
            whose = "a Buffer that was destroyed" if owner in _destroyed_ids else "another Buffer"
            raise ArgumentError(f"Buffer.{op}: argument 'handle' belongs to {whose}; a handle is taken only by the "
                                "Buffer whose call made it")
        return handle

    # -- streams ------------------------------------------------------------------------------------------------
    def _run(
        self,
        fn: Callable[[], Any],
        previous_event: EventOverlap | None,
        async_finish: bool,
        inputs: list[torch.Tensor | None],
        finished: bool = True,
    ) -> tuple[Any, EventOverlap]:
        """Runs ``fn`` on the Buffer's stream after the caller's stream (or ``previous_event``). A call that
        returns finished gets no event (None: the caller's stream is already ordered after it). finished=False:
        the call leaves work that reads its inputs for later (a receive hook), so they get ``record_stream`` on
        the Buffer's stream as on the general path."""
        _check_previous_event(previous_event)
        if self._stream is None:
            return fn(), EventOverlap(None)
        if finished and self._is_finished_call(previous_event, async_finish):
            assert self._finished is not None
            _zero_copy_read(inputs, self._finished.raw)
            return self._finished.run(fn), EventOverlap(None, self._stream)
        compute = torch.cuda.current_stream(self._stream.device)
        if previous_event is not None and previous_event.event is not None:
            self._stream.wait_event(previous_event.event)
        else:
            self._stream.wait_stream(compute)
            other = previous_event._stream if previous_event is not None else None
            if other is not None and other != self._stream:  # another Buffer's finished call: its stream as it is
                self._stream.wait_stream(other)
        # (before the launch: a zero-copy output's slot that waits for as many streams as it can refuses one more)
        _zero_copy_read(inputs, int(self._stream.cuda_stream))
        try:
            with _on_stream(self._stream, compute):
                result = fn()
        finally:  # (also when fn raised after launching work that reads them, e.g. a refused dispatch's prepare)
            for t in inputs:
                if t is not None:
                    t.record_stream(self._stream)
        for t in _tensors_of(result):
            t.record_stream(compute)
        event = torch.cuda.Event()
        event.record(self._stream)
        if not async_finish:
            compute.wait_event(event)
        return result, EventOverlap(event, device=self._stream.device)

    def _is_finished_call(self, previous_event: EventOverlap | None, async_finish: bool) -> bool:
        return (
            self._finished is not None and not async_finish
            and (previous_event is None or (previous_event.event is None
                                            and previous_event._stream in (None, self._stream)))
            and self._finished.usable()
        )

    # -- normal mode --------------------------------------------------------------------------------------------
    def get_dispatch_layout(
        self, topk_idx: torch.Tensor, *, previous_event: EventOverlap | None = None, async_finish: bool = False
    ) -> Layout:
        """topk_idx int64 [T, K] -> Layout (num_tokens_per_rank int32 [N], num_tokens_per_node int32 [nodes],
        num_tokens_per_expert int32 [E], is_token_in_rank bool [T, N]). No host wait besides the id range check.
        Either mode's Buffer computes it (on a low-latency Buffer: the same counts, for statistics).

        An id out of range or more tokens than max_tokens_per_rank is refused (ArgumentError) as the dispatch
        refuses it: where the backend's dispatch refuses a round on every rank (largeep's, outside a CUDA graph; not
        the torch backend on CUDA, see ``_void_after_layout``), this rank first takes part in the other ranks' next
        fresh dispatch with a void round, so that they raise PeerRefusedError naming this rank at once and every
        Buffer stays usable (the layout waits for that dispatch, up to LARGEEP_TIMEOUT_S, and raises
        PeerTimeoutError carrying the refusal if none comes; a peer that dispatches with num_worst_tokens learns
        it at its next call, its Buffer unusable, as with a dispatch's refusal). So on a normal-mode Buffer call
        the layout where a fresh dispatch follows on every rank (SPEC.md's sequence)."""
        op = "get_dispatch_layout"
        self._check_alive(op)
        checks.flags(op, async_finish=async_finish)
        c = self.ctx
        # a backend that checks the ids in its layout kernel saves the separate min/max and its device copy
        native_check = getattr(self._impl, "checks_layout_ids", False) and isinstance(topk_idx, torch.Tensor) and \
            checks.needs_id_check(topk_idx, self._settings.check_values)
        idx = checks.topk_idx(
            op, topk_idx, num_tokens=None, num_topk=c.num_topk, num_experts=c.num_experts, device=c.device,
            check_values=False,
        )
        _check_previous_event(previous_event, op)
        # a refusal for the values (an id out of range, more tokens than max_tokens_per_rank) is the dispatch's
        # that follows on the other ranks too: a void round tells them (_void_dispatch), as the dispatch itself does
        try:
            checks.max_tokens(op, idx.shape[0], c.max_tokens_per_rank, arg="topk_idx")
            checks.topk_idx(
                op, idx, num_tokens=None, num_topk=c.num_topk, num_experts=c.num_experts, device=c.device,
                check_values=self._settings.check_values and not native_check, memo="remember",
            )
            kwargs = {"check": True} if native_check else {}
            layout, event = self._run(lambda: self._impl.get_dispatch_layout(idx, **kwargs), previous_event,
                                      async_finish, [idx])
        except ArgumentError as refusal:
            self._void_after_layout(refusal)
            raise
        if native_check:
            checks.remember_checked(idx, c.num_experts)
        layout.event = event
        return layout  # type: ignore[no-any-return]

    def _void_after_layout(self, refusal: ArgumentError) -> None:
        """A layout's refusal (``refusal``) told to the other ranks through a void round in their next fresh dispatch
        (``_void_dispatch``). Not where that round could meet a dispatch of another shape: the torch backend on CUDA,
        whose fixed-size (``num_worst_tokens``) dispatch neither checks ids nor pairs its collectives with a void
        round's (there the refusal stays this rank's); nor on a low-latency Buffer (no normal dispatch follows). A
        void round that times out (no fresh dispatch came) raises PeerTimeoutError carrying the refusal."""
        c = self.ctx
        if c.low_latency or (c.device.type == "cuda" and isinstance(self._impl, TorchBackend)):
            return  # (in rounds a Buffer refuses num_worst_tokens: its dispatches all pair with a void round)
        self._void_dispatch(refusal, torch.empty(0, c.hidden, dtype=torch.bfloat16, device=c.device), None, 0,
                            " (in their next fresh dispatch)")

    def dispatch(
        self,
        x: Tokens,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        *,
        handle: DispatchHandle | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
    ) -> DispatchResult:
        """Sends each token once to every rank holding one of its experts (SPEC.md, normal mode).

        x: [T, H] bf16/fp32, or (e4m3 [T, H], float32 [T, H/128]); topk_idx int64 [T, K]; topk_weights float32
        [T, K]. With ``handle`` (and topk_idx/topk_weights None) the routing of that earlier dispatch is reused.
        ``expert_alignment``: the multiple that the per-expert counts are rounded up to. A cached dispatch returns
        its handle's dispatch's counts, aligned as that dispatch aligned them: there 1 (the default) means "the
        handle's", and another value that differs from the handle's is refused with ArgumentError.
        Waits on the host for the count exchange unless num_worst_tokens > 0 or a handle is given.

        A refusal (ArgumentError) of this rank's arguments reaches the other ranks, which may be in this call
        already, so that they raise PeerRefusedError naming this rank instead of pairing their call with this
        rank's next one: a fresh dispatch joins their round with a void one (``_void_dispatch``; this rank waits for
        it, up to LARGEEP_TIMEOUT_S), a cached one tells their first exchange (``_tell_refusal``: the torch backend
        on CPU groups). Not where no void round can pair: num_worst_tokens itself refused (the others' kind of
        round is unknown), a num_worst_tokens dispatch of the torch backend on CUDA, inside a CUDA graph capture, a
        cached dispatch on GPUs, and a num_worst_tokens dispatch on GPUs for any refusal but its token count (its
        void round, with no host wait, would leave every Buffer unusable); there the refusal is this rank's alone
        (docs/usage.md, "Refusals on one rank").
        """
        op = "dispatch"
        self._check_alive(op)
        self._check_mode(op, False)
        c = self.ctx
        # Every refusal below comes from this rank's arguments. The other ranks may be in this call already: a fresh
        # dispatch's refusal voids their round (_void_dispatch: they raise PeerRefusedError naming this rank), a
        # cached one's is told to their first exchange where the backend can (_tell_refusal); so a rank that catches
        # its refusal and goes on does not pair its next call with the others' pending one.
        xs: torch.Tensor | None = None
        scales: torch.Tensor | None = None
        too_many = False
        try:
            checks.flags(op, async_finish=async_finish)
            checks.positive_int(op, "expert_alignment", expert_alignment, maximum=1 << 20)
            # (the kernels number rows in 32 bits, within a grid's stride of 2**31: more rows than any rank can
            # receive are allowed, as fixed shapes, up to that)
            checks.positive_int(op, "num_worst_tokens", num_worst_tokens, minimum=0, maximum=checks.MAX_ROWS)
            if num_worst_tokens and self.num_rounds > 1:
                raise ArgumentError(
                    f"Buffer.{op}: argument 'num_worst_tokens' is not available in a Buffer with tokens_per_round (its "
                    f"{self.num_rounds} rounds are merged by their row counts, which only the host waits of a "
                    "variable-size dispatch give); pass 0"
                )
            xs, scales = checks.tokens(op, "x", x, hidden=c.hidden, device=c.device, allow_fp8=True)
            t = xs.shape[0]
            too_many = t > c.max_tokens_per_rank
            checks.max_tokens(op, t, c.max_tokens_per_rank)
            state, alignment, native_check = self._dispatch_checks(
                op, t, topk_idx, topk_weights, handle, expert_alignment, num_worst_tokens)
            _check_previous_event(previous_event, op)
        except ArgumentError as refusal:
            if handle is None:
                # (else the kind of the others' round is unknown; and where the round has no host wait (a CUDA
                # num_worst_tokens dispatch) a void round leaves every rank's Buffer unusable, which only too many
                # tokens, a refusal that can differ from rank to rank, is worth: the others refusals stay local)
                if self._worst_known(num_worst_tokens) and (too_many or self._id_checks(num_worst_tokens)[0]):
                    if xs is None:  # (x itself refused: a bf16 row, as after a layout's refusal)
                        xs, scales = torch.empty(0, c.hidden, dtype=torch.bfloat16, device=c.device), None
                    self._void_dispatch(refusal, xs, scales, num_worst_tokens)
            else:
                self._tell_refusal(op, refusal)
            raise
        assert xs is not None

        # the caller's stream, on which zero-copy outputs record their release
        caller = current_raw_stream(c.device) if c.device.type == "cuda" else None

        extra = {"check_ids": True} if native_check else {}

        def run() -> Any:
            return self._impl.dispatch(
                xs, scales, topk_idx, topk_weights, state, alignment, num_worst_tokens, caller_stream=caller,
                **extra,
            )

        out, event = self._run(run, previous_event, async_finish, [xs, scales, topk_idx, topk_weights])
        counts, counts_t = out.num_tokens_per_expert, out.num_tokens_per_expert_tensor
        if handle is None:
            num_recv = num_worst_tokens if num_worst_tokens else out.num_recv_tokens
            if not counts and counts_t.numel() and counts_t.device.type == "cpu":
                counts = [int(v) for v in counts_t.tolist()]  # (num_worst_tokens on CPU: no sync to avoid)
            handle = DispatchHandle(self._id, t, num_recv, out.state, num_worst_tokens, list(counts), counts_t,
                                    alignment)
        else:  # a cached dispatch: its handle's dispatch's rows (the tensor itself: a copy made here, on the
            # caller's stream, could read it before that dispatch's stream wrote it)
            counts = list(handle.counts)
            if handle.counts_tensor is not None:
                counts_t = handle.counts_tensor
        recv_x: Tokens = (out.x, out.x_scales) if out.x_scales is not None else out.x
        return DispatchResult(recv_x, out.topk_idx, out.topk_weights, counts, handle, event, counts_t)

    def _dispatch_checks(
        self, op: str, t: int, topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None,
        handle: DispatchHandle | None, expert_alignment: int, num_worst_tokens: int,
    ) -> tuple[Any, int, bool]:
        """A dispatch's checks of its routing (the handle's, or topk_idx and topk_weights of ``t`` tokens): returns
        the handle's backend state (None: a fresh dispatch), the alignment of its counts, and whether the backend
        checks the ids in its call (check_ids). ArgumentError for a refusal."""
        c = self.ctx
        state = None
        native_check = False
        if handle is not None:
            h = self._check_handle(op, handle, DispatchHandle)
            if topk_idx is not None or topk_weights is not None:
                raise ArgumentError(f"Buffer.{op}: with 'handle', 'topk_idx' and 'topk_weights' must be None")
            if t != h.num_tokens:
                raise ArgumentError(
                    f"Buffer.{op}: argument 'x' has {t} tokens but the handle was made for {h.num_tokens}"
                )
            if num_worst_tokens and num_worst_tokens != h.num_worst_tokens:
                raise ArgumentError(
                    f"Buffer.{op}: argument 'num_worst_tokens' = {num_worst_tokens} differs from the handle's "
                    f"({h.num_worst_tokens}; 0 means the handle's dispatch had a variable size)"
                )
            # (the call returns the handle's dispatch's counts, as that dispatch aligned them: another alignment
            # would be silently ignored)
            if expert_alignment not in (1, h.expert_alignment):
                raise ArgumentError(
                    f"Buffer.{op}: argument 'expert_alignment' = {expert_alignment} differs from the handle's "
                    f"({h.expert_alignment}): a cached dispatch returns the counts of the handle's dispatch, aligned "
                    "as that dispatch aligned them; pass that value, or leave it out (1)"
                )
            return h.state, h.expert_alignment, False
        if isinstance(topk_idx, DispatchHandle):
            raise ArgumentError(
                f"Buffer.{op}: argument 'topk_idx' is a DispatchHandle: pass a handle by name, dispatch(x, handle=h) "
                "(the second positional argument is topk_idx)"
            )
        if topk_idx is None or topk_weights is None:
            raise ArgumentError(f"Buffer.{op}: 'topk_idx' and 'topk_weights' are required without a handle")
        if num_worst_tokens == 0 and c.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ArgumentError(
                f"Buffer.{op}: inside a CUDA graph capture a fresh dispatch needs argument 'num_worst_tokens' "
                "> 0 (without it the row count comes from the host's wait for the count exchange, which a "
                "capture cannot make); or pass the handle of an earlier dispatch"
            )
        # with num_worst_tokens a CUDA dispatch does not wait on the host: only a backend that checks the ids
        # in its kernels without a host wait checks them then (a refusal surfaces at the next call); on CPU the
        # check costs no device sync
        host_ok, in_call = self._id_checks(num_worst_tokens)
        want = self._settings.check_values and in_call
        idx = checks.topk_idx(
            op, topk_idx, num_tokens=t, num_topk=c.num_topk, num_experts=c.num_experts, device=c.device,
            check_values=False,
        )
        # ids a layout just checked are not checked again (one use of its memo); else a backend that checks
        # them itself saves the separate min/max, its device copy and the sync: its verdict travels with the
        # count exchange, so that a refusal on one rank voids the call on every rank at once (this rank raises
        # ArgumentError, the others PeerRefusedError) before any row moves
        if want and not checks.take_checked(idx, c.num_experts):
            if getattr(self._impl, "checks_dispatch_ids", False) and checks.needs_id_check(idx, True):
                native_check = True
            elif host_ok:
                checks.topk_idx(
                    op, idx, num_tokens=t, num_topk=c.num_topk, num_experts=c.num_experts, device=c.device,
                    check_values=True,
                )
        checks.topk_weights(op, topk_weights, num_tokens=t, num_topk=c.num_topk, device=c.device)
        return state, expert_alignment, native_check

    def _worst_known(self, num_worst_tokens: object) -> bool:
        """Whether a fresh dispatch's ``num_worst_tokens`` passes its checks, so that the kind of round the other
        ranks run is known and a void round can pair with it (_void_dispatch)."""
        return (isinstance(num_worst_tokens, int) and not isinstance(num_worst_tokens, bool)
                and 0 <= num_worst_tokens <= checks.MAX_ROWS and not (num_worst_tokens and self.num_rounds > 1))

    def _id_checks(self, num_worst_tokens: int) -> tuple[bool, bool]:
        """Whether a fresh dispatch's ids can be checked with a host wait (none with num_worst_tokens on CUDA), and
        whether they can be checked in the call at all (there, or by a backend that checks them in its kernels
        without a wait)."""
        host_ok = num_worst_tokens == 0 or self.ctx.device.type == "cpu"
        return host_ok, host_ok or bool(getattr(self._impl, "checks_ids_without_wait", False))

    def _void_dispatch(self, refusal: ArgumentError, xs: torch.Tensor, scales: torch.Tensor | None,
                       num_worst_tokens: int, where: str = "") -> None:
        """Before this rank refuses a fresh dispatch for its own arguments (``refusal``, which the caller raises next:
        more tokens than max_tokens_per_rank, a dtype, shape or device, topk_weights, expert_alignment, a layout's
        refusal; ``xs``: its x, or an empty bf16 one where x itself was refused): where the backend refuses a round
        on every rank (its id check travels with the count exchange), a one-token round with an expert id this rank's
        check refuses makes the call void on every rank, so the others raise PeerRefusedError naming this rank at once
        instead of waiting for it until their timeout, and every Buffer stays usable (as for a bad id: a rank that
        ran the round with num_worst_tokens cannot raise and its Buffer is unusable from then on). Elsewhere (a
        CUDA num_worst_tokens dispatch of a backend that checks ids only with a host wait, a graph capture) only
        this rank raises; the others' call (without a host wait there) returns, and their next collectives wait for
        this rank until their bound (the process group's timeout over NCCL). A void round that times out (no peer
        dispatched; ``where`` says where it was to meet them) raises PeerTimeoutError carrying the refusal.

        In rounds (tokens_per_round) the void round is the others' round 0 (RoundsBackend.void_dispatch): they learn
        of the refusal before any of their rounds moves rows, and whatever kind of rows they send."""
        c = self.ctx
        if (not getattr(self._impl, "checks_dispatch_ids", False) or checks._capturing(c.device)
                or not self._id_checks(num_worst_tokens)[1]):
            return
        x1 = torch.zeros(1, c.hidden, dtype=xs.dtype, device=c.device)
        s1 = None if scales is None else torch.ones(1, c.hidden // 128, dtype=torch.float32, device=c.device)
        idx = torch.full((1, c.num_topk), c.num_experts, dtype=torch.int64, device=c.device)
        w = torch.zeros(1, c.num_topk, dtype=torch.float32, device=c.device)
        caller = current_raw_stream(c.device) if c.device.type == "cuda" else None
        call = getattr(self._impl, "void_dispatch", self._impl.dispatch)

        def run() -> Any:
            return call(x1, s1, idx, w, None, 1, num_worst_tokens, caller_stream=caller, check_ids=True)

        try:
            self._run(run, None, False, [x1, s1, idx, w])
        except (ArgumentError, PeerRefusedError):
            pass  # (this rank's refusal, and perhaps others': the caller raises this rank's own reason)
        except PeerTimeoutError as late:
            raise PeerTimeoutError(
                f"{refusal} -- and the void round that was to tell the other ranks{where} timed out: {late}"
            ) from refusal

    def _tell_refusal(self, op: str, refusal: ArgumentError) -> None:
        """A call that this rank refuses for its arguments (``refusal``, which the caller raises next), told to the
        other ranks, which may be in that call already, where the backend can: ``refuse`` (a cached dispatch or a
        combine) or ``low_latency_refuse`` (a low-latency call), as the Buffer's mode has it, where its
        ``refusal_reaches_peers`` / ``low_latency_refusal_reaches_peers`` says they tell the others (the torch
        backend on CPU groups, whose such calls start with an exchange of each rank's call; there the others raise
        PeerRefusedError naming this rank, nothing moved, every Buffer usable). Elsewhere (the torch backend on GPUs,
        with no host wait to raise from; the nvshmem backend, whose normal rows carry their handle's tag in their
        flags and whose low-latency receive has no host wait) it stays this rank's: the others' call waits for it
        until their timeout, or pairs with this rank's next call (docs/usage.md, "Refusals on one rank"). Not inside
        a CUDA graph capture. A round that times out (no peer made a call) raises PeerTimeoutError carrying the
        refusal; one that fails, RuntimeError carrying it."""
        ll = self.ctx.low_latency
        refuse = getattr(self._impl, "low_latency_refuse" if ll else "refuse", None)
        reaches = getattr(self._impl, "low_latency_refusal_reaches_peers" if ll else "refusal_reaches_peers", None)
        if refuse is None or reaches is None or not reaches() or checks._capturing(self.ctx.device):
            return
        try:
            self._run(lambda: refuse(op, str(refusal)), None, False, [])
        except PeerTimeoutError as late:
            raise PeerTimeoutError(
                f"{refusal} -- and the void round that was to tell the other ranks timed out: {late}"
            ) from refusal
        except RuntimeError as failed:  # (the Buffer failed earlier, or the group's collective raised)
            raise RuntimeError(
                f"{refusal} -- and the void round that was to tell the other ranks failed: {failed}"
            ) from refusal

    def combine(
        self,
        y: torch.Tensor,
        handle: DispatchHandle,
        *,
        topk_weights: torch.Tensor | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        bf16_partial_sums: bool = False,
    ) -> CombineResult:
        """y [R, H] bf16/fp32 (rows as the dispatch gave them) -> x [T, H], each token's rows summed in float32.
        topk_weights float32 [R, K], if given, are summed the same way. Does not wait on the host.

        ``bf16_partial_sums`` (bf16 y only; an extension of SPEC.md): in a group of several nodes, the sum of a
        token's rows on each other node (made there in float32) comes home as one bf16 row instead of float32: half
        the bytes between nodes, and the output carries, besides its own rounding, up to half a bf16 unit of each
        other node's partial sum. The rows of the token's own node are summed in float32 as without it; the summed
        ``topk_weights`` stay float32. Within one node it changes nothing. Every rank must pass the same value: the
        nvshmem backend's receivers leave partials of the other kind unread and the next call raises RuntimeError
        naming the sender; the torch backend refuses the call on CPU groups (each rank rounds as it asked on GPUs).

        A refusal of this rank's arguments (ArgumentError) reaches the other ranks on CPU groups of the torch backend
        (they raise PeerRefusedError naming this rank, nothing moved, every Buffer usable); elsewhere it stays this
        rank's: repeat the call with good arguments there (it pairs with the others' pending combine) or stop every
        rank (docs/usage.md, "Refusals on one rank")."""
        op = "combine"
        self._check_alive(op)
        self._check_mode(op, False)
        c = self.ctx
        try:  # (a refusal reaches the other ranks where the backend can: _tell_refusal)
            checks.flags(op, async_finish=async_finish, bf16_partial_sums=bf16_partial_sums)
            h = self._check_handle(op, handle, DispatchHandle)
            ys = checks.tensor(
                op, "y", y, dtypes=checks.FLOAT_DTYPES, ndim=2, device=c.device, shape=(h.num_recv_tokens, c.hidden),
                row_aligned=True,
            )
            if bf16_partial_sums and ys.dtype != torch.bfloat16:
                raise ArgumentError(
                    f"Buffer.{op}: argument 'bf16_partial_sums' = True needs y in bfloat16, y is {ys.dtype} (a "
                    "float32 combine keeps its partial sums in float32)"
                )
            if topk_weights is not None:
                checks.topk_weights(op, topk_weights, num_tokens=h.num_recv_tokens, num_topk=c.num_topk,
                                    device=c.device)
            _check_previous_event(previous_event, op)
        except ArgumentError as refusal:
            self._tell_refusal(op, refusal)
            raise
        # (only where they exist: several nodes; every backend takes the keyword)
        part_bf16 = bf16_partial_sums and c.ranks_per_node < c.num_ranks

        def run() -> Any:
            return self._impl.combine(ys, h.state, topk_weights, part_bf16)

        (x, w), event = self._run(run, previous_event, async_finish, [ys, topk_weights])
        return CombineResult(x, w, event)

    # -- low-latency mode ---------------------------------------------------------------------------------------
    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        *,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        topk_weights: torch.Tensor | None = None,
        bf16_partial_sums: bool = False,
    ) -> LowLatencyDispatchResult:
        """x bf16 [T, H] (T <= max_tokens_per_rank), topk_idx int64 [T, K] -> per-expert receive slots.

        CUDA-graph capturable, with no host wait in the graph. Eagerly, the call waits on the host for its
        expert-id range check (LARGEEP_CHECK_VALUES=0 skips it; on nvshmem a check kernel on the Buffer's stream, so
        after the Buffer's earlier work). ``use_ue8m0`` rounds scales to powers of two (kept as float32);
        ``round_scale`` does the same. With ``return_recv_hook`` the call only issues the sends and ``hook()``
        completes the receive. Every rank must pass the same ``use_fp8``: the nvshmem backend's receivers leave rows
        of the other kind unread and their next call raises RuntimeError naming the sender (the Buffer unusable); the
        torch backend refuses the call on CPU groups and does not check it on GPUs (docs/usage.md).

        ``topk_weights`` (float32 [T, K], optional; an extension of SPEC.md): the weights the combine of this
        handle will apply, sent now with the tokens, so that the nvshmem backend's combine sums each token's
        outputs on the experts' rank and sends one sum per (token, rank) where a token has two or more experts on
        a rank (float32 sums, sent as two bf16 rows: about half the bytes at 2 ranks, a quarter fewer at 4). The
        combine must then get this very tensor, unchanged (ArgumentError otherwise; a change in place goes unseen
        for an inference tensor, which has no version counter), and applies them as this call read them (each
        backend keeps a copy). The torch backend takes and checks it alike (its combine applies them at the
        source).

        ``bf16_partial_sums`` (needs ``topk_weights``): each such sum comes back as one bf16 row (its rounding)
        instead of two: half those bytes again, and the combine's output then carries, besides its own rounding, up
        to half a bf16 unit of each summed rank's partial sum (the torch backend rounds the same partial sums)."""
        op = "low_latency_dispatch"
        self._check_alive(op)
        self._check_mode(op, True)
        c = self.ctx
        # Every refusal of this rank's arguments voids the call on the other ranks too where the backend can tell
        # them (_tell_refusal); ranks refused alike meet in that void round, and all raise their own refusal.
        call: int | None = None
        try:
            checks.flags(op, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0, async_finish=async_finish,
                         return_recv_hook=return_recv_hook, bf16_partial_sums=bf16_partial_sums)
            xs = checks.tensor(op, "x", x, dtypes=(torch.bfloat16,), ndim=2, device=c.device, shape=(None, c.hidden),
                               row_aligned=True)
            t = xs.shape[0]
            if use_fp8 and c.hidden % 128:
                raise ArgumentError(
                    f"Buffer.{op}: argument 'use_fp8' = True needs hidden % 128 == 0, hidden is {c.hidden}"
                )
            idx = checks.topk_idx(
                op, topk_idx, num_tokens=t, num_topk=c.num_topk, num_experts=c.num_experts, device=c.device,
                check_values=False,
            )
            # a backend that checks the ids in a kernel of its own saves the min/max, its device copy and the device
            # sync
            check_ids = checks.needs_id_check(idx, self._settings.check_values)
            native_check = check_ids and getattr(self._impl, "checks_low_latency_ids", False)
            ws = None
            if topk_weights is not None:
                ws = checks.topk_weights(op, topk_weights, num_tokens=t, num_topk=c.num_topk, device=c.device)
            if bf16_partial_sums and ws is None:
                raise ArgumentError(
                    f"Buffer.{op}: argument 'bf16_partial_sums' = True needs 'topk_weights' (the sums it rounds are "
                    "made on the experts' ranks, with the weights sent with the tokens)"
                )
            rounding = bool(round_scale or use_ue8m0)
            call = self._check_in_flight(op)
            checks.max_tokens(op, t, c.max_tokens_per_rank)
            if check_ids and not native_check:
                checks.id_values(op, idx, c.num_experts)
        except ArgumentError as refusal:
            self._uncount_call(op, call)
            self._tell_refusal(op, refusal)
            raise
        extra: dict[str, Any] = {"check_ids": True} if native_check else {}
        if ws is not None:
            extra["topk_weights"] = ws
        if bf16_partial_sums:
            extra["bf16_partial_sums"] = True

        def run() -> Any:
            return self._impl.low_latency_dispatch(xs, topk_idx, use_fp8, rounding, return_recv_hook, **extra)

        keep: list[torch.Tensor | None] = [xs, topk_idx, ws]
        try:
            out, event = self._run(run, None, async_finish, keep, finished=not return_recv_hook)
        except (ArgumentError, PeerRefusedError, PeerTimeoutError):
            # refused or given up before anything was sent (the backend's id check, or its wait; a peer's refusal on
            # the torch backend)
            self._uncount_call(op, call)
            raise
        handle = LowLatencyHandle(self._id, t, out.state, received=not return_recv_hook, weights=ws,
                                  weights_version=_version_of(ws) if ws is not None else None,
                                  topk_idx=topk_idx if ws is not None else None,
                                  topk_idx_version=_version_of(topk_idx) if ws is not None else None)
        hook = self._wrap_hook(out.finish, op, call, handle) if return_recv_hook else None
        recv_x: Tokens = (out.x, out.x_scales) if out.x_scales is not None else out.x
        return LowLatencyDispatchResult(recv_x, out.num_tokens_per_expert, out.src_info, handle, event, hook)

    def low_latency_combine(
        self,
        y: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        *,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
    ) -> LowLatencyCombineResult:
        """y bf16 [E/N, N*M, H] -> x bf16 [T, H] = sum_k topk_weights[t, k] * y[expert, row of t] (float32 sums),
        over the k whose copy the handle's dispatch sent (its topk_idx[t, k] named an expert) and that topk_idx
        (int64 [T, K]) still names: a k the dispatch did not send adds nothing whatever topk_idx says there, and -1
        at a k that was sent leaves that k out; a k that was sent takes the row of the expert the dispatch named
        there (the only row it has). For a k that repeats an earlier k's expert, the row is that expert's. On CPU
        groups topk_idx's values are checked (ArgumentError for one outside [-1, E)); on GPUs they are not (no host
        wait), and such an id counts as -1. ``out`` must be writable in place (not a leaf that requires grad, not
        an inference tensor outside inference mode).
        A dispatch given topk_weights needs this topk_idx to be its own tensor, unchanged (ArgumentError otherwise:
        the experts' ranks sum over the k they got). No host wait on GPUs (on CPU groups the torch backend's call,
        its send with ``return_recv_hook`` too, first exchanges a marker that names the call, so it waits for every
        rank to reach it, up to LARGEEP_TIMEOUT_S); CUDA-graph capturable; topk_idx, topk_weights
        (unless sent at dispatch) and ``out`` are read and written when the receive runs (with
        ``return_recv_hook``: when the hook runs)."""
        op = "low_latency_combine"
        self._check_alive(op)
        self._check_mode(op, True)
        c = self.ctx
        call: int | None = None
        try:  # (a refusal reaches the other ranks where the backend can: _tell_refusal)
            checks.flags(op, async_finish=async_finish, return_recv_hook=return_recv_hook)
            h = self._check_handle(op, handle, LowLatencyHandle)
            if h.hook_error is not None:
                raise RuntimeError(
                    f"Buffer.{op}: argument 'handle' comes from a low_latency_dispatch whose receive hook raised: "
                    f"this Buffer failed earlier (low_latency_dispatch on rank {self.rank} raised {h.hook_error} in "
                    "its receive hook); that dispatch's rows were not received and the Buffer is unusable now "
                    "(destroy it on every rank)"
                )
            if not h.received:
                raise ArgumentError(
                    f"Buffer.{op}: argument 'handle' comes from a low_latency_dispatch whose receive hook has not "
                    "been called (call it first: until then the dispatch's rows have not been received)"
                )
            rows = c.num_ranks * c.max_tokens_per_rank
            ys = checks.tensor(
                op, "y", y, dtypes=(torch.bfloat16,), ndim=3, device=c.device,
                shape=(c.experts_per_rank, rows, c.hidden), row_aligned=True,
            )
            # the ids' values on CPU groups, where reading them costs no host wait (on GPUs an id outside [-1, E)
            # counts as -1: the dispatch's ids were checked, and a combine has no host wait)
            checks.topk_idx(
                op, topk_idx, num_tokens=h.num_tokens, num_topk=c.num_topk, num_experts=c.num_experts,
                device=c.device,
                check_values=c.device.type == "cpu" and checks.needs_id_check(topk_idx, self._settings.check_values),
            )
            checks.topk_weights(op, topk_weights, num_tokens=h.num_tokens, num_topk=c.num_topk, device=c.device)
            _refuse_unless_kept(
                op, "topk_weights", topk_weights, h.weights, h.weights_version,
                "which its rows carry to the experts' ranks to be applied there; pass that tensor unchanged, or "
                "dispatch without topk_weights",
            )
            _refuse_unless_kept(
                op, "topk_idx", topk_idx, h.topk_idx, h.topk_idx_version,
                "so the experts' ranks sum each token's outputs over the experts it named there, and other ids cannot "
                "be applied to those sums; pass the dispatch's topk_idx unchanged, or dispatch without topk_weights",
            )
            if out is None:
                out = torch.empty(h.num_tokens, c.hidden, dtype=torch.bfloat16, device=c.device)
            else:
                checks.tensor(
                    op, "out", out, dtypes=(torch.bfloat16,), ndim=2, device=c.device,
                    shape=(h.num_tokens, c.hidden), row_aligned=True,
                )
                checks.writable(op, "out", out)
            call = self._check_in_flight(op)
        except ArgumentError as refusal:
            self._uncount_call(op, call)
            self._tell_refusal(op, refusal)
            raise
        target = out

        def run() -> Any:
            return self._impl.low_latency_combine(ys, topk_idx, topk_weights, h.state, target, return_recv_hook)

        # (target too: the Buffer's stream writes it, and a caller that drops the result before waiting on its event
        # must not see its memory reused meanwhile)
        try:
            finish, event = self._run(run, None, async_finish, [ys, topk_idx, topk_weights, target],
                                      finished=not return_recv_hook)
        except (ArgumentError, PeerRefusedError, PeerTimeoutError):
            # refused before anything was sent (on CPU groups, ranks in other calls)
            self._uncount_call(op, call)
            raise
        hook = self._wrap_hook(finish, op, call) if return_recv_hook else None
        return LowLatencyCombineResult(target, event, hook)

    def _check_in_flight(self, op: str) -> int | None:
        """Refuses a low-latency call that would need the receive slots of a call whose hook is still due (two
        calls of one op in flight at most, SPEC.md): on the GPU it would wait for that hook, queued after it on the
        same stream, until LARGEEP_TIMEOUT_S. Returns the call's number (None while capturing a CUDA graph, whose
        replays the host cannot count)."""
        if self._stream is not None and torch.cuda.is_current_stream_capturing():
            return None
        call = self._ll_calls[op]
        late = [n for n in self._ll_pending[op] if n <= call - 2]
        if late:
            raise ArgumentError(
                f"Buffer.{op}: the receive hook of the {op} {call - min(late)} calls before this one has not been "
                "called; at most two calls of one op may be in flight (call that hook first)"
            )
        self._ll_calls[op] = call + 1
        return call

    def _uncount_call(self, op: str, call: int | None) -> None:
        """A low-latency call that ``_check_in_flight`` numbered ``call`` was refused before anything was sent: it
        takes no place among the calls in flight (the next call gets its number)."""
        if call is not None:
            self._ll_calls[op] = call

    def _wrap_hook(
        self, finish: Callable[[], None] | None, op: str, call: int | None, handle: LowLatencyHandle | None = None
    ) -> Callable[[], None]:
        """The receive hook of low-latency call ``call`` of ``op`` (None: captured in a graph, not counted);
        ``handle``: a dispatch's, marked received once the hook has issued the receive.

        A hook runs once. A call refused before the receive starts (after destroy(), or inside / outside a capture
        unlike its call) leaves it callable. Once the receive was attempted the hook is spent, whether it was issued
        or raised: a receive that raised may have run in part (the backend then marks the Buffer unusable, the
        other ranks having sent their rows), so it is not run again; the call leaves the calls in flight (the
        Buffer's next call raises the backend's error, not a refusal for a hook still due), and a dispatch's handle
        records the error and stays unreceived, so that a combine given it raises that error instead of reading
        counts and rows that were never written."""
        spent: list[str | None] = [None]  # set once the receive was attempted: "" it was issued, else what it raised
        if call is not None:
            self._ll_pending[op].add(call)
        # a hook runs its receive where its send went: inside the CUDA graph capture that holds the send, or eagerly
        # (an eager send's receive captured into a graph would not run now; a captured send's receive run eagerly
        # would wait for a send that has not run); _check_in_flight numbered the call unless it was captured
        captured = call is None

        def hook() -> None:
            if spent[0] is not None:
                raised = f" (its first call raised {spent[0]})" if spent[0] else ""
                raise RuntimeError(f"largeep: Buffer.{op}: a receive hook may be called once{raised}")
            self._check_alive(f"{op} (its receive hook)")
            if self._stream is not None and torch.cuda.is_current_stream_capturing() != captured:
                where = ("inside a CUDA graph capture", "outside one") if captured else \
                    ("outside a CUDA graph capture", "inside one")
                raise ArgumentError(
                    f"Buffer.{op}: its receive hook was made {where[0]} and is called {where[1]}: call it where the "
                    "call was made (in the same capture, or eagerly)"
                )
            try:
                self._run_receive(finish)
            except BaseException as exc:
                spent[0] = f"{type(exc).__name__}: {exc}"[:300]
                if handle is not None:
                    handle.hook_error = spent[0]
                raise
            else:
                spent[0] = ""
                if handle is not None:
                    handle.received = True
            finally:
                if call is not None:
                    self._ll_pending[op].discard(call)

        return hook

    def _run_receive(self, finish: Callable[[], None] | None) -> None:
        """A receive hook's ``finish`` on the Buffer's stream, ordered after the caller's stream and before it."""
        if finish is None:
            return
        if self._stream is None:
            finish()
            return
        if self._is_finished_call(None, False):
            assert self._finished is not None
            self._finished.run(finish)
            return
        compute = torch.cuda.current_stream(self._stream.device)
        self._stream.wait_stream(compute)
        with _on_stream(self._stream, compute):
            finish()
        compute.wait_stream(self._stream)


def _int_level_streams(device: torch.device) -> bool:
    """Whether this torch has the int-level stream calls _FinishedCalls uses, in the shape it expects (else calls
    take the general path)."""
    if None in (_GET_STREAM, _SET_STREAM, RAW_STREAM) or device.index is None:
        return False
    try:
        got = _GET_STREAM(device.index)  # type: ignore[misc]
    except (RuntimeError, TypeError):
        return False
    return isinstance(got, tuple) and len(got) == 3 and all(isinstance(v, int) for v in got)


@contextlib.contextmanager
def _on_stream(stream: torch.cuda.Stream, current: torch.cuda.Stream) -> Iterator[None]:
    """``torch.cuda.stream(stream)`` for the common case where ``current`` is the current stream of the current
    device, which is ``stream``'s device: two cheap stream switches instead of the context's device lookups (this
    runs on every call). Any other case takes ``torch.cuda.stream``."""
    if torch.cuda.current_device() != stream.device.index:
        with torch.cuda.stream(stream):
            yield
        return
    torch.cuda.set_stream(stream)
    try:
        yield
    finally:
        torch.cuda.set_stream(current)


def _check_previous_event(previous_event: object, op: str | None = None) -> None:
    """``op``: the call, which the refusal names (None: a call that checked it already)."""
    if previous_event is not None and not isinstance(previous_event, EventOverlap):
        raise ArgumentError(f"Buffer.{op or 'call'}: argument 'previous_event' must be an EventOverlap (a call's "
                            f".event) or None, got {type(previous_event).__name__}")


def _all_arrive(group: dist.ProcessGroup, op: str, rank: int, timeout_s: float) -> None:
    """Buffer creation's first exchange, on a group where gloo moves CPU tensors: every rank arrives within
    ``timeout_s`` (LARGEEP_TIMEOUT_S), else PeerTimeoutError naming the ranks that did not, instead of the gather
    after it waiting for the process group's own timeout (30 minutes on gloo) for a rank that never creates its
    Buffer. Each rank sends one number to every other and waits for theirs (point to point, so that a rank knows
    whose did not come; a timed-out receive closes its gloo connection, so a late rank fails at once rather than
    wait in the gather alone). On NCCL alone the group's own timeout applies (a collective there is not bounded
    from the host)."""
    n = dist.get_world_size(group)
    if n == 1 or not _collective.on_gloo(group, torch.device("cpu")):
        return
    ranks = dist.get_process_group_ranks(group)
    mine = torch.tensor([rank], dtype=torch.int32)
    got = {p: torch.full((1,), -1, dtype=torch.int32) for p in range(n) if p != rank}
    deadline = time.monotonic() + timeout_s
    missing: list[int] = []
    gone: dict[int, str] = {}  # the ranks whose connection failed (a rank that gave up on this one closed it)
    recvs: dict[int, Any] = {}
    sends: list[Any] = []
    for p, t in got.items():  # (posting fails at once on a closed connection)
        try:
            recvs[p] = dist.irecv(t, src=ranks[p], group=group, tag=_ARRIVE_TAG)
            sends.append(dist.isend(mine, dst=ranks[p], group=group, tag=_ARRIVE_TAG))
        except RuntimeError as exc:
            gone[p] = _collective.gloo_words(exc)
    for p, work in recvs.items():
        if p in gone:
            continue
        try:  # (at least 1 ms: torch's waits count whole milliseconds, and 0 ms is no bound)
            work.wait(timeout=timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
        except RuntimeError as exc:
            if "timed out" in _collective.first_line(exc).lower():
                missing.append(p)
            else:
                gone[p] = _collective.gloo_words(exc)
    if missing or gone:
        said = []
        if missing:
            said.append(f"waited in vain for ranks {missing} of its group (of {n}) to create their Buffer "
                        f"(LARGEEP_TIMEOUT_S={timeout_s:g} s): a rank did not create the Buffer, or failed before it")
        if gone:
            p0 = min(gone)
            said.append(f"lost its connection to ranks {sorted(gone)} (rank {p0}: {gone[p0][:200]}): a rank that "
                        "crashed, or waited longer than its LARGEEP_TIMEOUT_S for this one and gave up, closes it")
        raise PeerTimeoutError(f"{op}: rank {rank} " + "; it ".join(said)
                               + "; the group is out of step now (destroy it, and give the next Buffer a new group)")
    # (every rank's number came, so every rank has posted its receives: the sends complete)
    _collective.wait_all(sends, timeout_s, f"{op}: rank {rank} could not send its arrival to every rank of the group",
                         ": the group is out of step now (destroy it, and give the next Buffer a new group)")


# the tag of Buffer creation's arrival messages (_all_arrive)
_ARRIVE_TAG = 0x1AE9
# num_sms's default (fewer where the GPU has fewer SMs)
DEFAULT_SMS = 24


def _gpu_sms(device: torch.device | None = None) -> int | None:
    """The SM count of CUDA ``device`` (None: the current CUDA device), None for another device or without CUDA."""
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is None or device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _record_stream(t: torch.Tensor, stream: torch.cuda.Stream) -> None:
    """``t.record_stream(stream)``, and the same for a zero-copy dispatch output of any nvshmem Buffer, whose receive
    slot torch's allocator does not manage."""
    t.record_stream(stream)
    _zero_copy_read([t], int(stream.cuda_stream))


def _zero_copy_read(ts: list[torch.Tensor | None], stream: int) -> None:
    """The slot of each zero-copy dispatch output among ``ts`` (of any nvshmem Buffer) waits for ``stream`` too
    before its release (the backend module is only looked at once something imported it)."""
    zc = sys.modules.get("largeep.backends.nvshmem_backend")
    if zc is not None:
        for t in ts:
            if t is not None:
                zc.record_zero_copy(t, stream)


def _tensors_of(result: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) result of tuples, lists and dataclasses that the caller gets. A list or tuple whose
    first item is a number holds numbers only (per-expert counts) and is not walked, nor is a backend's ``state``
    (a handle's tensors: made on the Buffer's stream and used by its kernels there only): this runs on every call."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        if not result or isinstance(result[0], (int, float)):
            return []
        return [t for r in result for t in _tensors_of(r)]
    names = _FIELDS.get(type(result))
    if names is None:
        if not hasattr(result, "__dataclass_fields__"):
            return []
        names = _FIELDS[type(result)] = tuple(n for n in result.__dataclass_fields__ if n != "state")
    return [t for name in names for t in _tensors_of(getattr(result, name))]


# the fields _tensors_of walks, by dataclass (looked up once per class)
_FIELDS: dict[type, tuple[str, ...]] = {}
