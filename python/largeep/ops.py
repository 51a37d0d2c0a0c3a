"""Dispatch and combine for autograd and ``torch.compile``, and the grouped GEMM that expert MLPs run on.

Two paths reach the same :class:`largeep.Buffer` calls.

Eager (``torch.autograd.Function``): :func:`dispatch` and :func:`combine` return tensors tied into autograd, keep
the Buffer's handle as a Python object, and take ``previous_event`` / ``async_finish`` so a caller can overlap
communication with compute. Each is the other's backward (SPEC.md: combine is the adjoint of dispatch):

- dispatch backward: ``combine`` of the grad of the received rows through the same handle; the grad of the
  received ``topk_weights`` (masked to entries whose expert is on the receiving rank) is summed home by the same
  call, which gives the grad of the caller's ``topk_weights``. A dispatch with ``bf16_partial_sums`` (bf16 x) makes
  that combine with ``bf16_partial_sums`` (each other node's partial sum of the gradient rows sent home as bf16).
- combine backward: a cached ``dispatch`` (handle given, no layout, no count exchange) of the grad of the output.
  With ``num_worst_tokens`` the rows past the received count get a zero grad (they never reach the output).

These backwards are differentiable in turn (each is the other's backward again), so second derivatives
(``create_graph=True``, e.g. a gradient penalty) are right on this path; the custom-op path raises for them.

Compiled (``torch.library`` custom ops, namespace ``largeep``): a Buffer is a Python object, which a graph cannot
hold, so a Buffer is registered once (:func:`register_buffer`, outside the compiled region) and ops take its int id.
A dispatch's handle lives in a registry and travels through the graph as a *ticket*: an int64 CPU tensor [1]
holding its key. :func:`dispatch` and :func:`combine` pick this path by themselves while
``torch.compiler.is_compiling()`` (or with ``use_custom_ops=True``). The ops:

==============================  =====================================================================================
``dispatch_send``               all communication of a dispatch; returns the ticket. Effectful (ordered). With
                                ``use_fp8`` it quantises x first and dequantises what arrives.
``dispatch_recv``               the received x [R, H], topk_idx [R, K], topk_weights [R, K] of a ticket; no
                                communication. R is ``num_worst_tokens``, or else an unbacked SymInt (the fake
                                implementation calls ``new_dynamic_size``, bounded by N * max_tokens_per_rank).
                                Carries the autograd formula of dispatch.
``dispatch_cached``             re-sends a new x [T, H] with a ticket's routing (combine's backward). Effectful.
``combine``                     y [R, H] (+ topk_weights [R, K]) -> [T, H] (+ [T, K]). Effectful. Carries the
                                autograd formula of combine.
``low_latency_dispatch``        and ``low_latency_combine``: the low-latency mode (no autograd). Effectful.
``grouped_mm``                  ``out[offs[e-1]:offs[e]] = a[offs[e-1]:offs[e]] @ b[e]`` with autograd
                                (``grouped_mm_wgrad`` is the weight grad).
==============================  =====================================================================================

Why a send/recv pair: the communication ops are registered effectful (``EffectType.ORDERED``) so that no graph
pass reorders them or drops one (every rank must issue the same collectives in the same order), but an effectful
op that creates an unbacked size breaks Inductor in torch 2.13; the pure ``dispatch_recv`` creates it instead.

Variable row counts under ``torch.compile``: ``fullgraph=True`` captures ``dispatch_recv`` (it turns on
``capture_dynamic_output_shape_ops`` for the frame); without ``fullgraph`` set
``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` or Dynamo breaks the graph there. With
``num_worst_tokens`` > 0 every shape is static and no setting is needed (and nothing waits on the host).

Handle lifetime in the registry: a handle counts the backward calls still to come (hold flags, fixed when the
forward is traced: one for ``dispatch_recv`` when grad flows to x or topk_weights, one for each ``combine`` whose y
needs grad); each backward call drops one, and the handle is freed once a combine or a backward call leaves the
count at zero (so inference frees it at the combine, training at the last backward call, in either order). Eagerly
(``use_custom_ops=True``) each of those counts belongs to the autograd node that will make the call: should the node
die without making it (a backward that did not reach it, e.g. ``torch.autograd.grad`` of the expert weights alone; a
graph dropped before its backward), it gives the count back, and the handle is freed with its graph once a combine
has used it. A compiled graph's backward is one node that makes every call, so a partial backward that reaches it
frees there too. What stays is a handle no combine has used (the caller may still combine it) and those of a
compiled graph whose backward never runs; as a safety net each Buffer keeps at most ``max_live_handles`` (oldest
dropped first, with a warning the first time; a later use of one names the limit), and :func:`release_handles` frees
them all. Using a freed handle raises; so does a second backward through the same graph. A call refused for its
arguments (``ArgumentError``, raised before anything is sent) leaves the handle and its count as they were, for a
corrected call; any other failure counts as the call made. So a low-latency handle is freed by its combine, also by
a combine that fails, except one refused for its arguments.

For an MoE layer of your own around :func:`dispatch` and :func:`combine` (your router, your experts), the steps
between them are here too, each differentiable and compilable without a host wait: :func:`expert_order` sorts the
received (row, k) entries by local expert (offsets per expert, each entry's position, each position's row),
:func:`gather_rows` or plain indexing gathers the rows in that order, :func:`grouped_mm` runs one GEMM per expert,
and :func:`weighted_row_sum` sums each received row's outputs with its received weights (the expert side applies
the weights: the combine is an unweighted sum). docs/usage.md, "Your own MoE layer on largeep.ops", has the recipe.

The grouped GEMM uses ``torch._grouped_mm`` (there in torch 2.13: on CPU it runs float32, bfloat16 and
float16, with every non-unit stride a multiple of 16 bytes; its meta function accepts only bfloat16, hence the
custom op). Where the native kernel cannot run (strides, dtype, device) a padded ``torch.bmm`` over
[groups, max rows per group, K] does the same work; no Python loop over groups either way.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from largeep import _collective, _inductor_order, checks, fp8
from largeep._env import logger
from largeep.backends.base import current_raw_stream, on_device
from largeep.buffer import Buffer, DispatchHandle, EventOverlap, LowLatencyHandle, _record_stream
from largeep.errors import ArgumentError

__all__ = [
    "CombineOutput",
    "DispatchOutput",
    "LowLatencyDispatchOutput",
    "OpHandle",
    "TicketHandle",
    "buffer_of",
    "capture_event",
    "checkpoint_context_fn",
    "checkpoint_policy",
    "combine",
    "dispatch",
    "expert_activation",
    "expert_order",
    "gather_rows",
    "grouped_mm",
    "grouped_mm_backend",
    "grouped_mm_stats",
    "live_handles",
    "low_latency_combine",
    "low_latency_dispatch",
    "register_buffer",
    "release_handles",
    "reset_grouped_mm_stats",
    "sm_carveout",
    "wait",
    "weighted_row_sum",
]

DEFAULT_MAX_LIVE_HANDLES = 256
_EVICTED_KEPT = 4096

# ---------------------------------------------------------------------------------------------------------------
# Registry: Buffers by int id, handles by ticket
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """A live handle. ``pending`` holds a dispatch's outputs between ``dispatch_send`` and ``dispatch_recv``;
    ``valid_rows`` (bool [R, 1], the registry's own: the returned topk_idx may be changed in place or its memory
    reused once the caller is done with it) marks the received rows when ``num_worst_tokens`` > 0."""

    handle: DispatchHandle | LowLatencyHandle
    num_worst_tokens: int = 0
    valid_rows: Tensor | None = None
    pending: tuple[Tensor, Tensor, Tensor] | None = None
    refs: int = 0  # backward calls still to come
    # of those, the ones an eager op call added that no autograd node has taken yet (see _Hold); a compiled
    # graph's are never taken
    unclaimed: int = 0
    combined: bool = False  # a combine has used it


class _Registry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffers: weakref.WeakValueDictionary[int, Buffer] = weakref.WeakValueDictionary()
        self.ids: weakref.WeakKeyDictionary[Buffer, int] = weakref.WeakKeyDictionary()
        self.limits: dict[int, int] = {}
        self.entries: dict[int, OrderedDict[int, _Entry]] = {}
        self.next_buffer = itertools.count(1)
        self.next_ticket = itertools.count(1)
        # ids of Buffers that died, whose entries are dropped under the lock (see _forget_buffer)
        self.forgotten: list[int] = []
        # (buffer id, ticket) of each _Hold whose autograd node died before making its backward call
        self.released: list[tuple[int, int]] = []
        # the latest tickets evicted by max_live_handles, per Buffer (to name the limit in a later call's error)
        self.evicted: dict[int, OrderedDict[int, None]] = {}


_REG = _Registry()


def _drop_forgotten() -> None:
    """(Under the registry's lock.) Drops the entries of Buffers that died since, and the counts of holds given
    back since: an entry whose count that leaves at zero is freed if a combine has used it (before one has, the
    caller may still combine it, as after an inference dispatch)."""
    while _REG.forgotten:
        bid = _REG.forgotten.pop()
        _REG.entries.pop(bid, None)
        _REG.limits.pop(bid, None)
        _REG.evicted.pop(bid, None)
    while _REG.released:
        bid, tid = _REG.released.pop()
        entries = _REG.entries.get(bid)
        entry = entries.get(tid) if entries is not None else None
        if entry is not None:
            entry.refs -= 1
            if entry.refs <= 0 and entry.combined:
                del entries[tid]  # type: ignore[union-attr]


def _drop_forgotten_now() -> None:
    """For finalizers: _drop_forgotten if the registry's lock is free, else the next locked section does it (the
    garbage collector may run a finalizer in a thread that holds the lock, inside an allocation in a locked
    section, so a finalizer never waits for it)."""
    if _REG.lock.acquire(blocking=False):
        try:
            _drop_forgotten()
        finally:
            _REG.lock.release()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """The registry's lock, after dropping the entries of Buffers that died since and the holds given back."""
    with _REG.lock:
        _drop_forgotten()
        yield


class _Hold:
    """One backward call still to come on a handle (one of its ``refs``), owned by the eager autograd node that will
    make it: dispatch_recv's (whose backward is a combine) or a combine's (whose backward is a cached dispatch).
    The backward takes it. Should the node die without having made its call -- a backward that did not reach it
    (``torch.autograd.grad`` of other inputs only, a weights-only backward), or a graph dropped before its
    backward -- the hold is given back then, so that the handle goes with the graph that could still use it
    instead of staying until ``max_live_handles`` evicts it.

    The node keeps the ticket of its own forward: under activation checkpointing the recomputed forward's handles
    are held (and given back) by the recomputation's nodes, which die once it has run."""

    __slots__ = ("buffer_id", "live", "ticket", "tid")

    def __init__(self, buffer_id: int, ticket: Tensor, tid: int) -> None:
        self.buffer_id, self.ticket, self.tid, self.live = buffer_id, ticket, tid, True

    def take(self) -> Tensor:
        """For the backward call: the ticket, once (a second backward through the same graph raises before
        anything is sent)."""
        if not self.live:
            raise RuntimeError(
                "largeep.ops: a second backward through the same graph is not supported on the custom-op path (the "
                "first one released the dispatch's handle); run the forward again"
            )
        self.live = False
        return self.ticket

    def __del__(self) -> None:
        if self.live:
            try:
                _REG.released.append((self.buffer_id, self.tid))
                _drop_forgotten_now()
            except Exception:  # noqa: BLE001 - at interpreter exit the registry may be gone
                pass


def _claim(buffer_id: int, ticket: Tensor) -> _Hold | None:
    """For an autograd node's setup: takes one of the holds that the eager op call just made added to the count of
    ``ticket``'s entry. None while traced (no op has run; the ticket is fake) and after an op that did not run
    (a selective checkpoint's recomputation returns the saved outputs)."""
    if type(ticket) is not Tensor or ticket.device.type != "cpu" or is_fake(ticket):
        return None
    tid = int(ticket.reshape(-1)[0])
    with _locked():
        entries = _REG.entries.get(buffer_id)
        entry = entries.get(tid) if entries is not None else None
        if entry is None or entry.unclaimed <= 0:
            return None
        entry.unclaimed -= 1
    return _Hold(buffer_id, ticket, tid)


def register_buffer(buffer: Buffer, *, max_live_handles: int | None = None) -> int:
    """Gives ``buffer`` an int id that the custom ops take (call it outside any compiled region). Idempotent:
    a Buffer registered again keeps its id, and its limit unless ``max_live_handles`` is given (None: keep the
    Buffer's limit, DEFAULT_MAX_LIVE_HANDLES for a new one; MoELayer and the ops register the Buffers they get with
    None, so a limit raised before stays). The registry holds the Buffer weakly."""
    if not isinstance(buffer, Buffer):
        raise ArgumentError(f"register_buffer: argument 'buffer' must be a largeep.Buffer, got {type(buffer).__name__}")
    if max_live_handles is not None:
        if isinstance(max_live_handles, bool) or not isinstance(max_live_handles, int):
            raise ArgumentError(
                f"register_buffer: argument 'max_live_handles' must be an int, got {type(max_live_handles).__name__}"
            )
        if max_live_handles < 1:
            raise ArgumentError(f"register_buffer: argument 'max_live_handles' must be >= 1, got {max_live_handles}")
    with _locked():
        bid = _REG.ids.get(buffer)
        if bid is None:
            bid = next(_REG.next_buffer)
            _REG.ids[buffer] = bid
            _REG.buffers[bid] = buffer
            _REG.entries[bid] = OrderedDict()
            weakref.finalize(buffer, _forget_buffer, bid)  # its handles (and their tensors) go with it
        if max_live_handles is None:
            _REG.limits.setdefault(bid, DEFAULT_MAX_LIVE_HANDLES)
        else:
            _REG.limits[bid] = max_live_handles
    return bid


def _forget_buffer(bid: int) -> None:
    # A Buffer's finalizer: the garbage collector may run it in a thread that holds the registry's lock (an
    # allocation inside a locked section), so it never waits for the lock; it leaves the id for the next locked
    # section, and drops the entries now only if the lock is free.
    _REG.forgotten.append(bid)
    _drop_forgotten_now()


def buffer_of(buffer_id: int) -> Buffer:
    """The Buffer registered as ``buffer_id``."""
    buf = _REG.buffers.get(buffer_id)
    if buf is None:
        raise ArgumentError(f"largeep.ops: no live Buffer is registered as id {buffer_id} (see register_buffer)")
    return buf


def release_handles(buffer_id: int) -> int:
    """Drops every handle still held for ``buffer_id`` (e.g. after an optimizer step); returns how many."""
    with _locked():
        entries = _REG.entries.get(buffer_id)
        n = len(entries) if entries is not None else 0
        if entries is not None:
            entries.clear()
    return n


def live_handles(buffer_id: int) -> int:
    """How many handles the registry holds for ``buffer_id``."""
    with _locked():
        return len(_REG.entries.get(buffer_id, ()))


def _put(buffer_id: int, entry: _Entry) -> Tensor:
    with _locked():
        entries = _REG.entries[buffer_id]
        tid = next(_REG.next_ticket)
        entries[tid] = entry
        while len(entries) > _REG.limits[buffer_id]:
            old, _ = entries.popitem(last=False)
            evicted = _REG.evicted.setdefault(buffer_id, OrderedDict())
            if not evicted:
                logger.warning(
                    "largeep.ops: Buffer id %d holds more than max_live_handles = %d dispatch handles; the oldest "
                    "are dropped from now on (see largeep.ops.register_buffer and release_handles)",
                    buffer_id, _REG.limits[buffer_id],
                )
            evicted[old] = None
            while len(evicted) > _EVICTED_KEPT:
                evicted.popitem(last=False)
    return torch.tensor([tid], dtype=torch.int64, device="cpu")


def _get(buffer_id: int, ticket: Tensor, op: str) -> _Entry:
    """The entry of ``ticket`` (its count unchanged: see :func:`_settle`)."""
    tid = int(ticket.reshape(-1)[0])
    with _locked():
        entries = _REG.entries.get(buffer_id)
        entry = entries.get(tid) if entries is not None else None
        evicted = tid in _REG.evicted.get(buffer_id, ())
        owner = None if entry is not None else next((b for b, es in _REG.entries.items() if tid in es), None)
    if owner is not None:  # (tickets are numbered across Buffers)
        raise ArgumentError(f"largeep.ops.{op}: handle #{tid} comes from a dispatch on Buffer id {owner}, not on "
                            f"Buffer id {buffer_id} (argument 'buffer')")
    if entry is None:
        limit = _REG.limits.get(buffer_id, DEFAULT_MAX_LIVE_HANDLES)
        if evicted:
            raise RuntimeError(
                f"largeep.ops.{op}: handle #{tid} of Buffer id {buffer_id} was evicted: the Buffer held more than "
                f"max_live_handles = {limit} live handles, and the oldest are dropped. Raise the limit with "
                "largeep.ops.register_buffer(buf, max_live_handles=...) (at least the dispatches in flight between "
                "a forward and its backward: layers x chunks x micro-batches), or free the handles left behind "
                "(forwards whose combine or backward never ran) with largeep.ops.release_handles(buffer_id)"
            )
        raise RuntimeError(
            f"largeep.ops.{op}: handle #{tid} of Buffer id {buffer_id} was released (by the combine or backward "
            "call that was its last use, or by release_handles); on the custom-op path a handle takes no call after "
            "its last use: not a second backward through the same graph, nor a combine after the backward of a "
            "dispatch that no combine had used (the eager path allows both)"
        )
    return entry


def _settle(buffer_id: int, ticket: Tensor, refs: int, *, combined: bool = False) -> None:
    """Adds ``refs`` to the count of ``ticket``'s entry, if it is still there (added ones as holds an autograd node
    may claim), and frees it if the count is <= 0: after a call that used the entry (its arguments accepted), so
    that one refused for them leaves the entry as it was, for a corrected call."""
    tid = int(ticket.reshape(-1)[0])
    with _locked():
        entries = _REG.entries.get(buffer_id)
        entry = entries.get(tid) if entries is not None else None
        if entry is not None:
            entry.refs += refs
            entry.unclaimed += max(refs, 0)
            entry.combined = entry.combined or combined
            if entry.refs <= 0:
                del entries[tid]  # type: ignore[union-attr]


def _drop(buffer_id: int, ticket: Tensor) -> None:
    """Frees the entry of ``ticket`` if it is still there (release_handles or eviction may have freed it)."""
    tid = int(ticket.reshape(-1)[0])
    with _locked():
        entries = _REG.entries.get(buffer_id)
        if entries is not None:
            entries.pop(tid, None)


def _ticket_like() -> Tensor:
    return torch.empty(1, dtype=torch.int64, device="cpu")


def _fresh(outputs: tuple[Tensor, ...], inputs: tuple[Tensor | None, ...] = ()) -> tuple[Tensor, ...]:
    """Clones outputs that share storage with an input or an earlier output (custom ops may not return aliases;
    a backend may hand back views of one receive buffer, e.g. all its empty outputs)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    out = []
    for t in outputs:
        ptr = t.untyped_storage().data_ptr()
        if t.numel() == 0 or ptr in seen:
            t = t.clone()
        else:
            seen.add(ptr)
        out.append(t)
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------------
# Grouped GEMM
# ---------------------------------------------------------------------------------------------------------------

_NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16,),
}
# torch._grouped_mm runs its CUTLASS kernel on these CUDA majors (sm90, sm100); elsewhere it loops over the groups
# after copying offs to the host, which is no better than the padded bmm
_NATIVE_CUDA_MAJORS = (9, 10)
_native_failed: dict[tuple[str, torch.dtype], str] = {}
_calls: dict[str, int] = {}  # "native" or "padded_bmm (why)" -> calls since the last reset_grouped_mm_stats()
_calls_lock = threading.Lock()


def _strides_ok(t: Tensor) -> bool:
    """torch._grouped_mm's layout rule on the matrix (last two) dims: one stride is 1, the other a multiple of 16
    bytes and at least the size of the dim with stride 1 -- a dim of size 1 included (a [1, 30] float32 operand,
    or one with strides (1, 1), is refused); batch dims are not checked. Data 16-byte aligned."""
    if t.data_ptr() % 16 or t.dim() < 2:
        return False
    (r, c), (sr, sc) = t.shape[-2:], t.stride()[-2:]
    per16 = 16 // t.element_size()
    if sc == 1:
        return sr % per16 == 0 and sr >= max(1, c)
    if sr == 1:
        return sc % per16 == 0 and sc >= max(1, r)
    return False


@functools.cache
def _props_of(index: int) -> Any:
    return torch.cuda.get_device_properties(index)


def _props(device: torch.device) -> Any:
    """The properties of CUDA ``device`` (compute capability, SMs), looked up once per GPU: the grouped GEMM and
    the gather ask on every call, and torch's lookup costs several microseconds of host time."""
    return _props_of(device.index if device.index is not None else torch.cuda.current_device())


def _fallback_reason(a: Tensor, b: Tensor) -> str | None:
    """Why ``torch._grouped_mm`` cannot run ``a`` [P, K] x ``b`` [G, K, N] here (None: it can)."""
    dev = a.device.type
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if a.dtype not in _NATIVE_DTYPES.get(dev, ()):
        return f"dtype {a.dtype} on {dev}"
    failed = _native_failed.get((dev, a.dtype))
    if failed is not None:
        return failed
    if dev == "cuda" and _props(a.device).major not in _NATIVE_CUDA_MAJORS:
        return f"compute capability {torch.cuda.get_device_capability(a.device)} (the kernel needs sm90 or sm100)"
    if a.dtype != b.dtype:
        return f"a is {a.dtype}, b is {b.dtype}"
    if b.shape[-1] * a.element_size() % 16 or not _strides_ok(a) or not _strides_ok(b):
        return f"strides not multiples of 16 bytes (a {tuple(a.stride())}, b {tuple(b.stride())})"
    return None


def grouped_mm_backend(a: Tensor, b: Tensor) -> str:
    """"native" when ``torch._grouped_mm`` can run ``a`` [P, K] x ``b`` [G, K, N] (dtype, device, 16-byte
    strides), else "padded_bmm"."""
    return "native" if _fallback_reason(a, b) is None else "padded_bmm"


def grouped_mm_stats() -> dict[str, int]:
    """Grouped GEMMs run (forward and backward) since the last :func:`reset_grouped_mm_stats`, by backend:
    ``"native"`` (``torch._grouped_mm``) or ``"padded_bmm (<why the native kernel was not used>)"``."""
    with _calls_lock:
        return dict(_calls)


def reset_grouped_mm_stats() -> None:
    """Clears the counts of :func:`grouped_mm_stats`."""
    with _calls_lock:
        _calls.clear()


def _count(backend: str) -> None:
    with _calls_lock:
        _calls[backend] = _calls.get(backend, 0) + 1


def _group_rows(offs: Tensor, used: int) -> tuple[Tensor, Tensor, int]:
    """Rows [0, used) -> (group int64 [used], position in the group int64 [used], max rows of a group)."""
    o = offs.to(torch.int64)
    starts = torch.cat([o.new_zeros(1), o[:-1]])
    counts = o - starts
    cap = int(counts.max()) if counts.numel() else 0
    rows = torch.arange(used, device=o.device)
    grp = torch.searchsorted(o, rows, right=True)
    return grp, rows - starts[grp], cap


def _padded(t: Tensor, grp: Tensor, pos: Tensor, groups: int, cap: int) -> Tensor:
    out = t.new_zeros(groups, cap, t.shape[1])
    out[grp, pos] = t[: grp.numel()]
    return out


def _try_native(fn: Any) -> tuple[Tensor | None, str | None]:
    """The native kernel's output, or None and why it failed (the caller runs the fallback, then _native_off)."""
    try:
        out = fn()
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        return None, f"torch._grouped_mm failed: {_collective.first_line(exc)}"
    _count("native")
    return out, None


def _native_off(a: Tensor, why: str) -> None:
    """The native kernel failed where the padded bmm then ran on the same inputs: an unsupported combination (not
    a caller's mistake, which the fallback would have refused too), so the fallback serves it from now on."""
    _native_failed[(a.device.type, a.dtype)] = why
    logger.warning("largeep: %s (%s %s); using the padded bmm from now on", why, a.device, a.dtype)


def _clear_tail(out: Tensor, offs: Tensor, used: int) -> Tensor:
    """Zeroes rows [offs[-1], P) of ``out``: a slice when ``used`` (= offs[-1]) is known on the host, else a masked
    pass over the whole output (no host sync)."""
    if used >= 0:
        if used < out.shape[0]:
            out[used:].zero_()
        return out
    past = torch.arange(out.shape[0], device=out.device) >= offs[-1]
    return out.masked_fill_(past.unsqueeze(1), 0)


try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # a torch without it: never bypass the ops
    _get_current_dispatch_mode = None  # type: ignore[assignment]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _direct(*tensors: Tensor) -> bool:
    """Whether an eager call may run a custom op's body directly: plain tensors (not meta, fake or another
    subclass), no compiling, tracing or dispatch mode (fake tensors, meta), and no input needing a gradient (the
    op's autograd is then not needed). The op's dispatch costs host time on every call (about 20 us on the GPU
    machine, two grouped GEMMs and two more ops per expert call), which a chunked layer pays per chunk."""
    if _get_current_dispatch_mode is None or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    for t in tensors:
        if type(t) not in _PLAIN or t.is_meta:
            return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _grouped_mm_impl(a: Tensor, b: Tensor, offs: Tensor, used: int, clear_tail: bool = True) -> Tensor:
    why = _fallback_reason(a, b)
    failed = None
    if why is None and offs.numel():
        out, failed = _try_native(lambda: torch._grouped_mm(a, b, offs=offs))
        if out is not None:  # the kernel leaves rows past offs[-1] unwritten
            return _clear_tail(out, offs, used) if clear_tail else out
        why = failed
    _count(f"padded_bmm ({why or 'no groups'})")
    if used < 0:
        used = int(offs[-1]) if offs.numel() else 0  # the fallback waits on the host for the row counts
    grp, pos, cap = _group_rows(offs, used)
    res = torch.bmm(_padded(a, grp, pos, b.shape[0], cap), b)
    out = a.new_zeros(a.shape[0], b.shape[2])
    out[:used] = res[grp, pos]
    if failed is not None:
        _native_off(a, failed)
    return out


def _grouped_mm_wgrad_impl(a: Tensor, g: Tensor, offs: Tensor, used: int) -> Tensor:
    """a [P, K], g [P, N] -> [G, K, N] with ``out[e] = a[rows of e].T @ g[rows of e]`` (rows past offs[-1] unused)."""
    groups = offs.shape[0]
    why = _fallback_reason(a, g.unsqueeze(0))
    failed = None
    if why is None and groups:
        out, failed = _try_native(lambda: torch._grouped_mm(a.t(), g, offs=offs))
        if out is not None:
            return out
        why = failed
    _count(f"padded_bmm ({why or 'no groups'})")
    if used < 0:
        used = int(offs[-1]) if groups else 0
    grp, pos, cap = _group_rows(offs, used)
    res = torch.bmm(_padded(a, grp, pos, groups, cap).transpose(1, 2), _padded(g, grp, pos, groups, cap))
    if failed is not None:
        _native_off(a, failed)
    return res


@torch.library.custom_op(
    "largeep::grouped_mm", mutates_args=(),
    schema="(Tensor a, Tensor b, Tensor offs, int used=-1, bool clear_tail=True) -> Tensor",
)
def _grouped_mm_op(a: Tensor, b: Tensor, offs: Tensor, used: int = -1, clear_tail: bool = True) -> Tensor:
    return _grouped_mm_impl(a, b, offs, used, clear_tail)


@_grouped_mm_op.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor, used: int = -1, clear_tail: bool = True) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[2])


@torch.library.custom_op(
    "largeep::grouped_mm_wgrad", mutates_args=(), schema="(Tensor a, Tensor g, Tensor offs, int used=-1) -> Tensor"
)
def _grouped_mm_wgrad_op(a: Tensor, g: Tensor, offs: Tensor, used: int = -1) -> Tensor:
    return _grouped_mm_wgrad_impl(a, g, offs, used)


@_grouped_mm_wgrad_op.register_fake
def _(a: Tensor, g: Tensor, offs: Tensor, used: int = -1) -> Tensor:
    return a.new_empty(offs.shape[0], a.shape[1], g.shape[1])


def _gmm_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    a, b, offs, used, clear_tail = inputs
    ctx.used = used
    ctx.clear_tail = clear_tail
    ctx.save_for_backward(a, b, offs)


def _gmm_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
    """ga = grad @ b[e].T per group (its rows past offs[-1] cleared as the forward's were: without clear_tail they
    are unspecified, which the caller promised never to read); gb from the rows below offs[-1] only, so whatever
    the rows of ``a`` and ``grad`` past it hold (NaN included) does not reach it."""
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    ga = _grouped_mm_op(grad, b.transpose(1, 2), offs, ctx.used, ctx.clear_tail) if ctx.needs_input_grad[0] else None
    gb = _grouped_mm_wgrad_op(a, grad, offs, ctx.used) if ctx.needs_input_grad[1] else None
    return ga, gb, None, None, None


_grouped_mm_op.register_autograd(_gmm_backward, setup_context=_gmm_setup)


def _wgrad_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    a, g, offs, used = inputs
    ctx.used = used
    ctx.save_for_backward(a, g, offs)


def _wgrad_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
    """The weight gradient's own gradients (a second derivative through the expert weights, e.g. a penalty on
    their gradient): from ``out[e] = a[rows of e].T @ g[rows of e]``, ``ga = g @ grad[e].T`` and
    ``gg = a @ grad[e]`` per group, both grouped GEMMs (differentiable in turn), their rows past offs[-1] zero (the
    forward read none of them)."""
    a, g, offs = ctx.saved_tensors
    grad = grad.contiguous()
    ga = _grouped_mm_op(g, grad.transpose(1, 2), offs, ctx.used, True) if ctx.needs_input_grad[0] else None
    gg = _grouped_mm_op(a, grad, offs, ctx.used, True) if ctx.needs_input_grad[1] else None
    return ga, gg, None, None


_grouped_mm_wgrad_op.register_autograd(_wgrad_backward, setup_context=_wgrad_setup)


# ---------------------------------------------------------------------------------------------------------------
# The order of a dispatch's (row, k) entries by local expert (the expert GEMMs' input order)
# ---------------------------------------------------------------------------------------------------------------


def _order_sizes(r: int, k: int, num_pairs: int) -> tuple[int, int]:
    """(src length, pad) for R*K entries of which num_pairs (-1: not known) name a local expert."""
    if num_pairs < 0:
        return r * k, -1
    pad = num_pairs if num_pairs < r * k else -1
    return num_pairs + (pad >= 0), pad


@torch.library.custom_op(
    "largeep::expert_order", mutates_args=(),
    schema="(Tensor idx, int num_experts, int num_pairs) -> (Tensor, Tensor, Tensor)",
)
def _expert_order_op(idx: Tensor, num_experts: int, num_pairs: int) -> tuple[Tensor, Tensor, Tensor]:
    return _expert_order_impl(idx, num_experts, num_pairs)


def _expert_order_impl(idx: Tensor, num_experts: int, num_pairs: int) -> tuple[Tensor, Tensor, Tensor]:
    r, k = idx.shape
    e = num_experts
    src_len, pad = _order_sizes(r, k, num_pairs)
    # (the native sort numbers the pairs with int32: more than 2**31 - 1 take the torch ops)
    C = _native_rows() if idx.is_cuda and 1 <= e <= 1024 and r * k < 2**31 else None
    if C is not None:
        # one native call (a stable counting sort, three small kernels) instead of some fifteen torch ops
        # (outputs of a custom op may not share storage: one allocation each)
        idx = idx.contiguous()
        dev = idx.device
        pos = torch.empty(r, k, dtype=torch.int64, device=dev)
        src = torch.empty(src_len, dtype=torch.int64, device=dev)
        offs = torch.empty(e, dtype=torch.int32, device=dev)
        work = torch.empty(C.expert_order_work(r * k, e), dtype=torch.int32, device=dev)
        with on_device(dev):
            C.expert_order(idx.data_ptr(), r, k, e, offs.data_ptr(), work.data_ptr(), pos.data_ptr(),
                           src.data_ptr(), src_len, pad, current_raw_stream(dev))
        return offs, src, pos
    return _expert_order_torch(idx, e, num_pairs)


def _expert_order_torch(idx: Tensor, e: int, num_pairs: int) -> tuple[Tensor, Tensor, Tensor]:
    """expert_order in torch ops (any device): a stable argsort of the keys, then scatters."""
    r, k = idx.shape
    pad = _order_sizes(r, k, num_pairs)[1]
    key = torch.where((idx >= 0) & (idx < e), idx, e).reshape(-1)
    order = torch.argsort(key, stable=True)  # entries by local expert; entries naming none last
    counts = torch.zeros(e + 1, dtype=torch.int64, device=key.device).scatter_add_(0, key, torch.ones_like(key))
    offs = torch.cumsum(counts[:e], 0).to(torch.int32)
    if num_pairs < 0:
        # every entry has a row; those naming no local expert sit past offs[-1]
        src = order // k
        pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return offs, src, pos.view(r, k)
    src = order[:num_pairs] // k
    if pad >= 0:
        src = torch.cat([src, src.new_zeros(1)])
    pos = torch.full((r * k,), max(pad, 0), dtype=torch.int64, device=order.device)
    pos.scatter_(0, order[:num_pairs], torch.arange(num_pairs, device=order.device))
    return offs, src, pos.view(r, k)


@_expert_order_op.register_fake
def _(idx: Tensor, num_experts: int, num_pairs: int) -> tuple[Tensor, Tensor, Tensor]:
    r, k = idx.shape
    src_len, _ = _order_sizes(r, k, num_pairs)
    return (idx.new_empty(num_experts, dtype=torch.int32), idx.new_empty(src_len, dtype=torch.int64),
            idx.new_empty(r, k, dtype=torch.int64))


def expert_order(
    topk_idx: Tensor, num_experts: int, num_pairs: int | None = None
) -> tuple[Tensor, Tensor, Tensor, int | None]:
    """The (row, k) entries of ``topk_idx`` int64 [R, K] (local expert ids; -1 or any id outside [0, num_experts)
    names none) in a stable order by expert -- a stable argsort of the keys, entries naming none last.

    Returns (offs int32 [E] inclusive end of each expert's entries, src int64 the row of the entry at each position,
    pos int64 [R, K] each entry's position, pad):
      - num_pairs None: every entry has a position (those naming none past offs[-1]); src [R*K]; pad None.
      - num_pairs (the number of entries naming an expert, known on the host): src [num_pairs], plus one extra row 0
        at position pad = num_pairs that every entry naming none points at, when there are such entries (else pad
        None). ``num_pairs`` must be right; the result is undefined otherwise.
    On CUDA with the native module (up to 1024 experts): one counting sort, no host sync; elsewhere torch ops
    (argsort and scatters). A custom op (compiles without a graph break)."""
    if not isinstance(topk_idx, Tensor) or topk_idx.dtype != torch.int64 or topk_idx.dim() != 2:
        what = f"{topk_idx.dtype} {tuple(topk_idx.shape)}" if isinstance(topk_idx, Tensor) else type(topk_idx).__name__
        raise ArgumentError(f"expert_order: topk_idx must be an int64 [R, K] tensor, got {what}")
    r, k = topk_idx.shape
    if num_experts < 1:
        raise ArgumentError(f"expert_order: num_experts must be >= 1, got {num_experts}")
    if num_pairs is not None and not 0 <= num_pairs <= r * k:
        raise ArgumentError(f"expert_order: num_pairs must be in [0, {r * k}] (R * K), got {num_pairs}")
    pairs = -1 if num_pairs is None else num_pairs
    op = _expert_order_impl if _direct(topk_idx) else _expert_order_op
    offs, src, pos = op(topk_idx, num_experts, pairs)
    pad = _order_sizes(r, k, pairs)[1]
    return offs, src, pos, pad if pad >= 0 else None


def _native_rows() -> Any:
    from largeep import native

    return native.module() if native.unavailable_reason() is None else None


# ---------------------------------------------------------------------------------------------------------------
# The experts' gated activation: bias add and act(gate, up) of the first grouped GEMM's output
# ---------------------------------------------------------------------------------------------------------------

ACT_SILU, ACT_CLAMPED = 0, 1  # expert_activation's kinds


def _row_experts(h: Tensor, offs: Tensor) -> Tensor:
    """The expert of each row of h (sorted by expert, offs: inclusive ends); len(offs) for rows past offs[-1]."""
    return torch.searchsorted(offs, torch.arange(h.shape[0], device=h.device, dtype=offs.dtype), right=True)


def _biased(h: Tensor, bias: Tensor | None, offs: Tensor) -> Tensor:
    """h plus each row's expert's bias row (rows past offs[-1]: nothing), in h's dtype."""
    if bias is None:
        return h
    return h + torch.cat([bias, bias.new_zeros(1, bias.shape[1])])[_row_experts(h, offs)]


def _expert_act_torch(h: Tensor, bias: Tensor | None, offs: Tensor, kind: int, alpha: float, limit: float) -> Tensor:
    f = h.shape[1] // 2
    h = _biased(h, bias, offs)
    g, u = h[:, :f], h[:, f:]
    if kind == ACT_SILU:
        return F.silu(g) * u
    g = g.clamp(max=limit)
    return (u.clamp(-limit, limit) + 1) * (g * torch.sigmoid(g * alpha))


def _expert_act_grad_torch(grad: Tensor, h: Tensor, bias: Tensor | None, offs: Tensor, kind: int, alpha: float,
                           limit: float) -> Tensor:
    """The gradient of _expert_act_torch's output with respect to h ([P, 2F], in h's dtype), in torch ops at least
    float32 (differentiable: the path of a backward with create_graph)."""
    f = h.shape[1] // 2
    wide = torch.promote_types(h.dtype, torch.float32)
    hb = _biased(h, bias, offs).to(wide)
    g, u, d = hb[:, :f], hb[:, f:], grad.to(wide)
    if kind == ACT_SILU:
        s = torch.sigmoid(g)
        dg, du = d * u * s * (1 + g * (1 - s)), d * g * s
    else:
        gc, uc = g.clamp(max=limit), u.clamp(-limit, limit)
        s = torch.sigmoid(gc * alpha)
        dg = torch.where(g <= limit, d * (uc + 1) * (s + gc * alpha * s * (1 - s)), 0.0)
        du = torch.where((u >= -limit) & (u <= limit), d * gc * s, 0.0)
    return torch.cat([dg, du], dim=1).to(h.dtype)


def _native_expert_rows_ok(x: Tensor, offs: Tensor, cols: int, *same: Tensor | None) -> bool:
    """Whether largeep's expert-side row kernels (expert_act, row_bias_add, segment_row_sum) take x: CUDA bf16/fp32
    2-D rows whose blocks of ``cols`` columns are 16-byte multiples, offs int32 on the device, and x and each of
    ``same`` (None: left out) of x's dtype, contiguous and 16-byte aligned (an empty view's pointer counts too: the
    launchers assert alignment before they look at the sizes)."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float32) and x.dim() == 2):
        return False
    if (cols * x.element_size()) % 16 or not (offs.is_cuda and offs.dtype == torch.int32):
        return False
    return all(t is None or (t.dtype == x.dtype and t.is_contiguous() and t.data_ptr() % 16 == 0)
               for t in (x, *same))


def _native_act_ok(h: Tensor, bias: Tensor | None, offs: Tensor, *more: Tensor) -> bool:
    """Whether largeep's activation kernels take these: h [P, 2F] (F of 16-byte multiples), bias None or
    [len(offs), 2F], and ``more`` as _native_expert_rows_ok says."""
    if h.dim() != 2 or h.shape[1] % 2 or not _native_expert_rows_ok(h, offs, h.shape[1] // 2, bias, *more):
        return False
    return bias is None or tuple(bias.shape) == (offs.shape[0], h.shape[1])


@torch.library.custom_op("largeep::segment_row_sum", mutates_args=(), schema="(Tensor g, Tensor offs) -> Tensor")
def _segment_row_sum_op(g: Tensor, offs: Tensor) -> Tensor:
    g = g.contiguous()
    e, n = offs.shape[0], g.shape[1]
    C = _native_rows() if e <= 65535 and _native_expert_rows_ok(g, offs, n) else None
    if C is None:
        return _segment_row_sum_torch(g, offs)
    out = g.new_empty(e, n)
    with on_device(g.device):
        C.segment_row_sum(g.data_ptr(), offs.contiguous().data_ptr(), e, out.data_ptr(), n, g.element_size(),
                          current_raw_stream(g.device))
    return out


@_segment_row_sum_op.register_fake
def _(g: Tensor, offs: Tensor) -> Tensor:
    return g.new_empty(offs.shape[0], g.shape[1])


def _segment_row_sum_torch(g: Tensor, offs: Tensor) -> Tensor:
    """Each expert's rows of g summed ([E, N] in g's dtype, accumulated in at least float32; an index_add on CPU,
    an index_put with accumulation elsewhere, the rows past offs[-1] going to a row that is dropped);
    differentiable. (index_put's accumulation on CPU adds in another order from call to call: its threads.)"""
    wide = torch.promote_types(g.dtype, torch.float32)
    out = g.new_zeros(offs.shape[0] + 1, g.shape[1], dtype=wide)
    rows = _row_experts(g, offs)
    if g.device.type == "cpu":
        out = out.index_add(0, rows, g.to(wide))
    else:
        out = out.index_put((rows,), g.to(wide), accumulate=True)
    return out[:-1].to(g.dtype)


def _bias_grad(g: Tensor, offs: Tensor) -> Tensor:
    """A per-expert bias's gradient from its rows' (g [P, N], rows sorted by expert): largeep's kernel on CUDA (the
    same bits on every call: expert-TP members' copies of b2 stay equal), torch ops where the backward records a
    graph (create_graph) or elsewhere."""
    return _segment_row_sum_torch(g, offs) if torch.is_grad_enabled() else _segment_row_sum_op(g, offs)


@torch.library.custom_op(
    "largeep::expert_act", mutates_args=(),
    schema="(Tensor h, Tensor? bias, Tensor offs, int kind, float alpha, float limit) -> Tensor",
)
def _expert_act_op(h: Tensor, bias: Tensor | None, offs: Tensor, kind: int, alpha: float, limit: float) -> Tensor:
    return _expert_act_impl(h, bias, offs, kind, alpha, limit)


def _expert_act_impl(h: Tensor, bias: Tensor | None, offs: Tensor, kind: int, alpha: float, limit: float) -> Tensor:
    C = _native_rows() if _native_act_ok(h, bias, offs) else None
    if C is None:
        return _expert_act_torch(h, bias, offs, kind, alpha, limit)
    f = h.shape[1] // 2
    offs = offs.contiguous()
    a = h.new_empty(h.shape[0], f)
    with on_device(h.device):
        C.expert_act(h.data_ptr(), bias.data_ptr() if bias is not None else 0, offs.data_ptr(), offs.shape[0],
                     a.data_ptr(), h.shape[0], f, h.element_size(), kind, alpha, limit, current_raw_stream(h.device))
    return a


@_expert_act_op.register_fake
def _(h: Tensor, bias: Tensor | None, offs: Tensor, kind: int, alpha: float, limit: float) -> Tensor:
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.custom_op(
    "largeep::expert_act_backward", mutates_args=(),
    schema="(Tensor grad, Tensor h, Tensor? bias, Tensor offs, int kind, float alpha, float limit) -> Tensor",
)
def _expert_act_backward_op(grad: Tensor, h: Tensor, bias: Tensor | None, offs: Tensor, kind: int, alpha: float,
                            limit: float) -> Tensor:
    grad = grad.contiguous()
    C = _native_rows() if _native_act_ok(h, bias, offs, grad) else None
    if C is None:
        return _expert_act_grad_torch(grad, h, bias, offs, kind, alpha, limit)
    dh = torch.empty_like(h)
    with on_device(h.device):
        C.expert_act_backward(grad.data_ptr(), h.data_ptr(), bias.data_ptr() if bias is not None else 0,
                              offs.contiguous().data_ptr(), offs.shape[0], dh.data_ptr(), h.shape[0],
                              h.shape[1] // 2, h.element_size(), kind, alpha, limit, current_raw_stream(h.device))
    return dh


@_expert_act_backward_op.register_fake
def _(grad: Tensor, h: Tensor, bias: Tensor | None, offs: Tensor, kind: int, alpha: float, limit: float) -> Tensor:
    return torch.empty_like(h)


def _ea_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    h, bias, offs, kind, alpha, limit = inputs
    ctx.args = (kind, alpha, limit)
    ctx.save_for_backward(h, bias, offs)


def _ea_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
    """dh by largeep's kernel (zero rows past offs[-1]), or in torch ops where a backward records a graph
    (create_graph: second derivatives) or the kernel does not take the tensors; the bias's gradient sums each
    expert's rows of dh (_bias_grad)."""
    h, bias, offs = ctx.saved_tensors
    kind, alpha, limit = ctx.args
    if torch.is_grad_enabled():
        dh = _expert_act_grad_torch(grad, h, bias, offs, kind, alpha, limit)
    else:
        dh = _expert_act_backward_op(grad, h, bias, offs, kind, alpha, limit)
    db = _bias_grad(dh, offs) if bias is not None and ctx.needs_input_grad[1] else None
    return (dh if ctx.needs_input_grad[0] else None), db, None, None, None, None


_expert_act_op.register_autograd(_ea_backward, setup_context=_ea_setup)


@torch.library.custom_op(
    "largeep::row_bias_add", mutates_args=(), schema="(Tensor x, Tensor bias, Tensor offs) -> Tensor",
)
def _row_bias_add_op(x: Tensor, bias: Tensor, offs: Tensor) -> Tensor:
    return _row_bias_add_impl(x, bias, offs)


def _row_bias_add_impl(x: Tensor, bias: Tensor, offs: Tensor) -> Tensor:
    C = _native_rows() if _native_bias_ok(x, bias, offs) else None
    if C is None:
        return _biased(x, bias, offs)
    y = torch.empty_like(x)
    with on_device(x.device):
        C.row_bias_add(x.data_ptr(), bias.data_ptr(), offs.contiguous().data_ptr(), offs.shape[0], y.data_ptr(),
                       x.shape[0], x.shape[1], x.element_size(), current_raw_stream(x.device))
    return y


def _native_bias_ok(x: Tensor, bias: Tensor, offs: Tensor) -> bool:
    """Whether largeep's row_bias_add kernel takes these: bias [len(offs), N] and x [P, N] as
    _native_expert_rows_ok says."""
    return x.dim() == 2 and _native_expert_rows_ok(x, offs, x.shape[1], bias) and \
        tuple(bias.shape) == (offs.shape[0], x.shape[1])


@_row_bias_add_op.register_fake
def _(x: Tensor, bias: Tensor, offs: Tensor) -> Tensor:
    return torch.empty_like(x)


def _rba_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(inputs[2])


def _rba_backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:
    """x's gradient is the output's as it is (also on the rows past offs[-1], which the kernel zeroes: the grouped
    GEMM that made x drops those rows' gradients); the bias's sums each expert's rows (_bias_grad)."""
    (offs,) = ctx.saved_tensors
    return grad, _bias_grad(grad, offs) if ctx.needs_input_grad[1] else None, None


_row_bias_add_op.register_autograd(_rba_backward, setup_context=_rba_setup)


def _row_bias_add(x: Tensor, bias: Tensor, offs: Tensor) -> Tensor:
    """x [P, N] (rows sorted by expert, offs int32 [E] their inclusive ends) plus each row's expert's row of ``bias``
    [E, N] (x's dtype). On CUDA with the native module one kernel (float32 add, one rounding; rows past offs[-1]
    zero), elsewhere torch ops (those rows as x's); differentiable in x and bias (x's gradient passes as it is, on
    every row: for a grouped GEMM's output, whose rows past offs[-1] nothing reads)."""
    op = _row_bias_add_impl if _direct(x, bias, offs) else _row_bias_add_op
    return op(x, bias, offs)  # type: ignore[no-any-return]


def _check_act_args(h13: Tensor, offs: Tensor, bias: Tensor | None, kind: int, limit: float) -> None:
    """expert_activation's argument checks: caller mistakes are refused here, not left to the kernel (which would
    take another device's pointer, or a bias of another dtype as h13's) or the torch ops (which would give another
    dtype, or treat any kind but ACT_SILU as ACT_CLAMPED)."""
    if not isinstance(h13, Tensor) or h13.dim() != 2 or h13.shape[1] % 2 or not h13.is_floating_point():
        what = f"{h13.dtype} {tuple(h13.shape)}" if isinstance(h13, Tensor) else type(h13).__name__
        raise ArgumentError(f"expert_activation: h13 must be a floating [P, 2F] tensor, got {what}")
    if not isinstance(offs, Tensor) or offs.dtype != torch.int32 or offs.dim() != 1 or offs.device != h13.device:
        what = f"{offs.dtype} {tuple(offs.shape)} on {offs.device}" if isinstance(offs, Tensor) else \
            type(offs).__name__
        raise ArgumentError(f"expert_activation: offs must be an int32 [E] tensor on {h13.device}, got {what}")
    want = (offs.shape[0], h13.shape[1])
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != want or bias.dtype != h13.dtype
                             or bias.device != h13.device):
        what = f"{bias.dtype} {tuple(bias.shape)} on {bias.device}" if isinstance(bias, Tensor) else \
            type(bias).__name__
        raise ArgumentError(f"expert_activation: bias must be None or a {h13.dtype} {want} tensor (E = len(offs), "
                            f"2F = h13's columns) on {h13.device}, got {what}")
    if not isinstance(kind, int) or isinstance(kind, bool) or kind not in (ACT_SILU, ACT_CLAMPED):
        raise ArgumentError(f"expert_activation: kind must be ACT_SILU ({ACT_SILU}) or ACT_CLAMPED ({ACT_CLAMPED}), "
                            f"got {kind!r}")
    if kind == ACT_CLAMPED and not float(limit) > 0:
        raise ArgumentError(f"expert_activation: limit must be > 0 with ACT_CLAMPED, got {limit!r}")


def expert_activation(
    h13: Tensor, offs: Tensor, bias: Tensor | None = None, kind: int = ACT_SILU, alpha: float = 1.702,
    limit: float = 7.0,
) -> Tensor:
    """The experts' gated activation of the first grouped GEMM's output h13 [P, 2F] (gate projection in columns
    [0, F), up projection in [F, 2F); rows sorted by expert, ``offs`` int32 [E] their inclusive end rows), plus each
    row's expert's ``bias`` [E, 2F] (in h13's dtype) when given -> [P, F] in h13's dtype; differentiable in h13 and
    bias. ``kind``: ``ACT_SILU`` (``silu(g) * u``) or ``ACT_CLAMPED`` (GPT-OSS's: ``(clamp(u, -limit, limit) + 1) *
    g' * sigmoid(alpha * g')``, ``g' = min(g, limit)``). On CUDA with the native module (bf16/fp32, F of a multiple
    of 16 bytes): one kernel, one read of h13 and one write of the result, float32 math (the bias added before any
    rounding), rows past offs[-1] written as zeros; its backward one kernel too (and the bias's gradient another, which
    sums each expert's rows in a fixed order). Elsewhere torch ops (rows past offs[-1] then follow their h13
    rows). ``offs`` must be non-decreasing with ``offs[-1] <= P`` (as ``grouped_mm``'s; not checked: that needs a
    host wait); the bias's gradient reads the rows up to ``offs[-1]``."""
    _check_act_args(h13, offs, bias, kind, limit)
    op = _expert_act_impl if (_direct(h13, bias, offs) if bias is not None else _direct(h13, offs)) else \
        _expert_act_op
    return op(h13, bias, offs, kind, float(alpha), float(limit))  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------------------------
# Weighted sum of each row's expert outputs
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "largeep::weighted_row_sum", mutates_args=(),
    schema="(Tensor src, Tensor pos, Tensor w, int pad, Tensor? count=None) -> Tensor",
)
def _weighted_row_sum_op(src: Tensor, pos: Tensor, w: Tensor, pad: int, count: Tensor | None = None) -> Tensor:
    return _weighted_row_sum_impl(src, pos, w, pad, count)


def _summed(pos: Tensor, pad: int, count: Tensor | None, rows: int) -> Tensor:
    """bool [R, K]: the entries weighted_row_sum adds (not pad, naming one of src's ``rows`` rows, and below count
    when given)."""
    keep = (pos != pad) & (pos >= 0) & (pos < rows)
    return keep & (pos < count) if count is not None else keep


def _weighted_row_sum_impl(src: Tensor, pos: Tensor, w: Tensor, pad: int, count: Tensor | None = None) -> Tensor:
    r, k = pos.shape
    if k == 0:  # (no entries: every row sums nothing; largeep's kernel takes 1 <= K <= 16)
        return src.new_zeros(r, src.shape[1])
    C = _native_rows() if _native_rows_ok(src, pos) and (count is None or count.is_cuda) else None
    if C is None:
        # embedding_bag: the same sum (its CUDA kernel is several times slower than largeep's on large rows). It
        # multiplies an entry's row by its weight even when the weight is 0, reads the row of every entry but its
        # padding_idx's, and fails on a position outside src (on CUDA, an assert that ends the process's CUDA
        # context). So every entry left out names the padding_idx instead: pad itself when there is no count, else
        # an appended zero row (entries at or past count may name rows that hold NaN, or lie past src, as the
        # native kernel allows). Without pad or count, the zero row is appended only if a position lies outside src
        # (on CUDA always: no host wait).
        n = src.shape[0]
        if count is None and pad >= 0:
            pos = torch.where(_summed(pos, pad, None, n), pos, pad)
        elif count is not None or pos.is_cuda or bool(((pos < 0) | (pos >= n)).any()):
            keep = _summed(pos, pad, count, n)
            pad = n
            src = torch.cat([src, src.new_zeros(1, src.shape[1])])
            pos = torch.where(keep, pos, pad)
        w_src = torch.where(_summed(pos, pad, None, src.shape[0]), w, 0.0).to(src.dtype)
        return F.embedding_bag(pos, src, mode="sum", per_sample_weights=w_src, padding_idx=pad if pad >= 0 else None)
    src, pos, w = src.contiguous(), pos.contiguous(), w.contiguous().float()
    y = src.new_empty(r, src.shape[1])
    with on_device(src.device):
        C.weighted_row_sum(src.data_ptr(), src.shape[0], src.element_size(), pos.data_ptr(), w.data_ptr(),
                           y.data_ptr(), r, k, src.shape[1], pad, count.data_ptr() if count is not None else 0,
                           current_raw_stream(src.device))
    return y


def _native_rows_ok(src: Tensor, pos: Tensor) -> bool:
    """Whether largeep's kernel takes these: CUDA bf16/fp32 rows of 16-byte multiples, 16-byte aligned,
    1 <= K <= 16."""
    return (
        src.is_cuda and src.dtype in (torch.bfloat16, torch.float32) and src.dim() == 2
        and (src.shape[1] * src.element_size()) % 16 == 0 and 1 <= pos.shape[1] <= 16 and pos.is_cuda
        and (not src.numel() or (src.is_contiguous() and src.data_ptr() % 16 == 0))
    )


@_weighted_row_sum_op.register_fake
def _(src: Tensor, pos: Tensor, w: Tensor, pad: int, count: Tensor | None = None) -> Tensor:
    return src.new_empty(pos.shape[0], src.shape[1])


def _wrs_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    src, pos, w, pad, count = inputs
    ctx.pad = pad
    ctx.save_for_backward(src, pos, w, count)


def _wrs_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, None, None]:
    """One top-k column at a time, so the temporaries are [R, H], never [R, K, H]:
    grad_src[pos[r, k]] = w[r, k] * grad[r] (each valid entry names its own row; duplicates add up) and
    grad_w[r, k] = <grad[r], src[pos[r, k]]> (0 for entries equal to pad, outside src, or at or past count). Every
    shape is static (no data-dependent selection or branch, which would break a compiled backward into pieces): an
    entry left out names an extra row P, zero in the copy of src that is read and dropped from grad_src, and its
    weight's grad is masked by torch.where (so that whatever its weight or grad hold, NaN included, goes nowhere);
    the rows of grad_src no valid entry names are zero."""
    src, pos, w, count = ctx.saved_tensors
    k, n = pos.shape[1], src.shape[0]
    valid = _summed(pos, ctx.pad, count, n)
    g32 = grad.float()
    # in src's dtype: each row gets one product, rounded once (rows named twice would be rounded per addition)
    g_src = src.new_zeros(n + 1, src.shape[1]) if ctx.needs_input_grad[0] else None
    g_w = torch.zeros(pos.shape, dtype=torch.float32, device=pos.device) if ctx.needs_input_grad[2] else None
    src_read = F.pad(src, (0, 0, 0, 1)) if g_w is not None else None  # (row n: zeros)
    for j in range(k):
        ok = valid[:, j]
        p = torch.where(ok, pos[:, j], n)
        if g_src is not None:
            g_src.index_add_(0, p, (g32 * w[:, j].float().unsqueeze(1)).to(src.dtype))
        if g_w is not None and src_read is not None:
            # in float32 throughout (a bf16 bmm returns its dot products rounded to bf16)
            g_w[:, j] = torch.where(ok, torch.linalg.vecdot(src_read[p].float(), g32), 0.0)
    return (
        g_src[:n] if g_src is not None else None,
        None,
        g_w.to(w.dtype) if g_w is not None else None,
        None,
        None,
    )


_weighted_row_sum_op.register_autograd(_wrs_backward, setup_context=_wrs_setup)


def weighted_row_sum(
    src: Tensor, pos: Tensor, w: Tensor, pad: int | None = None, count: Tensor | None = None
) -> Tensor:
    """``y[r] = sum_k w[r, k] * src[pos[r, k]]`` over the entries with ``pos[r, k] != pad`` and
    ``0 <= pos[r, k] < P`` (and ``pos[r, k] < count``), accumulated in float32, in src's dtype; differentiable in
    ``src`` and ``w`` (each source row named by at most one entry). Entries left out are skipped, not multiplied by
    0: whatever their rows hold (NaN included) reaches neither y nor a gradient; their weights get a zero gradient.
    An entry naming no row of src is left out rather than read out of bounds (the positions are not checked on the
    host, which would cost a wait).

    Args:
        src: [P, H] bf16/fp32 rows; pos: int64 [R, K] row indices into src (on src's device); w: float32 [R, K];
            pad: a row index (in [0, P)) that entries name when they are not to be summed, or None: every entry is
            summed.
        count: None, or an int32 tensor of one element on src's device (e.g. ``offs[-1:]`` of an expert order):
            the rows of src at or past it are never read, and the entries naming them are left out. Read on the
            device only (no host wait).
    On CUDA with the native module (bf16/fp32 rows of a multiple of 16 bytes, K <= 16): one read of the named rows,
    weights in float32, no [R, K, H] intermediate (largeep's kernel); elsewhere ``embedding_bag``, whose weights
    are rounded to src's dtype first.
    """
    if pos.dtype != torch.int64 or pos.dim() != 2 or pos.device != src.device:
        raise ArgumentError(f"weighted_row_sum: pos must be int64 [R, K] on {src.device}, got {pos.dtype} "
                            f"{tuple(pos.shape)} on {pos.device}")
    if w.shape != pos.shape or w.device != src.device:
        raise ArgumentError(f"weighted_row_sum: w must be [R, K] = {tuple(pos.shape)} on {src.device}, got "
                            f"{tuple(w.shape)} on {w.device}")
    if pad is not None and not 0 <= pad < src.shape[0]:
        raise ArgumentError(f"weighted_row_sum: pad must be a row of src in [0, {src.shape[0]}) or None, got {pad}")
    _check_count("weighted_row_sum", count, src.device)
    direct = _direct(src, w, pos) if count is None else _direct(src, w, pos, count)
    op = _weighted_row_sum_impl if direct else _weighted_row_sum_op
    return op(src, pos, w, -1 if pad is None else pad, count)  # type: ignore[no-any-return]


def _check_count(op: str, count: Tensor | None, device: torch.device) -> None:
    if count is None:
        return
    if not isinstance(count, Tensor) or count.dtype != torch.int32 or count.numel() != 1 or count.device != device:
        what = f"{count.dtype} {tuple(count.shape)} on {count.device}" if isinstance(count, Tensor) else type(count)
        raise ArgumentError(f"{op}: count must be an int32 tensor of one element on {device}, got {what}")


# ---------------------------------------------------------------------------------------------------------------
# Gather of the rows below a device-side count (the expert GEMMs' input when the pair count is not on the host)
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "largeep::gather_rows", mutates_args=(),
    schema="(Tensor x, Tensor src, Tensor count, Tensor? pos=None, int num_blocks=0) -> Tensor",
)
def _gather_rows_op(x: Tensor, src: Tensor, count: Tensor, pos: Tensor | None = None, num_blocks: int = 0) -> Tensor:
    return _gather_rows_impl(x, src, count, pos, num_blocks)


def _gather_rows_impl(x: Tensor, src: Tensor, count: Tensor, pos: Tensor | None = None, num_blocks: int = 0) -> Tensor:
    C = _native_rows() if _native_gather_ok(x, src, count) else None
    if C is None:
        return _gather_rows_torch(x, src, count)
    out = x.new_empty(src.shape[0], x.shape[1])
    _gather_rows_into(C, out, x, src.contiguous(), count, num_blocks)
    return out


def _gather_rows_into(C: Any, out: Tensor, x: Tensor, src: Tensor, count: Tensor, num_blocks: int) -> None:
    """The native gather into ``out`` [P, H] (its rows at or past count left as they are)."""
    dev = x.device
    with on_device(dev):
        blocks = num_blocks if num_blocks > 0 else C.gather_rows_default_blocks(_props(dev).multi_processor_count)
        C.gather_rows(x.data_ptr(), x.shape[0], x.shape[1] * x.element_size(), src.data_ptr(), count.data_ptr(),
                      out.data_ptr(), src.shape[0], blocks, current_raw_stream(dev))


def _native_gather_ok(x: Tensor, src: Tensor, count: Tensor) -> bool:
    """Whether largeep's gather takes these: CUDA rows of 16-byte multiples, contiguous and 16-byte aligned (an
    empty x, whose view may sit anywhere, takes the torch path)."""
    return (
        x.is_cuda and src.is_cuda and count.is_cuda and x.numel() > 0 and (x.shape[1] * x.element_size()) % 16 == 0
        and x.is_contiguous() and x.data_ptr() % 16 == 0
    )


def _gather_rows_torch(x: Tensor, src: Tensor, count: Tensor) -> Tensor:
    """The gather in torch ops (any device, no host wait): the rows at or past count take x[0] (their src entries
    are not read, so they may be anything)."""
    p = src.shape[0]
    if x.shape[0] == 0:  # then count is 0 (no row to name)
        return x.new_zeros(p, x.shape[1])
    keep = torch.arange(p, device=src.device) < count
    return x[torch.where(keep, src, 0)]


@_gather_rows_op.register_fake
def _(x: Tensor, src: Tensor, count: Tensor, pos: Tensor | None = None, num_blocks: int = 0) -> Tensor:
    return x.new_empty(src.shape[0], x.shape[1])


def _gather_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, src, count, pos, _ = inputs
    ctx.x_rows = x.shape[0]
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(src, count, pos)


def _gather_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
    """grad_x[r] = the sum of grad[i] over the positions i < count with src[i] = r; the rows at or past count add
    nothing (selected away, never multiplied: they may hold NaN). With pos (each position i < count named by
    exactly one entry pos[r, k] = i, and src[i] = r) it is a row sum -- largeep's weighted-sum kernel with weights
    1: no atomics, float32 accumulation, one rounding; else an index_add in float32 of the masked rows."""
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    src, count, pos = ctx.saved_tensors
    grad = grad.contiguous()
    if pos is not None:
        ones = torch.ones(pos.shape, dtype=torch.float32, device=pos.device)
        gx = _weighted_row_sum_op(grad, pos, ones, -1, count)
    else:
        keep = torch.arange(src.shape[0], device=src.device) < count
        rows = torch.where(keep.unsqueeze(1), grad.float(), 0.0)
        gx = grad.new_zeros(ctx.x_rows, grad.shape[1], dtype=torch.float32)
        if ctx.x_rows:
            gx.index_add_(0, torch.where(keep, src, 0), rows)
    return gx.to(ctx.x_dtype), None, None, None, None


_gather_rows_op.register_autograd(_gather_backward, setup_context=_gather_setup)


def gather_rows(
    x: Tensor, src: Tensor, count: Tensor, pos: Tensor | None = None, *, num_blocks: int | None = None
) -> Tensor:
    """``out[i] = x[src[i]]`` for the positions ``i < count``, with count read on the device (no host wait);
    differentiable in ``x``. The gather of an expert order's rows when the number of valid pairs is not known on
    the host (``count = offs[-1:]``): only those rows are copied.

    Args:
        x: [N, H] rows of any dtype.
        src: int64 [P] row indices into x (on x's device); entries at or past count are not read.
        count: int32 tensor of one element on x's device.
        pos: None, or int64 [N, K] the inverse of src below count (each position i < count named by exactly one
            entry, ``pos[r, k] = i`` with ``src[i] = r``; the other entries name positions at or past count): what
            :func:`expert_order` returns. With it the backward is a row sum (no atomics, float32, one rounding);
            without it an index_add.
        num_blocks: blocks of the native kernel (grid-stride over the rows); None: enough to fill the GPU.

    Returns:
        [P, H] in x's dtype. Rows at or past count are unspecified: largeep's kernel (CUDA, rows of 16-byte
        multiples, x contiguous and 16-byte aligned) leaves them unwritten; the torch fallback fills them with x[0].
        Their gradient is dropped (never added to x's).
    """
    if x.dim() != 2:
        raise ArgumentError(f"gather_rows: x must be [N, H], got {x.dim()}-d")
    if src.dtype != torch.int64 or src.dim() != 1 or src.device != x.device:
        raise ArgumentError(f"gather_rows: src must be int64 [P] on {x.device}, got {src.dtype} {tuple(src.shape)} "
                            f"on {src.device}")
    _check_count("gather_rows", count, x.device)
    if pos is not None and (pos.dtype != torch.int64 or pos.dim() != 2 or pos.shape[0] != x.shape[0]
                            or pos.device != x.device):
        raise ArgumentError(f"gather_rows: pos must be int64 [{x.shape[0]}, K] on {x.device} or None, got "
                            f"{pos.dtype} {tuple(pos.shape)} on {pos.device}")
    if num_blocks is not None and not 1 <= num_blocks < 2**31:
        raise ArgumentError(f"gather_rows: num_blocks must be in [1, 2**31) or None, got {num_blocks}")
    direct = _direct(x, src, count) if pos is None else _direct(x, src, count, pos)
    op = _gather_rows_impl if direct else _gather_rows_op
    return op(x, src, count, pos, num_blocks or 0)  # type: ignore[no-any-return]


def grouped_mm(a: Tensor, b: Tensor, offs: Tensor, used: int | None = None, *, clear_tail: bool = True) -> Tensor:
    """One GEMM per group over contiguous row ranges, differentiable in ``a`` and ``b``.

    Args:
        a: [P, K] rows sorted by group (bf16/fp32/fp16, same dtype as ``b``).
        b: [G, K, N] one matrix per group.
        offs: int32 [G], inclusive end row of each group (non-decreasing, ``offs[-1] <= P``), on a's device.
        used: ``offs[-1]`` when the caller knows it on the host (no sync): the rows past it are then zeroed with
            a slice instead of a masked pass over the whole output, and the fallback skips one host sync.
            Must equal ``offs[-1]``.
        clear_tail: False leaves the rows past ``offs[-1]`` of the output as the native kernel leaves them
            (unspecified, NaN possible; the padded bmm still gives zeros), and so are those rows of a's gradient:
            for a caller that reads neither (``GroupedExperts.forward_rows``: its gather's backward and its weighted
            sum stop at ``offs[-1]``), which saves a masked pass over the output when ``used`` is not known.

    Returns:
        [P, N] in a's dtype; rows past ``offs[-1]`` are zero (with ``clear_tail``). The native kernel
        (``torch._grouped_mm``: bf16 on sm90/sm100 CUDA; float32/bf16/fp16 on CPU; 16-byte strides) does not wait
        on the host; the padded-bmm fallback does (for the largest group), inside the op, so a compiled graph does
        not break.
        :func:`grouped_mm_stats` counts which one ran.
    """
    # caller mistakes are refused here, not left to the native kernel (whose failures turn it off for the process)
    if a.dim() != 2 or b.dim() != 3 or offs.dim() != 1:
        raise ArgumentError(f"grouped_mm: expected a [P, K], b [G, K, N], offs [G]; got {a.dim()}-d, {b.dim()}-d, "
                            f"{offs.dim()}-d")
    if a.dtype != b.dtype or offs.dtype != torch.int32:
        raise ArgumentError(f"grouped_mm: a and b must share a dtype and offs be int32; got {a.dtype}, {b.dtype}, "
                            f"{offs.dtype}")
    if not a.is_floating_point() or a.element_size() < 2:
        raise ArgumentError(f"grouped_mm: arguments 'a' and 'b' must be bf16/fp16/fp32 (or float64) tensors, got "
                            f"{a.dtype} (an FP8 operand has no grouped GEMM here: dequantise it first, "
                            "largeep.fp8.dequantize)")
    if a.shape[1] != b.shape[1] or offs.shape[0] != b.shape[0]:
        raise ArgumentError(f"grouped_mm: expected a [P, K], b [G, K, N], offs [G]; got a {tuple(a.shape)}, b "
                            f"{tuple(b.shape)}, offs {tuple(offs.shape)}")
    if not a.device == b.device == offs.device:
        raise ArgumentError(f"grouped_mm: a, b and offs must be on one device; got {a.device}, {b.device}, "
                            f"{offs.device}")
    op = _grouped_mm_impl if _direct(a, b, offs) else _grouped_mm_op
    return op(a, b, offs, -1 if used is None else used, clear_tail)  # type: ignore[no-any-return]


@contextlib.contextmanager
def sm_carveout(num_sms: int) -> Iterator[None]:
    """GEMMs launched inside leave ``num_sms`` SMs free (torch's experimental SM carveout, which cuBLASLt and the
    CUTLASS grouped GEMM read at launch). A persistent GEMM grid that fills every SM keeps a communication kernel on
    another stream from starting until the GEMM ends (or, launched after it, waits for it), which serialises the
    overlap. ``num_sms`` <= 0, or a torch without the setting: no change. Host-side only; restores the previous
    value on exit."""
    if num_sms <= 0 or not hasattr(torch._C, "_set_sm_carveout_experimental"):
        yield
        return
    prev = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(num_sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(prev)


# ---------------------------------------------------------------------------------------------------------------
# Normal mode: custom ops
# ---------------------------------------------------------------------------------------------------------------


def _max_rows(buffer_id: int) -> int:
    buf = _REG.buffers.get(buffer_id)
    return buf.ctx.num_ranks * buf.ctx.max_tokens_per_rank if buf is not None else 2**31 - 1


@torch.library.custom_op(
    "largeep::dispatch_send",
    mutates_args=(),
    schema=(
        "(int buffer_id, Tensor x, Tensor topk_idx, Tensor topk_weights, int num_worst_tokens, bool use_fp8=False) "
        "-> Tensor"
    ),
)
def _dispatch_send_op(
    buffer_id: int, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, num_worst_tokens: int, use_fp8: bool = False
) -> Tensor:
    buf = buffer_of(buffer_id)
    if use_fp8:  # (the quantisation would run on x's device, and the Buffer then refuse the pair naming its parts)
        checks.on("ops.dispatch", "x", x, buf.ctx.device)
    send = _fp8_pair(x) if use_fp8 else _row_aligned(x)
    # (idx and w contiguous here: a compiled caller's chunks are not copied before the op, see _needs_row_copy)
    res = buf.dispatch(send, topk_idx.contiguous(), topk_weights.contiguous(), num_worst_tokens=num_worst_tokens)
    assert res.topk_idx is not None and res.topk_weights is not None
    entry = _Entry(res.handle, num_worst_tokens, _valid_rows(res.topk_idx >= 0) if num_worst_tokens else None)
    entry.pending = (_received_x(res.x, x.dtype if use_fp8 else None), res.topk_idx, res.topk_weights)
    return _put(buffer_id, entry)


@_dispatch_send_op.register_fake
def _(
    buffer_id: int, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, num_worst_tokens: int, use_fp8: bool = False
) -> Tensor:
    _inductor_order.ensure()
    return _ticket_like()


@torch.library.custom_op(
    "largeep::dispatch_recv",
    mutates_args=(),
    schema=(
        "(int buffer_id, Tensor ticket, Tensor x, Tensor topk_weights, int num_worst_tokens, bool hold, "
        "bool bf16_partial_sums=False) -> (Tensor, Tensor, Tensor)"
    ),
)
def _dispatch_recv_op(
    buffer_id: int, ticket: Tensor, x: Tensor, topk_weights: Tensor, num_worst_tokens: int, hold: bool,
    bf16_partial_sums: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """bf16_partial_sums: for the backward only (its combine of the received rows' gradient, bf16 as x is)."""
    entry = _get(buffer_id, ticket, "dispatch_recv")
    with _locked():  # (the hold is added only with the outputs: a refused call leaves the count as it was)
        out, entry.pending = entry.pending, None
        if out is not None and hold:
            entry.refs += 1
            entry.unclaimed += 1
    if out is None:
        raise RuntimeError("largeep.ops.dispatch_recv: the outputs of this dispatch were already taken")
    rx, ridx, rw = _fresh(out, (ticket, x, topk_weights))
    return rx, ridx, rw


@_dispatch_recv_op.register_fake
def _(
    buffer_id: int, ticket: Tensor, x: Tensor, topk_weights: Tensor, num_worst_tokens: int, hold: bool,
    bf16_partial_sums: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    rows = num_worst_tokens or torch.library.get_ctx().new_dynamic_size(max=_max_rows(buffer_id))
    k = topk_weights.shape[1]
    return (
        x.new_empty(rows, x.shape[1]),
        torch.empty(rows, k, dtype=torch.int64, device=x.device),
        topk_weights.new_empty(rows, k),
    )


@torch.library.custom_op(
    "largeep::dispatch_cached",
    mutates_args=(),
    schema="(int buffer_id, Tensor x, Tensor ticket, SymInt num_rows) -> Tensor",
)
def _dispatch_cached_op(buffer_id: int, x: Tensor, ticket: Tensor, num_rows: int) -> Tensor:
    """combine's backward: drops the reference its forward held (once the Buffer has accepted ``x``)."""
    entry = _get(buffer_id, ticket, "dispatch_cached")
    assert isinstance(entry.handle, DispatchHandle)
    try:
        out = buffer_of(buffer_id).dispatch(
            _row_aligned(x), handle=entry.handle, num_worst_tokens=entry.num_worst_tokens
        ).x
    except ArgumentError:
        raise
    except BaseException:
        _settle(buffer_id, ticket, -1)
        raise
    _settle(buffer_id, ticket, -1)
    assert isinstance(out, Tensor)
    return _fresh((_zero_tail(out, entry.valid_rows),), (x,))[0]


@_dispatch_cached_op.register_fake
def _(buffer_id: int, x: Tensor, ticket: Tensor, num_rows: int) -> Tensor:
    _inductor_order.ensure()
    return x.new_empty(num_rows, x.shape[1])


@torch.library.custom_op(
    "largeep::combine",
    mutates_args=(),
    schema=(
        "(int buffer_id, Tensor y, Tensor ticket, SymInt num_tokens, Tensor? topk_weights, int refs, "
        "bool bf16_partial_sums=False) -> (Tensor, Tensor)"
    ),
)
def _combine_op(
    buffer_id: int, y: Tensor, ticket: Tensor, num_tokens: int, topk_weights: Tensor | None, refs: int,
    bf16_partial_sums: bool = False,
) -> tuple[Tensor, Tensor]:
    """refs: +1 for a forward whose y needs grad (its backward will come), 0 for one without, -1 as the backward
    of dispatch_recv. The count changes once the Buffer has accepted the arguments: a combine refused for them
    (``ArgumentError``, raised before anything is sent) leaves the handle as it was, for a corrected call; any
    other failure counts as the call made (a failed forward without the backward it would have had)."""
    entry = _get(buffer_id, ticket, "combine")
    assert isinstance(entry.handle, DispatchHandle)
    try:
        res = buffer_of(buffer_id).combine(y, entry.handle, topk_weights=topk_weights,
                                           bf16_partial_sums=bf16_partial_sums)
    except ArgumentError:
        raise
    except BaseException:
        _settle(buffer_id, ticket, min(refs, 0), combined=True)
        raise
    _settle(buffer_id, ticket, refs, combined=True)
    w = res.topk_weights if res.topk_weights is not None else y.new_empty(0, dtype=torch.float32)
    x, w = _fresh((res.x, w), (y, topk_weights))
    return x, w


@_combine_op.register_fake
def _(
    buffer_id: int, y: Tensor, ticket: Tensor, num_tokens: int, topk_weights: Tensor | None, refs: int,
    bf16_partial_sums: bool = False,
) -> tuple[Tensor, Tensor]:
    _inductor_order.ensure()
    w = topk_weights.new_empty(num_tokens, topk_weights.shape[1]) if topk_weights is not None else None
    return y.new_empty(num_tokens, y.shape[1]), w if w is not None else y.new_empty(0, dtype=torch.float32)


def _valid_rows(recv_valid: Tensor) -> Tensor:
    """bool [R, 1] from ``recv_valid`` (bool [R, K]: the received (row, k) that name an expert here): the rows a
    ``num_worst_tokens`` dispatch received (a received row names one of this rank's experts; the rows past the
    received count name none)."""
    return recv_valid.any(dim=1, keepdim=True)


def _zero_tail(x: Tensor, valid_rows: Tensor | None) -> Tensor:
    """Zeroes rows past the received count of a ``num_worst_tokens`` dispatch (``valid_rows``: _valid_rows's)."""
    if valid_rows is None:
        return x
    return torch.where(valid_rows, x, 0)


def _recv_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    buffer_id, ticket, x, topk_weights, _, hold = inputs[:6]
    ctx.buffer_id = buffer_id
    ctx.bf16_partial_sums = bool(inputs[6]) if len(inputs) > 6 else False
    ctx.num_tokens = x.shape[0]
    ctx.x_dtype = x.dtype
    ctx.hidden = x.shape[1]
    # eagerly the node holds its backward call's count and its own forward's ticket (see _Hold), which the
    # backward takes over the saved one (a checkpoint's recomputation gives that of the recomputed forward); the
    # ticket is saved in any case, so that the saved tensors are the same whether or not a hold was claimed (a
    # selective checkpoint compares the forward's with the recomputation's)
    ctx.hold = _claim(buffer_id, ticket) if hold else None
    # which received (row, k) name an expert, as a tensor of the backward's own: the returned topk_idx may be
    # changed in place by the caller
    ctx.save_for_backward(ticket, output[1] >= 0)


def _recv_backward(ctx: Any, gx: Tensor | None, _gidx: Any, gw: Tensor | None) -> tuple[Any, ...]:
    ticket, recv_valid = ctx.saved_tensors
    if ctx.hold is not None:
        ticket = ctx.hold.take()
    if gx is None:
        gx = torch.zeros(recv_valid.shape[0], ctx.hidden, dtype=ctx.x_dtype, device=recv_valid.device)
    # (the backends take empty tensors of any strides, as an empty gradient may have)
    w = torch.where(recv_valid, gw, 0.0).contiguous() if gw is not None else None
    x, wsum = _combine_op(ctx.buffer_id, gx.contiguous(), ticket, ctx.num_tokens, w, -1, ctx.bf16_partial_sums)
    return None, None, x, (wsum if w is not None else None), None, None, None


_dispatch_recv_op.register_autograd(_recv_backward, setup_context=_recv_setup)


def _combine_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    buffer_id, y, ticket, _, _, refs = inputs[:6]
    ctx.buffer_id = buffer_id
    ctx.num_rows = y.shape[0]
    ctx.in_backward = refs < 0  # dispatch_recv's backward, recorded by a backward with create_graph=True
    ctx.hold = _claim(buffer_id, ticket) if refs > 0 else None  # (as in _recv_setup)
    ctx.save_for_backward(ticket)


_NO_DOUBLE_BACKWARD = (
    "largeep.ops: a second derivative through dispatch or combine (a backward through a backward taken with "
    "create_graph=True, e.g. a gradient penalty) is not supported on the custom-op path (torch.compile, "
    "use_custom_ops=True); the eager path (ops.dispatch / ops.combine with use_custom_ops=False, not compiled) "
    "supports it"
)


def _combine_backward(ctx: Any, gx: Tensor | None, _gw: Any) -> tuple[Any, ...]:
    if ctx.in_backward:
        raise RuntimeError(_NO_DOUBLE_BACKWARD)
    if gx is None:
        return None, None, None, None, None, None, None
    (ticket,) = ctx.saved_tensors
    if ctx.hold is not None:
        ticket = ctx.hold.take()
    gy = _dispatch_cached_op(ctx.buffer_id, gx.contiguous(), ticket, ctx.num_rows)
    return None, gy, None, None, None, None, None


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def _cached_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    pass


def _cached_backward(ctx: Any, gy: Tensor) -> tuple[Any, ...]:
    # dispatch_cached runs only as combine's backward: reaching its own backward is a second derivative
    raise RuntimeError(_NO_DOUBLE_BACKWARD)


_dispatch_cached_op.register_autograd(_cached_backward, setup_context=_cached_setup)

# ---------------------------------------------------------------------------------------------------------------
# Low-latency mode: custom ops (no autograd)
# ---------------------------------------------------------------------------------------------------------------
# (the dispatcher drops trailing arguments equal to their schema defaults before it calls these: the Python
# functions must give the same defaults)


@torch.library.custom_op(
    "largeep::low_latency_dispatch",
    mutates_args=(),
    schema=(
        "(int buffer_id, Tensor x, Tensor topk_idx, bool use_fp8, bool round_scale, Tensor? topk_weights=None, "
        "bool bf16_partial_sums=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
)
def _ll_dispatch_op(
    buffer_id: int, x: Tensor, topk_idx: Tensor, use_fp8: bool, round_scale: bool,
    topk_weights: Tensor | None = None, bf16_partial_sums: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    res = buffer_of(buffer_id).low_latency_dispatch(
        x, topk_idx, use_fp8=use_fp8, round_scale=round_scale, topk_weights=topk_weights,
        bf16_partial_sums=bf16_partial_sums,
    )
    if isinstance(res.x, tuple):
        q, s = res.x
    else:
        q, s = res.x, x.new_empty(0, dtype=torch.float32)
    q, s, counts, info = _fresh((q, s, res.num_tokens_per_expert, res.src_info), (x, topk_idx, topk_weights))
    return q, s, counts, info, _put(buffer_id, _Entry(res.handle))


@_ll_dispatch_op.register_fake
def _(
    buffer_id: int, x: Tensor, topk_idx: Tensor, use_fp8: bool, round_scale: bool,
    topk_weights: Tensor | None = None, bf16_partial_sums: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _inductor_order.ensure()
    c = buffer_of(buffer_id).ctx
    rows = c.num_ranks * c.max_tokens_per_rank
    h = x.shape[1]
    dev = x.device
    q = torch.empty(c.experts_per_rank, rows, h, dtype=torch.float8_e4m3fn if use_fp8 else x.dtype, device=dev)
    s = (
        torch.empty(c.experts_per_rank, rows, h // 128, dtype=torch.float32, device=dev)
        if use_fp8
        else torch.empty(0, dtype=torch.float32, device=dev)
    )
    counts = torch.empty(c.experts_per_rank, dtype=torch.int32, device=dev)
    info = torch.empty(c.experts_per_rank, rows, 2, dtype=torch.int32, device=dev)
    return q, s, counts, info, _ticket_like()


def _same_storage(arg: str, t: Tensor, kept: Tensor, why: str) -> Tensor:
    """``kept`` (the tensor a weighted low-latency dispatch kept), if ``t`` is at its memory with its strides (what
    a compiled graph preserves of it); else ArgumentError naming ``arg``."""
    if (t.data_ptr(), t.stride()) != (kept.data_ptr(), kept.stride()):
        raise ArgumentError(
            f"largeep.ops.low_latency_combine: argument '{arg}' is not the tensor given to the ticket's "
            f"low_latency_dispatch (memory at {t.data_ptr():#x} with strides {tuple(t.stride())}, expected "
            f"{kept.data_ptr():#x} with {tuple(kept.stride())}): {why}"
        )
    return kept


@torch.library.custom_op(
    "largeep::low_latency_combine",
    mutates_args=(),
    schema="(int buffer_id, Tensor y, Tensor topk_idx, Tensor topk_weights, Tensor ticket) -> Tensor",
)
def _ll_combine_op(buffer_id: int, y: Tensor, topk_idx: Tensor, topk_weights: Tensor, ticket: Tensor) -> Tensor:
    # the handle is freed after the combine, or after any failure but a refusal of its arguments (eagerly, a
    # corrected call may follow; inside a compiled graph none can, and max_live_handles bounds what is left)
    entry = _get(buffer_id, ticket, "low_latency_combine")
    h = entry.handle
    assert isinstance(h, LowLatencyHandle)
    buf = buffer_of(buffer_id)
    try:
        w, idx = topk_weights, topk_idx
        if h.weights is not None:
            # the dispatch was given weights: a compiled graph hands the ops the same storage, not the same Python
            # object, so the storage is what must match here (the Buffer then checks the object the dispatch
            # kept). Best effort: Inductor may reuse that memory for another tensor once the dispatch has read it,
            # which no check here can tell; the combine applies the weights as the dispatch read them either way.
            c = buf.ctx
            checks.topk_weights("low_latency_combine", w, num_tokens=h.num_tokens, num_topk=c.num_topk,
                                device=c.device)
            w = _same_storage("topk_weights", w, h.weights,
                              "those weights travelled with the tokens and are applied on the experts' ranks; pass "
                              "the same tensor, or dispatch without topk_weights")
            # and the ids likewise: the experts' ranks sum each token's outputs over the k the dispatch named (the
            # same best effort; the nvshmem combine then reads the ids its dispatch kept, not these)
            checks.topk_idx("low_latency_combine", idx, num_tokens=h.num_tokens, num_topk=c.num_topk,
                            num_experts=c.num_experts, device=c.device, check_values=False)
            assert h.topk_idx is not None
            idx = _same_storage("topk_idx", idx, h.topk_idx,
                                "that dispatch was given topk_weights, so the experts' ranks sum each token's outputs "
                                "over the experts it named there; pass the same topk_idx, or dispatch without "
                                "topk_weights")
        out = buf.low_latency_combine(y, idx, w, h).x
    except ArgumentError:
        raise
    except BaseException:
        _drop(buffer_id, ticket)
        raise
    _drop(buffer_id, ticket)
    return _fresh((out,), (y, topk_idx, topk_weights))[0]


@_ll_combine_op.register_fake
def _(buffer_id: int, y: Tensor, topk_idx: Tensor, topk_weights: Tensor, ticket: Tensor) -> Tensor:
    _inductor_order.ensure()
    return y.new_empty(topk_idx.shape[0], y.shape[2])


for _name in ("dispatch_send", "dispatch_cached", "combine", "low_latency_dispatch", "low_latency_combine"):
    torch.library._register_effectful_op(f"largeep::{_name}", torch.library.EffectType.ORDERED)

# ---------------------------------------------------------------------------------------------------------------
# Eager path: autograd Functions over the Buffer
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class OpHandle:
    """Handle of an eager :func:`dispatch`: the Buffer, its :class:`DispatchHandle`, which received (row, k) name an
    expert here (to mask the weights' gradient, and to find the rows past the received count when
    ``num_worst_tokens`` > 0) and the source T.

    Under autograd that is ``recv_valid``, a bool [R, K] tensor of the handle's own, made by the dispatch: the
    received topk_idx may sit in a zero-copy receive slot, which stays taken while any output lives (holding it to
    the backward would leave later dispatches of the step their copy-out), and the caller may change it in place.
    Without grad mode (nothing records a backward then, and the handle dies with the caller's use of it) the
    received topk_idx is kept instead, unread unless a backward comes after all, which refuses it changed in
    place since."""

    buffer: Buffer
    handle: DispatchHandle
    recv_valid: Tensor | None
    recv_topk_idx: Tensor | None
    num_worst_tokens: int
    num_tokens: int
    recv_version: int = 0  # recv_topk_idx's version counter when the dispatch returned it (-1: an inference tensor)

    def received(self) -> Tensor:
        """bool [R, K]: the received (row, k) that name an expert here. (Read at backward time, on the backward's
        stream: the outputs of an ``async_finish`` dispatch are not ready when it returns.)"""
        if self.recv_valid is not None:
            return self.recv_valid
        idx = self.recv_topk_idx
        assert idx is not None
        if self.recv_version >= 0 and idx._version != self.recv_version:
            raise RuntimeError(
                "largeep.ops: the topk_idx that a dispatch made without grad mode returned was changed in place "
                "before a backward through it, which reads it to find the received rows and weights; change a "
                "clone of it instead"
            )
        return idx >= 0


class TicketHandle(NamedTuple):
    """Handle of a :func:`dispatch` on the custom-op path: the registry ticket (int64 CPU [1]) and the source T."""

    ticket: Tensor
    num_tokens: Any  # int or SymInt


Handle = OpHandle | TicketHandle


class DispatchOutput(NamedTuple):
    """x: [R, H] in x's dtype: each token that picked an expert of this rank, once (source rank ascending, then
    token), however many of this rank's experts it picked. topk_idx: int64 [R, K], the token's K choices with ids
    made local (``id - rank * E/N`` for the experts of this rank, in [0, E/N); -1 for those elsewhere and for the
    caller's -1), so a row may name several local experts. topk_weights: float32 [R, K], the caller's weights as
    sent (0 where topk_idx is -1); the combine sums rows unweighted, so the experts' side applies them, and the
    gradient of what it computes from them reaches the caller's topk_weights (the router). With
    ``num_worst_tokens`` R is that number and rows past the received count name no expert (their x is
    unspecified). num_tokens_per_expert: the rows naming each local expert, rounded up to ``expert_alignment``
    (host ints; a row naming two local experts counts for each, so they can add up to more than R), where known
    without a device sync, else None (count topk_idx on the device instead: :func:`expert_order`'s offsets).
    event: wait on it (:func:`wait`) before using the tensors when ``async_finish`` was set. docs/usage.md, "Your
    own MoE layer on largeep.ops", puts this together."""

    x: Tensor
    topk_idx: Tensor
    topk_weights: Tensor
    handle: Handle
    event: EventOverlap | None
    num_tokens_per_expert: list[int] | None


class CombineOutput(NamedTuple):
    """x: [T, H] in y's dtype; event as in :class:`DispatchOutput`."""

    x: Tensor
    event: EventOverlap | None


_side_streams: dict[tuple[str, torch.device, int], torch.cuda.Stream] = {}


def _side_stream(purpose: str, device: torch.device, priority: int) -> torch.cuda.Stream:
    """largeep's own stream for ``purpose`` on CUDA ``device`` at ``priority``, made once (one per purpose, so that
    work of different purposes is not serialised on one stream): "dispatch" (:func:`_buffer_dispatch`), "pipeline"
    (``layers.MoEPipeline``)."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (purpose, device, priority)
    stream = _side_streams.get(key)
    if stream is None:
        stream = _side_streams[key] = torch.cuda.Stream(device, priority=priority)
    return stream


def _buffer_dispatch(
    buffer: Buffer, x: Tensor | tuple[Tensor, Tensor], topk_idx: Tensor, topk_weights: Tensor, num_worst_tokens: int,
    previous_event: EventOverlap | None, async_finish: bool, expert_alignment: int = 1,
) -> Any:
    """``buffer.dispatch`` (x: rows, or an FP8 pair), issued from an idle side stream when it is to wait for
    ``previous_event`` only.

    A dispatch without ``num_worst_tokens`` waits on the host: the Buffer's expert-id check (a Python min/max where
    the backend does not check the ids itself, as largeep's backends do) syncs the *current* stream,
    then the count exchange. Issued from the caller's stream, that sync also waits for everything queued
    there after ``previous_event`` -- in MoELayer's chunked schedule, the previous chunk's expert GEMMs -- so the
    next chunk could only be sent after them and its dispatch never overlapped them. From a side stream that waits
    for ``previous_event`` first, the host waits only for what the dispatch needs. The outputs are made safe for
    the caller's stream (``record_stream``), and without ``async_finish`` the caller's stream waits for them.

    A backend that checks the ids itself (``checks_dispatch_ids``: both of largeep's, with the count exchange)
    needs no side stream: its host waits are for work on the Buffer's stream, which waits for ``previous_event``
    only; the side stream would only cost host time (a stream switch, an event and a ``record_stream`` per output,
    tens of microseconds per chunk on a host-bound schedule)."""
    ev = previous_event.event if previous_event is not None else None
    rows = x if isinstance(x, Tensor) else x[0]
    if (
        ev is None or num_worst_tokens or not rows.is_cuda or getattr(buffer._impl, "checks_dispatch_ids", False)
        or torch.cuda.is_current_stream_capturing()
    ):
        return buffer.dispatch(
            x, topk_idx, topk_weights, num_worst_tokens=num_worst_tokens, expert_alignment=expert_alignment,
            previous_event=previous_event, async_finish=async_finish,
        )
    caller = torch.cuda.current_stream(rows.device)
    side = _side_stream("dispatch", rows.device, buffer._settings.stream_priority)  # the Buffer's own stream priority
    side.wait_event(ev)
    with torch.cuda.stream(side):
        res = buffer.dispatch(
            x, topk_idx, topk_weights, num_worst_tokens=num_worst_tokens, expert_alignment=expert_alignment,
            previous_event=previous_event, async_finish=True,
        )
    res.record_stream(caller)  # also guards a zero-copy receive slot, which Tensor.record_stream does not
    if not async_finish and res.event is not None and res.event.event is not None:
        caller.wait_event(res.event.event)
    return res


def _fp8_pair(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` as the FP8 pair that a dispatch with ``use_fp8`` sends (:func:`largeep.fp8.quantize` of x, copied
    first where strided or misaligned, as a plain dispatch copies it), after :func:`_check_fp8`."""
    _check_fp8(x)
    return fp8.quantize(_row_aligned(x))


def _check_fp8(x: Tensor) -> None:
    """ArgumentError naming ``x`` where a dispatch with ``use_fp8`` cannot send it as an FP8 pair."""
    if x.dtype not in (torch.bfloat16, torch.float32) or x.dim() != 2 or x.shape[1] % fp8.GROUP:
        raise ArgumentError(
            f"ops.dispatch: use_fp8=True sends x quantised to FP8, one scale per {fp8.GROUP} channels: argument 'x' "
            f"must be a bf16/fp32 tensor [T, H] with H a multiple of {fp8.GROUP}, got {x.dtype} {tuple(x.shape)}"
        )


def _received_x(x: Tensor | tuple[Tensor, Tensor], dtype: torch.dtype | None) -> Tensor:
    """A dispatch's received x for the caller: the rows as they came, or (``dtype`` given: a ``use_fp8``
    dispatch) the received FP8 pair dequantised to ``dtype``."""
    if dtype is None:
        assert isinstance(x, Tensor)
        return x
    assert isinstance(x, tuple)
    return fp8.dequantize(*x, dtype=dtype)


def _sendable(
    buffer: Buffer, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, use_fp8: bool,
    previous_event: EventOverlap | None,
) -> tuple[Tensor | tuple[Tensor, Tensor], Tensor, Tensor, EventOverlap | None]:
    """What an eager dispatch hands the Buffer: x (``use_fp8``: its FP8 pair, :func:`_fp8_pair`), topk_idx and
    topk_weights, each copied where the Buffer would refuse its layout (strided; x also where it starts at an
    address not 16-byte aligned on CUDA), as the custom-op path copies them; and the event the dispatch is to wait
    for. The copies (and the quantisation) run where the dispatch would find them: on the caller's stream, which a
    dispatch without ``previous_event`` waits for; with one, on the Buffer's stream after that event (no other
    stream: the same under CUDA-graph capture), and an event recorded there after them replaces it. A tensor on
    another device than the Buffer's is passed as it is, for the Buffer to refuse naming it (``use_fp8``: x is
    refused here, the quantisation would run on x's device and the Buffer then name the pair's parts)."""
    device = buffer.ctx.device
    if use_fp8:
        checks.on("ops.dispatch", "x", x, device)

    def here(t: Any) -> bool:
        return isinstance(t, Tensor) and t.device == device

    copy_x = here(x) and _needs_row_copy(x)
    copy_iw = [here(t) and not t.is_contiguous() for t in (topk_idx, topk_weights)]
    if not (use_fp8 or copy_x or any(copy_iw)):
        return x, topk_idx, topk_weights, previous_event

    def make() -> tuple[Tensor | tuple[Tensor, Tensor], Tensor, Tensor]:
        send = _fp8_pair(x) if use_fp8 else _row_aligned(x)
        idx, w = (t.contiguous() if c else t for t, c in zip((topk_idx, topk_weights), copy_iw, strict=True))
        return send, idx, w

    stream = buffer._stream
    if previous_event is None or previous_event.event is None or stream is None or not x.is_cuda:
        return (*make(), previous_event)
    stream.wait_event(previous_event.event)
    with torch.cuda.stream(stream):
        send, idx, w = make()
        after = torch.cuda.Event()
        after.record(stream)
    for t, copied in zip((x, topk_idx, topk_weights), (use_fp8 or copy_x, *copy_iw), strict=True):
        if copied:  # (read there)
            _record_stream(t, stream)
    return send, idx, w, EventOverlap(after, device=stream.device)


def _received(
    buffer: Buffer, rx: Tensor | tuple[Tensor, Tensor], recv_idx: Tensor, dtype: torch.dtype | None, mask: bool,
    event: EventOverlap, async_finish: bool,
) -> tuple[Tensor, Tensor | None, EventOverlap]:
    """The dispatch's received x for the caller (:func:`_received_x`: ``dtype`` given, the FP8 pair dequantised),
    with ``mask`` ``recv_idx >= 0`` (bool [R, K], for the backward: see :class:`OpHandle`), made where the
    dispatch's outputs are ready, and the event that covers them. Without ``async_finish`` (the caller's stream is
    ordered after the dispatch), on the caller's stream; with it, on the Buffer's stream behind the dispatch, with a
    new event recorded after it for the caller (whose wait on the dispatch's event then orders it after these
    too)."""
    stream = buffer._stream
    if dtype is None and not mask:  # (nothing to make: the plain dispatch's outputs and event as they are)
        assert isinstance(rx, Tensor)
        return rx, None, event
    if not async_finish or event.event is None or stream is None:
        return _received_x(rx, dtype), (recv_idx >= 0 if mask else None), event
    caller = torch.cuda.current_stream(stream.device)
    # (the dispatch's event was recorded on this stream, Buffer._run: work queued here now runs after it)
    with torch.cuda.stream(stream):
        x = _received_x(rx, dtype)
        valid = recv_idx >= 0 if mask else None
        after = torch.cuda.Event()
        after.record(stream)
    # (read here: a zero-copy slot they sit in waits for this stream too)
    for t in (recv_idx, *(rx if isinstance(rx, tuple) else ())):
        _record_stream(t, stream)
    for t in (x, valid):
        if t is not None and t is not rx:
            t.record_stream(caller)
    return x, valid, EventOverlap(after, device=stream.device)


class _DispatchFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        topk_idx: Tensor,
        topk_weights: Tensor,
        buffer: Buffer,
        num_worst_tokens: int,
        previous_event: EventOverlap | None,
        async_finish: bool,
        sink: list[Any],
        grad: bool,
        use_fp8: bool,
        bf16_partial_sums: bool,
        expert_alignment: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        send, idx, w, ready = _sendable(buffer, x, topk_idx, topk_weights, use_fp8, previous_event)
        res = _buffer_dispatch(buffer, send, idx, w, num_worst_tokens, ready, async_finish, expert_alignment)
        assert res.topk_idx is not None and res.topk_weights is not None
        rx, valid, event = _received(buffer, res.x, res.topk_idx, x.dtype if use_fp8 else None, grad, res.event,
                                     async_finish)
        if grad:
            assert valid is not None
            handle = OpHandle(buffer, res.handle, valid, None, num_worst_tokens, x.shape[0])
        else:
            handle = OpHandle(buffer, res.handle, None, res.topk_idx, num_worst_tokens, x.shape[0],
                              -1 if res.topk_idx.is_inference() else res.topk_idx._version)
        sink.append((handle, res, event))
        ctx.handle = handle
        ctx.x_dtype = x.dtype
        ctx.home = _home_bf16_partials if bf16_partial_sums else _home
        ctx.mark_non_differentiable(res.topk_idx)
        return rx, res.topk_idx, res.topk_weights

    @staticmethod
    def backward(ctx: Any, gx: Tensor | None, _gidx: Any, gw: Tensor | None) -> tuple[Any, ...]:
        h: OpHandle = ctx.handle
        if gx is None:
            c = h.buffer.ctx
            gx = torch.zeros(h.handle.num_recv_tokens, c.hidden, dtype=ctx.x_dtype, device=c.device)
        x, w = _recorded(ctx.home, _away, h, gx, gw)
        return x, None, w, None, None, None, None, None, None, None, None, None


class _CombineFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        y: Tensor,
        handle: OpHandle,
        previous_event: EventOverlap | None,
        async_finish: bool,
        sink: list[Any],
        bf16_partial_sums: bool,
    ) -> Tensor:
        res = handle.buffer.combine(y, handle.handle, previous_event=previous_event, async_finish=async_finish,
                                    bf16_partial_sums=bf16_partial_sums)
        sink.append(res)
        ctx.handle = handle
        return res.x

    @staticmethod
    def backward(ctx: Any, gx: Tensor) -> tuple[Any, ...]:
        gy, _ = _recorded(_away, _home, ctx.handle, gx, None)
        return gy, None, None, None, None, None


# The backwards above are themselves differentiable (a second derivative, e.g. a gradient penalty taken with
# create_graph=True): both maps are linear, so each one's backward is the other one through the same handle.
#   home: rows [R, H], weights [R, K] or None -> (sum of each token's rows [T, H], of its weights [T, K] or None);
#         weights are taken only where the received topk_idx names an expert (dispatch gave 0 elsewhere), rows
#         past the received count (num_worst_tokens) not at all (combine reads none of them).
#   away: x [T, H], w [T, K] or None -> (the rows a dispatch with the handle receives [R, H], rows past the received
#         count zero; the weights [R, K] it receives, zero where topk_idx names no expert here).
# The first derivative costs what it did without this (one combine, one cached dispatch); the weights' part of
# "away" (a cached dispatch carries no weights) sends them as rows of H float32 values, which only a second
# derivative through the weights does. A dispatch with bf16_partial_sums records _home_bf16_partials for home (each
# other node's partial sum rounded to bf16: linear up to that rounding), in its own backward and any derivative above.


def _row_aligned(t: Tensor) -> Tensor:
    """``t`` contiguous, copied where it starts at an address not 16-byte aligned on CUDA (the Buffer's row copies
    need that): a chunk's view of a batch whose rows are not a multiple of 16 bytes, or the gradient of one (the
    backward of the chunks' concatenation hands each chunk a view). The copy is on the current stream, before the
    call."""
    return t.clone(memory_format=torch.contiguous_format) if _needs_row_copy(t) else t


def _needs_row_copy(t: Tensor) -> bool:
    """Whether :func:`_row_aligned` copies ``t`` (strided, or starting at an address not 16-byte aligned on CUDA;
    never while compiling, where no layout is known for sure: the custom ops copy when they run, and a contiguity
    test of a chunk of a dynamic batch would make Dynamo guard on, and recompile for, the chunk's size)."""
    if torch.compiler.is_compiling():
        return False
    return not t.is_contiguous() or (t.is_cuda and t.data_ptr() % 16 != 0)


def _home(
    h: OpHandle, rows: Tensor, weights: Tensor | None, bf16_partial_sums: bool = False
) -> tuple[Tensor, Tensor | None]:
    w = torch.where(h.received(), weights, 0.0).contiguous() if weights is not None else None
    res = h.buffer.combine(_row_aligned(rows), h.handle, topk_weights=w, bf16_partial_sums=bf16_partial_sums)
    return res.x, (res.topk_weights if w is not None else None)


def _home_bf16_partials(h: OpHandle, rows: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """_home with ``bf16_partial_sums``: the backward of a dispatch that asked for it (bf16 rows)."""
    return _home(h, rows, weights, True)


def _away(h: OpHandle, x: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor | None]:
    buf, worst = h.buffer, h.num_worst_tokens
    rows = buf.dispatch(_row_aligned(x), handle=h.handle, num_worst_tokens=worst).x
    assert isinstance(rows, Tensor)
    if worst:
        rows = _zero_tail(rows, _valid_rows(h.received()))
    recv_w = None
    if w is not None:
        hidden, k = buf.ctx.hidden, w.shape[1]
        parts = []
        for lo in range(0, k, hidden):  # (K <= H in any real model: one call)
            part = w[:, lo:lo + hidden].float()
            sent = buf.dispatch(F.pad(part, (0, hidden - part.shape[1])).contiguous(), handle=h.handle,
                                num_worst_tokens=worst).x
            assert isinstance(sent, Tensor)
            parts.append(sent[:, :part.shape[1]])
        recv_w = torch.where(h.received(), torch.cat(parts, dim=1), 0.0)
    return rows, recv_w


if TYPE_CHECKING:  # (the annotations only: _home and _away)
    _Map = Callable[[OpHandle, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]


class _LinearFn(torch.autograd.Function):
    """``fn`` (_home or _away) through a handle, recorded for autograd: its backward is ``adjoint``, the other one,
    recorded again in turn (any order of derivative)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, a: Tensor, b: Tensor | None, h: OpHandle, fn: _Map, adjoint: _Map
    ) -> tuple[Tensor, Tensor | None]:
        ctx.handle, ctx.fn, ctx.adjoint = h, fn, adjoint
        return fn(h, a, b)

    @staticmethod
    def backward(ctx: Any, ga: Tensor, gb: Tensor | None) -> tuple[Any, ...]:
        # (autograd passes zeros for an output not used, None for the weights' output when there was none)
        return (*_recorded(ctx.adjoint, ctx.fn, ctx.handle, ga, gb), None, None, None)


def _recorded(fn: _Map, adjoint: _Map, h: OpHandle, a: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``fn(h, a, b)``, recorded for autograd (its backward ``adjoint``) when the backward calling it is
    (create_graph=True); else called directly, which saves a Function's host time on every first-order backward."""
    if torch.is_grad_enabled():
        return _LinearFn.apply(a, b, h, fn, adjoint)  # type: ignore[no-any-return]
    return fn(h, a, b)


# ---------------------------------------------------------------------------------------------------------------
# Public functions (pick the path)
# ---------------------------------------------------------------------------------------------------------------


def _use_ops(force: bool) -> bool:
    return force or torch.compiler.is_compiling()


def _check_buffer_arg(buffer: Any, op: str) -> None:
    """ArgumentError naming ``buffer`` unless it is a Buffer or an int id (a bool is neither: True would name
    Buffer id 1)."""
    if isinstance(buffer, bool) or not isinstance(buffer, (Buffer, int)):
        raise ArgumentError(f"largeep.ops.{op}: argument 'buffer' must be a largeep.Buffer or its int id from "
                            f"register_buffer, got {type(buffer).__name__}")


def _buffer_id(buffer: Buffer | int, op: str) -> int:
    _check_buffer_arg(buffer, op)
    if isinstance(buffer, int):
        return buffer
    if torch.compiler.is_compiling():
        raise ArgumentError(
            f"largeep.ops.{op}: inside torch.compile pass the int id from register_buffer(buf), not the Buffer"
        )
    return register_buffer(buffer)


def _buffer(buffer: Buffer | int, op: str) -> Buffer:
    _check_buffer_arg(buffer, op)
    return buffer if isinstance(buffer, Buffer) else buffer_of(buffer)


def dispatch(
    buffer: Buffer | int,
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    *,
    num_worst_tokens: int = 0,
    expert_alignment: int = 1,
    previous_event: EventOverlap | None = None,
    async_finish: bool = False,
    use_custom_ops: bool = False,
    use_fp8: bool = False,
    bf16_partial_sums: bool = False,
) -> DispatchOutput:
    """Differentiable normal-mode dispatch (SPEC.md): grads flow to ``x`` and ``topk_weights``.

    Args:
        buffer: a normal-mode Buffer, or its id from :func:`register_buffer` (required inside ``torch.compile``).
        x: [T, H] bf16/fp32. topk_idx: int64 [T, K] physical expert ids in [-1, E). topk_weights: float32 [T, K].
            Strided ones (and an x that starts at an address not 16-byte aligned on CUDA), which the Buffer
            refuses, are copied first on every path (with ``previous_event``, on the Buffer's stream after it).
        num_worst_tokens: > 0 gives [num_worst_tokens, ...] outputs and no host wait (Buffer semantics).
        expert_alignment: the multiple that the returned ``num_tokens_per_expert`` are rounded up to, as
            ``Buffer.dispatch``'s (the rows themselves are not padded: a grouped GEMM that needs aligned groups
            lays them out itself, docs/usage.md "Your own MoE layer on largeep.ops"). It changes only those host
            counts, which only the eager path without ``num_worst_tokens`` returns (elsewhere they are None: count
            ``topk_idx`` on the device, e.g. with :func:`expert_order`).
        previous_event, async_finish: as ``Buffer.dispatch`` (eager path only; ignored on the custom-op path,
            which always finishes in order).
        use_custom_ops: take the custom-op path in eager mode too (it is always taken while compiling).
        use_fp8: send x as FP8 (:func:`largeep.fp8.quantize`: e4m3, one float32 scale per 128 channels; H must be
            a multiple of 128): the rows travel in about half the bytes of bf16. The returned x is the received
            pair dequantised to x's dtype. The backward treats the quantisation as the identity (straight-through):
            x's gradient is the combine of the received rows' gradient in x's dtype, as without FP8 (no FP8 on the
            way back). The quantisation runs where the dispatch starts (after ``previous_event`` when one is
            given), the dequantisation where its outputs are ready (with ``async_finish``, on the Buffer's stream
            before the returned event). A NaN or infinity in x spoils its whole 128-channel group (every value of
            it arrives NaN: :mod:`largeep.fp8`).
        bf16_partial_sums: for the backward (bf16 x only: x's gradient is the combine of the received rows'
            gradient, in x's dtype): that combine takes ``Buffer.combine(bf16_partial_sums=True)``, each other
            node's partial sum of a token's gradient rows coming home as bf16 (half the bytes between nodes, one
            more bf16 rounding; the summed weights' gradient stays float32). Within one node it changes nothing.
            The forward is as without it. Every rank must pass the same value.

    Waits on the host for the count exchange unless ``num_worst_tokens`` > 0.
    """
    # what the differentiable path cannot take, refused before anything is sent (the Buffer checks the rest)
    if not isinstance(x, Tensor):
        raise ArgumentError(
            f"ops.dispatch: argument 'x' must be a tensor [T, H] (bf16/fp32), got {type(x).__name__} (to send FP8 "
            "rows with a gradient, pass x and use_fp8=True; Buffer.dispatch takes a quantised pair)"
        )
    if not isinstance(topk_weights, Tensor):
        raise ArgumentError(f"ops.dispatch: argument 'topk_weights' must be a float32 tensor [T, K], got "
                            f"{type(topk_weights).__name__}")
    checks.flags("ops.dispatch", use_fp8=use_fp8, async_finish=async_finish, use_custom_ops=use_custom_ops,
                 bf16_partial_sums=bf16_partial_sums)
    if use_fp8:
        _check_fp8(x)
    if bf16_partial_sums and x.dtype != torch.bfloat16:
        raise ArgumentError(
            f"ops.dispatch: argument 'bf16_partial_sums' = True needs x in bfloat16 (its backward combines the "
            f"received rows' gradient, in x's dtype, with bf16 partial sums), x is {x.dtype}"
        )
    if _use_ops(use_custom_ops):
        # (the counts it rounds are not returned on this path; eagerly the Buffer checks it, telling the other ranks)
        checks.positive_int("ops.dispatch", "expert_alignment", expert_alignment, maximum=1 << 20)
        bid = _buffer_id(buffer, "dispatch")
        ticket = torch.ops.largeep.dispatch_send(bid, x.detach(), topk_idx, topk_weights.detach(), num_worst_tokens,
                                                 use_fp8)
        hold = torch.is_grad_enabled() and (x.requires_grad or topk_weights.requires_grad)
        rx, ridx, rw = torch.ops.largeep.dispatch_recv(bid, ticket, x, topk_weights, num_worst_tokens, hold,
                                                       bf16_partial_sums)
        return DispatchOutput(rx, ridx, rw, TicketHandle(ticket, x.shape[0]), None, None)
    buf = _buffer(buffer, "dispatch")
    sink: list[Any] = []
    rx, ridx, rw = _DispatchFn.apply(
        x, topk_idx, topk_weights, buf, num_worst_tokens, previous_event, async_finish, sink, torch.is_grad_enabled(),
        use_fp8, bf16_partial_sums, expert_alignment,
    )
    handle, res, event = sink[0]
    counts = res.num_tokens_per_expert if not num_worst_tokens else None
    return DispatchOutput(rx, ridx, rw, handle, event, counts)


def combine(
    buffer: Buffer | int,
    y: Tensor,
    handle: Handle,
    *,
    previous_event: EventOverlap | None = None,
    async_finish: bool = False,
    bf16_partial_sums: bool = False,
) -> CombineOutput:
    """Differentiable normal-mode combine: x [T, H] = per-token sum of the rows y [R, H] sent home (no weights).

    ``handle`` comes from :func:`dispatch` on ``buffer``; the path follows it. Does not wait on the host.
    ``bf16_partial_sums`` (bf16 y only): ``Buffer.combine(bf16_partial_sums=True)``, each other node's partial sum
    of a token's rows sent home as bf16 (within one node nothing changes), on either path. The backward (a cached
    dispatch of the output's gradient) is as without it."""
    checks.flags("ops.combine", async_finish=async_finish, bf16_partial_sums=bf16_partial_sums)
    if not isinstance(handle, (OpHandle, TicketHandle)):
        raise ArgumentError("ops.combine: argument 'handle' must be the handle of an ops.dispatch (its output's "
                            f".handle), got {type(handle).__name__}")
    if isinstance(handle, TicketHandle):
        bid = _buffer_id(buffer, "combine")
        hold = int(torch.is_grad_enabled() and y.requires_grad)
        x, _ = torch.ops.largeep.combine(bid, y, handle.ticket, handle.num_tokens, None, hold, bf16_partial_sums)
        return CombineOutput(x, None)
    if handle.buffer is not _buffer(buffer, "combine"):
        raise ArgumentError("ops.combine: argument 'handle' comes from a dispatch on another Buffer than argument "
                            "'buffer'")
    sink: list[Any] = []
    x = _CombineFn.apply(y, handle, previous_event, async_finish, sink, bf16_partial_sums)
    return CombineOutput(x, sink[0].event)


class LowLatencyDispatchOutput(NamedTuple):
    """x: [E/N, N*M, H] (bf16, or e4m3 with ``use_fp8``); scales: float32 [E/N, N*M, H/128] or None;
    num_tokens_per_expert: int32 [E/N]; src_info: int32 [E/N, N*M, 2]; handle: LowLatencyHandle (eager) or a
    ticket tensor (custom-op path); hook: see ``Buffer.low_latency_dispatch`` (eager only)."""

    x: Tensor
    scales: Tensor | None
    num_tokens_per_expert: Tensor
    src_info: Tensor
    handle: LowLatencyHandle | Tensor
    hook: Any


def low_latency_dispatch(
    buffer: Buffer | int,
    x: Tensor,
    topk_idx: Tensor,
    *,
    use_fp8: bool = True,
    round_scale: bool = False,
    return_recv_hook: bool = False,
    use_custom_ops: bool = False,
    topk_weights: Tensor | None = None,
    bf16_partial_sums: bool = False,
) -> LowLatencyDispatchOutput:
    """Low-latency dispatch (no autograd) of x bf16 [T, H], topk_idx int64 [T, K]. Compilable (fixed shapes);
    ``return_recv_hook`` only on the eager path. ``topk_weights``, ``bf16_partial_sums``: see
    ``Buffer.low_latency_dispatch``; on the
    custom-op path the combine must get a tensor of the same memory and strides (a compiled graph passes the same
    buffer to both ops, not the same object). That check is best effort under Inductor, which may place another
    tensor in that memory once this dispatch has read it; the combine applies the weights as this dispatch read
    them, on every backend. No host wait."""
    checks.flags("ops.low_latency_dispatch", use_fp8=use_fp8, round_scale=round_scale,
                 return_recv_hook=return_recv_hook, use_custom_ops=use_custom_ops, bf16_partial_sums=bf16_partial_sums)
    if _use_ops(use_custom_ops):
        if return_recv_hook:
            raise ArgumentError("largeep.ops.low_latency_dispatch: return_recv_hook is eager-only")
        bid = _buffer_id(buffer, "low_latency_dispatch")
        q, s, counts, info, ticket = torch.ops.largeep.low_latency_dispatch(
            bid, x, topk_idx, use_fp8, round_scale, topk_weights, bf16_partial_sums
        )
        return LowLatencyDispatchOutput(q, s if use_fp8 else None, counts, info, ticket, None)
    res = _buffer(buffer, "low_latency_dispatch").low_latency_dispatch(
        x, topk_idx, use_fp8=use_fp8, round_scale=round_scale, return_recv_hook=return_recv_hook,
        topk_weights=topk_weights, bf16_partial_sums=bf16_partial_sums,
    )
    q, s = res.x if isinstance(res.x, tuple) else (res.x, None)
    return LowLatencyDispatchOutput(q, s, res.num_tokens_per_expert, res.src_info, res.handle, res.hook)


def low_latency_combine(
    buffer: Buffer | int,
    y: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    handle: LowLatencyHandle | Tensor,
    *,
    return_recv_hook: bool = False,
) -> tuple[Tensor, Any]:
    """Low-latency combine: y bf16 [E/N, N*M, H] -> (x bf16 [T, H] weighted by topk_weights, hook or None)."""
    checks.flags("ops.low_latency_combine", return_recv_hook=return_recv_hook)
    if isinstance(handle, Tensor):
        if return_recv_hook:
            raise ArgumentError("largeep.ops.low_latency_combine: return_recv_hook is eager-only")
        bid = _buffer_id(buffer, "low_latency_combine")
        return torch.ops.largeep.low_latency_combine(bid, y, topk_idx, topk_weights, handle), None
    res = _buffer(buffer, "low_latency_combine").low_latency_combine(
        y, topk_idx, topk_weights, handle, return_recv_hook=return_recv_hook
    )
    return res.x, res.hook


# The ops that a recomputation must not run again: the communication ops (every rank would have to issue them again,
# in the same order, and torch's checkpointing of an effectful op in a compiled graph fails), and dispatch_recv,
# whose outputs a ticket gives out once.
_SAVED_BY_CHECKPOINT = frozenset(
    ("dispatch_send", "dispatch_recv", "dispatch_cached", "combine", "low_latency_dispatch", "low_latency_combine")
)


def checkpoint_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """A selective-checkpointing policy (``torch.utils.checkpoint.create_selective_checkpoint_contexts``): MUST_SAVE
    for largeep's communication ops and ``dispatch_recv``, None for any other op (decide those yourself). See
    :func:`checkpoint_context_fn`, which wraps it."""
    from torch.utils.checkpoint import CheckpointPolicy

    if getattr(op, "namespace", None) == "largeep" and op.__name__.split(".")[0] in _SAVED_BY_CHECKPOINT:
        return CheckpointPolicy.MUST_SAVE
    return None


def checkpoint_context_fn(policy: Any = None) -> tuple[Any, Any]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False,
    context_fn=largeep.ops.checkpoint_context_fn)`` around code that calls :func:`dispatch` / :func:`combine` (or a
    ``MoELayer``): the recomputation in the backward keeps the outputs of largeep's communication ops from the
    forward (they are saved, about the size of the received rows and the combined output) and recomputes
    everything else (or what ``policy(ctx, op, *args, **kwargs)`` -> ``CheckpointPolicy`` decides; pass it with
    ``functools.partial(checkpoint_context_fn, policy=...)``). Under ``torch.compile`` plain activation
    checkpointing of a region with largeep's ops fails in torch (it cannot recompute ordered effectful ops); with
    this it compiles and equals eager. Eagerly on the custom-op path it also saves the dispatch and combine that
    plain checkpointing sends again in the backward; the eager path's autograd Functions are not ops that a policy
    sees, and are recomputed as plain checkpointing does."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def choose(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        must = checkpoint_policy(ctx, op, *args, **kwargs)
        if must is not None:
            return must
        return policy(ctx, op, *args, **kwargs) if policy is not None else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(choose)  # type: ignore[no-any-return]


def capture_event(device: torch.device) -> EventOverlap | None:
    """An event recorded now on the current stream of ``device`` (for ``previous_event``); None on CPU (where
    every call has finished when it returns) or while compiling."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(device))
    return EventOverlap(ev, device=device)


def wait(event: EventOverlap | None) -> None:
    """Orders the current stream after ``event`` (no-op for None). Does not block the host."""
    if event is not None:
        event.current_stream_wait()
