"""Argument checks shared by every backend: run once, in Python, before anything is launched.

Each failure raises :class:`largeep.errors.ArgumentError` whose message names the argument and what was expected.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import TypeGuard

import torch

from largeep.errors import ArgumentError, PeerRefusedError
from largeep.fp8 import FP8_DTYPE, GROUP

FLOAT_DTYPES = (torch.bfloat16, torch.float32)


def _where(op: str, arg: str) -> str:
    return f"{op}: argument '{arg}'"


def on(op: str, arg: str, t: torch.Tensor, device: torch.device) -> None:
    """ArgumentError naming ``arg`` unless tensor ``t`` is on ``device`` (a device without an index takes any of its
    type)."""
    where = t.device
    if where != device and (where.type != device.type or (device.index is not None and where.index != device.index)):
        raise ArgumentError(f"{_where(op, arg)} is on {where}, expected {device}")


def writable(op: str, arg: str, t: torch.Tensor) -> None:
    """Refuses an output tensor that an in-place write would fail on after the call's exchanges: a leaf that
    requires grad (with grad enabled), an inference tensor outside inference mode."""
    if t.is_leaf and t.requires_grad and torch.is_grad_enabled():
        raise ArgumentError(f"{_where(op, arg)} is a leaf tensor that requires grad, which cannot be written in "
                            "place (pass one without requires_grad, or call under torch.no_grad())")
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise ArgumentError(f"{_where(op, arg)} is an inference tensor, which cannot be written in place outside "
                            "inference mode")


def tensor(
    op: str,
    arg: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype],
    ndim: int,
    device: torch.device | None,
    shape: Sequence[int | None] | None = None,
    row_aligned: bool = False,
    contiguous: bool = True,
) -> torch.Tensor:
    """Checks that ``t`` is a contiguous tensor of one of ``dtypes`` on ``device`` with ``shape`` (None = any; a
    device None: any device; ``contiguous`` False: any strides).
    ``row_aligned``: token rows the kernels read or write 16 bytes at a time: on CUDA, its data must be 16-byte
    aligned (a view starting mid-row of a larger tensor is not)."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentError(f"{_where(op, arg)} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise ArgumentError(f"{_where(op, arg)} has dtype {t.dtype}, expected {names}")
    have_shape = t.shape  # (each attribute read costs host time on every call: read once)
    if len(have_shape) != ndim:
        raise ArgumentError(f"{_where(op, arg)} has {t.dim()} dimensions {tuple(have_shape)}, expected {ndim}")
    if shape is not None:
        for i, (have, want) in enumerate(zip(have_shape, shape, strict=False)):
            if want is not None and have != want:
                exp = tuple("*" if s is None else s for s in shape)
                raise ArgumentError(f"{_where(op, arg)} has shape {tuple(have_shape)}, expected {exp} (dim {i})")
    if device is not None:
        on(op, arg, t, device)
    where = t.device
    if contiguous and not t.is_contiguous():
        raise ArgumentError(f"{_where(op, arg)} must be contiguous (strides {t.stride()})")
    if row_aligned and where.type == "cuda" and t.data_ptr() % 16:
        raise ArgumentError(f"{_where(op, arg)} must start at a 16-byte aligned address (data_ptr % 16 = "
                            f"{t.data_ptr() % 16}: a view into a larger tensor? pass a copy)")
    return t


def tokens(
    op: str, arg: str, x: object, *, hidden: int, device: torch.device, allow_fp8: bool, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` is [T, H] bf16/fp32, or (when ``allow_fp8``) a pair (e4m3 [T, H], float32 [T, H/128])."""
    if isinstance(x, (tuple, list)):
        if not allow_fp8:
            raise ArgumentError(f"{_where(op, arg)}: an FP8 pair is not accepted here; pass a bf16/fp32 tensor")
        if len(x) != 2:
            raise ArgumentError(f"{_where(op, arg)}: an FP8 pair must have 2 tensors, got {len(x)}")
        if hidden % GROUP:
            raise ArgumentError(f"{_where(op, arg)}: FP8 needs hidden % {GROUP} == 0, hidden is {hidden}")
        q = tensor(op, arg + "[0]", x[0], dtypes=(FP8_DTYPE,), ndim=2, device=device, shape=(rows, hidden),
                   row_aligned=True)
        s = tensor(
            op, arg + "[1]", x[1], dtypes=(torch.float32,), ndim=2, device=device,
            shape=(q.shape[0], hidden // GROUP),
        )
        return q, s
    if isinstance(x, torch.Tensor) and x.dtype == FP8_DTYPE and allow_fp8:  # (codes alone carry no scales)
        raise ArgumentError(f"{_where(op, arg)} has dtype {x.dtype} without its scales: pass the pair (q, s) that "
                            "largeep.fp8.quantize makes (Buffer.dispatch), or a bf16/fp32 x with use_fp8=True "
                            "(largeep.ops.dispatch)")
    t = tensor(op, arg, x, dtypes=FLOAT_DTYPES, ndim=2, device=device, shape=(rows, hidden), row_aligned=True)
    return t, None


def topk_idx(
    op: str, t: object, *, num_tokens: int | None, num_topk: int, num_experts: int, device: torch.device,
    check_values: bool, memo: str | None = None,
) -> torch.Tensor:
    """int64 [T, K] with values in [-1, E). The value check costs one device sync; skipped while capturing.

    memo: "remember" (get_dispatch_layout): a tensor that passes is remembered; "use" (dispatch): a remembered
    tensor, unchanged since (same object, same version counter, same E), is not checked again, and is forgotten --
    so the usual ``get_dispatch_layout(idx)`` then ``dispatch(x, idx, ...)`` syncs the device once, not twice."""
    idx = tensor(op, "topk_idx", t, dtypes=(torch.int64,), ndim=2, device=device, shape=(num_tokens, num_topk))
    if not needs_id_check(idx, check_values):
        return idx
    if memo == "use" and take_checked(idx, num_experts):
        return idx
    id_values(op, idx, num_experts)
    if memo == "remember":
        remember_checked(idx, num_experts)
    return idx


def id_values(op: str, idx: torch.Tensor, num_experts: int) -> None:
    """ArgumentError naming the first id found outside [-1, E) (one device sync on a GPU)."""
    lo_v, hi_v = _id_range(idx)
    if lo_v < -1 or hi_v >= num_experts:
        raise bad_expert_id(op, lo_v if lo_v < -1 else hi_v, num_experts)


def needs_id_check(idx: torch.Tensor, check_values: bool) -> bool:
    """Whether topk_idx's values are to be checked now (checks on, some ids, not capturing a CUDA graph)."""
    return check_values and idx.numel() > 0 and not _capturing(idx.device)


def bad_expert_id(op: str, bad: int, num_experts: int) -> ArgumentError:
    return ArgumentError(f"{_where(op, 'topk_idx')} holds expert id {bad}, expected values in [-1, {num_experts})")


def refused_round(
    op: str, rank: int, refused: list[int], bad: int | None, num_experts: int, no_wait: list[int] | None = None
) -> ArgumentError | PeerRefusedError:
    """What ``rank`` raises for a collective call that the ranks ``refused`` (sorted) voided with an expert id out
    of range: ArgumentError naming ``bad`` (this rank's own bad id) where it refused, else PeerRefusedError naming
    them. ``no_wait``: ranks that ran the call without a host wait (num_worst_tokens), which cannot raise, so that
    their Buffers, and with them the group's, are unusable now."""
    after = _after_void_round(no_wait)
    if rank in refused:
        assert bad is not None, f"{op}: rank {rank} refused without a bad id"
        return ArgumentError(f"{bad_expert_id(op, bad, num_experts)} (nothing was sent by any rank{after})")
    return PeerRefusedError(
        f"{op}: rank(s) {refused} refused this dispatch (an expert id outside [-1, num_experts) in their "
        f"topk_idx, more tokens than max_tokens_per_rank, or another of their arguments), so the round was void on "
        f"every rank: rank {rank} sent and received nothing{after}",
        buffer_usable=not no_wait,
    )


def refused_call(op: str, rank: int, refused: list[int], what: str) -> PeerRefusedError:
    """What ``rank`` raises where the ranks ``refused`` (sorted) refused their part of its call ``op`` for their
    arguments and told the others in the call's first exchange (``what``: the call they refused), before any row
    moved: the call is void on every rank, and the Buffer usable."""
    return PeerRefusedError(
        f"{op}: rank(s) {refused} refused their call ({what}) for its arguments, so the call was void on every rank: "
        f"rank {rank} sent and received nothing, and the Buffer stays usable for the next call"
    )


def _after_void_round(no_wait: list[int] | None) -> str:
    """How a void round leaves the Buffers: usable, unless ranks ``no_wait`` ran it without a host wait."""
    if no_wait:
        return (f"; rank(s) {no_wait} ran the call with num_worst_tokens and could not raise, so their Buffers are "
                "unusable now (they raise at their next call): destroy the Buffer on every rank and make a new one")
    return ", and the Buffer stays usable for the next call"


def rows_kind(dtype: torch.dtype | str, with_scales: bool) -> str:
    """A dispatch's kind of rows, as the refusals of ranks that disagree name it (both backends)."""
    return f"x {dtype}{', FP8 scales' if with_scales else ''}"


def calls_disagree(op: str, calls: Sequence[str], rule: str, no_wait: list[int] | None = None) -> ArgumentError:
    """What every rank raises for a collective call whose ranks disagree on its kind (``calls``: each rank's, in
    rank order), which was void on every rank; ``rule``: what every rank must do."""
    desc = "; ".join(f"rank {r}: {c}" for r, c in enumerate(calls))
    return ArgumentError(f"{op}: the ranks of the group disagree on the call ({desc}); every rank must {rule} "
                         f"(nothing was sent by any rank{_after_void_round(no_wait)})")


# topk_idx tensors a layout checked, waiting for the dispatch that follows: id -> (weak reference, version counter,
# E). One use each: a tensor changed in place through torch gets a new version and is checked again; writes torch
# does not see (a CUDA graph replay, raw pointers, a torch.distributed receive or broadcast into it) between a
# layout and its dispatch are not caught. Tensors made under inference_mode have no version counter and are always
# checked.
_CHECKED: OrderedDict[int, tuple[weakref.ref[torch.Tensor], int, int]] = OrderedDict()
_CHECKED_MAX = 16


def take_checked(idx: torch.Tensor, num_experts: int) -> bool:
    """idx is a tensor a layout just checked (unchanged since, same E): True, and forgotten (one use)."""
    hit = _CHECKED.pop(id(idx), None)
    return (
        hit is not None and hit[0]() is idx and not idx.is_inference() and hit[1] == idx._version
        and hit[2] == num_experts
    )


def remember_checked(idx: torch.Tensor, num_experts: int) -> None:
    """idx passed the id check (here, or in a backend's layout): the dispatch that follows need not check it."""
    if idx.is_inference():
        return
    _CHECKED[id(idx)] = (weakref.ref(idx), idx._version, num_experts)
    _CHECKED.move_to_end(id(idx))
    while len(_CHECKED) > _CHECKED_MAX:
        _CHECKED.popitem(last=False)


def _id_range(idx: torch.Tensor) -> tuple[int, int]:
    """(min, max) of idx with one device sync (not one per value)."""
    lo, hi = torch.stack(torch.aminmax(idx)).tolist()
    return int(lo), int(hi)


def topk_weights(op: str, t: object, *, num_tokens: int, num_topk: int, device: torch.device) -> torch.Tensor:
    return tensor(
        op, "topk_weights", t, dtypes=(torch.float32,), ndim=2, device=device, shape=(num_tokens, num_topk)
    )


# The most rows the native kernels number (32-bit ints walked in grid-stride loops: a grid's stride, at most a few
# hundred thousand threads, must fit below 2**31)
MAX_ROWS = (1 << 31) - (1 << 20)


def integer_tensor(v: object) -> TypeGuard[torch.Tensor]:
    """Whether ``v`` is a tensor of integers (not bool): what expert ids may be held in."""
    return isinstance(v, torch.Tensor) and not (v.dtype.is_floating_point or v.dtype.is_complex
                                                or v.dtype == torch.bool)


def flags(op: str, **named: object) -> None:
    """ArgumentError naming the first of ``named`` that is not a bool (a string such as "no" or an int is refused:
    its truth is not what it says)."""
    for arg, v in named.items():
        if not isinstance(v, bool):
            raise ArgumentError(f"{_where(op, arg)} must be a bool (True or False), got {type(v).__name__} {v!r:.40}")


def positive_int(op: str, arg: str, v: object, *, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
    """An int in [minimum, maximum] (default maximum: what the kernels' int32 counts hold)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ArgumentError(f"{_where(op, arg)} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ArgumentError(f"{_where(op, arg)} must be >= {minimum}, got {v}")
    if v > maximum:
        raise ArgumentError(f"{_where(op, arg)} must be <= {maximum}, got {v}")
    return v


def max_tokens(op: str, num_tokens: int, max_tokens_per_rank: int, arg: str = "x") -> None:
    if num_tokens > max_tokens_per_rank:
        raise ArgumentError(
            f"{_where(op, arg)} has {num_tokens} tokens, more than max_tokens_per_rank={max_tokens_per_rank} "
            "given to the Buffer"
        )


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
