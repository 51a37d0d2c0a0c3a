"""Wrong calls, one per row of ``CASES``, each followed by a good round on the same Buffer (SPEC.md, "Errors").

The body ``bad_call(rank, world, backend, name)`` runs on every rank of a pool: it builds a Buffer and good inputs,
makes the wrong call of case ``name`` (every rank makes it, so no rank is left waiting in a collective), checks the
exception's type and message, checks that no tensor the caller holds changed, then runs a good dispatch + combine
checked against ``reference.py``. It returns the failures instead of raising (see ``checked_calls``).

The backend name is an argument so the GPU run reuses every row with "nvshmem" (and "torch" over NCCL). Rows whose
``device`` is "cuda" need a CUDA Buffer (tensors on the wrong device); rows whose ``device`` is "cpu" need a Buffer
on a gloo group (where "nvshmem" cannot run).
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import largeep
import torch
import torch.distributed as dist
from checked_calls import (
    Checker,
    LowLatencyCase,
    LowLatencyRound,
    NormalCase,
    NormalRound,
    same_bits,
)
from largeep import ArgumentError, BufferDestroyedError, fp8
from reference import make_inputs, ref_combine, ref_dispatch, ref_layout, ref_low_latency, ref_low_latency_combine

HIDDEN, EXPERTS, TOPK, MAX_TOKENS = 256, 8, 3, 16


def tokens_of(world: int) -> tuple[int, ...]:
    """Uneven token counts, all below MAX_TOKENS and above 0 (every rank must make the wrong call)."""
    return tuple(5 + 2 * r for r in range(world))


@dataclass
class Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Env:
    """What a row's ``call`` may use. x/idx/w: good inputs of this rank on the Buffer's device (x bf16 [T, H],
    idx int64 [T, K], w float32 [T, K]); prev: a good dispatch already made on ``buf`` (its handle is valid)."""

    rank: int
    world: int
    backend: str
    dev: torch.device
    hidden: int
    low_latency: bool
    buf: largeep.Buffer
    x: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor
    prev: Any
    extra: list[largeep.Buffer] = field(default_factory=list)
    groups: list[dist.ProcessGroup] = field(default_factory=list)
    destroyed: bool = False

    def buffer_kwargs(self, **over: Any) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            hidden=self.hidden, num_experts=EXPERTS, num_topk=TOPK, max_tokens_per_rank=MAX_TOKENS,
            backend=self.backend, low_latency=self.low_latency,
        )
        kw.update(over)
        return kw

    def other_buffer(self, group: dist.ProcessGroup | None = None, **over: Any) -> largeep.Buffer:
        if group is not None and self.backend == "nvshmem":
            # NVSHMEM serves one group per process (a second one is refused, tested in test_gpu.py): the Buffer on
            # the other group uses the torch backend; its handles and shapes still do not fit this Buffer.
            over.setdefault("backend", "torch")
        b = largeep.Buffer(group, **self.buffer_kwargs(**over))
        self.extra.append(b)
        return b

    def destroy(self) -> None:
        self.buf.destroy()
        self.destroyed = True

    @property
    def rows(self) -> int:
        """Rows of the previous normal dispatch on this rank."""
        return int(self.prev.handle.num_recv_tokens)

    def y(self, rows: int | None = None, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Expert outputs [rows, H] for a normal combine (default: the previous dispatch's row count)."""
        n = self.rows if rows is None else rows
        return torch.randn(n, self.hidden, device=self.dev).to(dtype)

    def ll_y(self, experts: int | None = None, rows: int | None = None, hidden: int | None = None,
             dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        e = EXPERTS // self.world if experts is None else experts
        r = self.world * MAX_TOKENS if rows is None else rows
        return torch.randn(e, r, hidden or self.hidden, device=self.dev).to(dtype)


def strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous tensor equal to ``t`` (same shape and dtype): every other column of a wider one."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    out = wide[..., ::2]
    out.copy_(t)
    assert not out.is_contiguous()
    return out


def transposed(t: torch.Tensor) -> torch.Tensor:
    """A column-major tensor equal to a 2-D ``t`` (same shape and dtype; strides (1, rows)): the transpose of a
    contiguous one."""
    out = t.t().contiguous().t()
    assert not out.is_contiguous() and out.shape == t.shape
    return out


def row_pitch(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous tensor equal to ``t`` whose last dimension is dense (stride 1) but whose rows are further
    apart: the first columns of a wider one."""
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 128, dtype=t.dtype, device=t.device)
    out = wide[..., :t.shape[-1]]
    out.copy_(t)
    assert not out.is_contiguous() and out.stride(-1) == 1
    return out


def with_id(idx: torch.Tensor, value: int, at: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``idx`` with entry ``at`` (default [0, 0]) set to ``value`` (a fresh tensor)."""
    out = idx.clone()
    out[at] = value
    return out


def more_tokens(e: Env, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Good-looking inputs with ``n`` tokens (used with n > MAX_TOKENS)."""
    inp = make_inputs(77, e.rank, n, e.hidden, EXPERTS, TOPK, torch.bfloat16)
    return inp.x.to(e.dev), inp.topk_idx.to(e.dev), inp.topk_weights.to(e.dev)


def fp8_pair(e: Env) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [T, H], float32 [T, H/128]) of x; for a hidden size that is no multiple of 128, one scale per row."""
    if e.hidden % fp8.GROUP:
        t = e.x.shape[0]
        return e.x.to(fp8.FP8_DTYPE), torch.ones(t, max(e.hidden // fp8.GROUP, 1), device=e.dev)
    q, s = fp8.quantize(e.x.float().cpu())
    return q.to(e.dev), s.to(e.dev)


def other_handle(e: Env, destroy: bool, low_latency: bool | None = None, group: dist.ProcessGroup | None = None
                 ) -> Any:
    """A valid handle of another Buffer of the same sizes (destroyed afterwards when ``destroy``). Its inputs go to
    that Buffer's device: a torch Buffer on a subgroup of a gloo group whose ranks share a GPU takes CPU tensors."""
    ll = e.low_latency if low_latency is None else low_latency
    b = e.other_buffer(group, low_latency=ll)
    x, idx, w = (t.to(b.ctx.device) for t in (e.x, e.idx, e.w))
    h: largeep.DispatchHandle | largeep.LowLatencyHandle
    if ll:
        h = b.low_latency_dispatch(x, idx, use_fp8=False).handle
    else:
        h = b.dispatch(x, idx, w).handle
    if destroy:
        b.destroy()
    return h


def own_subgroup(e: Env) -> dist.ProcessGroup:
    """A group of size 1 holding only this rank (every rank takes part in making all of them)."""
    mine, _ = dist.new_subgroups(group_size=1)
    e.groups.append(mine)
    return mine


def ll_y_for_world_on_subgroup(e: Env) -> Call:
    # A Buffer on a group of 1 expects y [E, 1*M, H]; y shaped for the world is [E/N, N*M, H]
    sub = own_subgroup(e)
    b = e.other_buffer(sub, low_latency=True)
    x, idx, w, y = (t.to(b.ctx.device) for t in (e.x, e.idx, e.w, e.ll_y()))  # (see other_handle)
    h = b.low_latency_dispatch(x, idx, use_fp8=False).handle
    return Call(b.low_latency_combine, (y, idx, w, h))


def buffer_on_group_without_me(e: Env) -> Call | None:
    g = dist.new_group(ranks=[0])
    if e.rank == 0:
        e.groups.append(g)
        return None
    return Call(largeep.Buffer, (g,), e.buffer_kwargs())


def make_buffer(e: Env, **over: Any) -> Call:
    return Call(largeep.Buffer, (None,), e.buffer_kwargs(**over))


def _destroyed(e: Env, call: Callable[[Env], Call]) -> Call:
    made = call(e)  # built while the Buffer is alive, called after destroy()
    e.destroy()
    return made


@dataclass(frozen=True)
class BadCase:
    """A wrong call. ``words``: substrings that must all appear in the message (the argument, what was expected).
    ``device``: "any", "cuda" (needs a CUDA Buffer) or "cpu" (needs a Buffer on a gloo group); ``gpus``: the GPUs
    the process needs (ranks sharing one GPU skip a case of 2)."""

    name: str
    low_latency: bool
    call: Callable[[Env], Call | None]
    words: tuple[str, ...]
    error: type[BaseException] = ArgumentError
    device: str = "any"
    hidden: int = HIDDEN
    gpus: int = 0


def ll_third_call(e: Env, combine: bool) -> Call:
    """A low-latency call (of one op) with a hook, one without, then a third while the first's hook is still due:
    the third is the wrong call; the first hook is called after it either way (the good round needs its slots)."""
    buf = e.buf
    if combine:
        y = e.ll_y()

        def issue(hook: bool = False) -> Any:
            return buf.low_latency_combine(y, e.idx, e.w, e.prev.handle, return_recv_hook=hook)
    else:
        def issue(hook: bool = False) -> Any:
            return buf.low_latency_dispatch(e.x, e.idx, use_fp8=False, return_recv_hook=hook)
    first = issue(hook=True)
    issue()

    def third() -> None:
        try:
            issue()
        finally:
            first.hook()

    return Call(third)


def ll_bad_id_with_a_hook_due(e: Env) -> Call:
    """A low-latency dispatch with a bad expert id while an earlier one's hook is due: refused, and it takes no place
    among the calls in flight -- one more dispatch with a hook is accepted after it (two in flight); both hooks are
    called after it either way."""
    buf = e.buf
    first = buf.low_latency_dispatch(e.x, e.idx, use_fp8=False, return_recv_hook=True)

    def call() -> None:
        try:
            buf.low_latency_dispatch(e.x, with_id(e.idx, EXPERTS), use_fp8=False)
        finally:
            second = buf.low_latency_dispatch(e.x, e.idx, use_fp8=False, return_recv_hook=True)
            assert first.hook is not None and second.hook is not None
            first.hook()
            second.hook()

    return Call(call)


def ll_weights_differ(e: Env, how: str) -> Call:
    """A low-latency combine whose handle's dispatch was given topk_weights, called with other weights: ``how`` =
    "copy" (equal values, another tensor) or "in_place" (the same tensor, changed since). Refused: the dispatch's
    rows carried those weights to the experts' ranks, where the nvshmem combine applies them."""
    w = e.w.clone()
    d = e.buf.low_latency_dispatch(e.x, e.idx, use_fp8=False, topk_weights=w)
    if how == "in_place":
        w.mul_(1.0)
    return Call(e.buf.low_latency_combine, (e.ll_y(), e.idx, w.clone() if how == "copy" else w, d.handle))


def ll_ids_differ(e: Env, how: str) -> Call:
    """A low-latency combine whose handle's dispatch was given topk_weights, called with other ids: ``how`` =
    "copy" (equal values, another tensor), "masked" (a copy with -1 at a k that was sent) or "in_place" (the same
    tensor, changed since). Refused: the experts' ranks sum each token's outputs over the k they got, which other
    ids cannot mask."""
    idx = e.idx.clone()
    d = e.buf.low_latency_dispatch(e.x, idx, use_fp8=False, topk_weights=e.w)
    if how == "in_place":
        idx.add_(0)
    given = idx
    if how == "copy":
        given = idx.clone()
    elif how == "masked":
        given = idx.clone()
        given[:, 0] = -1
    return Call(e.buf.low_latency_combine, (e.ll_y(), given, e.w, d.handle))


def ll_hook_that_raised(rank: int, world: int) -> dict[str, str]:
    """A low-latency dispatch's receive hook whose receive raises (injected, after the real receive ran): the hook
    raises that error; a second call of it raises that it may be called once, naming the first call's error; a
    combine given the handle raises RuntimeError naming it (the handle was never marked received); and the failed
    call is no longer in flight (two more calls with hooks due are accepted). Returns the messages."""
    buf = largeep.Buffer(None, hidden=HIDDEN, num_experts=EXPERTS, num_topk=TOPK, max_tokens_per_rank=MAX_TOKENS,
                         backend="torch", low_latency=True)
    try:
        x = torch.randn(MAX_TOKENS, HIDDEN).to(torch.bfloat16)
        idx = torch.stack([torch.randperm(EXPERTS)[:TOPK] for _ in range(MAX_TOKENS)])
        w = torch.rand(MAX_TOKENS, TOPK)
        real = buf._impl.low_latency_dispatch

        def failing(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            finish = out.finish

            def fail() -> None:
                finish()
                raise RuntimeError("the receive's launch failed (injected)")

            out.finish = fail
            return out

        buf._impl.low_latency_dispatch = failing
        try:
            d = buf.low_latency_dispatch(x, idx, use_fp8=False, return_recv_hook=True)
        finally:
            buf._impl.low_latency_dispatch = real
        assert d.hook is not None
        msgs: dict[str, str] = {}
        for name, call in (("hook", d.hook), ("again", d.hook),
                           ("combine", lambda: buf.low_latency_combine(
                               torch.randn(EXPERTS // world, world * MAX_TOKENS, HIDDEN).to(torch.bfloat16), idx, w,
                               d.handle))):
            try:
                call()
            except RuntimeError as exc:
                assert not isinstance(exc, ArgumentError), f"{name}: {exc}"
                msgs[name] = str(exc)
            else:
                raise AssertionError(f"{name}: did not raise")
        first = buf.low_latency_dispatch(x, idx, use_fp8=False, return_recv_hook=True)
        second = buf.low_latency_dispatch(x, idx, use_fp8=False, return_recv_hook=True)
        assert first.hook is not None and second.hook is not None
        first.hook()
        second.hook()
        return msgs
    finally:
        buf.destroy()


def ll_given_up_call_not_in_flight(rank: int, world: int) -> str:
    """A low-latency dispatch whose backend gives up (PeerTimeoutError, as the nvshmem id check's host wait does)
    before sending, while an earlier call's hook is due: the failed call takes no place among the calls in flight, so
    one more call with a hook is accepted. Returns the failed call's message."""
    from largeep.errors import PeerTimeoutError

    buf = largeep.Buffer(None, hidden=HIDDEN, num_experts=EXPERTS, num_topk=TOPK, max_tokens_per_rank=MAX_TOKENS,
                         backend="torch", low_latency=True)
    try:
        x = torch.randn(MAX_TOKENS, HIDDEN).to(torch.bfloat16)
        idx = torch.stack([torch.randperm(EXPERTS)[:TOPK] for _ in range(MAX_TOKENS)])
        first = buf.low_latency_dispatch(x, idx, use_fp8=False, return_recv_hook=True)
        real = buf._impl.low_latency_dispatch

        def gives_up(*args: Any, **kwargs: Any) -> Any:
            raise PeerTimeoutError("low_latency_dispatch: the id check did not finish (injected)")

        buf._impl.low_latency_dispatch = gives_up
        try:
            buf.low_latency_dispatch(x, idx, use_fp8=False)
        except PeerTimeoutError as exc:
            msg = str(exc)
        else:
            raise AssertionError("the injected failure did not raise")
        finally:
            buf._impl.low_latency_dispatch = real
        second = buf.low_latency_dispatch(x, idx, use_fp8=False, return_recv_hook=True)
        assert first.hook is not None and second.hook is not None
        first.hook()
        second.hook()
        return msg
    finally:
        buf.destroy()


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data starts one element past a 16-byte boundary."""
    base = torch.empty(t.numel() + 16, dtype=t.dtype, device=t.device)
    return base[1:1 + t.numel()].view(t.shape).copy_(t)


def ll_combine_before_hook(e: Env) -> Call:
    """A low-latency combine given the handle of a dispatch whose receive hook is still due (its rows have not been
    received): refused; the hook is called after it either way."""
    d = e.buf.low_latency_dispatch(e.x, e.idx, use_fp8=False, return_recv_hook=True)
    y = e.ll_y()

    def call() -> None:
        try:
            e.buf.low_latency_combine(y, e.idx, e.w, d.handle)
        finally:
            assert d.hook is not None
            d.hook()

    return Call(call)


def ll_hook_of(e: Env) -> Call:
    """The receive hook of a low-latency dispatch (for a call after destroy())."""
    d = e.buf.low_latency_dispatch(e.x, e.idx, use_fp8=False, return_recv_hook=True)
    assert d.hook is not None
    return Call(d.hook)


def _n(name: str, call: Callable[[Env], Call | None], *words: str, **kw: Any) -> BadCase:
    return BadCase(name, False, call, words, **kw)


def _ll(name: str, call: Callable[[Env], Call | None], *words: str, **kw: Any) -> BadCase:
    return BadCase(name, True, call, words, **kw)


_K = ("expected (", f", {TOPK}) (dim")
CASES: list[BadCase] = [
    # -- Buffer creation --------------------------------------------------------------------------------------
    _n("create_num_experts_not_divisible", lambda e: make_buffer(e, num_experts=EXPERTS + 1),
       "'num_experts'", f"{EXPERTS + 1}", "not divisible by the group size"),
    _n("create_ranks_per_node_not_dividing", lambda e: make_buffer(e, ranks_per_node=e.world + 1),
       "'ranks_per_node'", "must divide the group size"),
    _n("create_hidden_zero_on_rank_0_only", lambda e: make_buffer(e, hidden=0 if e.rank == 0 else HIDDEN),
       "'hidden'", ">= 1"),
    _n("create_ranks_disagree_on_hidden", lambda e: make_buffer(e, hidden=HIDDEN * (1 + e.rank % 2)),
       "disagree", "hidden"),
    _n("create_ranks_per_node_zero", lambda e: make_buffer(e, ranks_per_node=0), "'ranks_per_node'", ">= 1"),
    _n("create_group_not_a_process_group", lambda e: Call(largeep.Buffer, (0,), e.buffer_kwargs()),
       "'group'", "must be a torch.distributed.ProcessGroup", "got int"),
    _n("create_group_a_list_of_ranks", lambda e: Call(largeep.Buffer, (list(range(e.world)),), e.buffer_kwargs()),
       "'group'", "must be a torch.distributed.ProcessGroup", "got list"),
    _n("create_hidden_zero", lambda e: make_buffer(e, hidden=0), "'hidden'", ">= 1"),
    _n("create_hidden_float", lambda e: make_buffer(e, hidden=256.0), "'hidden'", "must be an int", "float"),
    _n("create_num_topk_above_experts", lambda e: make_buffer(e, num_topk=EXPERTS + 1),
       "'num_topk'", "exceeds num_experts"),
    _n("create_max_tokens_zero", lambda e: make_buffer(e, max_tokens_per_rank=0), "'max_tokens_per_rank'", ">= 1"),
    _n("create_num_sms_zero", lambda e: make_buffer(e, num_sms=0), "'num_sms'", ">= 1"),
    _n("create_low_latency_not_bool", lambda e: make_buffer(e, low_latency="no"),
       "'low_latency'", "must be a bool", "str 'no'"),
    _n("create_backend_unknown", lambda e: make_buffer(e, backend="mpi"), "'backend'", "'mpi'", "expected"),
    _n("create_nvshmem_without_gpus", lambda e: make_buffer(e, backend="nvshmem"),
       "'nvshmem'", "not available", error=RuntimeError, device="cpu"),
    _n("create_group_without_this_rank", buffer_on_group_without_me, "'group'", "rank"),
    # -- normal dispatch: x -----------------------------------------------------------------------------------
    _n("dispatch_x_dtype_int32", lambda e: Call(e.buf.dispatch, (e.x.to(torch.int32), e.idx, e.w)),
       "'x'", "dtype torch.int32", "expected torch.bfloat16, torch.float32"),
    _n("dispatch_x_dtype_float16", lambda e: Call(e.buf.dispatch, (e.x.half(), e.idx, e.w)),
       "'x'", "dtype torch.float16", "expected"),
    _n("dispatch_x_fp8_without_scales", lambda e: Call(e.buf.dispatch, (e.x.to(fp8.FP8_DTYPE), e.idx, e.w)),
       "'x'", "dtype torch.float8_e4m3fn without its scales", "fp8.quantize", "use_fp8=True"),
    _n("dispatch_x_not_a_tensor", lambda e: Call(e.buf.dispatch, (e.x.float().cpu().numpy(), e.idx, e.w)),
       "'x'", "must be a torch.Tensor", "ndarray"),
    _n("dispatch_x_list_of_rows", lambda e: Call(e.buf.dispatch, (list(e.x), e.idx, e.w)),
       "'x'", "FP8 pair must have 2 tensors"),
    _n("dispatch_x_1d", lambda e: Call(e.buf.dispatch, (e.x.reshape(-1), e.idx, e.w)),
       "'x'", "1 dimensions", "expected 2"),
    _n("dispatch_x_wrong_hidden", lambda e: Call(e.buf.dispatch, (e.x[:, :128].contiguous(), e.idx, e.w)),
       "'x'", "shape", f"expected ('*', {HIDDEN})"),
    _n("dispatch_x_non_contiguous", lambda e: Call(e.buf.dispatch, (strided(e.x), e.idx, e.w)),
       "'x'", "contiguous"),
    _n("dispatch_x_transposed", lambda e: Call(e.buf.dispatch, (transposed(e.x), e.idx, e.w)),
       "'x'", "contiguous"),
    _n("dispatch_x_row_pitch", lambda e: Call(e.buf.dispatch, (row_pitch(e.x), e.idx, e.w)),
       "'x'", "contiguous"),
    _n("dispatch_x_too_many_tokens", lambda e: Call(e.buf.dispatch, more_tokens(e, MAX_TOKENS + 1)),
       "'x'", f"{MAX_TOKENS + 1} tokens", f"max_tokens_per_rank={MAX_TOKENS}"),
    _n("dispatch_fp8_scales_dtype", lambda e: Call(e.buf.dispatch, ((fp8_pair(e)[0], fp8_pair(e)[1].bfloat16()),
                                                                     e.idx, e.w)),
       "'x[1]'", "dtype torch.bfloat16", "expected torch.float32"),
    _n("dispatch_fp8_scales_shape", lambda e: Call(e.buf.dispatch, ((fp8_pair(e)[0], fp8_pair(e)[1][:, :1].clone()),
                                                                     e.idx, e.w)),
       "'x[1]'", "shape", f", {HIDDEN // 128}) (dim 1)"),
    _n("dispatch_fp8_three_tensors", lambda e: Call(e.buf.dispatch, ((*fp8_pair(e), e.x), e.idx, e.w)),
       "'x'", "2 tensors", "got 3"),
    _n("dispatch_fp8_hidden_not_128", lambda e: Call(e.buf.dispatch, (fp8_pair(e), e.idx, e.w)),
       "'x'", "FP8 needs hidden % 128 == 0", "hidden is 192", hidden=192),
    # -- normal dispatch: topk_idx / topk_weights / options -------------------------------------------------
    _n("dispatch_idx_dtype_int32", lambda e: Call(e.buf.dispatch, (e.x, e.idx.int(), e.w)),
       "'topk_idx'", "dtype torch.int32", "expected torch.int64"),
    _n("dispatch_idx_wrong_topk", lambda e: Call(e.buf.dispatch, (e.x, e.idx[:, :-1].contiguous(), e.w)),
       "'topk_idx'", "shape", "dim 1"),
    _n("dispatch_idx_wrong_rows", lambda e: Call(e.buf.dispatch, (e.x, e.idx[:-1].contiguous(), e.w)),
       "'topk_idx'", "shape", "dim 0"),
    _n("dispatch_idx_non_contiguous", lambda e: Call(e.buf.dispatch, (e.x, strided(e.idx), e.w)),
       "'topk_idx'", "contiguous"),
    _n("dispatch_idx_expert_too_large", lambda e: Call(e.buf.dispatch, (e.x, with_id(e.idx, EXPERTS), e.w)),
       "'topk_idx'", f"expert id {EXPERTS}", f"[-1, {EXPERTS})"),
    _n("dispatch_alignment_too_large", lambda e: Call(e.buf.dispatch, (e.x, e.idx, e.w), {"expert_alignment": 1 << 31}),
       "'expert_alignment'", "<= 1048576"),
    _n("dispatch_ranks_disagree_on_worst",
       lambda e: Call(e.buf.dispatch, (e.x, e.idx, e.w), {"num_worst_tokens": e.rank and e.world * MAX_TOKENS}),
       "disagree", "num_worst_tokens=0", device="cpu"),
    _n("dispatch_ranks_disagree_on_dtype",
       lambda e: Call(e.buf.dispatch, (e.x.float() if e.rank == 0 else e.x, e.idx, e.w)),
       "disagree", "rank 0: ", "x torch.float32", "rank 1: ", "x torch.bfloat16"),
    _n("dispatch_ranks_disagree_on_fp8",
       lambda e: Call(e.buf.dispatch, (fp8_pair(e) if e.rank == 1 else e.x, e.idx, e.w)),
       "disagree", "rank 0: ", "x torch.bfloat16", "rank 1: ", "x torch.float8_e4m3fn, FP8 scales"),
    _n("dispatch_worst_too_small", lambda e: Call(e.buf.dispatch, (e.x, e.idx, e.w), {"num_worst_tokens": 1}),
       "'num_worst_tokens' = 1", "smaller than the rows", device="cpu"),
    _n("dispatch_worst_idx_expert_too_large",
       lambda e: Call(e.buf.dispatch, (e.x, with_id(e.idx, EXPERTS), e.w), {"num_worst_tokens": e.world * MAX_TOKENS}),
       "'topk_idx'", f"expert id {EXPERTS}", device="cpu"),
    _n("dispatch_idx_expert_below_minus_one", lambda e: Call(e.buf.dispatch, (e.x, with_id(e.idx, -2), e.w)),
       "'topk_idx'", "expert id -2", f"[-1, {EXPERTS})"),
    _n("dispatch_weights_dtype", lambda e: Call(e.buf.dispatch, (e.x, e.idx, e.w.bfloat16())),
       "'topk_weights'", "dtype torch.bfloat16", "expected torch.float32"),
    _n("dispatch_weights_shape", lambda e: Call(e.buf.dispatch, (e.x, e.idx, e.w[:, :1].contiguous())),
       "'topk_weights'", "shape", *_K),
    _n("dispatch_weights_missing", lambda e: Call(e.buf.dispatch, (e.x, e.idx, None)),
       "'topk_idx' and 'topk_weights' are required"),
    _n("dispatch_alignment_zero", lambda e: Call(e.buf.dispatch, (e.x, e.idx, e.w), {"expert_alignment": 0}),
       "'expert_alignment'", ">= 1"),
    _n("dispatch_worst_above_32_bit_rows",
       lambda e: Call(e.buf.dispatch, (e.x, e.idx, e.w), {"num_worst_tokens": (1 << 31) - (1 << 20) + 1}),
       "'num_worst_tokens'", f"<= {(1 << 31) - (1 << 20)}"),
    _n("dispatch_worst_negative", lambda e: Call(e.buf.dispatch, (e.x, e.idx, e.w), {"num_worst_tokens": -1}),
       "'num_worst_tokens'", ">= 0"),
    # -- normal dispatch with a handle ----------------------------------------------------------------------
    _n("dispatch_handle_and_idx", lambda e: Call(e.buf.dispatch, (e.x, e.idx, e.w), {"handle": e.prev.handle}),
       "'handle'", "'topk_idx' and 'topk_weights' must be None"),
    _n("dispatch_handle_positional", lambda e: Call(e.buf.dispatch, (e.x, e.prev.handle)),
       "'topk_idx' is a DispatchHandle", "dispatch(x, handle=h)"),
    _n("dispatch_handle_wrong_tokens", lambda e: Call(e.buf.dispatch, (e.x[:-1].contiguous(),),
                                                      {"handle": e.prev.handle}),
       "'x'", "but the handle was made for"),
    _n("dispatch_handle_other_buffer", lambda e: Call(e.buf.dispatch, (e.x,), {"handle": other_handle(e, False)}),
       "'handle'", "another"),
    _n("dispatch_handle_destroyed_buffer", lambda e: Call(e.buf.dispatch, (e.x,),
                                                          {"handle": other_handle(e, True)}),
       "'handle'", "destroyed"),
    _n("dispatch_handle_variable_with_worst",
       lambda e: Call(e.buf.dispatch, (e.x,), {"handle": e.prev.handle, "num_worst_tokens": max(e.rows, 1)}),
       "'num_worst_tokens'", "handle"),
    # a cached dispatch returns its handle's dispatch's counts: another expert_alignment is refused, not ignored,
    # before any row moves (on every rank: a refusal on one rank alone is told to the others' call, see
    # lone_refusal); 1, the default, means the handle's alignment (NormalRound checks a cached dispatch's counts)
    _n("dispatch_handle_other_alignment",
       lambda e: Call(e.buf.dispatch, (e.x,), {"handle": e.prev.handle, "expert_alignment": 4}),
       "argument 'expert_alignment' = 4 differs from the handle's (1)"),
    # -- layout --------------------------------------------------------------------------------------------
    _n("layout_idx_dtype_float", lambda e: Call(e.buf.get_dispatch_layout, (e.idx.float(),)),
       "'topk_idx'", "dtype torch.float32", "expected torch.int64"),
    _n("layout_idx_dtype_int32", lambda e: Call(e.buf.get_dispatch_layout, (e.idx.int(),)),
       "'topk_idx'", "dtype torch.int32", "expected torch.int64"),
    _n("layout_idx_1d", lambda e: Call(e.buf.get_dispatch_layout, (e.idx.reshape(-1),)),
       "'topk_idx'", "1 dimensions", "expected 2"),
    _n("layout_idx_wrong_topk", lambda e: Call(e.buf.get_dispatch_layout, (e.idx[:, :-1].contiguous(),)),
       "'topk_idx'", "shape", *_K),
    _n("layout_idx_expert_too_large", lambda e: Call(e.buf.get_dispatch_layout, (with_id(e.idx, EXPERTS + 5),)),
       "'topk_idx'", f"expert id {EXPERTS + 5}"),
    _n("layout_idx_expert_below_minus_one", lambda e: Call(e.buf.get_dispatch_layout, (with_id(e.idx, -3),)),
       "'topk_idx'", "expert id -3", f"[-1, {EXPERTS})"),
    _n("layout_idx_expert_minus_two", lambda e: Call(e.buf.get_dispatch_layout, (with_id(e.idx, -2, (1, 1)),)),
       "'topk_idx'", "expert id -2", f"[-1, {EXPERTS})"),
    _n("layout_idx_expert_equal_to_num_experts",
       lambda e: Call(e.buf.get_dispatch_layout, (with_id(e.idx, EXPERTS, (2, 0)),)),
       "'topk_idx'", f"expert id {EXPERTS}", f"[-1, {EXPERTS})"),
    _n("layout_too_many_tokens", lambda e: Call(e.buf.get_dispatch_layout, (more_tokens(e, MAX_TOKENS + 3)[1],)),
       "'topk_idx'", f"{MAX_TOKENS + 3} tokens", f"max_tokens_per_rank={MAX_TOKENS}"),
    # -- normal combine ------------------------------------------------------------------------------------
    _n("dispatch_async_finish_not_bool", lambda e: Call(e.buf.dispatch, (e.x, e.idx, e.w), {"async_finish": 1}),
       "'async_finish'", "must be a bool", "int 1"),
    _n("layout_async_finish_not_bool", lambda e: Call(e.buf.get_dispatch_layout, (e.idx,),
                                                      {"async_finish": "yes"}),
       "'async_finish'", "must be a bool", "str"),
    _n("combine_async_finish_not_bool", lambda e: Call(e.buf.combine, (e.y(), e.prev.handle), {"async_finish": None}),
       "'async_finish'", "must be a bool", "NoneType"),
    _n("combine_bf16_partial_sums_not_bool", lambda e: Call(e.buf.combine, (e.y(), e.prev.handle),
                                                            {"bf16_partial_sums": 1}),
       "'bf16_partial_sums'", "must be a bool", "int 1"),
    _n("combine_bf16_partial_sums_float32_y", lambda e: Call(e.buf.combine, (e.y(dtype=torch.float32), e.prev.handle),
                                                             {"bf16_partial_sums": True}),
       "'bf16_partial_sums'", "needs y in bfloat16", "torch.float32"),
    _n("combine_rows_more_than_handle", lambda e: Call(e.buf.combine, (e.y(e.rows + 1), e.prev.handle)),
       "'y'", "shape", "dim 0"),
    _n("combine_rows_fewer_than_handle", lambda e: Call(e.buf.combine, (e.y(max(e.rows - 1, 0) if e.rows else 3),
                                                                        e.prev.handle)),
       "'y'", "shape", "dim 0"),
    _n("combine_y_wrong_hidden", lambda e: Call(e.buf.combine, (e.y()[:, :128].contiguous(), e.prev.handle)),
       "'y'", "shape", "dim 1"),
    _n("combine_y_dtype_float16", lambda e: Call(e.buf.combine, (e.y(dtype=torch.float16), e.prev.handle)),
       "'y'", "dtype torch.float16", "expected torch.bfloat16, torch.float32"),
    _n("combine_y_non_contiguous", lambda e: Call(e.buf.combine, (strided(e.y()), e.prev.handle)),
       "'y'", "contiguous"),
    _n("combine_weights_wrong_rows", lambda e: Call(e.buf.combine, (e.y(), e.prev.handle),
                                                    {"topk_weights": torch.rand(e.rows + 2, TOPK, device=e.dev)}),
       "'topk_weights'", "shape", *_K),
    _n("combine_weights_wrong_topk", lambda e: Call(e.buf.combine, (e.y(), e.prev.handle),
                                                    {"topk_weights": torch.rand(e.rows, TOPK - 1, device=e.dev)}),
       "'topk_weights'", "shape", *_K),
    _n("combine_weights_1d", lambda e: Call(e.buf.combine, (e.y(), e.prev.handle),
                                            {"topk_weights": torch.rand(e.rows * TOPK, device=e.dev)}),
       "'topk_weights'", "1 dimensions", "expected 2"),
    _n("combine_weights_dtype_float64", lambda e: Call(e.buf.combine, (e.y(), e.prev.handle), {
        "topk_weights": torch.rand(e.rows, TOPK, dtype=torch.float64, device=e.dev)}),
       "'topk_weights'", "dtype torch.float64", "expected torch.float32"),
    _n("combine_weights_dtype_bfloat16", lambda e: Call(e.buf.combine, (e.y(), e.prev.handle), {
        "topk_weights": torch.rand(e.rows, TOPK, device=e.dev).bfloat16()}),
       "'topk_weights'", "dtype torch.bfloat16", "expected torch.float32"),
    _n("combine_handle_none", lambda e: Call(e.buf.combine, (e.y(), None)),
       "'handle'", "must be a DispatchHandle", "NoneType"),
    _n("combine_handle_low_latency", lambda e: Call(e.buf.combine, (e.y(), other_handle(e, False, True))),
       "'handle'", "must be a DispatchHandle", "LowLatencyHandle"),
    _n("combine_handle_other_buffer", lambda e: Call(e.buf.combine, (e.y(), other_handle(e, False))),
       "'handle'", "another"),
    _n("combine_handle_destroyed_buffer", lambda e: Call(e.buf.combine, (e.y(), other_handle(e, True))),
       "'handle'", "destroyed"),
    # -- the wrong mode ------------------------------------------------------------------------------------
    _n("low_latency_dispatch_on_normal", lambda e: Call(e.buf.low_latency_dispatch, (e.x, e.idx)),
       "low_latency_dispatch", "low_latency=True", "this Buffer's calls are get_dispatch_layout, dispatch and combine"),
    _n("low_latency_combine_on_normal", lambda e: Call(e.buf.low_latency_combine,
                                                       (e.ll_y(), e.idx, e.w, other_handle(e, False, True))),
       "low_latency_combine", "low_latency=True"),
    _ll("dispatch_on_low_latency", lambda e: Call(e.buf.dispatch, (e.x, e.idx, e.w)),
        "dispatch", "low_latency=False", "this Buffer's calls are low_latency_dispatch and low_latency_combine"),
    _ll("combine_on_low_latency", lambda e: Call(e.buf.combine, (e.y(4), other_handle(e, False, False))),
        "combine", "low_latency=False"),
    # -- after destroy -------------------------------------------------------------------------------------
    _n("destroyed_dispatch", lambda e: _destroyed(e, lambda e: Call(e.buf.dispatch, (e.x, e.idx, e.w))),
       "dispatch", "destroyed", error=BufferDestroyedError),
    _n("destroyed_combine", lambda e: _destroyed(e, lambda e: Call(e.buf.combine, (e.y(), e.prev.handle))),
       "combine", "destroyed", error=BufferDestroyedError),
    _n("destroyed_layout", lambda e: _destroyed(e, lambda e: Call(e.buf.get_dispatch_layout, (e.idx,))),
       "get_dispatch_layout", "destroyed", error=BufferDestroyedError),
    _ll("destroyed_low_latency_dispatch", lambda e: _destroyed(e, lambda e: Call(e.buf.low_latency_dispatch,
                                                                                 (e.x, e.idx))),
        "low_latency_dispatch", "destroyed", error=BufferDestroyedError),
    _ll("destroyed_low_latency_combine", lambda e: _destroyed(e, lambda e: Call(
        e.buf.low_latency_combine, (e.ll_y(), e.idx, e.w, e.prev.handle))),
        "low_latency_combine", "destroyed", error=BufferDestroyedError),
    _ll("destroyed_low_latency_hook", lambda e: _destroyed(e, ll_hook_of),
        "low_latency_dispatch", "receive hook", "destroyed", error=BufferDestroyedError),
    # -- low-latency dispatch ------------------------------------------------------------------------------
    _ll("ll_dispatch_x_float32", lambda e: Call(e.buf.low_latency_dispatch, (e.x.float(), e.idx)),
        "'x'", "dtype torch.float32", "expected torch.bfloat16"),
    _ll("ll_dispatch_x_fp8_pair", lambda e: Call(e.buf.low_latency_dispatch, (fp8_pair(e), e.idx)),
        "'x'", "must be a torch.Tensor", "tuple"),
    _ll("ll_dispatch_x_wrong_hidden", lambda e: Call(e.buf.low_latency_dispatch, (e.x[:, :128].contiguous(), e.idx)),
        "'x'", "shape", f"expected ('*', {HIDDEN})"),
    _ll("ll_dispatch_x_non_contiguous", lambda e: Call(e.buf.low_latency_dispatch, (strided(e.x), e.idx)),
        "'x'", "contiguous"),
    _ll("ll_dispatch_too_many_tokens", lambda e: Call(e.buf.low_latency_dispatch, more_tokens(e, MAX_TOKENS + 1)[:2]),
        "'x'", f"{MAX_TOKENS + 1} tokens", f"max_tokens_per_rank={MAX_TOKENS}"),
    _ll("ll_dispatch_idx_expert_too_large", lambda e: Call(e.buf.low_latency_dispatch, (e.x, with_id(e.idx, EXPERTS))),
        "'topk_idx'", f"expert id {EXPERTS}", f"[-1, {EXPERTS})"),
    _ll("ll_dispatch_idx_expert_below_minus_one", lambda e: Call(e.buf.low_latency_dispatch,
                                                                 (e.x, with_id(e.idx, -7))),
        "'topk_idx'", "expert id -7"),
    _ll("ll_dispatch_idx_expert_minus_two", lambda e: Call(e.buf.low_latency_dispatch,
                                                           (e.x, with_id(e.idx, -2, (1, 2)))),
        "'topk_idx'", "expert id -2", f"[-1, {EXPERTS})"),
    _ll("ll_dispatch_x_transposed", lambda e: Call(e.buf.low_latency_dispatch, (transposed(e.x), e.idx)),
        "'x'", "contiguous"),
    _ll("ll_dispatch_idx_expert_too_large_with_a_hook_due", ll_bad_id_with_a_hook_due,
        "'topk_idx'", f"expert id {EXPERTS}", f"[-1, {EXPERTS})"),
    _ll("ll_dispatch_idx_wrong_topk", lambda e: Call(e.buf.low_latency_dispatch, (e.x, e.idx[:, :1].contiguous())),
        "'topk_idx'", "shape", *_K),
    _ll("ll_dispatch_idx_wrong_rows", lambda e: Call(e.buf.low_latency_dispatch, (e.x, e.idx[1:].contiguous())),
        "'topk_idx'", "shape", "dim 0"),
    _ll("ll_dispatch_idx_1d", lambda e: Call(e.buf.low_latency_dispatch, (e.x, e.idx.reshape(-1))),
        "'topk_idx'", "1 dimensions", "expected 2"),
    _ll("ll_dispatch_idx_dtype_int32", lambda e: Call(e.buf.low_latency_dispatch, (e.x, e.idx.int())),
        "'topk_idx'", "dtype torch.int32", "expected torch.int64"),
    _ll("ll_dispatch_idx_dtype_float", lambda e: Call(e.buf.low_latency_dispatch, (e.x, e.idx.float())),
        "'topk_idx'", "dtype torch.float32", "expected torch.int64"),
    _ll("ll_dispatch_idx_non_contiguous", lambda e: Call(e.buf.low_latency_dispatch, (e.x, strided(e.idx))),
        "'topk_idx'", "contiguous"),
    _ll("ll_dispatch_fp8_hidden_not_128", lambda e: Call(e.buf.low_latency_dispatch, (e.x, e.idx),
                                                         {"use_fp8": True}),
        "'use_fp8'", "needs hidden % 128 == 0", "hidden is 192", hidden=192),
    # -- low-latency combine -------------------------------------------------------------------------------
    _ll("ll_combine_y_wrong_experts", lambda e: Call(e.buf.low_latency_combine,
                                                     (e.ll_y(experts=EXPERTS // e.world + 1), e.idx, e.w,
                                                      e.prev.handle)),
        "'y'", "shape", "dim 0"),
    _ll("ll_combine_y_wrong_rows", lambda e: Call(e.buf.low_latency_combine,
                                                  (e.ll_y(rows=MAX_TOKENS), e.idx, e.w, e.prev.handle)),
        "'y'", "shape", "dim 1"),
    _ll("ll_combine_y_float32", lambda e: Call(e.buf.low_latency_combine,
                                               (e.ll_y(dtype=torch.float32), e.idx, e.w, e.prev.handle)),
        "'y'", "dtype torch.float32", "expected torch.bfloat16"),
    _ll("ll_combine_y_2d", lambda e: Call(e.buf.low_latency_combine, (e.y(4), e.idx, e.w, e.prev.handle)),
        "'y'", "2 dimensions", "expected 3"),
    _ll("ll_combine_y_non_contiguous", lambda e: Call(e.buf.low_latency_combine,
                                                      (strided(e.ll_y()), e.idx, e.w, e.prev.handle)),
        "'y'", "contiguous"),
    _ll("ll_combine_idx_wrong_rows", lambda e: Call(e.buf.low_latency_combine,
                                                    (e.ll_y(), e.idx[:-1].contiguous(), e.w, e.prev.handle)),
        "'topk_idx'", "shape", "dim 0"),
    _ll("ll_combine_idx_wrong_topk", lambda e: Call(e.buf.low_latency_combine,
                                                    (e.ll_y(), e.idx[:, :1].contiguous(), e.w, e.prev.handle)),
        "'topk_idx'", "shape", *_K),
    _ll("ll_combine_idx_1d", lambda e: Call(e.buf.low_latency_combine,
                                            (e.ll_y(), e.idx.reshape(-1), e.w, e.prev.handle)),
        "'topk_idx'", "1 dimensions", "expected 2"),
    _ll("ll_combine_idx_dtype_int32", lambda e: Call(e.buf.low_latency_combine,
                                                     (e.ll_y(), e.idx.int(), e.w, e.prev.handle)),
        "'topk_idx'", "dtype torch.int32", "expected torch.int64"),
    _ll("ll_combine_idx_dtype_float", lambda e: Call(e.buf.low_latency_combine,
                                                     (e.ll_y(), e.idx.float(), e.w, e.prev.handle)),
        "'topk_idx'", "dtype torch.float32", "expected torch.int64"),
    # (no row for a combine id >= E: the combine's ids only mask the copies its dispatch sent, unchecked so that it
    # has no host wait and is graph-capturable; an id outside [0, E) adds nothing, as -1: docs/usage.md,
    # unchecked_out_of_range)
    _ll("ll_combine_weights_not_the_dispatchs", lambda e: ll_weights_differ(e, "copy"),
        "'topk_weights'", "another tensor", "low_latency_dispatch was given topk_weights"),
    _ll("ll_combine_weights_changed_since_dispatch", lambda e: ll_weights_differ(e, "in_place"),
        "'topk_weights'", "changed in place", "pass that tensor unchanged"),
    _ll("ll_combine_idx_not_the_weighted_dispatchs", lambda e: ll_ids_differ(e, "copy"),
        "'topk_idx'", "another tensor", "was given topk_weights", "pass the dispatch's topk_idx unchanged"),
    _ll("ll_combine_idx_masked_after_weighted_dispatch", lambda e: ll_ids_differ(e, "masked"),
        "'topk_idx'", "another tensor", "other ids cannot be applied to those sums"),
    _ll("ll_combine_idx_changed_since_weighted_dispatch", lambda e: ll_ids_differ(e, "in_place"),
        "'topk_idx'", "changed in place", "pass the dispatch's topk_idx unchanged"),
    _ll("ll_dispatch_weights_wrong_rows", lambda e: Call(e.buf.low_latency_dispatch, (e.x, e.idx),
                                                         {"topk_weights": e.w[1:].contiguous()}),
        "'topk_weights'", "shape", "dim 0"),
    _ll("ll_dispatch_bf16_partial_sums_without_weights", lambda e: Call(e.buf.low_latency_dispatch, (e.x, e.idx),
                                                                        {"bf16_partial_sums": True}),
        "'bf16_partial_sums'", "needs 'topk_weights'"),
    _ll("ll_dispatch_bf16_partial_sums_not_bool", lambda e: Call(e.buf.low_latency_dispatch, (e.x, e.idx),
                                                                 {"topk_weights": e.w, "bf16_partial_sums": 1}),
        "'bf16_partial_sums'", "must be a bool", "int"),
    _ll("ll_dispatch_use_fp8_not_bool", lambda e: Call(e.buf.low_latency_dispatch, (e.x, e.idx), {"use_fp8": "no"}),
        "'use_fp8'", "must be a bool", "str 'no'"),
    _ll("ll_dispatch_hook_not_bool", lambda e: Call(e.buf.low_latency_dispatch, (e.x, e.idx),
                                                    {"return_recv_hook": 0}),
        "'return_recv_hook'", "must be a bool", "int 0"),
    _ll("ll_combine_hook_not_bool", lambda e: Call(e.buf.low_latency_combine, (e.ll_y(), e.idx, e.w, e.prev.handle),
                                                   {"return_recv_hook": 1}),
        "'return_recv_hook'", "must be a bool", "int 1"),
    _ll("ll_combine_weights_dtype", lambda e: Call(e.buf.low_latency_combine,
                                                   (e.ll_y(), e.idx, e.w.double(), e.prev.handle)),
        "'topk_weights'", "dtype torch.float64", "expected torch.float32"),
    _ll("ll_combine_handle_normal", lambda e: Call(e.buf.low_latency_combine,
                                                   (e.ll_y(), e.idx, e.w, other_handle(e, False, False))),
        "'handle'", "must be a LowLatencyHandle", "DispatchHandle"),
    _ll("ll_combine_handle_other_buffer", lambda e: Call(e.buf.low_latency_combine,
                                                         (e.ll_y(), e.idx, e.w, other_handle(e, False))),
        "'handle'", "another"),
    _ll("ll_combine_handle_destroyed_buffer", lambda e: Call(e.buf.low_latency_combine,
                                                             (e.ll_y(), e.idx, e.w, other_handle(e, True))),
        "'handle'", "destroyed"),
    _ll("ll_combine_out_wrong_shape", lambda e: Call(
        e.buf.low_latency_combine, (e.ll_y(), e.idx, e.w, e.prev.handle),
        {"out": torch.empty(e.x.shape[0] + 1, HIDDEN, dtype=torch.bfloat16, device=e.dev)}),
        "'out'", "shape", "dim 0"),
    _ll("ll_combine_out_float32", lambda e: Call(
        e.buf.low_latency_combine, (e.ll_y(), e.idx, e.w, e.prev.handle),
        {"out": torch.empty(e.x.shape[0], HIDDEN, device=e.dev)}),
        "'out'", "dtype torch.float32", "expected torch.bfloat16"),
    _ll("ll_combine_out_non_contiguous", lambda e: Call(
        e.buf.low_latency_combine, (e.ll_y(), e.idx, e.w, e.prev.handle), {"out": strided(e.x)}),
        "'out'", "contiguous"),
    _ll("ll_combine_before_dispatch_hook", ll_combine_before_hook, "'handle'", "receive hook has not been called"),
    # -- a third call while the first one's receive hook is due (two in flight at most) ----------------------
    _ll("ll_dispatch_third_in_flight", lambda e: ll_third_call(e, False),
        "low_latency_dispatch", "receive hook", "2 calls before", "at most two calls"),
    _ll("ll_combine_third_in_flight", lambda e: ll_third_call(e, True),
        "low_latency_combine", "receive hook", "2 calls before", "at most two calls"),
    # -- group size ----------------------------------------------------------------------------------------
    _ll("ll_combine_y_shaped_for_world_on_subgroup", ll_y_for_world_on_subgroup,
        "'y'", "shape", f"expected ({EXPERTS}, {MAX_TOKENS}, {HIDDEN})"),
    _n("combine_handle_from_subgroup_buffer", lambda e: Call(e.buf.combine,
                                                             (e.y(), other_handle(e, False, group=own_subgroup(e)))),
       "'handle'", "another"),
    # -- tensors on the wrong device (a CUDA Buffer only) ----------------------------------------------------
    _n("dispatch_x_on_cpu", lambda e: Call(e.buf.dispatch, (e.x.cpu(), e.idx, e.w)),
       "'x'", "is on cpu", "expected cuda", device="cuda"),
    _n("dispatch_idx_on_cpu", lambda e: Call(e.buf.dispatch, (e.x, e.idx.cpu(), e.w)),
       "'topk_idx'", "is on cpu", "expected cuda", device="cuda"),
    _n("dispatch_weights_on_cpu", lambda e: Call(e.buf.dispatch, (e.x, e.idx, e.w.cpu())),
       "'topk_weights'", "is on cpu", "expected cuda", device="cuda"),
    _n("dispatch_fp8_scales_on_cpu", lambda e: Call(e.buf.dispatch, ((fp8_pair(e)[0], fp8_pair(e)[1].cpu()),
                                                                       e.idx, e.w)),
       "'x[1]'", "is on cpu", "expected cuda", device="cuda"),
    _n("dispatch_x_on_other_gpu", lambda e: Call(e.buf.dispatch, (e.x.to(f"cuda:{1 - e.rank % 2}"), e.idx, e.w)),
       "'x'", "expected cuda", device="cuda", gpus=2),
    _n("dispatch_x_misaligned", lambda e: Call(e.buf.dispatch, (misaligned(e.x), e.idx, e.w)),
       "'x'", "16-byte aligned", device="cuda"),
    _n("combine_y_misaligned", lambda e: Call(e.buf.combine, (misaligned(e.y()), e.prev.handle)),
       "'y'", "16-byte aligned", device="cuda"),
    _n("layout_idx_on_cpu", lambda e: Call(e.buf.get_dispatch_layout, (e.idx.cpu(),)),
       "'topk_idx'", "is on cpu", "expected cuda", device="cuda"),
    _n("combine_y_on_cpu", lambda e: Call(e.buf.combine, (e.y().cpu(), e.prev.handle)),
       "'y'", "is on cpu", "expected cuda", device="cuda"),
    _n("combine_weights_on_cpu", lambda e: Call(e.buf.combine, (e.y(), e.prev.handle),
                                                {"topk_weights": torch.rand(e.rows, TOPK)}),
       "'topk_weights'", "is on cpu", "expected cuda", device="cuda"),
    _ll("ll_dispatch_x_on_cpu", lambda e: Call(e.buf.low_latency_dispatch, (e.x.cpu(), e.idx)),
        "'x'", "is on cpu", "expected cuda", device="cuda"),
    _ll("ll_dispatch_idx_on_cpu", lambda e: Call(e.buf.low_latency_dispatch, (e.x, e.idx.cpu())),
        "'topk_idx'", "is on cpu", "expected cuda", device="cuda"),
    _ll("ll_dispatch_x_on_other_gpu", lambda e: Call(e.buf.low_latency_dispatch,
                                                     (e.x.to(f"cuda:{1 - e.rank % 2}"), e.idx)),
        "'x'", "expected cuda", device="cuda", gpus=2),
    _ll("ll_combine_idx_on_cpu", lambda e: Call(e.buf.low_latency_combine,
                                                (e.ll_y(), e.idx.cpu(), e.w, e.prev.handle)),
        "'topk_idx'", "is on cpu", "expected cuda", device="cuda"),
    _ll("ll_combine_y_on_cpu", lambda e: Call(e.buf.low_latency_combine,
                                              (e.ll_y().cpu(), e.idx, e.w, e.prev.handle)),
        "'y'", "is on cpu", "expected cuda", device="cuda"),
    _ll("ll_combine_out_on_cpu", lambda e: Call(
        e.buf.low_latency_combine, (e.ll_y(), e.idx, e.w, e.prev.handle),
        {"out": torch.empty(e.x.shape[0], HIDDEN, dtype=torch.bfloat16)}),
        "'out'", "is on cpu", "expected cuda", device="cuda"),
]
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    if hasattr(obj, "__dataclass_fields__") and not isinstance(obj, (largeep.DispatchHandle, largeep.LowLatencyHandle)):
        return [t for name in obj.__dataclass_fields__ for t in _tensors(getattr(obj, name))]
    return []


def _good_case(world: int, hidden: int, low_latency: bool, seed: int) -> NormalCase | LowLatencyCase:
    toks = tokens_of(world)
    if low_latency:
        return LowLatencyCase(toks, MAX_TOKENS, hidden, EXPERTS, TOPK, seed, use_fp8=hidden % 128 == 0)
    return NormalCase(toks, hidden, EXPERTS, TOPK, seed, max_tokens=MAX_TOKENS)


def _env(rank: int, world: int, backend: str, case: BadCase, seed: int) -> Env:
    buf = largeep.Buffer(
        None, hidden=case.hidden, num_experts=EXPERTS, num_topk=TOPK, max_tokens_per_rank=MAX_TOKENS,
        backend=backend, low_latency=case.low_latency,
    )
    dev = buf.ctx.device  # (the current CUDA device for nvshmem on a gloo group: ranks sharing a GPU)
    inp = make_inputs(seed, rank, tokens_of(world)[rank], case.hidden, EXPERTS, TOPK, torch.bfloat16)
    x, idx, w = inp.x.to(dev), inp.topk_idx.to(dev), inp.topk_weights.to(dev)
    if case.low_latency:
        prev: Any = buf.low_latency_dispatch(x, idx, use_fp8=False)
    else:
        prev = buf.dispatch(x, idx, w)
    return Env(rank, world, backend, dev, case.hidden, case.low_latency, buf, x, idx, w, prev)


def bad_call(rank: int, world: int, backend: str, name: str) -> dict[str, Any]:
    """Runs row ``name`` of CASES on this rank; returns {"message": the exception's text, "failures": [...]}."""
    case = BY_NAME[name]
    seed = zlib.crc32(name.encode()) % 100_000
    chk = Checker(f"{name} on rank {rank}")
    e = _env(rank, world, backend, case, seed)
    message = ""
    try:
        call = case.call(e)
        if call is not None:
            # the previous results may live in a destroyed Buffer's memory: not read after destroy()
            held = _tensors([e.x, e.idx, e.w, None if e.destroyed else e.prev, call.args, call.kwargs])
            before = [t.clone() for t in held]
            try:
                call.fn(*call.args, **call.kwargs)
            except Exception as exc:  # noqa: BLE001 - the type is checked below
                message = str(exc)
                chk.expect(isinstance(exc, case.error),
                           f"raised {type(exc).__name__}({message!r}), expected {case.error.__name__}")
                missing = [w for w in case.words if w not in message]
                chk.expect(not missing, f"message {message!r} lacks {missing}")
            else:
                chk.expect(False, "the wrong call was not refused")
            changed = [i for i, (t, c) in enumerate(zip(held, before, strict=True)) if not same_bits(t, c)]
            chk.expect(not changed, f"the wrong call modified the caller's tensors {changed}")
        # the Buffer (or, after destroy(), a new one) still works
        if e.destroyed:
            e.buf = largeep.Buffer(None, **e.buffer_kwargs())
        good = _good_case(world, case.hidden, case.low_latency, seed + 1)
        chk.where = f"{name} on rank {rank}, the good round after it"
        if isinstance(good, LowLatencyCase):
            LowLatencyRound(e.buf, good, chk).run()
        else:
            NormalRound(e.buf, good, chk).run()
    finally:
        for b in e.extra:
            b.destroy()
        e.buf.destroy()
        for g in e.groups:
            dist.destroy_process_group(g)
    return {"message": message, "failures": chk.failures, "checks": chk.checks}


def bad_env(rank: int, world: int, backend: str, var: str, raw: str, bad_ranks: list[int]) -> dict[str, Any]:
    """The ranks ``bad_ranks`` (sorted) have ``var``=``raw`` (a value the library refuses), set after import:
    Buffer() must raise ArgumentError on every rank at once (the ranks with the value naming the variable, the
    others naming those ranks and the variable), none waiting in a collective the others skip; then, the variable
    unset, a Buffer works."""
    chk = Checker(f"{var}={raw!r} on ranks {bad_ranks}, rank {rank}")
    bad = rank in bad_ranks
    old = os.environ.get(var)
    if bad:
        os.environ[var] = raw
    try:
        try:
            largeep.Buffer(None, hidden=HIDDEN, num_experts=EXPERTS, num_topk=TOPK, max_tokens_per_rank=MAX_TOKENS,
                           backend=backend).destroy()
        except ArgumentError as exc:
            want = [var, repr(raw)] + ([] if bad else [f"rank(s) {bad_ranks} refused"])
            chk.expect(all(w in str(exc) for w in want), f"message {str(exc)!r}")
        else:
            chk.expect(False, "Buffer() went through")
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old
    case = _good_case(world, HIDDEN, False, 3)
    buf = largeep.Buffer(None, backend=backend, **case.buffer_kwargs())
    try:
        assert isinstance(case, NormalCase)
        NormalRound(buf, case, chk).run()
    finally:
        buf.destroy()
    return {"failures": chk.failures}


def hosts_in_any_order(rank: int, world: int) -> list[str]:
    """Hosts holding ranks a, b, a, b (not in contiguous blocks): refused without ranks_per_node, accepted with
    ranks_per_node = 1; a block of ranks_per_node ranks across hosts is refused. Returns the messages."""
    import socket

    real = socket.gethostname
    socket.gethostname = lambda: "ab"[rank % 2]  # type: ignore[assignment]
    kw: dict[str, Any] = dict(hidden=HIDDEN, num_experts=EXPERTS, num_topk=TOPK, max_tokens_per_rank=MAX_TOKENS,
                              backend="torch")
    seen = []
    try:
        for rpn, words in ((None, "pass ranks_per_node explicitly"), (2, "different hosts")):
            try:
                largeep.Buffer(None, ranks_per_node=rpn, **kw)
            except ArgumentError as exc:
                assert words in str(exc), str(exc)
                seen.append(str(exc))
            else:
                raise AssertionError(f"ranks_per_node={rpn} on hosts a, b, a, b was accepted")
        largeep.Buffer(None, ranks_per_node=1, **kw).destroy()
    finally:
        socket.gethostname = real  # type: ignore[assignment]
    return seen


def hosts_of_unequal_size(rank: int, world: int) -> str:
    """Hosts a, a, b (3 ranks): the first host's 2 ranks do not divide the group, so the node size cannot be
    derived: refused without ranks_per_node (naming the hosts), accepted with ranks_per_node = 1. Returns the
    message."""
    import socket

    real = socket.gethostname
    socket.gethostname = lambda: "aab"[rank]  # type: ignore[assignment]
    kw: dict[str, Any] = dict(hidden=HIDDEN, num_experts=6, num_topk=2, max_tokens_per_rank=MAX_TOKENS,
                              backend="torch")
    try:
        try:
            largeep.Buffer(None, **kw)
        except ArgumentError as exc:
            msg = str(exc)
        else:
            raise AssertionError("hosts a, a, b were accepted without ranks_per_node")
        largeep.Buffer(None, ranks_per_node=1, **kw).destroy()
    finally:
        socket.gethostname = real  # type: ignore[assignment]
    return msg


def auto_backend_agrees(rank: int, world: int) -> str:
    """backend="auto" learns which ranks cannot load the native module (rank 1 here), so every rank picks the same
    backend. Returns why this rank's Buffer took 'torch' (the logged reason)."""
    import logging

    from largeep import native
    from largeep._env import logger

    reasons: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            reasons.append(record.getMessage())

    keep, level = Keep(), logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    real = native.unavailable_reason
    native.unavailable_reason = lambda: None if rank != 1 else "not built here"  # type: ignore[assignment]
    try:
        buf = largeep.Buffer(None, hidden=HIDDEN, num_experts=EXPERTS, num_topk=TOPK, max_tokens_per_rank=MAX_TOKENS,
                             backend="auto")
        try:
            assert buf.backend_name == "torch", buf.backend_name
        finally:
            buf.destroy()
    finally:
        native.unavailable_reason = real  # type: ignore[assignment]
        logger.removeHandler(keep)
        logger.setLevel(level)
    return next(r for r in reasons if "backend 'auto' uses 'torch'" in r)


def dispatch_id_check_paths(rank: int, world: int) -> dict[str, Any]:
    """Which expert-id check a fresh dispatch runs (a torch-backend Buffer whose backend is made to claim the
    native check of the nvshmem one, and to record what it was asked): alone, the backend's own (no Python
    min/max); after a layout of the same unchanged tensor, none (the layout's memo, used once); on a backend
    without its own check, the Python one; with a handle, none."""
    from largeep import checks

    buf = largeep.Buffer(None, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=4, backend="torch")
    impl: Any = buf._impl
    asked: list[bool] = []
    real_dispatch = impl.dispatch

    def recording(*a: Any, check_ids: bool = False, **k: Any) -> Any:
        asked.append(check_ids)
        return real_dispatch(*a, **k)

    calls: list[int] = []
    real_range = checks._id_range
    checks._id_range = lambda t: calls.append(1) or real_range(t)  # type: ignore[assignment]
    impl.dispatch, impl.checks_dispatch_ids = recording, True
    try:
        x = torch.randn(4, 32)
        idx = torch.tensor([[0, 1], [1, -1], [2 * world - 1, 0], [-1, -1]], dtype=torch.int64)
        w = torch.rand(4, 2)
        d = buf.dispatch(x, idx, w)
        assert asked == [True] and not calls, (asked, calls)  # the backend's own check only
        buf.get_dispatch_layout(idx)  # (the torch backend's layout checks in Python: one min/max)
        assert len(calls) == 1
        buf.dispatch(x, idx, w)
        assert asked[-1] is False and len(calls) == 1, (asked, calls)  # the layout's check covers it
        buf.dispatch(x, idx, w)
        assert asked[-1] is True and len(calls) == 1  # the memo is used once
        buf.dispatch(x, handle=d.handle)
        assert asked[-1] is False and len(calls) == 1  # a cached dispatch checks nothing
        impl.checks_dispatch_ids = False
        buf.dispatch(x, idx, w)
        assert asked[-1] is False and len(calls) == 2  # no native check: the Python one
    finally:
        checks._id_range = real_range  # type: ignore[assignment]
        buf.destroy()
    return {"asked": asked, "python_checks": len(calls)}


def other_group_first(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 starts NVSHMEM on a group of its own (a Buffer on [0]); then every rank makes a Buffer on the whole
    group: every rank raises RuntimeError naming rank 0's process as serving another group, at once (rank 1, whose
    NVSHMEM is not started, used to go on into the next collective and wait there for the process group's
    timeout). A fresh pool: NVSHMEM must not be started in it yet."""
    import time

    chk = Checker(f"another group first, rank {rank}")
    sub = dist.new_group([0])
    if rank == 0:
        largeep.Buffer(sub, hidden=128, num_experts=4, num_topk=2, max_tokens_per_rank=8, backend="nvshmem").destroy()
    dist.barrier()
    start = time.monotonic()
    try:
        largeep.Buffer(None, hidden=128, num_experts=2 * world, num_topk=2, max_tokens_per_rank=8, backend="nvshmem")
        chk.expect(False, "a Buffer was made on a group that rank 0's NVSHMEM does not serve")
    except RuntimeError as exc:
        chk.expect("already serves another process group" in str(exc) and "rank(s) [0]" in str(exc), str(exc))
    took = time.monotonic() - start
    chk.expect(took < 10.0, f"refused after {took:.1f} s")
    return {"failures": chk.failures}


def nvshmem_creation_fails_after_alloc(rank: int, world: int, fail_on: int, busy_on: int = -1) -> dict[str, Any]:
    """The nvshmem backend's creation on CPU with a stand-in for the native module (NVSHMEM already started on this
    group): after the symmetric allocation, rank ``fail_on``'s kernels fail to be made (-1: nobody's). Every rank
    must raise (that rank its own error, the others naming it), free the symmetric memory once (collectively) and
    its host-mapped words, each after a bounded wait for its device ("order": the sync comes first); with no failure
    every rank gets a live backend. Rank ``busy_on``'s device does not become idle within the bound (its
    _synchronize_bounded raises): that rank frees nothing. Module names patched in the worker are restored."""
    import ctypes

    from largeep import _env
    from largeep.backends import nvshmem_backend as nb
    from largeep.backends.base import GroupContext

    log: dict[str, list[Any]] = {"free": [], "host_free": [], "kernels": []}
    order: list[str] = []
    keep: list[Any] = []

    def synchronize(device: Any, timeout_s: float, op: str) -> None:
        order.append("sync")
        if rank == busy_on:
            raise largeep.PeerTimeoutError(f"{op}: injected: the work queued did not finish")

    class Kernels:
        def __init__(self, *args: Any) -> None:
            if rank == fail_on:
                raise RuntimeError("injected: the kernels could not be made")
            log["kernels"].append(args[0])

    class Stand:
        NormalKernels = Kernels

        def initialized(self) -> bool:
            return True

        def normal_layout(self, *args: Any) -> dict[str, int]:
            return {"total_bytes": 1 << 20, "off_zc": 0, "zc_slot_bytes": 0}

        def prep_scratch_words(self, num_experts: int) -> int:
            return 8

        def alloc(self, nbytes: int, timeout_s: float) -> int:
            return 1 << 32

        def peer_ptr(self, base: int, r: int) -> int:
            return base + (r << 24)

        def host_alloc(self, nbytes: int) -> list[int]:
            buf = (ctypes.c_int64 * (nbytes // 8))()
            keep.append(buf)
            return [ctypes.addressof(buf)] * 2

        def host_free(self, ptr: int) -> None:
            log["host_free"].append(ptr)
            order.append("host_free")

        def free(self, base: int, timeout_s: float) -> None:
            log["free"].append(base)
            order.append("free")

    saved = (nb.native.module, nb.torch.cuda.mem_get_info, nb._gpu_of, nb._world, nb._synchronize_bounded)
    nb.native.module = lambda: Stand()  # type: ignore[assignment]
    nb._synchronize_bounded = synchronize  # type: ignore[assignment]
    nb.torch.cuda.mem_get_info = lambda device=None: (1 << 40, 1 << 40)  # type: ignore[assignment]
    nb._gpu_of = lambda device: f"gpu {rank}"  # type: ignore[assignment]
    nb._world = {"ranks": list(range(world)), "device": None}
    out: dict[str, Any] = {"error": None}
    try:
        ctx = GroupContext(dist.group.WORLD, rank, world, world, torch.device("cpu"), 128, 2 * world, 2, 8, 24, False)
        try:
            backend = nb.NvshmemBackend(ctx, _env.settings())
            out["alive"] = bool(backend.alive)
        except RuntimeError as exc:
            out["error"] = str(exc)
    finally:
        (nb.native.module, nb.torch.cuda.mem_get_info, nb._gpu_of, nb._world,  # type: ignore[assignment]
         nb._synchronize_bounded) = saved
    out.update({k: len(v) for k, v in log.items()})
    out["order"] = order
    return out


def _torch_buffer_on_own_group(world: int, timeout_s: float, low_latency: bool = False,
                               tokens_per_round: int | None = None) -> tuple[Any, largeep.Buffer]:
    """A torch-backend Buffer (H 32, E 2N, K 2, M 4, ``low_latency``, ``tokens_per_round``) on a gloo group of its
    own (its timeout 20 s past ``timeout_s``), made with LARGEEP_TIMEOUT_S=``timeout_s``: a collective that ranks
    abandon stays in that group, not in the pool's."""
    import datetime

    sub = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=timeout_s + 20))
    before = os.environ.get("LARGEEP_TIMEOUT_S")
    os.environ["LARGEEP_TIMEOUT_S"] = str(timeout_s)
    try:
        buf = largeep.Buffer(sub, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=4,
                             backend="torch", low_latency=low_latency, tokens_per_round=tokens_per_round)
    finally:
        if before is None:
            del os.environ["LARGEEP_TIMEOUT_S"]
        else:
            os.environ["LARGEEP_TIMEOUT_S"] = before
    return sub, buf


def refused_without_a_dispatch(rank: int, world: int, timeout_s: float, op: str = "layout",
                               tokens_per_round: int | None = None) -> dict[str, Any]:
    """Rank 0 refuses a call for its own values and no fresh dispatch follows on the other ranks to take its void
    round: ``op`` "layout": its layout refuses an expert id (the others make a layout alone); "dispatch": its
    dispatch has max_tokens_per_rank + 1 tokens (the others make no call). The void round times out after
    LARGEEP_TIMEOUT_S with a PeerTimeoutError that still names the refusal (not lost behind the timeout), chained
    from it; also in rounds (``tokens_per_round``). A gloo group of its own (the abandoned collective stays in it)."""
    import time

    sub, buf = _torch_buffer_on_own_group(world, timeout_s, tokens_per_round=tokens_per_round)
    out: dict[str, Any] = {"elapsed_s": 0.0, "message": ""}
    try:
        idx = torch.tensor([[0, 1], [1, -1]], dtype=torch.int64)
        if rank == 0:
            idx[1, 0] = 2 * world + 5
            m = buf.ctx.max_tokens_per_rank
            start = time.monotonic()
            try:
                if op == "layout":
                    buf.get_dispatch_layout(idx)
                else:
                    buf.dispatch(torch.randn(m + 1, 32), torch.zeros(m + 1, 2, dtype=torch.int64), torch.ones(m + 1, 2))
            except largeep.PeerTimeoutError as exc:
                out["elapsed_s"] = time.monotonic() - start
                out["message"] = str(exc)
                out["cause"] = type(exc.__cause__).__name__
        elif op == "layout":
            buf.get_dispatch_layout(idx)
    finally:
        dist.barrier()  # the pool's own group
        buf.destroy()
        dist.destroy_process_group(sub)
    return out


def creation_missing_peer(rank: int, world: int, timeout_s: float) -> dict[str, Any]:
    """Rank 1 does not create its Buffer in time (a gloo group of its own): every other rank's Buffer creation
    raises PeerTimeoutError within LARGEEP_TIMEOUT_S (not the process group's timeout) naming rank 1 alone. Rank 1
    then creates its Buffer late: it raises PeerTimeoutError at once, naming the ranks that gave up on it (their
    timed-out receives closed its connections), instead of waiting alone in the gather after the arrival."""
    import datetime
    import time

    sub = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=timeout_s + 30))
    before = os.environ.get("LARGEEP_TIMEOUT_S")
    os.environ["LARGEEP_TIMEOUT_S"] = str(timeout_s)
    out: dict[str, Any] = {}

    def create() -> None:
        start = time.monotonic()
        try:
            largeep.Buffer(sub, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=4,
                           backend="torch")
        except largeep.PeerTimeoutError as exc:
            out["elapsed_s"] = time.monotonic() - start
            out["message"] = str(exc)
        else:
            raise AssertionError(f"rank {rank} made a Buffer although rank 1 did not make its own in time")

    try:
        if rank != 1:
            create()
        dist.barrier()  # the pool's own group: the others have given up
        if rank == 1:
            create()
        dist.barrier()
        # the group is out of step on every rank now: a Buffer on it is refused at once, everywhere
        start = time.monotonic()
        try:
            largeep.Buffer(sub, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=4, backend="torch")
        except largeep.ArgumentError as exc:
            out.update(again=str(exc), again_s=time.monotonic() - start)
    finally:
        if before is None:
            del os.environ["LARGEEP_TIMEOUT_S"]
        else:
            os.environ["LARGEEP_TIMEOUT_S"] = before
        dist.barrier()  # the pool's own group
        dist.destroy_process_group(sub)
    return out


def _peer_call(op: str, buf: largeep.Buffer, rank: int, world: int) -> Callable[[], Any]:
    """The call ``op`` of the missing-peer tests on ``buf`` (a torch-backend Buffer of H 32, E 2N, K 2, M 4; low
    latency for the "low_latency_" ops), made on every rank: "dispatch"; "combine" (after a dispatch, made here);
    "low_latency_combine" (after a low-latency dispatch, made here); "low_latency_hook" (a low-latency dispatch
    and its receive hook); "gate" (the gate's load sum over the default group)."""
    from largeep.gate import GateConfig, TopKGate

    x = torch.randn(4, 32).to(torch.bfloat16)
    idx = torch.tensor([[0, 1], [1, -1], [2 * world - 1, 0], [-1, -1]], dtype=torch.int64)
    w = torch.rand(4, 2)
    if op == "dispatch":
        return lambda: buf.dispatch(x, idx, w)
    if op == "combine":
        d = buf.dispatch(x, idx, w)
        return lambda: buf.combine(d.x, d.handle)
    if op == "low_latency_combine":
        ld = buf.low_latency_dispatch(x, idx, use_fp8=False)
        y = torch.zeros(ld.x.shape, dtype=torch.bfloat16)
        return lambda: buf.low_latency_combine(y, idx, w, ld.handle)
    if op == "low_latency_hook":
        return lambda: buf.low_latency_dispatch(x, idx, use_fp8=False, return_recv_hook=True).hook()
    assert op == "gate", op
    gate = TopKGate(GateConfig(hidden=8, num_experts=4, topk=2))
    return lambda: gate.update_bias(dist.group.WORLD, load=torch.full((4,), float(rank + 1)))


MISSING_PEER_OPS = ("dispatch", "combine", "low_latency_combine")


def torch_missing_peer(rank: int, world: int, timeout_s: float, op: str = "dispatch") -> dict[str, Any]:
    """Torch backend on gloo: rank 1 never calls ``op`` (for a combine: every rank dispatches first, then rank 1
    leaves out the combine); every other rank raises PeerTimeoutError naming the call and the ranks waited on within
    LARGEEP_TIMEOUT_S (not the process group's 30 minutes), then refuses the next call at once. The Buffer lives on
    a group of its own (short timeout, destroyed at the end): the collective the timed-out ranks abandoned stays in
    it. Returns the timed-out call's message."""
    import re
    import time

    sub, buf = _torch_buffer_on_own_group(world, timeout_s, low_latency=op == "low_latency_combine")
    elapsed = refused = 0.0
    msg = ""
    try:
        call = _peer_call(op, buf, rank, world)
        if rank != 1:
            start = time.monotonic()
            try:
                call()
            except largeep.PeerTimeoutError as exc:
                elapsed = time.monotonic() - start
                msg = str(exc)
                others = re.escape(str([r for r in range(world) if r != rank]))
                want = (rf"{op}: rank {rank} waited for ranks {others} of its group in vain "
                        rf"\(LARGEEP_TIMEOUT_S={timeout_s:g} s")
                assert re.match(want, msg), (want, msg)
            else:
                raise AssertionError(f"{op} returned although rank 1 never called it")
            start = time.monotonic()
            try:
                call()
            except largeep.PeerTimeoutError as exc:
                refused = time.monotonic() - start
                assert re.match(rf"{op}: this Buffer failed earlier \({op} on rank {rank} failed", str(exc)), str(exc)
            else:
                raise AssertionError(f"a failed Buffer accepted another {op}")
        if op == "dispatch":
            again = _new_buffer_on_out_of_step_group(rank, world, sub, buf, timeout_s)
    finally:
        dist.barrier()  # the pool's own group: rank 1 waits here until the others have given up
        buf.destroy()
        dist.destroy_process_group(sub)
    out = {"elapsed_s": elapsed, "refused_s": refused, "message": msg}
    if op == "dispatch":
        out["again"] = again
    if op == "dispatch" and world == 2:
        # a Buffer on a new group works on every rank
        fresh, good = _torch_buffer_on_own_group(world, timeout_s)
        try:
            x = torch.randn(3, 32).to(torch.bfloat16)
            # (2 experts per rank: each token reaches ranks 0 and 1, and the unweighted combine sums its 2 rows)
            d = good.dispatch(x, torch.tensor([[0, 2], [1, 3], [3, 0]], dtype=torch.int64), torch.ones(3, 2))
            c = good.combine(d.x, d.handle)
            assert torch.equal(c.x, x * 2), (c.x, x)
        finally:
            good.destroy()
            dist.destroy_process_group(fresh)
    return out


PEER_EXITS_OPS = ("dispatch", "combine", "low_latency_combine", "low_latency_hook", "gate")


def peer_exits(rank: int, world: int, op: str, timeout_s: float) -> dict[str, Any]:
    """Rank 1 exits (os._exit(3)) where the others call ``op`` (for a combine: after every rank's dispatch;
    "low_latency_hook": the others' dispatch returns a receive hook, whose wait meets the loss; "gate": the gate's
    load sum, a collective of the library's outside a Buffer) with LARGEEP_TIMEOUT_S = ``timeout_s``: every other
    rank raises PeerTimeoutError naming the call and the ranks waited on at once, not after the timeout; a Buffer
    then refuses its next call at once, and its destroy returns. Torch backend on the pool's gloo group (which
    the exit breaks: run with ``exits={1}``). Returns the message and the times on the other ranks."""
    os.environ["LARGEEP_TIMEOUT_S"] = str(timeout_s)
    buf = largeep.Buffer(None, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=4, backend="torch",
                         low_latency=op.startswith("low_latency"))
    call = _peer_call(op, buf, rank, world)
    if rank == 1:
        os._exit(3)
    def raises() -> tuple[str, float]:
        start = time.monotonic()
        try:
            call()
        except largeep.PeerTimeoutError as exc:
            return str(exc), time.monotonic() - start
        raise AssertionError(f"{op} returned although rank 1 exited")

    out: dict[str, Any] = {}
    out["message"], out["elapsed_s"] = raises()
    if op != "gate":  # (the Buffer failed: its next call is refused at once)
        out["again"], out["again_s"] = raises()
    start = time.monotonic()
    buf.destroy()
    out["destroy_s"] = time.monotonic() - start
    return out



def _tcp_connections() -> dict[int, tuple[str, str]]:
    """This process's established TCP connections: file descriptor -> (local, remote) address, as /proc/net/tcp and
    tcp6 write them (hex "address:port"; Linux)."""
    inodes = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # (closed meanwhile)
            continue
        if link.startswith("socket:["):
            inodes[link[len("socket:["):-1]] = int(name)
    out = {}
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "01" and cols[9] in inodes:  # (state 01: established)
                    out[inodes[cols[9]]] = (cols[1], cols[2])
    return out


def peer_exits_after_neighbour(rank: int, world: int, timeout_s: float) -> dict[str, Any]:
    """3 ranks, the gate's load sum over the pool's gloo group, LARGEEP_TIMEOUT_S = ``timeout_s``: rank 1's
    connections to rank 2 close first (rank 1 shuts them down), its connections to rank 0 only when its process
    exits, 0.5 s later. Rank 0 calls update_bias at once; rank 2 calls it 0.2 s later, having seen its connection
    to rank 1 close, and raises at once. So rank 0 is in the collective before either loss and learns of rank 1's
    exit only through its own connection to it. (In gloo's ring all-reduce rank 0 then waited for its send to rank
    2, which had left the collective, until LARGEEP_TIMEOUT_S: the race behind a rare failure of
    test_peer_exits[gate], where rank 0's connection to rank 1 was seen closed late.) Every other rank must raise
    PeerTimeoutError naming the call at once. Returns the message and the time on ranks 0 and 2."""
    from largeep.gate import GateConfig, TopKGate

    os.environ["LARGEEP_TIMEOUT_S"] = str(timeout_s)
    gate = TopKGate(GateConfig(hidden=8, num_experts=4, topk=2))
    every: list[Any] = [None] * world
    dist.all_gather_object(every, set(_tcp_connections().values()))
    if rank == 1:
        import socket

        to_two = [fd for fd, (here, there) in _tcp_connections().items() if (there, here) in every[2]]
        assert to_two, "rank 1 found no connection to rank 2"
        for fd in to_two:
            s = socket.socket(fileno=os.dup(fd))  # (the connection itself is shut down; the dup is closed)
            s.shutdown(socket.SHUT_RDWR)
            s.close()
        time.sleep(0.5)
        os._exit(3)
    if rank == 2:
        time.sleep(0.2)
    start = time.monotonic()
    try:
        gate.update_bias(dist.group.WORLD, load=torch.full((4,), float(rank + 1)))
    except largeep.PeerTimeoutError as exc:
        return {"message": str(exc), "elapsed_s": time.monotonic() - start}
    raise AssertionError("update_bias returned although rank 1 exited")

def _new_buffer_on_out_of_step_group(rank: int, world: int, sub: Any, buf: largeep.Buffer,
                                     timeout_s: float) -> dict[str, Any]:
    """After torch_missing_peer's dispatch: every rank destroys its Buffer and makes a new one on the same group.
    The ranks that timed out refuse at once (ArgumentError naming 'group' and the call that failed), without
    joining; rank 1, which never made the call, raises PeerTimeoutError naming them: it waited for their arrival
    in vain, or found its connections to them closed (their timed-out waits close them). Before, the ranks waited
    in the creation's gather for the process group's timeout, or failed there with gloo's RuntimeError."""
    import time

    buf.destroy()
    dist.barrier()  # the pool's own group: rank 1 starts once the others' calls have timed out (else its own wait
    # could time out first and close the connections theirs wait on)
    before = os.environ.get("LARGEEP_TIMEOUT_S")
    os.environ["LARGEEP_TIMEOUT_S"] = str(timeout_s)
    start = time.monotonic()
    try:
        largeep.Buffer(sub, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=4, backend="torch")
    except (largeep.ArgumentError, largeep.PeerTimeoutError) as exc:
        return {"error": type(exc).__name__, "message": str(exc), "elapsed_s": time.monotonic() - start}
    finally:
        if before is None:
            del os.environ["LARGEEP_TIMEOUT_S"]
        else:
            os.environ["LARGEEP_TIMEOUT_S"] = before
    raise AssertionError(f"rank {rank} made a Buffer on a group whose collectives are out of step")


# -- one rank's ids refused, the others' good ------------------------------------------------------------------------
REFUSAL_VARIANTS = ("bf16", "fp8", "nodes", "empty_peer", "twice", "worst_peer", "worst_all", "layout", "layout_fp8",
                    "layout_tokens", "layout_rounds", "layout_fp8_rounds", "layout_tokens_rounds", "late", "late_nodes",
                    "late_worst", "late_first")
ROUNDS_TOKENS = 4  # the "_rounds" variants' tokens_per_round (MAX_TOKENS in 4 rounds)
LATE_TOKENS = 3000  # the "late" variants' max_tokens_per_rank: calls of 2100+ tokens, the bad id near their end


def one_rank_refuses(rank: int, world: int, backend: str, variant: str) -> dict[str, Any]:
    """Rank 0 dispatches an expert id out of range, the other ranks good ids (variants: bf16 rows, FP8 rows, every
    rank a node of its own, rank 1 with no tokens, two refusals in a row; worst_peer: the other ranks dispatch with
    num_worst_tokens, nvshmem only; worst_all: every rank does, nvshmem only). Rank 0 must raise ArgumentError
    naming the id, every other rank PeerRefusedError naming rank 0, at once (not after LARGEEP_TIMEOUT_S), with the
    caller's tensors unchanged; then a cached dispatch of an earlier handle and a fresh round are right on every rank
    (worst_peer: the peers' next call raises instead, their Buffers being unusable; worst_all: no rank raises in the
    call, which has no host wait, and every rank's next call does, rank 0's naming the id; layout, layout_fp8,
    layout_tokens: every rank calls get_dispatch_layout before its dispatch, and rank 0's layout refuses the id, or
    more tokens than max_tokens_per_rank, which voids the others' dispatch; *_rounds: the same with calls in rounds
    (tokens_per_round), where the layout's void round must meet the others' round 0: they raise PeerRefusedError
    there, before any of their rounds moved rows, also when they dispatch FP8 rows and the void round's row is bf16).
    Returns {"failures", "elapsed_s", "checks"}."""
    import time

    chk = Checker(f"{variant} on rank {rank}")
    use_fp8 = variant in ("fp8", "layout_fp8", "layout_fp8_rounds")
    layout_first = variant.startswith("layout")
    in_rounds = variant.endswith("_rounds")
    # half_nodes: 2 nodes (forwarders on 4); late*: more than 1024 tokens (the nvshmem prepare kernel runs several
    # blocks per destination: the bad id is in the last one's chunk, its verdict gathered from the chunks)
    rpn = {"nodes": 1, "half_nodes": max(1, world // 2), "late_nodes": 1}.get(variant)
    late = variant.startswith("late")
    counts = tuple(2100 + 211 * r if late else 0 if variant == "empty_peer" and r == 1 else 5 + 2 * r
                   for r in range(world))
    case = NormalCase(counts, HIDDEN, EXPERTS, TOPK, 11, use_fp8=use_fp8,
                      max_tokens=LATE_TOKENS if late else MAX_TOKENS, ranks_per_node=rpn)
    buf = largeep.Buffer(None, backend=backend, **case.buffer_kwargs(),
                         tokens_per_round=ROUNDS_TOKENS if in_rounds else None)
    dev = buf.ctx.device  # the group's device, or the current CUDA device for nvshmem on a gloo group
    elapsed: list[float] = []
    try:
        inp = make_inputs(case.seed, rank, case.tokens[rank], HIDDEN, EXPERTS, TOPK, torch.bfloat16)
        x, idx, w = inp.x.to(dev), inp.topk_idx.to(dev), inp.topk_weights.to(dev)
        xs: Any = tuple(t.to(dev) for t in fp8.quantize(inp.x.float())) if use_fp8 else x
        prev = buf.dispatch(xs, idx, w)
        prev_x = [t.clone() for t in (prev.x if use_fp8 else (prev.x,))]
        bad_id = EXPERTS + 3 if variant != "twice" else -4
        # (late_first: in the first chunk, so the verdict passes through the scratch that gathers the chunks', and
        # the good round after it shows that scratch was left clear)
        at = (idx.shape[0] - 7, TOPK - 1) if late and variant != "late_first" else (0, 0)
        bad = with_id(idx, bad_id, at) if rank == 0 else idx.clone()
        if variant.startswith("layout_tokens") and rank == 0:  # good ids, one token too many
            bad = idx.repeat(MAX_TOKENS // idx.shape[0] + 1, 1)[:MAX_TOKENS + 1].contiguous()
        no_wait = (variant == "worst_peer" and rank != 0) or variant in ("worst_all", "late_worst")
        worst = world * case.buffer_max_tokens if no_wait else 0
        for attempt in range(2 if variant == "twice" else 1):
            held = [bad, w] + list(xs if use_fp8 else (xs,))
            before = [t.clone() for t in held]
            dist.barrier()
            t0 = time.perf_counter()
            try:
                if layout_first:
                    buf.get_dispatch_layout(bad)
                buf.dispatch(xs, bad, w, num_worst_tokens=worst)
            except ArgumentError as exc:
                chk.expect(rank == 0 and variant not in ("worst_all", "late_worst"),
                           f"attempt {attempt}: ArgumentError: {exc}")
                if variant.startswith("layout_tokens"):
                    chk.expect("get_dispatch_layout" in str(exc) and "max_tokens_per_rank" in str(exc), str(exc))
                else:
                    chk.expect(f"expert id {bad_id}" in str(exc) and "'topk_idx'" in str(exc), str(exc))
                if layout_first:
                    chk.expect("get_dispatch_layout" in str(exc), f"not the layout's refusal: {exc}")
                if variant == "worst_peer":  # the peers could not raise: the message says their Buffers are gone
                    chk.expect("num_worst_tokens" in str(exc) and "destroy the Buffer" in str(exc), str(exc))
            except largeep.PeerRefusedError as exc:
                chk.expect(rank != 0, f"attempt {attempt}: PeerRefusedError on the refusing rank: {exc}")
                chk.expect("rank(s) [0]" in str(exc) and "stays usable" in str(exc) and exc.buffer_usable, str(exc))
                # (in rounds: refused in round 0, before any round moved rows; a later round's error names it)
                chk.expect("sent and received nothing" in str(exc) and "(tokens_per_round)" not in str(exc),
                           f"not refused in the first round: {exc}")
            else:
                chk.expect(worst > 0 and (rank != 0 or variant in ("worst_all", "late_worst")),
                           f"attempt {attempt}: the call was not refused")
            elapsed.append(time.perf_counter() - t0)
            chk.expect(all(same_bits(t, c) for t, c in zip(held, before, strict=True)),
                       "the refused call modified the caller's tensors")
        if variant in ("worst_peer", "worst_all", "late_worst"):
            if worst:  # no host wait in that call: its next call reports the refusal, the Buffer unusable
                try:
                    buf.dispatch(xs, idx, w)
                except largeep.PeerRefusedError as exc:
                    chk.expect("rank 0 refused" in str(exc) and "unusable" in str(exc) and not exc.buffer_usable,
                               str(exc))
                    if rank == 0:  # its own check's verdict, read at this call
                        chk.expect(f"expert id {bad_id}," in str(exc), str(exc))
                else:
                    chk.expect(False, "the call after a refused num_worst_tokens round was not refused")
            return {"failures": chk.failures, "elapsed_s": max(elapsed), "checks": chk.checks}
        # the void round left nothing behind: a cached dispatch of the earlier handle moves its rows again ...
        again = buf.dispatch(xs, handle=prev.handle)
        got = again.x if use_fp8 else (again.x,)
        chk.expect(all(same_bits(a, b) for a, b in zip(got, prev_x, strict=True)),
                   "a cached dispatch after the void round differs from the first")
        del prev, again, got
        # ... and a fresh round is right on every rank
        chk.where = f"{variant} on rank {rank}, the good round after it"
        NormalRound(buf, case, chk).run()
    finally:
        buf.destroy()
    return {"failures": chk.failures, "elapsed_s": max(elapsed), "checks": chk.checks}


def _hooks_then_good_round(buf: largeep.Buffer, case: LowLatencyCase, chk: Checker, due: list[Any],
                           where: str) -> None:
    """Calls the receive hooks still due of ``due`` (low-latency dispatch results), then a checked good round."""
    for d in due:
        assert d.hook is not None
        d.hook()
    chk.where = where
    LowLatencyRound(buf, case, chk).run()


LL_REFUSAL_VARIANTS = ("id", "tokens", "hook", "fp8", "all", "twice")


def ll_one_rank_refuses(rank: int, world: int, variant: str) -> dict[str, Any]:
    """The torch backend on a CPU group: rank 0's low_latency_dispatch has an expert id out of range ("id", "hook":
    the others ask for a receive hook, "fp8": FP8 rows, "twice": two such calls in a row) or one token more than
    max_tokens_per_rank ("tokens"); "all": every rank's has a bad id. Rank 0 raises ArgumentError, every other rank
    PeerRefusedError naming rank 0 in its call, at once, with the caller's tensors unchanged, nothing moved; then a
    good round (with a hook, and FP8 rows) is right on every rank, and a call the others ask for with a hook is
    refused for the hooks due only after two more. Returns {"failures", "elapsed_s"}."""
    import time

    chk = Checker(f"low-latency {variant} on rank {rank}")
    case = LowLatencyCase(tokens_of(world), MAX_TOKENS, HIDDEN, EXPERTS, TOPK, 17, use_fp8=variant == "fp8",
                          hook=True)
    buf = largeep.Buffer(None, backend="torch", **case.buffer_kwargs())
    elapsed: list[float] = []
    try:
        inp = make_inputs(case.seed, rank, case.tokens[rank], HIDDEN, EXPERTS, TOPK, torch.bfloat16)
        x, idx = inp.x, inp.topk_idx
        refuses = rank == 0 or variant == "all"
        if refuses and variant == "tokens":
            x, idx = x.repeat(MAX_TOKENS, 1)[:MAX_TOKENS + 1].contiguous(), idx.repeat(MAX_TOKENS, 1)[:MAX_TOKENS + 1]
            idx = idx.contiguous()
        elif refuses:
            idx = with_id(idx, EXPERTS + 2)
        for attempt in range(2 if variant == "twice" else 1):
            before = [x.clone(), idx.clone()]
            dist.barrier()
            t0 = time.perf_counter()
            try:
                buf.low_latency_dispatch(x, idx, use_fp8=case.use_fp8, return_recv_hook=variant == "hook")
            except ArgumentError as exc:
                chk.expect(refuses, f"attempt {attempt}: ArgumentError on a good rank: {exc}")
                want = "max_tokens_per_rank" if variant == "tokens" else f"expert id {EXPERTS + 2}"
                chk.expect(want in str(exc) and "low_latency_dispatch" in str(exc), str(exc))
            except largeep.PeerRefusedError as exc:
                chk.expect(not refuses, f"attempt {attempt}: PeerRefusedError on a refusing rank: {exc}")
                chk.expect("rank(s) [0]" in str(exc) and "stays usable" in str(exc) and exc.buffer_usable, str(exc))
            else:
                chk.expect(False, f"attempt {attempt}: the call was not refused")
            elapsed.append(time.perf_counter() - t0)
            chk.expect(same_bits(x, before[0]) and same_bits(idx, before[1]),
                       "the refused call modified the caller's tensors")
        # the refused calls took no place among those in flight: two dispatches with hooks due are accepted, a
        # third is refused on every rank alike
        good = make_inputs(case.seed + 1, rank, case.tokens[rank], HIDDEN, EXPERTS, TOPK, torch.bfloat16)
        due = [buf.low_latency_dispatch(good.x, good.topk_idx, use_fp8=case.use_fp8, return_recv_hook=True)
               for _ in range(2)]
        try:
            buf.low_latency_dispatch(good.x, good.topk_idx, use_fp8=case.use_fp8, return_recv_hook=True)
        except ArgumentError as exc:
            chk.expect("has not been called" in str(exc), str(exc))
        else:
            chk.expect(False, "a third dispatch with two hooks due was not refused")
        _hooks_then_good_round(buf, case, chk, due, f"low-latency {variant} on rank {rank}, the good round after it")
    finally:
        buf.destroy()
    return {"failures": chk.failures, "elapsed_s": max(elapsed)}


def ll_refused_alike(rank: int, world: int, how: str) -> dict[str, Any]:
    """The torch backend on a CPU group: every rank's low-latency dispatch is refused for one reason checked without
    an exchange ("weights": topk_weights of the wrong shape; "in_flight": two receive hooks still due), and rank 0's
    also has a bad expert id. Every rank raises that same refusal (their void rounds meet each other; the id's
    refusal comes after those checks), so the hooks and a good round after it pair and are right. Returns
    {"failures"}."""
    chk = Checker(f"low-latency calls refused alike ({how}) on rank {rank}")
    case = LowLatencyCase(tokens_of(world), MAX_TOKENS, HIDDEN, EXPERTS, TOPK, 23, use_fp8=False)
    buf = largeep.Buffer(None, backend="torch", **case.buffer_kwargs())
    try:
        inp = make_inputs(case.seed, rank, case.tokens[rank], HIDDEN, EXPERTS, TOPK, torch.bfloat16)
        idx = with_id(inp.topk_idx, EXPERTS + 1) if rank == 0 else inp.topk_idx
        due = []
        kw: dict[str, Any] = {}
        if how == "in_flight":
            due = [buf.low_latency_dispatch(inp.x, inp.topk_idx, use_fp8=False, return_recv_hook=True)
                   for _ in range(2)]
            want = "has not been called"
        else:
            kw["topk_weights"] = inp.topk_weights[:, :1].contiguous()
            want = "topk_weights"
        try:
            buf.low_latency_dispatch(inp.x, idx, use_fp8=False, **kw)
        except ArgumentError as exc:
            chk.expect(want in str(exc), f"refused for another reason: {exc}")
        else:
            chk.expect(False, "the call was not refused")
        _hooks_then_good_round(buf, case, chk, due,
                               f"low-latency calls refused alike ({how}) on rank {rank}, a good round after them")
    finally:
        buf.destroy()
    return {"failures": chk.failures}


def ll_mixed_refusals(rank: int, world: int) -> dict[str, Any]:
    """The torch backend on a CPU group: at one low-latency dispatch rank 0 is refused for a bad expert id while the
    others are refused for an argument of theirs (bf16_partial_sums without weights). Every refusal is told in one
    void round (a review found the argument refusals told to nobody, so that the others' next call paired with the
    call rank 0 was still in, a call apart from then on): every rank raises its own refusal, and a good round after
    it is right on every rank. Returns {"failures"}."""
    chk = Checker(f"mixed low-latency refusals on rank {rank}")
    case = LowLatencyCase(tokens_of(world), MAX_TOKENS, HIDDEN, EXPERTS, TOPK, 19, use_fp8=False)
    buf = largeep.Buffer(None, backend="torch", **case.buffer_kwargs())
    try:
        inp = make_inputs(case.seed, rank, case.tokens[rank], HIDDEN, EXPERTS, TOPK, torch.bfloat16)
        try:
            if rank == 0:
                buf.low_latency_dispatch(inp.x, with_id(inp.topk_idx, EXPERTS + 1), use_fp8=False)
            else:
                buf.low_latency_dispatch(inp.x, inp.topk_idx, use_fp8=False, bf16_partial_sums=True)
        except ArgumentError as exc:
            want = f"expert id {EXPERTS + 1}" if rank == 0 else "bf16_partial_sums"
            chk.expect(want in str(exc), str(exc))
        else:
            chk.expect(False, "the first call was not refused")
        chk.where = f"mixed low-latency refusals on rank {rank}, a good round after them"
        LowLatencyRound(buf, case, chk).run()
    finally:
        buf.destroy()
    return {"failures": chk.failures}


def ll_combine_refusal_meets_dispatch(rank: int, world: int, then: str = "dispatch") -> dict[str, Any]:
    """The torch backend on a CPU group: rank 1's low-latency combine is refused for its y, which ends the others'
    combine at once (PeerRefusedError naming rank 1); then rank 1 goes on (``then``) to its next dispatch
    (``"dispatch"``; ``"bad_dispatch"``: one refused for a bad id, whose void round meets the combines), or
    (``"other_combine"``) to the combine of a second dispatch made before, while the others repeat the first
    combine. The call's first exchange meets the combines' marker (which names the dispatch combined): every rank
    raises ArgumentError naming each rank's call, nothing moves (gloo aborted the processes on the rows' sizes
    before; two combines of other dispatches summed each other's rows), and no Buffer fails; rank 1 then repeats its
    combine with the others, every rank's combine is right, and a good round (or the second dispatch's combine)
    follows. Returns {"failures", "elapsed_s"}."""
    chk = Checker(f"a low-latency combine refused on rank 1, then a {then}, seen from rank {rank}")
    case = LowLatencyCase(tokens_of(world), MAX_TOKENS, HIDDEN, EXPERTS, TOPK, 23, use_fp8=False)
    buf = largeep.Buffer(None, backend="torch", **case.buffer_kwargs())
    t0 = time.monotonic()
    try:
        rnd = LowLatencyRound(buf, case, chk)
        rnd.dispatch()
        rnd.receive()
        assert rnd.res is not None
        second = None
        if then == "other_combine":
            second = LowLatencyRound(buf, LowLatencyCase(tokens_of(world), MAX_TOKENS, HIDDEN, EXPERTS, TOPK, 25,
                                                         use_fp8=False), chk)
            second.dispatch()
            second.receive()
        if rank == 1:
            try:
                bad_y = torch.zeros(1, 1, HIDDEN, dtype=torch.bfloat16)
                buf.low_latency_combine(bad_y, rnd.idx, rnd.w, rnd.res.handle)
            except ArgumentError as exc:
                chk.expect("'y'" in str(exc), str(exc))
            else:
                chk.expect(False, "the combine of a wrong y was not refused")
        else:  # (rank 1's refusal reaches this combine)
            try:
                rnd.combine()
            except largeep.PeerRefusedError as exc:
                chk.expect("rank(s) [1]" in str(exc) and exc.buffer_usable, str(exc))
            else:
                chk.expect(False, "rank 1's refusal did not reach this combine")
        try:
            if rank == 1:
                if second is not None:
                    second.combine()
                elif then == "bad_dispatch":  # (refused for its values: its void round meets the combines)
                    buf.low_latency_dispatch(rnd.x, with_id(rnd.idx, EXPERTS + 1), use_fp8=False)
                else:
                    buf.low_latency_dispatch(rnd.x, rnd.idx, use_fp8=False)
            else:
                rnd.combine()
        except ArgumentError as exc:
            if second is not None:
                want = ("rank 0: the combine of low-latency dispatch 1" in str(exc)
                        and "rank 1: the combine of low-latency dispatch 2" in str(exc))
            elif then == "bad_dispatch":
                want = ("rank 1: low_latency_dispatch (refused)" in str(exc) and "rank 0: the combine of" in str(exc)
                        and (rank != 1 or f"expert id {EXPERTS + 1}" in str(exc)))
            else:
                want = "rank 1: low_latency_dispatch" in str(exc) and "rank 0: the combine of" in str(exc)
            chk.expect("disagree on the call" in str(exc) and want, str(exc))
        else:
            chk.expect(False, "the calls that met were not refused")
        chk.expect(time.monotonic() - t0 < 5.0, f"the refusal took {time.monotonic() - t0:.1f} s")
        chk.where = f"the combine repeated after the refusals, rank {rank}"
        rnd.combine()
        if second is not None:
            chk.where = f"the second dispatch's combine after the refusals, rank {rank}"
            second.combine()
        chk.where = f"a good round after the refusals, rank {rank}"
        LowLatencyRound(buf, LowLatencyCase(tokens_of(world), MAX_TOKENS, HIDDEN, EXPERTS, TOPK, 24, use_fp8=False),
                        chk).run()
    finally:
        buf.destroy()
    return {"failures": chk.failures, "elapsed_s": time.monotonic() - t0}


def unchecked_out_of_range(rank: int, world: int, backend: str, low_latency: bool) -> dict[str, Any]:
    """With LARGEEP_CHECK_VALUES=0 nothing refuses an expert id >= E or < -1: every backend ignores it (the layout
    counts it nowhere, the token does not go there, and combine adds nothing for it), exactly as if it were -1,
    instead of indexing out of range or failing; the Buffer stays usable."""
    chk = Checker(f"unchecked ids out of range on rank {rank} ({'low latency' if low_latency else 'normal'})")
    old = os.environ.get("LARGEEP_CHECK_VALUES")
    os.environ["LARGEEP_CHECK_VALUES"] = "0"
    try:
        buf = largeep.Buffer(None, hidden=HIDDEN, num_experts=EXPERTS, num_topk=TOPK, max_tokens_per_rank=MAX_TOKENS,
                             backend=backend, low_latency=low_latency)
    finally:
        if old is None:
            del os.environ["LARGEEP_CHECK_VALUES"]
        else:
            os.environ["LARGEEP_CHECK_VALUES"] = old
    dev = buf.ctx.device
    try:
        inp = make_inputs(13, rank, tokens_of(world)[rank], HIDDEN, EXPERTS, TOPK, torch.bfloat16)
        x, idx, w = inp.x.to(dev), inp.topk_idx.to(dev), inp.topk_weights.to(dev)
        bad = idx.clone()
        bad[0, 0], bad[1, 1], bad[2, 0] = EXPERTS, EXPERTS + 7, -5
        masked = torch.where((bad >= EXPERTS) | (bad < -1), -1, bad)
        outs = []
        for ids in (bad, masked):
            if not low_latency:  # (the layout of its own, as a caller's get_dispatch_layout)
                lay = buf.get_dispatch_layout(ids)
                layout = [lay.num_tokens_per_rank, lay.num_tokens_per_node, lay.num_tokens_per_expert,
                          lay.is_token_in_rank]
                ref = ref_layout(masked.cpu(), world, EXPERTS, world)
                for name, got in zip(("num_tokens_per_rank", "num_tokens_per_node", "num_tokens_per_expert",
                                      "is_token_in_rank"), layout, strict=True):
                    want = ref[name].to(got.dtype)
                    chk.expect(torch.equal(got.cpu(), want), f"layout {name}: {got.tolist()} != {want.tolist()}")
            if low_latency:
                d = buf.low_latency_dispatch(x, ids, use_fp8=False)
                counts = d.num_tokens_per_expert.clone()
                y = torch.zeros(d.x.shape, dtype=torch.bfloat16, device=dev)
                for e in range(y.shape[0]):
                    n = int(counts[e])
                    y[e, :n] = d.x[e, :n].float().mul(e + 2).to(torch.bfloat16)
                c = buf.low_latency_combine(y, ids, w, d.handle)
                outs.append([counts, c.x.clone()])
            else:
                d = buf.dispatch(x, ids, w)
                c = buf.combine(d.x, d.handle, topk_weights=d.topk_weights)
                outs.append([d.x.clone(), d.topk_idx.clone(), d.topk_weights.clone(), c.x.clone(),
                             c.topk_weights.clone()])
        for i, (a, b) in enumerate(zip(*outs, strict=True)):
            chk.expect(same_bits(a, b), f"output {i} differs from the call with those ids -1")
    finally:
        buf.destroy()
    return {"failures": chk.failures}


def some_ranks_refuse(rank: int, world: int, backend: str, bad_ranks: list[int], value: int, tokens: list[int],
                      use_fp8: bool, ranks_per_node: int | None = None) -> dict[str, Any]:
    """The ranks in ``bad_ranks`` put expert id ``value`` (out of range) into their first token (those with tokens),
    the others dispatch good ids: the ranks that refused raise ArgumentError naming the id, every other rank
    PeerRefusedError naming exactly those ranks (nobody raises when no rank with a token refused); the caller's
    tensors stay unchanged; then a checked round is right on every rank."""
    chk = Checker(f"ranks {bad_ranks} refuse {value} (tokens {tokens}, fp8 {use_fp8}) on rank {rank}")
    experts = 4 * world  # (any world size divides it)
    case = NormalCase(tuple(tokens), HIDDEN, experts, TOPK, 17, use_fp8=use_fp8, max_tokens=MAX_TOKENS,
                      ranks_per_node=ranks_per_node)
    buf = largeep.Buffer(None, backend=backend, **case.buffer_kwargs())
    dev = buf.ctx.device
    refusers = sorted(r for r in bad_ranks if tokens[r] > 0)
    try:
        inp = make_inputs(case.seed, rank, tokens[rank], HIDDEN, experts, TOPK, torch.bfloat16)
        x, idx, w = inp.x.to(dev), inp.topk_idx.to(dev), inp.topk_weights.to(dev)
        xs: Any = tuple(t.to(dev) for t in fp8.quantize(inp.x.float())) if use_fp8 else x
        ids = with_id(idx, value) if rank in refusers else idx.clone()
        held = [ids, w] + list(xs if use_fp8 else (xs,))
        before = [t.clone() for t in held]
        try:
            buf.dispatch(xs, ids, w)
        except ArgumentError as exc:
            chk.expect(rank in refusers and f"expert id {value}" in str(exc), f"ArgumentError: {exc}")
        except largeep.PeerRefusedError as exc:
            chk.expect(rank not in refusers and f"rank(s) {refusers} refused" in str(exc) and exc.buffer_usable,
                       f"PeerRefusedError: {exc}")
        else:
            chk.expect(not refusers, f"the call went through although ranks {refusers} refused")
        chk.expect(all(same_bits(t, c) for t, c in zip(held, before, strict=True)),
                   "the refused call modified the caller's tensors")
        chk.where += ", the good round after it"
        NormalRound(buf, case, chk).run()
    finally:
        buf.destroy()
    return {"failures": chk.failures}


def too_many_tokens_on_some_ranks(rank: int, world: int, backend: str, over: list[int], use_fp8: bool,
                                  tokens_per_round: int | None = None) -> dict[str, Any]:
    """The ranks in ``over`` dispatch MAX_TOKENS + 1 tokens (the others a few): they raise ArgumentError naming
    max_tokens_per_rank, every other rank PeerRefusedError naming exactly them, at once (not after a timeout); the
    caller's tensors stay unchanged; then a checked round is right on every rank (every Buffer usable)."""
    import time

    chk = Checker(f"ranks {over} send too many tokens (fp8 {use_fp8}, rounds {tokens_per_round}) on rank {rank}")
    experts = 4 * world
    good = tuple(3 + 2 * r for r in range(world))
    case = NormalCase(good, HIDDEN, experts, TOPK, 23, use_fp8=use_fp8, max_tokens=MAX_TOKENS)
    kwargs = case.buffer_kwargs()
    if tokens_per_round is not None:
        kwargs["tokens_per_round"] = tokens_per_round
    buf = largeep.Buffer(None, backend=backend, **kwargs)
    dev = buf.ctx.device
    try:
        t = MAX_TOKENS + 1 if rank in over else good[rank]
        inp = make_inputs(case.seed, rank, t, HIDDEN, experts, TOPK, torch.bfloat16)
        x, idx, w = inp.x.to(dev), inp.topk_idx.to(dev), inp.topk_weights.to(dev)
        xs: Any = tuple(v.to(dev) for v in fp8.quantize(inp.x.float())) if use_fp8 else x
        held = [idx, w] + list(xs if use_fp8 else (xs,))
        before = [v.clone() for v in held]
        start = time.monotonic()
        try:
            buf.dispatch(xs, idx, w)
        except ArgumentError as exc:
            chk.expect(rank in over and f"has {MAX_TOKENS + 1} tokens, more than max_tokens_per_rank={MAX_TOKENS}"
                       in str(exc), f"ArgumentError: {exc}")
        except largeep.PeerRefusedError as exc:
            chk.expect(rank not in over and f"rank(s) {sorted(over)} refused" in str(exc) and exc.buffer_usable,
                       f"PeerRefusedError: {exc}")
            # (in rounds the void round is the others' round 0: no round of theirs moved rows, and the error, which
            # names a later round, does not)
            chk.expect("sent and received nothing" in str(exc) and "(tokens_per_round)" not in str(exc),
                       f"not refused in the first round: {exc}")
        else:
            chk.expect(not over, f"the call went through although ranks {over} sent too many tokens")
        elapsed = time.monotonic() - start
        chk.expect(elapsed < 10.0, f"the refusal took {elapsed:.1f} s (a timeout, not a refusal)")
        chk.expect(all(same_bits(v, c) for v, c in zip(held, before, strict=True)),
                   "the refused call modified the caller's tensors")
        chk.where += ", the good round after it"
        NormalRound(buf, case, chk).run()
    finally:
        buf.destroy()
    return {"failures": chk.failures}


def uneven_gpus_refused(rank: int, world: int) -> dict[str, Any]:
    """The ranks share GPUs unevenly (the pool puts 2 on one GPU, 1 on another): every rank's nvshmem Buffer must
    raise ArgumentError naming the placement, before NVSHMEM's initialisation (which does not finish then)."""
    import time

    chk = Checker(f"uneven GPUs, rank {rank}")
    case = NormalCase(tuple([4] * world), HIDDEN, 4 * world, TOPK, 3, max_tokens=MAX_TOKENS)
    start = time.monotonic()
    try:
        largeep.Buffer(None, backend="nvshmem", **case.buffer_kwargs()).destroy()
    except ArgumentError as exc:
        chk.expect("different numbers of ranks" in str(exc) and "same number of ranks on every GPU" in str(exc),
                   f"ArgumentError: {exc}")
    else:
        chk.expect(False, "the Buffer was created")
    return {"failures": chk.failures, "elapsed_s": time.monotonic() - start}


def heap_sizes_refused(rank: int, world: int) -> dict[str, Any]:
    """Rank r sets NVSHMEM_SYMMETRIC_SIZE to (r + 2) GiB: every rank's nvshmem Buffer must raise ArgumentError
    naming the variable, before NVSHMEM starts; with the variable unset on every rank a Buffer is then made (largeep
    sizes the heap itself) and works."""
    chk = Checker(f"heap sizes, rank {rank}")
    case = NormalCase(tuple([4] * world), HIDDEN, 4 * world, TOPK, 3, max_tokens=MAX_TOKENS)
    old = os.environ.get("NVSHMEM_SYMMETRIC_SIZE")
    os.environ["NVSHMEM_SYMMETRIC_SIZE"] = f"{rank + 2}G"
    try:
        largeep.Buffer(None, backend="nvshmem", **case.buffer_kwargs()).destroy()
        chk.expect(False, "the Buffer was created")
    except ArgumentError as exc:
        chk.expect("NVSHMEM_SYMMETRIC_SIZE differs" in str(exc) and "'2G'" in str(exc), f"ArgumentError: {exc}")
    finally:
        if old is None:
            os.environ.pop("NVSHMEM_SYMMETRIC_SIZE", None)
        else:
            os.environ["NVSHMEM_SYMMETRIC_SIZE"] = old
    buf = largeep.Buffer(None, backend="nvshmem", **case.buffer_kwargs())
    try:
        NormalRound(buf, case, chk).run()
    finally:
        buf.destroy()
    return {"failures": chk.failures}


def init_times_out(rank: int, world: int, timeout_s: float) -> dict[str, Any]:
    """The ranks share GPUs unevenly and the placement check is switched off: NVSHMEM's initialisation must end
    in PeerTimeoutError after about ``timeout_s`` (LARGEEP_INIT_TIMEOUT_S) on every rank, and a second Buffer must
    raise at once. Returns {"failures", "created"} (created: NVSHMEM served the placement after all)."""
    import time

    from largeep.backends import nvshmem_backend

    chk = Checker(f"init timeout, rank {rank}")
    case = NormalCase(tuple([4] * world), HIDDEN, 4 * world, TOPK, 3, max_tokens=MAX_TOKENS)
    nvshmem_backend.uneven_gpus_reason = lambda places: None  # (this process is killed afterwards)
    os.environ["LARGEEP_INIT_TIMEOUT_S"] = str(timeout_s)
    start = time.monotonic()
    try:
        largeep.Buffer(None, backend="nvshmem", **case.buffer_kwargs()).destroy()
        return {"failures": [], "created": True}
    except largeep.PeerTimeoutError as exc:
        took = time.monotonic() - start
        chk.expect(timeout_s <= took < timeout_s + 15 and "LARGEEP_INIT_TIMEOUT_S" in str(exc),
                   f"PeerTimeoutError after {took:.1f} s: {exc}")
    start = time.monotonic()
    try:
        largeep.Buffer(None, backend="nvshmem", **case.buffer_kwargs())
        chk.expect(False, "a second Buffer was created")
    except largeep.PeerTimeoutError as exc:
        chk.expect(time.monotonic() - start < 5.0 and "an earlier Buffer's" in str(exc), f"second Buffer: {exc}")
    return {"failures": chk.failures, "created": False}


def nvshmem_missing_on_one_rank(rank: int, world: int) -> str:
    """backend='nvshmem' where only rank 0 lacks the native module (the others pretend to have it): every rank
    raises RuntimeError (rank 0 its own reason, the others naming rank 0) instead of the others going on into
    NVSHMEM's start without it. Returns the message."""
    from largeep import native

    real = native.unavailable_reason
    # (fixed on every rank, whatever this machine has: rank 0 lacks it, the others have it)
    native.unavailable_reason = (lambda: None) if rank > 0 else (lambda: "not built here (test)")  # type: ignore
    try:
        largeep.Buffer(None, hidden=HIDDEN, num_experts=EXPERTS, num_topk=TOPK, max_tokens_per_rank=MAX_TOKENS,
                       backend="nvshmem")
    except RuntimeError as exc:
        return str(exc)
    finally:
        native.unavailable_reason = real  # type: ignore[assignment]
    raise AssertionError("Buffer(backend='nvshmem') went through")


def missing_collective_member(rank: int, world: int, which: str, timeout_s: float) -> dict[str, Any]:
    """Rank 0 makes a collective call of the library's (``which``: the gate's load sum, or the replicas' gradient
    sum) that the other ranks never make: it must raise PeerTimeoutError naming the call after about
    LARGEEP_TIMEOUT_S (gloo), not wait for the process group's own timeout; a good call on every rank works
    beforehand. Returns {"raised": message or None, "took": seconds} on rank 0."""
    import time

    from largeep import layers
    from largeep.gate import GateConfig, TopKGate

    group = dist.new_group(list(range(world)))
    os.environ["LARGEEP_TIMEOUT_S"] = str(timeout_s)
    try:
        if which == "gate":
            gate = TopKGate(GateConfig(hidden=8, num_experts=4, topk=2))

            def call() -> None:
                gate.update_bias(group, load=torch.full((4,), float(rank + 1)))
        elif which == "gather":  # (Buffer creation's gather of every rank's arguments)
            from largeep import _collective

            def call() -> None:
                with _collective.marks_out_of_step(group):  # (as Buffer creation makes it)
                    got = _collective.all_gather_object({"rank": rank, "pad": "x" * rank}, group, "Buffer", timeout_s)
                assert got == [{"rank": r, "pad": "x" * r} for r in range(world)], got
        else:
            w = torch.nn.Parameter(torch.zeros(2, 3))
            w.grad = torch.full((2, 3), float(rank + 1))
            table = torch.tensor([0, 1] * world)  # every logical expert on every rank

            def call() -> None:
                layers.allreduce_replica_grads([w], table, group)
        call()  # every rank: the sum over the group arrives
        if which == "replicas":
            expect = float(sum(range(1, world + 1)))
            assert torch.equal(w.grad, torch.full((2, 3), expect)), w.grad
        if rank != 0:
            return {"raised": None, "took": 0.0}
        start = time.monotonic()
        try:
            call()
        except largeep.PeerTimeoutError as exc:
            out: dict[str, Any] = {"raised": str(exc), "took": time.monotonic() - start}
            if which == "gather":  # the group is out of step now: a Buffer on it is refused at once
                start = time.monotonic()
                try:
                    largeep.Buffer(group, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=4,
                                   backend="torch")
                except largeep.ArgumentError as again:
                    out.update(refused=str(again), refused_s=time.monotonic() - start)
            return out
        return {"raised": None, "took": time.monotonic() - start}
    finally:
        del os.environ["LARGEEP_TIMEOUT_S"]


def too_large_for_the_gpu(rank: int, world: int) -> dict[str, Any]:
    """The first nvshmem Buffer of these processes asks for more symmetric memory than their shared GPU has free
    (max_tokens_per_rank 2**20 at hidden 7168: about 170 GiB per rank): every rank raises ArgumentError naming the
    memory, before NVSHMEM starts; then a Buffer of a fitting size works (a checked round). With NVSHMEM started
    and that Buffer alive, the too-large one is refused the same way (before, only a process's first Buffer was
    checked: a later one failed inside the collective allocation on the ranks short of memory alone), and the
    fitting Buffer still works."""
    chk = Checker(f"too large on rank {rank}")

    def too_large() -> None:
        try:
            largeep.Buffer(None, hidden=7168, num_experts=2 * world, num_topk=2, max_tokens_per_rank=1 << 20,
                           backend="nvshmem")
        except ArgumentError as exc:
            chk.expect("GiB of symmetric memory per rank" in str(exc) and "GiB free" in str(exc)
                       and "lower max_tokens_per_rank" in str(exc), f"ArgumentError: {exc}")
        else:
            chk.expect(False, "a Buffer larger than the GPU's free memory was made")

    too_large()
    case = NormalCase(tuple(5 + 3 * r for r in range(world)), HIDDEN, EXPERTS, TOPK, 19, max_tokens=MAX_TOKENS)
    buf = largeep.Buffer(None, backend="nvshmem", **case.buffer_kwargs())
    try:
        chk.where += ", the fitting Buffer after it"
        NormalRound(buf, case, chk).run()
        chk.where += ", a too-large Buffer beside it"
        too_large()
        NormalRound(buf, case, chk).run()
    finally:
        buf.destroy()
    return {"failures": chk.failures}


def num_sms_bounds(rank: int, world: int) -> list[str]:
    """Buffer(num_sms=...) on a CPU group, with largeep.buffer._gpu_sms made to report a GPU of 16 SMs (or to fail as
    CUDA's start can): above 16 is refused where the native normal-mode kernels could take it (backend "auto" or
    "nvshmem", normal mode) on every rank, 16 is taken, and the torch backend and the low-latency mode take any
    count (they ignore it). A failing SM lookup on one rank is every rank's ArgumentError, not the others' timeout.
    Returns the messages, in that order."""
    import largeep.buffer as buffer_mod

    kw: dict[str, Any] = dict(hidden=128, num_experts=2 * world, num_topk=1, max_tokens_per_rank=4)
    msgs = []

    def refused(**over: Any) -> str:
        try:
            largeep.Buffer(None, **{**kw, **over}).destroy()
        except ArgumentError as exc:
            return str(exc)
        raise AssertionError(f"Buffer({over}) was accepted")

    real = buffer_mod._gpu_sms
    try:
        buffer_mod._gpu_sms = lambda: 16
        msgs.append(refused(num_sms=17))
        largeep.Buffer(None, **kw, num_sms=16, backend="torch").destroy()  # (auto takes torch on CPU)
        for over in (dict(backend="torch"), dict(low_latency=True, backend="torch")):
            largeep.Buffer(None, **kw, num_sms=2000, **over).destroy()

        def fails() -> int:
            raise RuntimeError("Cannot re-initialize CUDA in forked subprocess\nmore")

        if rank == world - 1:
            buffer_mod._gpu_sms = fails
        msgs.append(refused(num_sms=8))
    finally:
        buffer_mod._gpu_sms = real
    return msgs


def ranks_disagree(rank: int, world: int) -> list[str]:
    """Ranks that disagree on a combine (topk_weights on rank 0 only; y float32 on rank 0 only; bf16_partial_sums
    on rank 0 only, the ranks being nodes of one rank), on a cached
    dispatch (FP8 rows on rank 0 only), or on the call itself (a cached dispatch on rank 0, a combine or a fresh
    dispatch elsewhere), with variable and fixed (num_worst_tokens) outputs: on CPU groups every rank raises
    ArgumentError naming each rank's call (gloo aborted the process where the calls' first collectives differed in
    size, and a cached dispatch met by a combine of the same sizes returned the wrong rows), nothing moves, and the
    next good round trip is right."""
    torch.manual_seed(rank)
    e = 4 * world
    buf = largeep.Buffer(None, hidden=128, num_experts=e, num_topk=2, max_tokens_per_rank=8, backend="torch",
                         ranks_per_node=1)
    x = torch.randn(6, 128).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(e)[:2] for _ in range(6)])
    w = torch.rand(6, 2)
    ranks = torch.stack([(idx // 4 == r).any(1) for r in range(world)], dim=1).sum(1, keepdim=True)
    msgs = []
    try:
        for worst in (0, 16):
            d = buf.dispatch(x, idx, w, num_worst_tokens=worst)
            y = d.x.float() if rank == 0 else d.x
            cases = [(lambda d=d: buf.combine(d.x, d.handle, topk_weights=d.topk_weights if rank == 0 else None),
                      "topk_weights given", "topk_weights None"),
                     (lambda d=d, y=y: buf.combine(y, d.handle), "y torch.float32", "y torch.bfloat16"),
                     (lambda d=d: buf.combine(d.x, d.handle, bf16_partial_sums=rank == 0),
                      "topk_weights None, bf16_partial_sums", "topk_weights None, the handle"),
                     (lambda d=d: buf.dispatch(fp8.quantize(x) if rank == 0 else x, handle=d.handle),
                      "x torch.float8_e4m3fn, FP8 scales", "x torch.bfloat16"),
                     (lambda d=d: buf.dispatch(x, handle=d.handle) if rank == 0 else buf.combine(d.x, d.handle),
                      "cached dispatch, x torch.bfloat16", "combine, y torch.bfloat16"),
                     (lambda d=d, worst=worst: buf.dispatch(x, handle=d.handle) if rank == 0 else
                      buf.dispatch(x, idx, w, num_worst_tokens=worst),
                      "cached dispatch, x torch.bfloat16", f"num_worst_tokens={worst}, x torch.bfloat16")]
            for call, first, second in cases:
                try:
                    call()
                except largeep.ArgumentError as exc:
                    said = dict(part.split(": ", 1) for part in str(exc).split("(", 1)[1].split(")")[0].split("; "))
                    assert first in said["rank 0"] and second in said["rank 1"], str(exc)  # each rank's own call
                    msgs.append(str(exc))
                else:
                    raise AssertionError(f"ranks that disagree were not refused ({first} / {second})")
            c = buf.combine(d.x, d.handle)  # the Buffer still works
            assert torch.equal(c.x, (x.float() * ranks).to(torch.bfloat16)), "a good combine after the refusals"
    finally:
        buf.destroy()
    return msgs


def event_arguments(rank: int, world: int) -> None:
    """get_dispatch_layout returns its event (Layout.event); a previous_event that is not an EventOverlap is
    refused naming the argument, before anything runs."""
    buf = largeep.Buffer(None, hidden=128, num_experts=4 * world, num_topk=2, max_tokens_per_rank=8,
                         backend="torch")
    try:
        idx = torch.zeros(3, 2, dtype=torch.int64)
        layout = buf.get_dispatch_layout(idx, async_finish=True)
        assert isinstance(layout.event, largeep.EventOverlap), layout
        d = buf.dispatch(torch.zeros(3, 128), idx, torch.ones(3, 2))
        for name, call in (
            ("get_dispatch_layout", lambda: buf.get_dispatch_layout(idx, previous_event=object())),
            ("dispatch", lambda: buf.dispatch(torch.zeros(3, 128), idx, torch.ones(3, 2), previous_event=1)),
            ("combine", lambda: buf.combine(d.x, d.handle, previous_event="event")),
        ):
            try:
                call()
            except ArgumentError as exc:
                assert f"Buffer.{name}: argument 'previous_event' must be an EventOverlap" in str(exc), str(exc)
            else:
                raise AssertionError(f"{name}: a previous_event of the wrong type was taken")
        c = buf.combine(d.x, d.handle)  # the refusals left the Buffer usable
        assert torch.equal(c.x, d.x.new_zeros(3, 128)), "a good combine after the refusals"
    finally:
        buf.destroy()


def handle_owners(rank: int, world: int) -> None:
    """A handle given to a Buffer other than the one that made it is refused, saying whether its own Buffer is
    alive (another Buffer) or was destroyed; the Buffer refusing it stays usable."""
    kw = {"hidden": 128, "num_experts": 4 * world, "num_topk": 2, "max_tokens_per_rank": 8, "backend": "torch"}
    idx = torch.tensor([[0, 1], [1, -1], [2, 3]], dtype=torch.int64)
    x, w = torch.randn(3, 128), torch.rand(3, 2)
    a = largeep.Buffer(None, **kw)
    b = largeep.Buffer(None, **kw)
    try:
        da = a.dispatch(x, idx, w)
        for destroyed in (False, True):
            if destroyed:
                a.destroy()
            try:
                b.combine(da.x, da.handle)
            except ArgumentError as exc:
                msg = str(exc)
                assert "Buffer.combine: argument 'handle'" in msg, msg
                if destroyed:
                    assert "a Buffer that was destroyed" in msg and "another Buffer" not in msg, msg
                else:
                    assert "another Buffer" in msg and "destroyed" not in msg, msg
            else:
                raise AssertionError("a handle of another Buffer was taken")
        db = b.dispatch(x, idx, w)
        assert torch.equal(b.combine(db.x, db.handle).x, x * (idx >= 0).any(1, keepdim=True)), "b after refusals"
    finally:
        a.destroy()
        b.destroy()


def ll_use_fp8_disagree(rank: int, world: int) -> str:
    """A low-latency dispatch with use_fp8 on rank 0 only, on a CPU group: every rank raises ArgumentError naming
    each rank's use_fp8 (the packed rows of different widths aborted the process in gloo), and the next good round
    trip is right."""
    torch.manual_seed(rank)
    e = 4 * world
    buf = largeep.Buffer(None, hidden=128, num_experts=e, num_topk=2, max_tokens_per_rank=8, backend="torch",
                         low_latency=True)
    x = torch.randn(6, 128).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(e)[:2] for _ in range(6)])
    w = torch.rand(6, 2)
    try:
        try:
            buf.low_latency_dispatch(x, idx, use_fp8=rank == 0)
        except ArgumentError as exc:
            msg = str(exc)
            assert "disagree" in msg and "rank 0: use_fp8=True" in msg and "rank 1: use_fp8=False" in msg, msg
        else:
            raise AssertionError("ranks that disagree on use_fp8 were not refused")
        d = buf.low_latency_dispatch(x, idx, use_fp8=False)
        out = buf.low_latency_combine(d.x, idx, w, d.handle)
        want = (x.float() * w.sum(1, keepdim=True)).to(torch.bfloat16)
        torch.testing.assert_close(out.x.float(), want.float(), rtol=2**-7, atol=2**-7)
    finally:
        buf.destroy()
    return msg


def out_of_step_keys(rank: int, world: int) -> None:
    """The out-of-step mark of a process group: None and dist.group.WORLD are one group, the first reason stays, and
    a Buffer on the marked group is refused at once naming it. The mark is taken off afterwards (the pool's group
    serves later tests)."""
    from largeep import _collective

    try:
        _collective.mark_out_of_step(None, "a test's mark")
        assert _collective.out_of_step(dist.group.WORLD) == "a test's mark"
        _collective.mark_out_of_step(dist.group.WORLD, "a second mark")
        assert _collective.out_of_step(None) == "a test's mark"
        try:
            largeep.Buffer(None, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=4, backend="torch")
        except largeep.ArgumentError as exc:
            assert f"argument 'group' is out of step on rank {rank}: an earlier call on it failed (a test's mark)" \
                in str(exc), str(exc)
        else:
            raise AssertionError("a Buffer was made on a group marked out of step")
    finally:
        _collective._OUT_OF_STEP.pop(dist.group.WORLD, None)
    largeep.Buffer(None, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=4, backend="torch").destroy()


def all_reduce_bad_setting(rank: int, world: int) -> dict[str, Any]:
    """Every rank's LARGEEP_LOG_LEVEL is bad when the library's own all-reduce (the gate's load sum, the replicas'
    gradient sum, expert TP) is called: it raises ValueError naming the variable before the collective starts, so
    the tensor stays as it was, and the group's next collective pairs as before."""
    from largeep import _collective

    t = torch.full((4,), float(rank + 1))
    os.environ["LARGEEP_LOG_LEVEL"] = "verbose"
    try:
        _collective.all_reduce(t, None, "the test's sum")
        raised = ""
    except ValueError as exc:
        raised = str(exc)
    finally:
        del os.environ["LARGEEP_LOG_LEVEL"]
    time.sleep(0.5)  # (a collective issued all the same would have completed by now)
    dist.barrier()
    unchanged = t.tolist()
    _collective.all_reduce(t, None, "the test's sum")
    return {"raised": raised, "unchanged": unchanged, "sum": t.tolist()}


# -- one rank's call refused for an argument, the others' good ------------------------------------------------------
# (call, case) -> (rank 0's wrong call, the words its ArgumentError must hold). ``g`` holds rank 0's good arguments
# of the call (x, idx, w; for a cached dispatch or a combine the earlier dispatch ``d``; for a low-latency combine
# its dispatch ``d``, y and ``out``).
LONE_REFUSALS: dict[str, dict[str, tuple[Callable[[Any], Any], tuple[str, ...]]]] = {
    "dispatch": {
        "weights_float64": (lambda g: g.buf.dispatch(g.x, g.idx, g.w.double()), ("'topk_weights'", "float64")),
        "x_float16": (lambda g: g.buf.dispatch(g.x.half(), g.idx, g.w), ("'x'", "float16")),
        "x_hidden": (lambda g: g.buf.dispatch(g.x[:, :128].contiguous(), g.idx, g.w), ("'x'", "shape")),
        "idx_int32": (lambda g: g.buf.dispatch(g.x, g.idx.int(), g.w), ("'topk_idx'", "int32")),
        "weights_missing": (lambda g: g.buf.dispatch(g.x, g.idx, None), ("'topk_weights' are required",)),
        "alignment_zero": (lambda g: g.buf.dispatch(g.x, g.idx, g.w, expert_alignment=0),
                           ("'expert_alignment'", ">= 1")),
        "alignment_too_large": (lambda g: g.buf.dispatch(g.x, g.idx, g.w, expert_alignment=1 << 21),
                                ("'expert_alignment'", "<= 1048576")),
        "async_not_bool": (lambda g: g.buf.dispatch(g.x, g.idx, g.w, async_finish="yes"), ("'async_finish'",)),
    },
    "cached_dispatch": {
        "x_tokens": (lambda g: g.buf.dispatch(g.x[:-1].contiguous(), handle=g.d.handle),
                     ("'x'", "the handle was made for")),
        "x_float16": (lambda g: g.buf.dispatch(g.x.half(), handle=g.d.handle), ("'x'", "float16")),
        "alignment_other": (lambda g: g.buf.dispatch(g.x, handle=g.d.handle, expert_alignment=4),
                            ("'expert_alignment' = 4",)),
    },
    "combine": {
        "y_rows": (lambda g: g.buf.combine(torch.cat([g.y, g.y[:1]]), g.d.handle), ("'y'", "shape")),
        "y_float16": (lambda g: g.buf.combine(g.y.half(), g.d.handle), ("'y'", "float16")),
        "weights_float64": (lambda g: g.buf.combine(g.y, g.d.handle, topk_weights=g.d.topk_weights.double()),
                            ("'topk_weights'", "float64")),
    },
    "low_latency_dispatch": {
        "x_float32": (lambda g: g.buf.low_latency_dispatch(g.x.float(), g.idx, use_fp8=False), ("'x'", "float32")),
        "idx_int32": (lambda g: g.buf.low_latency_dispatch(g.x, g.idx.int(), use_fp8=False), ("'topk_idx'", "int32")),
        "weights_shape": (lambda g: g.buf.low_latency_dispatch(g.x, g.idx, use_fp8=False,
                                                               topk_weights=g.w[:, :1].contiguous()),
                          ("'topk_weights'", "shape")),
        "partial_sums_without_weights": (lambda g: g.buf.low_latency_dispatch(g.x, g.idx, use_fp8=False,
                                                                              bf16_partial_sums=True),
                                         ("'bf16_partial_sums'", "needs 'topk_weights'")),
    },
    "low_latency_combine": {
        "y_rows": (lambda g: g.buf.low_latency_combine(g.y[:, :-1], g.idx, g.w, g.d.handle), ("'y'", "shape")),
        "weights_float64": (lambda g: g.buf.low_latency_combine(g.y, g.idx, g.w.double(), g.d.handle),
                            ("'topk_weights'", "float64")),
        "out_float32": (lambda g: g.buf.low_latency_combine(g.y, g.idx, g.w, g.d.handle,
                                                            out=torch.empty(g.x.shape, device=g.x.device)),
                        ("'out'", "float32")),
    },
}
LONE_REFUSAL_CASES = [(call, name) for call, cases in LONE_REFUSALS.items() for name in cases]


def lone_refusal_told(backend: str, call: str) -> bool:
    """Whether a refusal of ``call`` on one rank reaches the others' pending call (they raise PeerRefusedError):
    on CPU groups (the torch backend) every call; on the nvshmem backend a fresh dispatch (its void round). Else the
    others' call pairs with the refusing rank's next one, which repeats the call with good arguments."""
    return backend == "torch" or call == "dispatch"


@dataclass
class _Lone:
    buf: largeep.Buffer
    x: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor
    d: Any = None
    y: Any = None


def _ll_y(res: Any, seed: int, rank: int, world: int) -> tuple[torch.Tensor, Callable[[int, int, int], torch.Tensor]]:
    """A low-latency combine's y [E/N, N*M, H] bf16 for dispatch result ``res`` on ``rank``: each valid row is
    y_of(global expert, source rank, source token), a function every rank can evaluate; the others 0."""
    epr = EXPERTS // world

    def y_of(ge: int, s: int, t: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 100_003 + ge * 1009 + s * 101 + t)
        return torch.randn(HIDDEN, generator=g).to(torch.bfloat16)

    info = res.src_info.cpu()
    counts = res.num_tokens_per_expert.cpu().tolist()
    y = torch.zeros(epr, world * MAX_TOKENS, HIDDEN, dtype=torch.bfloat16)
    for le in range(epr):
        for j in range(counts[le]):
            s, t = info[le, j].tolist()
            y[le, j] = y_of(rank * epr + le, s, t)
    return y.to(res.src_info.device), y_of


def _check_ll_rows(chk: Checker, res: Any, want: dict[int, dict[tuple[int, int], torch.Tensor]], what: str) -> None:
    """A bf16 low-latency dispatch's receive against ref_low_latency (rows in any order within an expert)."""
    counts = res.num_tokens_per_expert.cpu().tolist()
    info, x = res.src_info.cpu(), res.x.cpu()
    for le, rows in want.items():
        if not chk.expect(counts[le] == len(rows), f"{what}: expert {le} got {counts[le]} rows, expected {len(rows)}"):
            continue
        got = {tuple(info[le, j].tolist()): x[le, j] for j in range(counts[le])}
        chk.expect(set(got) == set(rows), f"{what}: expert {le} got rows of {sorted(got)}, expected {sorted(rows)}")
        chk.expect(all(k in got and same_bits(got[k], v) for k, v in rows.items()), f"{what}: expert {le}: values")


def lone_refusal(rank: int, world: int, backend: str, call: str, name: str) -> dict[str, Any]:
    """Rank 0's ``call`` is refused for an argument (LONE_REFUSALS[call][name]), every other rank makes the good
    call. Rank 0 raises ArgumentError naming the argument, at once. Where the refusal reaches the others
    (lone_refusal_told) they raise PeerRefusedError naming rank 0, at once, their Buffer usable, and then every rank
    makes the good call; elsewhere their call returns and rank 0 repeats it with good arguments, which pairs with it.
    Either way the good call is right on every rank (against reference.py), and so is a good round trip after it.
    Returns {"failures", "elapsed_s"}."""
    chk = Checker(f"{call} {name} refused on rank 0, seen from rank {rank} ({backend})")
    low_latency = call.startswith("low_latency")
    seed = 40 + zlib.crc32(f"{call}/{name}".encode()) % 1000
    tokens = tokens_of(world)
    buf = largeep.Buffer(None, hidden=HIDDEN, num_experts=EXPERTS, num_topk=TOPK, max_tokens_per_rank=MAX_TOKENS,
                         backend=backend, low_latency=low_latency)
    dev = buf.ctx.device
    told = lone_refusal_told(backend, call)
    elapsed = 0.0
    try:
        inputs = [make_inputs(seed, r, tokens[r], HIDDEN, EXPERTS, TOPK, torch.bfloat16) for r in range(world)]
        mine = inputs[rank]
        g = _Lone(buf, mine.x.to(dev), mine.topk_idx.to(dev), mine.topk_weights.to(dev))
        refs = [ref_dispatch(inputs, r, EXPERTS) for r in range(world)]
        ys = [torch.randn(len(d.src), HIDDEN, generator=torch.Generator().manual_seed(seed * 7 + r)).to(torch.bfloat16)
              for r, d in enumerate(refs)]
        y_of = None
        if call in ("cached_dispatch", "combine"):
            g.d = buf.dispatch(g.x, g.idx, g.w)
            g.y = ys[rank].to(dev)
        elif call == "low_latency_combine":
            g.d = buf.low_latency_dispatch(g.x, g.idx, use_fp8=False)
            g.y, y_of = _ll_y(g.d, seed, rank, world)

        def good() -> Any:
            if call == "dispatch":
                return buf.dispatch(g.x, g.idx, g.w)
            if call == "cached_dispatch":
                return buf.dispatch(g.x, handle=g.d.handle)
            if call == "combine":
                return buf.combine(g.y, g.d.handle)
            if call == "low_latency_dispatch":
                return buf.low_latency_dispatch(g.x, g.idx, use_fp8=False)
            return buf.low_latency_combine(g.y, g.idx, g.w, g.d.handle)

        def check(res: Any, what: str) -> None:
            if call in ("dispatch", "cached_dispatch"):
                ref = refs[rank]
                want = (torch.stack([inputs[s].x[t] for s, t in ref.src]) if ref.src
                        else torch.empty(0, HIDDEN, dtype=torch.bfloat16))
                chk.equal(res.x, want, f"{what}: x")
            elif call == "combine":
                chk.close(res.x, ref_combine(ys, refs, rank, tokens[rank]), torch.bfloat16, f"{what}: x")
            elif call == "low_latency_dispatch":
                _check_ll_rows(chk, res, ref_low_latency(inputs, rank, EXPERTS), what)
            else:
                assert y_of is not None
                chk.close(res.x, ref_low_latency_combine(mine, rank, EXPERTS, world, y_of), torch.bfloat16,
                          f"{what}: x")

        bad, words = LONE_REFUSALS[call][name]
        held = [t for t in (g.x, g.idx, g.w, g.y) if isinstance(t, torch.Tensor)]
        before = [t.clone() for t in held]
        pending = None
        dist.barrier()
        t0 = time.monotonic()
        try:
            pending = bad(g) if rank == 0 else good()
        except ArgumentError as exc:
            chk.expect(rank == 0, f"ArgumentError on a good rank: {exc}")
            missing = [w for w in words if w not in str(exc)]
            chk.expect(not missing, f"the refusal lacks {missing}: {exc}")
        except largeep.PeerRefusedError as exc:
            chk.expect(rank != 0 and told, f"PeerRefusedError: {exc}")
            chk.expect("rank(s) [0]" in str(exc) and "stays usable" in str(exc) and exc.buffer_usable, str(exc))
        else:
            chk.expect(rank != 0 and not told, "the call was not refused")
        elapsed = time.monotonic() - t0
        chk.expect(all(same_bits(t, b) for t, b in zip(held, before, strict=True)),
                   "the refused call modified the caller's tensors")
        chk.where = f"{call} {name}: the good call after the refusal, rank {rank} ({backend})"
        if told or rank == 0:
            check(good(), "the good call")
        if pending is not None:  # (the call that rank 0's repeated call paired with)
            check(pending, "the call pending at the refusal")
        chk.where = f"{call} {name}: a good round trip after it, rank {rank} ({backend})"
        if low_latency:
            LowLatencyRound(buf, LowLatencyCase(tokens, MAX_TOKENS, HIDDEN, EXPERTS, TOPK, seed + 1, use_fp8=False),
                            chk).run()
        else:
            NormalRound(buf, NormalCase(tokens, HIDDEN, EXPERTS, TOPK, seed + 1, max_tokens=MAX_TOKENS), chk).run()
    finally:
        buf.destroy()
    return {"failures": chk.failures, "elapsed_s": elapsed}
