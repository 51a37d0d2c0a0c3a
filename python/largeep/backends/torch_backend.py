"""SPEC.md's semantics over torch.distributed collectives (gloo on CPU, NCCL on GPU).

This is the reference every other backend is tested against and the NCCL baseline of the benchmarks, so it is
vectorised: one count exchange, one permutation (a gather), one ``all_to_all_single`` of packed rows, and for a
variable-size combine one ``index_add`` per rank whose rows come back (in rank order: the sums are the same bits on
every device and every run).

Normal mode, variable sizes (the default): the count exchange is read on the host (one sync) to size the output.
Normal mode with ``num_worst_tokens`` and the whole low-latency mode use fixed-size blocks instead (each source sends
``cap`` rows to each destination whatever the counts), so no host sync happens and the calls are graph-capturable.

Rows travel packed: every tensor that goes with a token (x, FP8 scales, top-k ids and weights) is viewed as bytes
and concatenated, so a fixed-size call issues one data collective; a variable-size dispatch sends x straight into
its output and the small per-row fields in a second one, and a variable-size combine given weights sends them in a
second one too.

On CUDA (NCCL) no wait here is bounded by LARGEEP_TIMEOUT_S: the process group's timeout applies. Nor are the
kinds of the ranks' calls compared there except in a variable-size fresh dispatch (its signature rides the count
exchange, read on the host): a num_worst_tokens dispatch sends a blank signature (no host wait to read one), and
cached dispatches, combines and low-latency calls (use_fp8) send none, so ranks whose calls differ pair mismatched
collectives (docs/usage.md).

A num_worst_tokens dispatch whose rows on some rank are more than num_worst_tokens is refused on every rank of a CPU
group before its rows move (one more collective, of the row counts). On CUDA nothing waits for the counts; as on the
nvshmem backend, that rank's outputs hold no rows (ids -1, weights 0, counts 0) and its next call raises, the Buffer
unusable; besides, its combine sends NaN back for every row it received, so that no source rank's sum silently lacks
them. The verdict reaches the host through a copy into pinned memory that nothing waits for: a call the host makes
before the device has run the dispatch (its combine, typically) goes through, and a later one raises. In a CUDA
graph the check is captured with the dispatch and runs at each replay; the host reads it at its next call of the
Buffer outside the graph (no Python runs during a replay).

A call that raises on one rank after its first collective (out of memory, KeyboardInterrupt, a wait that timed out)
leaves that rank out of step with the others, which wait in the call's next collective: from then on the Buffer
refuses every call on that rank before it issues anything (_out_of_step_on_error).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from largeep import _collective, checks, fp8
from largeep.backends.base import GroupContext, LowLatencyDispatchOut, NormalDispatchOut, align_up
from largeep.errors import ArgumentError, PeerRefusedError, PeerTimeoutError
from largeep.layout import Layout, compute_layout, one_hot_mask


def _pack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """[P, ...] tensors -> uint8 [P, sum of row bytes]."""
    rows = parts[0].shape[0]
    if len(parts) == 1:
        return parts[0].contiguous().reshape(-1).view(torch.uint8).reshape(rows, _row_bytes(parts[0]))
    return torch.cat(
        [p.contiguous().reshape(-1).view(torch.uint8).reshape(rows, _row_bytes(p))
         for p in parts],
        dim=1,
    )


def _row_bytes(t: torch.Tensor) -> int:
    n = t.element_size()
    for s in t.shape[1:]:
        n *= s
    return n


def _unpack(rows: torch.Tensor, specs: Sequence[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
    """uint8 [P, bytes] -> tensors [P, *shape] of the given dtypes, in order."""
    out, col = [], 0
    for dtype, shape in specs:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        # a fresh buffer: a one-row slice stays non-contiguous in the byte sense and refuses a wider view
        part = torch.empty((rows.shape[0], nbytes), dtype=torch.uint8, device=rows.device)
        part.copy_(rows[:, col : col + nbytes])
        out.append(part.view(dtype).reshape(rows.shape[0], *shape))
        col += nbytes
    return out


def _exclusive_cumsum(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.cumsum(t, dim=dim) - t


def _sum_blocks_in_order(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, blocks: Sequence[int]) -> None:
    """out float32 [T, ...] += rows [P, ...] (any float dtype, taken as float32) at out[index[p]], the rows being
    len(blocks) contiguous blocks of blocks[i] rows (a variable-size combine: the rows from each rank, in rank
    order), none of which names an index twice. One index_add per block, in block order: every out[t] is the sum
    0 + (its row of the first block that has one) + (... of the next) ..., the same order on every device (one
    index_add over all rows runs in that order on CPU, but in atomics of no fixed order on CUDA, where a token with
    rows from three ranks or more could then differ in its last bits from one run to the next)."""
    start = 0
    for size in blocks:
        if size:
            out.index_add_(0, index[start : start + size], rows[start : start + size].float())
        start += size


def _round_other_nodes(per_node: torch.Tensor, home: int) -> torch.Tensor:
    """per_node float32 [T, M, H] (a token's rows summed per node) -> [T, H]: their sum, each node's but ``home``'s
    rounded to bf16 first (bf16 partial sums: what the other nodes send home)."""
    rounded = per_node.to(torch.bfloat16).float()
    rounded[:, home] = per_node[:, home]
    return rounded.sum(1)


def _sum_by_node(index: torch.Tensor, rows: torch.Tensor, blocks: Sequence[int], num_tokens: int,
                 ranks_per_node: int, rank: int) -> torch.Tensor:
    """A variable-size combine's sum (as _sum_blocks_in_order: blocks[r] rows from rank r, at out[index[p]]) with
    bf16 partial sums: each node's blocks summed apart in float32, then _round_other_nodes."""
    nodes = len(blocks) // ranks_per_node
    per_node = torch.zeros(num_tokens, nodes, rows.shape[1], dtype=torch.float32, device=rows.device)
    start = 0
    for r, size in enumerate(blocks):
        if size:
            block = rows[start : start + size].float()
            per_node[:, r // ranks_per_node].index_add_(0, index[start : start + size], block)
        start += size
    return _round_other_nodes(per_node, rank // ranks_per_node)


# A normal-mode call's signature: the call (_FRESH dispatch, _CACHED dispatch, _COMBINE), num_worst_tokens (of the
# handle's dispatch in a cached dispatch or a combine: 0 for a variable-size one), the dtype of its rows, and FP8
# scales (a dispatch) or topk_weights (a combine) given or not; then a fresh dispatch's id check verdict (the lowest id
# below -1 and the highest id >= E, 0 for none or without a check); then the number of the handle's dispatch among
# this Buffer's fresh dispatches (1, 2, ...; 0 in a fresh dispatch): ranks make their fresh dispatches together, so
# handles of one dispatch carry one number on every rank. A fresh dispatch sends it with its counts, the last _SIG
# columns of its first collective. On CPU groups every normal-mode call's first collective carries it at that one
# width (_agree), so ranks that make different calls, or pass handles of different dispatches, pair in it and raise
# instead of meeting collectives of different sizes, which gloo answers by aborting the process. A rank that refuses
# its cached dispatch or combine for its arguments sends _REFUSED there (its second column: the call it refused,
# TorchBackend.refuse), so that the others' pending call raises PeerRefusedError naming it instead of pairing with
# that rank's next call.
_SIG = 7
_FRESH, _CACHED, _COMBINE, _REFUSED = 0, 1, 2, 3
_CALL_NAMES = {_FRESH: "fresh dispatch", _CACHED: "cached dispatch", _COMBINE: "combine"}
_DTYPE_CODE = {torch.bfloat16: 0, torch.float32: 1, fp8.FP8_DTYPE: 2}
_DTYPE_OF = {v: k for k, v in _DTYPE_CODE.items()}


def _call_signature(num_worst_tokens: int, x: torch.Tensor, x_scales: torch.Tensor | None, n: int,
                    dev: torch.device, topk_idx: torch.Tensor, num_experts: int, check_ids: bool) -> torch.Tensor:
    sig = torch.tensor([_FRESH, num_worst_tokens, _DTYPE_CODE.get(x.dtype, -1), int(x_scales is not None), 0, 0, 0],
                       dtype=torch.int64, device=dev)
    if check_ids and topk_idx.numel():  # (on the device: the verdict travels with the counts, no sync of its own)
        lo, hi = torch.aminmax(topk_idx)
        sig[4] = torch.where(lo < -1, lo, 0)
        sig[5] = torch.where(hi >= num_experts, hi, 0)
    return sig.expand(n, _SIG)


def _describe_call(row: tuple[int, ...]) -> str:
    call, worst, code, flag = row[:4]
    if call == _REFUSED:
        return f"{_CALL_NAMES.get(worst, '?')} refused for its arguments"
    dtype = _DTYPE_OF.get(code, "?")
    # (no parentheses or semicolons: calls_disagree lists the ranks' calls in parentheses, separated by them)
    handle = f"the handle of dispatch {row[6]}, {f'num_worst_tokens={worst}' if worst else 'variable size'}"
    if call == _COMBINE:
        part = ", bf16_partial_sums" if flag & 2 else ""
        return f"combine, y {dtype}, topk_weights {'given' if flag & 1 else 'None'}{part}, {handle}"
    rows = checks.rows_kind(dtype, bool(flag))
    return f"cached dispatch, {rows}, {handle}" if call == _CACHED else f"num_worst_tokens={worst}, {rows}"


# what every rank must do, by the call this rank made
_SAME_CALL = {
    _FRESH: "dispatch the same kind of rows with the same num_worst_tokens",
    _CACHED: "send the same kind of rows in a cached dispatch",
    _COMBINE: "combine the same dtype of y, and pass topk_weights or not alike, and bf16_partial_sums alike",
}


def _raise_if_calls_differ(rows: Sequence[tuple[int, ...]], rank: int) -> None:
    """ArgumentError on every rank (each sees every rank's signature) when the ranks' calls differ: another call
    (a fresh or cached dispatch, a combine), a handle of another dispatch, or another kind of rows. Ignores the id
    verdicts. PeerRefusedError naming the ranks that refused their call (_REFUSED) where there are any."""
    refused = [r for r, row in enumerate(rows) if row[0] == _REFUSED]
    if refused:
        what = _describe_call(rows[refused[0]]).removesuffix(" refused for its arguments")
        raise checks.refused_call("combine" if rows[rank][0] == _COMBINE else "dispatch", rank, refused, what)
    kinds = [r[:4] + r[6:7] for r in rows]
    mine = kinds[rank]
    if all(k == mine for k in kinds):
        return
    op = "combine" if mine[0] == _COMBINE else "dispatch"
    if any(k[0] != mine[0] for k in kinds):
        rule = "make the same call (a fresh dispatch, a cached dispatch or a combine)"
    elif mine[0] != _FRESH and any((k[1], k[4]) != (mine[1], mine[4]) for k in kinds):
        rule = "pass the handle of the same dispatch (the one that every rank made together)"
    else:
        rule = _SAME_CALL[mine[0]]
    raise checks.calls_disagree(op, [_describe_call(r) for r in rows], rule)


def _first_naming(topk_idx: torch.Tensor) -> torch.Tensor:
    """int64 [T, K]: for each (t, k), the first k' <= k with topk_idx[t, k'] == topk_idx[t, k]."""
    k = topk_idx.shape[1]
    same = topk_idx.unsqueeze(2) == topk_idx.unsqueeze(1)  # [T, K, K']
    earlier = torch.ones(k, k, dtype=torch.bool, device=topk_idx.device).tril()  # k' <= k
    return (same & earlier).to(torch.int8).argmax(2)  # the first True (k' = k always is)


def _check_signatures(sig: torch.Tensor, rank: int, num_experts: int) -> None:
    """On every rank (each sees every rank's signature): ArgumentError on a rank whose id check refused its ids and
    PeerRefusedError on the others, naming those ranks (nothing has moved; the next call may be a good one); else
    ArgumentError when the ranks' dispatches differ in kind: their rows would not match in the collectives that
    follow."""
    rows = [tuple(int(v) for v in r) for r in sig.tolist()]
    if any(r[0] != _FRESH for r in rows):  # (a peer made another call: its verdict fields mean nothing)
        _raise_if_calls_differ(rows, rank)
    refused = [r for r, row in enumerate(rows) if row[4] or row[5]]
    if refused:
        low, high = rows[rank][4:6]
        raise checks.refused_round("dispatch", rank, refused, low or high or None, num_experts)
    _raise_if_calls_differ(rows, rank)


def _agree(backend: TorchBackend, call: int, dtype: torch.dtype, flag: int, state: _VarState | _FixedState) -> None:
    """On a CPU group, a cached dispatch's or a combine's first collective: its signature (``call``, the handle's
    num_worst_tokens and dispatch number, the dtype of its rows, ``flag``: FP8 scales given (a dispatch), or
    topk_weights given (a combine, bit 0) and bf16 partial sums (bit 1)) at the width of a
    fresh dispatch's counts, so that it pairs with whatever call the other ranks made; every rank raises
    ArgumentError naming each rank's call when they differ, before any row moves. Not on CUDA, where comparing
    would wait on the host."""
    c = backend.ctx
    n = c.num_ranks
    if n == 1:
        return
    worst = state.num_worst if isinstance(state, _FixedState) else 0
    mine = torch.zeros(n, 1 + c.experts_per_rank + _SIG, dtype=torch.int64)
    mine[:, -_SIG:] = torch.tensor([call, worst, _DTYPE_CODE.get(dtype, -1), int(flag), 0, 0, state.number])
    got, _ = backend._all_to_all(mine, n)
    rows = [tuple(int(v) for v in r) for r in got[:, -_SIG:].tolist()]
    _raise_if_calls_differ(rows, c.rank)


# a fixed-size dispatch's output rows past its num_worst_tokens: the row that empty slots land in (zeros in combine),
# and the one that received rows land in when they are more than the output holds (NaN in combine)
_DISCARD, _POISON = 0, 1
_EXTRA_ROWS = 2


@dataclass
class _VarState:
    """Handle of a variable-size normal dispatch. Source side: t_idx int64 [P] (token of each sent row, rows
    ordered by destination then token), send_splits. Receiver side: recv_splits, num_recv."""

    t_idx: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    num_recv: int
    num_tokens: int
    number: int  # the dispatch's number among the Buffer's fresh dispatches (see _SIG)


@dataclass
class _FixedState:
    """Handle of a fixed-size normal dispatch (num_worst_tokens). Source side: slot int64 [T, N], the row of the
    send block each (token, rank) pair used (``N*cap`` = not sent). Receiver side: dest int64 [N*cap], the output
    row of each received slot (``num_worst + _DISCARD``: an empty slot; ``num_worst + _POISON``: a row that did not
    fit, see TorchBackend._note_overflow); num_recv int64 [] on the device, the rows the output holds."""

    slot: torch.Tensor
    dest: torch.Tensor
    num_recv: torch.Tensor
    num_worst: int
    num_tokens: int
    number: int  # the dispatch's number among the Buffer's fresh dispatches (see _SIG)


@dataclass
class _LowLatencyState:
    """Source side: slot int64 [T*K], the send-block row of each (token, k) copy (``N*cap`` = none).
    Receiver side: out_index int64 [N*cap], the flat row of [E/N * N*M] each received slot landed in
    (``E/N*N*M`` = invalid)."""

    slot: torch.Tensor
    out_index: torch.Tensor
    num_tokens: int
    # the dispatch's topk_weights as it read them (a copy), or None: the combine applies these, as the nvshmem
    # backend applies the copy its send kernel keeps
    weights_kept: torch.Tensor | None = None
    # bf16_partial_sums: a token's weighted sum over its experts on one rank is rounded to bf16 where it has two or
    # more there (the nvshmem backend sends that sum as one bf16 row)
    sum_one: bool = False
    # with weights kept, the dispatch's topk_idx as it read them (a copy): the combine takes its ids from these, as
    # the nvshmem backend takes them from the ids its send kept (the Buffer refuses another topk_idx then; a change
    # it cannot see, in place under inference mode, then changes neither backend's result)
    idx_kept: torch.Tensor | None = None
    # on CPU groups, the dispatch's number among this Buffer's low-latency dispatches (past their refusals: the same
    # on every rank), which its combine's marker carries (0 elsewhere)
    number: int = 0


def _bf16_partial_sums(rows: torch.Tensor, w: torch.Tensor, topk_idx: torch.Tensor, valid: torch.Tensor, epr: int,
                       n: int) -> torch.Tensor:
    """float32 [T, H]: sum over ranks r of P[t, r] = sum of w[t, k] * rows[t, k] over the k whose expert is on r, each
    P rounded to bf16 where t names two or more distinct experts on r (bf16_partial_sums: the experts' rank sent that
    sum as one bf16 row; a single expert's row goes as it is). rows float32 [T, K, H] (a repeated expert's k: its
    first k's row), w float32 [T, K] (0 where not valid)."""
    t, k, h = rows.shape
    first = _first_naming(topk_idx)
    own = first == torch.arange(k, device=rows.device)
    # as the kernels: a repeated expert's row once, with the sum of its weights
    w_own = torch.zeros_like(w).scatter_add_(1, first, w)
    rank = torch.where(valid, topk_idx // epr, n)  # [T, K], n = none
    adds = valid & own  # (a repeated expert's other k carry its row too: left out, rather than times 0)
    experts_on = torch.zeros(t, n + 1, dtype=torch.int64, device=rows.device).scatter_add_(1, rank, adds.long())
    part = torch.zeros(t, n + 1, h, dtype=torch.float32, device=rows.device)
    terms = torch.where(adds.unsqueeze(-1), rows * w_own.unsqueeze(-1), 0.0)
    part.scatter_add_(1, rank.unsqueeze(-1).expand(t, k, h), terms)
    part = torch.where((experts_on >= 2).unsqueeze(-1), part.to(torch.bfloat16).float(), part)
    return part[:, :n].sum(1)


_R = TypeVar("_R")


# the call a backend method is part of, where its name is not that call's (for messages; the method sets the
# call it was given once it runs)
_OP_NAMES = {"low_latency_refuse": "low_latency_dispatch", "refuse": "dispatch"}
# On CPU groups each low-latency call starts with an exchange of [N, E/N + 2] int64 words whose last column says
# which call it is: a dispatch (0), a dispatch this rank refused (1), a combine (_LL_COMBINE), whose column -2
# holds the number of the dispatch it combines, or a combine this rank refused (_LL_COMBINE_REFUSED). A refusal of
# this rank's arguments is told there (low_latency_refuse): the others' call of that kind raises PeerRefusedError
# naming this rank. A rank whose calls differ from the others' (a combine meeting a dispatch, or the combine of
# another dispatch in flight) meets the others' call there too, and every rank raises, instead of pairing rows of
# other sizes (gloo aborts the process on that) or summing another dispatch's rows.
_LL_DISPATCH, _LL_REFUSED, _LL_COMBINE, _LL_COMBINE_REFUSED = 0, 1, 2, 3
_LL_CALLS = {_LL_DISPATCH: "low_latency_dispatch", _LL_REFUSED: "low_latency_dispatch (refused)",
             _LL_COMBINE: "low_latency_combine", _LL_COMBINE_REFUSED: "low_latency_combine (refused)"}
_LL_SAME_CALL = ("make the same low-latency call (each dispatch followed by its combine on every rank; a call "
                 "refused on one rank must be repeated there before that rank goes on)")


def _ll_call_names(words: torch.Tensor) -> list[str]:
    """Each rank's low-latency call, from the last two columns of what it sent in the call's first exchange."""
    return [f"the combine of low-latency dispatch {k}" if v == _LL_COMBINE else _LL_CALLS.get(v, "?")
            for k, v in words[:, -2:].tolist()]


def _out_of_step_on_error(fn: Callable[..., _R]) -> Callable[..., _R]:
    """For TorchBackend's collective calls: refuses the call at once if the Buffer failed earlier; an exception
    raised after the call's first collective was issued (out of memory for an output, KeyboardInterrupt, a failed
    wait: anything on this rank alone) marks the Buffer failed, naming the call and the error, and goes on up. The
    other ranks went on into the call's next collective, which this rank never joins: they wait for it until their
    bound (LARGEEP_TIMEOUT_S over gloo, the process group's timeout over NCCL), and a later call of this rank would
    pair its first collective with that one (gloo aborts the process on the size mismatch; NCCL mixes the rows or
    hangs). So every later call on this rank is refused before it issues anything. (Finishing the call's remaining
    collectives first is not attempted: their receive buffers are what could not be made, and a KeyboardInterrupt
    means stop.) A refusal (ArgumentError, PeerRefusedError) after the first collective is raised on every rank
    alike, each having seen every rank's signature or counts there: the ranks stay in step and the Buffer usable."""

    @functools.wraps(fn)
    def wrapper(self: TorchBackend, *args: Any, **kwargs: Any) -> _R:
        self._begin(_OP_NAMES.get(fn.__name__, fn.__name__))
        self._issued = False
        try:
            with torch.no_grad():  # (no autograd: see TorchBackend)
                return fn(self, *args, **kwargs)
        except (ArgumentError, PeerRefusedError):
            raise
        except BaseException as exc:
            if self._issued:
                self._fail(fn.__name__, exc)
            raise

    return wrapper


class TorchBackend:
    """``timeout_s`` (LARGEEP_TIMEOUT_S): on CPU (gloo) every collective is waited on with this bound, and a peer
    that does not answer within it ends the call in PeerTimeoutError naming the operation and the ranks waited
    on; after that, or any other failure of a collective, the Buffer refuses further calls (the group still holds
    the abandoned collective; a receive hook already handed out still waits, bounded). On CUDA (NCCL) the process
    group's own timeout and watchdog apply. None: no bound of our own anywhere. Any other exception on this rank
    after a call's first collective makes the Buffer refuse further calls too (see _out_of_step_on_error).

    Every call (and receive hook) runs under torch.no_grad(), as the native kernels record no autograd either: its
    outputs carry no graph, whatever of its inputs require grad (a low-latency combine would otherwise connect its
    output to topk_weights but not to y, and turn an ``out`` given to it into a non-leaf); largeep.ops holds the
    autograd of dispatch and combine."""

    name = "torch"
    # dispatch(check_ids=True) sends its id check's verdict with the counts (see dispatch): no separate min/max sync,
    # and a refusal on one rank ends the call on every rank at once instead of leaving the others waiting
    checks_dispatch_ids = True

    def __init__(self, ctx: GroupContext, timeout_s: float | None = None) -> None:
        self.ctx = ctx
        self.timeout_s = timeout_s
        self._op = "dispatch"  # the public call in progress, for the timeout's message
        # why this Buffer refuses every call, and the class of that refusal (PeerTimeoutError after a failed wait)
        self._failed: str | None = None
        self._failed_error: type[RuntimeError] = RuntimeError
        self._issued = False  # the call in progress has issued a collective (see _out_of_step_on_error)
        # fresh dispatches made so far, past their refusals (the ranks make them together: the same count on each)
        self._dispatches = 0
        self._ll_dispatches = 0  # the same for low-latency dispatches, on CPU groups (see _LL_COMBINE)
        # A num_worst_tokens dispatch that receives more rows than num_worst_tokens: on CPU every rank refuses it
        # before the rows move (_check_worst); on CUDA, which has no host wait to raise from, _note_overflow marks it
        # in _overflow (int64 [1] on the device) and in _overflow_host (its pinned host copy, as numpy), which the
        # next call reads (_begin). worst_check_on_host False on a CPU group takes the CUDA path there.
        self.worst_check_on_host = ctx.device.type == "cpu"
        self._overflow: torch.Tensor | None = None
        self._overflow_pinned: torch.Tensor | None = None
        self._overflow_host: Any = None
        if not ctx.low_latency:
            # (made here, not at the first num_worst_tokens call, which may be inside a CUDA graph capture; the copy
            # from the host waits for itself, so any stream may use the zeros)
            self._overflow = torch.zeros(1, dtype=torch.int64).to(ctx.device)
            self._overflow_pinned = torch.zeros(1, dtype=torch.int64, pin_memory=True) \
                if ctx.device.type == "cuda" else self._overflow
            self._overflow_host = self._overflow_pinned.numpy()

    def _begin(self, op: str) -> None:
        if self._failed is None and self._overflow_host is not None and self._overflow_host[0]:
            code = int(self._overflow_host[0])
            self._failed = (
                f"an earlier dispatch with num_worst_tokens = {code & 0xFFFFFFFF} received {code >> 32} rows on rank "
                f"{self.ctx.rank}, more than its output holds; that call's outputs hold no rows (ids -1, counts 0) "
                "and its combine gave NaN for every token this rank had received; num_worst_tokens must be at least "
                "the rows any rank can receive, e.g. num_ranks * max_tokens_per_rank"
            )
            self._failed_error = RuntimeError
        if self._failed is not None:
            raise self._failed_error(
                f"{op}: this Buffer failed earlier ({self._failed}); it refuses further calls (destroy it on every "
                "rank)"
            )
        self._op = op

    def _fail(self, op: str, exc: BaseException) -> None:
        """Marks the Buffer failed after ``exc`` ended ``op`` on this rank past its first collective (a failed
        wait has marked it already, with its own reason)."""
        if self._failed is not None:
            return
        lines = str(exc).splitlines()
        what = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        self._failed = (f"{op} on rank {self.ctx.rank} raised {what[:300]} after its first collective, so this "
                        "rank's collectives no longer pair with the other ranks' (theirs wait for its part of that "
                        "call)")
        self._failed_error = RuntimeError

    def _finishing(self, op: str, finish: Callable[[], None]) -> Callable[[], None]:
        """``finish`` (the rest of a low-latency call, after its collectives were issued), marking the Buffer failed
        if it raises. Run once, it lets go of ``finish`` and what that holds (the received rows, the collective's
        work and its send buffer), which the caller's hook would otherwise keep alive as long as the results.
        ``finish`` runs in the inference mode of the call (on or off), wherever the hook is called: it writes the
        outputs the call made (inference tensors when it was made under torch.inference_mode), as the native
        receive writes them whatever the mode."""
        held: list[Callable[[], None] | None] = [finish]
        inference = torch.is_inference_mode_enabled()

        def run() -> None:
            f = held[0]
            assert f is not None, "a low-latency receive runs once"
            try:
                with torch.inference_mode(inference), torch.no_grad():  # (no autograd: see TorchBackend)
                    f()
            except BaseException as exc:
                self._fail(op, exc)
                raise
            held[0] = None

        return run

    def destroy(self) -> None:
        """On CUDA, waits for the device to finish this Buffer's work, which may still write _overflow (the caching
        allocator would otherwise hand its memory to another tensor of the stream that made it meanwhile)."""
        if self._overflow is not None and self._overflow.device.type == "cuda":
            torch.cuda.synchronize(self._overflow.device)
        self._overflow = self._overflow_pinned = self._overflow_host = None

    def _bounded(self) -> bool:
        return self.timeout_s is not None and self.ctx.device.type == "cpu"

    def _wait(self, work: dist.Work | None, op: str | None = None) -> None:
        """Waits for a collective's ``work`` (None: it ran synchronously), within ``timeout_s`` where bounded."""
        if work is None:
            return
        if not self._bounded():
            work.wait()
            return
        assert self.timeout_s is not None
        try:
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:
            # any failure of a collective leaves the group out of step (a peer gone, a late peer matching the
            # abandoned call): the Buffer refuses further calls either way
            c, what = self.ctx, op or self._op
            first = _collective.gloo_words(exc)
            self._failed = f"{what} on rank {c.rank} failed: {first}"
            self._failed_error = PeerTimeoutError
            _collective.mark_out_of_step(c.group, self._failed)
            others = [r for r in range(c.num_ranks) if r != c.rank]
            why = _collective.lost_connection(exc)
            if why is not None:
                raise PeerTimeoutError(
                    f"{what}: rank {c.rank} lost its connection to its group while it waited for ranks {others} "
                    f"(gloo: {first}): {why}; this Buffer refuses further calls, and its process group is out of step "
                    "(give the next Buffer a new group)"
                ) from None
            if "timed out" not in str(exc).lower():
                raise
            raise PeerTimeoutError(
                f"{what}: rank {c.rank} waited for ranks {others} of its group in vain (LARGEEP_TIMEOUT_S="
                f"{self.timeout_s:g} s, or the process group's own timeout if shorter; gloo: {first}): a peer did not "
                "make the same call, or failed before it; this Buffer refuses further calls, and its process group is "
                "out of step (give the next Buffer a new group)"
            ) from None

    def _note_overflow(self, over: torch.Tensor, num_recv: torch.Tensor, num_worst_tokens: int) -> None:
        """A num_worst_tokens dispatch without a host wait (CUDA): ``over`` (bool [] on the device) says its
        ``num_recv`` rows are more than ``num_worst_tokens``. Then (as the nvshmem backend) its outputs hold no rows
        (the caller sets their ids to -1 and counts to 0), and its rows go to the _POISON row: its combine sends
        NaN back for each, so no source rank's sum silently lacks them. Here the first such dispatch's counts go
        into _overflow on the device, then into pinned host memory, where the next call of this Buffer reads them
        and raises, the Buffer unusable from then on. Nothing waits: a call that the host makes before the device
        has run this copy (the combine, typically) goes through, and a later one raises. In a CUDA graph the
        update and the copy are captured (a copy to pinned memory is a plain graph node) and run at each replay;
        the host learns of an overflow at its first call after the replay, never during the replay itself."""
        assert self._overflow is not None and self._overflow_pinned is not None
        code = torch.where(over, num_recv * (1 << 32) + num_worst_tokens, 0)  # (rows < 2**31 and worst < 2**32)
        self._overflow.copy_(torch.where(self._overflow != 0, self._overflow, code))  # (the first one stays)
        if self._overflow_pinned is not self._overflow:
            self._overflow_pinned.copy_(self._overflow, non_blocking=True)

    # -- collectives ---------------------------------------------------------------------------------------------
    def _check_worst(self, num_recv: torch.Tensor, num_worst_tokens: int) -> None:
        """ArgumentError on every rank when some rank receives more rows than ``num_worst_tokens`` (its rows past
        it would be lost). One all_gather of the row counts; CPU only (on CUDA it would wait on the host)."""
        n = self.ctx.num_ranks
        totals = [torch.zeros(1, dtype=torch.int64, device="cpu") for _ in range(n)]
        self._issued = True
        self._wait(dist.all_gather(totals, num_recv.reshape(1).to(torch.int64), group=self.ctx.group,
                                   async_op=self._bounded()))
        over = {r: int(v) for r, v in enumerate(totals) if int(v) > num_worst_tokens}
        if over:
            raise ArgumentError(
                f"dispatch: argument 'num_worst_tokens' = {num_worst_tokens} is smaller than the rows received by "
                f"rank(s) {over}; it must be at least the rows any rank can receive (e.g. num_ranks * "
                "max_tokens_per_rank)"
            )

    def _all_to_all(
        self,
        send: torch.Tensor,
        recv_rows: int,
        send_splits: list[int] | None = None,
        recv_splits: list[int] | None = None,
        async_op: bool = False,
    ) -> tuple[torch.Tensor, dist.Work | None]:
        """``async_op``: return the work for the caller to finish with ``_wait`` (else it is waited for here)."""
        out = torch.empty((recv_rows, *send.shape[1:]), dtype=send.dtype, device=send.device)
        self._issued = True
        work = dist.all_to_all_single(
            out, send, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=self.ctx.group,
            async_op=async_op or self._bounded(),
        )
        if not async_op:
            self._wait(work)
            work = None
        return out, work

    def _all_to_all_into(
        self, out: torch.Tensor, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> None:
        """Rows of ``send`` [P, ...] to ``out`` [R, ...] (same dtype), as bytes so that every dtype travels."""
        # (an empty tensor may have any strides, a last one of 0 included, which a byte view refuses)
        self._issued = True
        self._wait(dist.all_to_all_single(
            out.view(torch.uint8).view(out.shape[0], -1) if out.numel() else out.new_empty(0, dtype=torch.uint8),
            send.contiguous().view(torch.uint8).view(send.shape[0], -1) if send.numel()
            else send.new_empty(0, dtype=torch.uint8),
            output_split_sizes=recv_splits, input_split_sizes=send_splits, group=self.ctx.group,
            async_op=self._bounded(),
        ))

    # -- normal mode ---------------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor) -> Layout:
        self._begin("get_dispatch_layout")
        c = self.ctx
        return compute_layout(topk_idx, c.num_ranks, c.num_experts, c.ranks_per_node)

    def _pair_meta(
        self, topk_idx: torch.Tensor, topk_weights: torch.Tensor, r_idx: torch.Tensor, t_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For sent (rank, token) pairs: local expert ids int64 [P, K] (-1 off that rank), weights float32 [P, K]
        (0 where -1), and per-(rank, local expert) row counts int64 [N, E/N]."""
        c = self.ctx
        epr = c.experts_per_rank
        glob = topk_idx[t_idx]
        local = glob - r_idx.unsqueeze(1) * epr
        ok = (glob >= 0) & (local >= 0) & (local < epr)
        local = torch.where(ok, local, -1)
        weights = torch.where(ok, topk_weights[t_idx], 0.0)
        counts = torch.zeros(c.num_ranks, epr, dtype=torch.int64, device=topk_idx.device)
        counts.index_add_(0, r_idx, one_hot_mask(local, epr).to(torch.int64))
        return local, weights, counts

    @_out_of_step_on_error
    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        state: _VarState | _FixedState | None,
        expert_alignment: int,
        num_worst_tokens: int,
        caller_stream: int | None = None,  # nvshmem's zero-copy outputs only
        check_ids: bool = False,
    ) -> NormalDispatchOut:
        """``check_ids`` (a fresh dispatch that waits on the host: without num_worst_tokens, or on CPU): refuse an id
        in topk_idx outside [-1, num_experts) on every rank, before any row moves: the verdict travels with the count
        exchange (no sync of its own), this rank raises ArgumentError and the others PeerRefusedError."""
        if state is not None and x.device.type == "cpu":  # (a fresh dispatch's kind travels with its counts)
            _agree(self, _CACHED, x.dtype, x_scales is not None, state)
        if num_worst_tokens > 0 or isinstance(state, _FixedState):
            assert not check_ids or x.device.type == "cpu", "dispatch: no host wait to check ids in (num_worst_tokens)"
            return self._dispatch_fixed(x, x_scales, topk_idx, topk_weights, state, expert_alignment,
                                        num_worst_tokens, check_ids)
        return self._dispatch_var(x, x_scales, topk_idx, topk_weights, state, expert_alignment, check_ids)

    def _row_specs(self, x: torch.Tensor, x_scales: torch.Tensor | None, with_meta: bool) -> list:
        c = self.ctx
        specs: list[tuple[torch.dtype, tuple[int, ...]]] = [(x.dtype, (c.hidden,))]
        if x_scales is not None:
            specs.append((torch.float32, (c.hidden // fp8.GROUP,)))
        if with_meta:
            specs += [(torch.int64, (c.num_topk,)), (torch.float32, (c.num_topk,))]
        return specs

    def _dispatch_var(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        state: _VarState | None,
        expert_alignment: int,
        check_ids: bool,
    ) -> NormalDispatchOut:
        c = self.ctx
        dev = x.device
        per_expert_list: list[int] = []
        per_expert_t: torch.Tensor | None = None
        if state is None:
            assert topk_idx is not None and topk_weights is not None
            mine = _call_signature(0, x, x_scales, c.num_ranks, dev, topk_idx, c.num_experts, check_ids)
            in_rank = compute_layout(topk_idx, c.num_ranks, c.num_experts, c.ranks_per_node).is_token_in_rank
            r_idx, t_idx = in_rank.t().nonzero(as_tuple=True)  # ordered by rank, then token
            local, weights, exp_counts = self._pair_meta(topk_idx, topk_weights, r_idx, t_idx)
            send_counts = in_rank.sum(0, dtype=torch.int64)
            meta, _ = self._all_to_all(torch.cat([send_counts.unsqueeze(1), exp_counts, mine], dim=1), c.num_ranks)
            sig = meta[:, -_SIG:]
            host = torch.cat([meta[:, 0], send_counts, meta[:, 1:-_SIG].sum(0), sig.reshape(-1)]).cpu()  # one sync
            n = c.num_ranks
            _check_signatures(host[-n * _SIG:].view(n, _SIG), c.rank, c.num_experts)
            host = host[: -n * _SIG]
            recv_splits = host[:n].tolist()
            send_splits = host[n : 2 * n].tolist()
            raw = host[2 * n :]
            per_expert_list = align_up(raw, expert_alignment).tolist()
            per_expert_t = torch.tensor(per_expert_list, dtype=torch.int32, device=dev)
            self._dispatches += 1
            state = _VarState(t_idx, send_splits, recv_splits, int(sum(recv_splits)), x.shape[0], self._dispatches)
            parts = [x[t_idx]] + ([x_scales[t_idx]] if x_scales is not None else []) + [local, weights]
        else:
            parts = [x[state.t_idx]] + ([x_scales[state.t_idx]] if x_scales is not None else [])
        # x lands straight in the output (no packing copy on either side); the small per-row fields travel
        # together in a second collective.
        recv_x = torch.empty(state.num_recv, c.hidden, dtype=x.dtype, device=dev)
        self._all_to_all_into(recv_x, parts[0], state.send_splits, state.recv_splits)
        meta_parts = parts[1:]
        recv_scales = recv_idx = recv_w = None
        if meta_parts:
            specs = self._row_specs(x, x_scales, len(meta_parts) > (1 if x_scales is not None else 0))[1:]
            rows, _ = self._all_to_all(_pack(meta_parts), state.num_recv, state.send_splits, state.recv_splits)
            out = _unpack(rows, specs)
            recv_scales = out.pop(0) if x_scales is not None else None
            if out:
                recv_idx, recv_w = out[0], out[1]
        if per_expert_t is None:
            per_expert_t = torch.empty(0, dtype=torch.int32, device=dev)
        return NormalDispatchOut(
            recv_x, recv_scales, recv_idx, recv_w, per_expert_list, per_expert_t, state.num_recv, state
        )

    def _dispatch_fixed(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        state: _VarState | _FixedState | None,
        expert_alignment: int,
        num_worst_tokens: int,
        check_ids: bool,
    ) -> NormalDispatchOut:
        c = self.ctx
        dev = x.device
        n, cap, t = c.num_ranks, c.max_tokens_per_rank, x.shape[0]
        per_expert_t: torch.Tensor | None = None
        if state is None:
            assert topk_idx is not None and topk_weights is not None
            # (on CUDA no rank reads the signatures here: zeros, made without a copy from the host, which a CUDA
            # graph capture refuses)
            mine = _call_signature(num_worst_tokens, x, x_scales, n, dev, topk_idx, c.num_experts, check_ids) \
                if dev.type == "cpu" else torch.zeros(n, _SIG, dtype=torch.int64, device=dev)
            in_rank = compute_layout(topk_idx, n, c.num_experts, c.ranks_per_node).is_token_in_rank
            pos = torch.cumsum(in_rank.to(torch.int64), dim=0) - 1
            slot = torch.where(in_rank, torch.arange(n, device=dev) * cap + pos, n * cap)  # [T, N]
            r_idx = torch.arange(n, device=dev).repeat(t)
            t_idx = torch.arange(t, device=dev).repeat_interleave(n)
            local, weights, exp_counts = self._pair_meta(
                topk_idx, topk_weights, r_idx, t_idx
            )  # counts include only real pairs: local is -1 everywhere off-rank
            send_counts = in_rank.sum(0, dtype=torch.int64)
            meta, _ = self._all_to_all(torch.cat([send_counts.unsqueeze(1), exp_counts, mine], dim=1), n)
            if dev.type == "cpu":  # (on CUDA the comparison would wait on the host, which this path never does)
                _check_signatures(meta[:, -_SIG:], c.rank, c.num_experts)
            recv_counts = meta[:, 0]
            raw = meta[:, 1:-_SIG].sum(0)
            per_expert_t = align_up(raw, expert_alignment).to(torch.int32)
            j = torch.arange(cap, device=dev)
            off = _exclusive_cumsum(recv_counts)
            num_recv = recv_counts.sum()
            # each received slot's output row: num_worst_tokens (_DISCARD) for an empty slot; every row to _POISON
            # when they are more than the output holds
            valid = j < recv_counts.unsqueeze(1)  # [N src, cap]
            dest = torch.where(valid, off.unsqueeze(1) + j, num_worst_tokens + _DISCARD)
            if self.worst_check_on_host:  # no device sync on CPU: refuse an overflow on every rank before rows move
                self._check_worst(num_recv, num_worst_tokens)
            else:
                over = num_recv > num_worst_tokens
                self._note_overflow(over, num_recv, num_worst_tokens)
                dest = torch.where(over & valid, num_worst_tokens + _POISON, dest)
                per_expert_t = torch.where(over, 0, per_expert_t)
                num_recv = torch.where(over, 0, num_recv)  # (the rows the output holds: none)
            self._dispatches += 1
            state = _FixedState(slot, dest.reshape(-1), num_recv, num_worst_tokens, t, self._dispatches)
            parts = [x[t_idx]] + ([x_scales[t_idx]] if x_scales is not None else []) + [local, weights]
        else:
            assert isinstance(state, _FixedState)
            t_idx = torch.arange(t, device=dev).repeat_interleave(n)
            parts = [x[t_idx]] + ([x_scales[t_idx]] if x_scales is not None else [])
        with_meta = len(parts) > (2 if x_scales is not None else 1)
        packed = _pack(parts)
        send = torch.zeros(n * cap + 1, packed.shape[1], dtype=torch.uint8, device=dev)
        send[state.slot.reshape(-1)] = packed
        rows, _ = self._all_to_all(send[: n * cap], n * cap)
        placed = torch.empty(state.num_worst + _EXTRA_ROWS, packed.shape[1], dtype=torch.uint8, device=dev)
        placed[state.dest] = rows
        out = _unpack(placed[: state.num_worst], self._row_specs(x, x_scales, with_meta))
        recv_x = out.pop(0)
        recv_scales = out.pop(0) if x_scales is not None else None
        recv_idx, recv_w = (out[0], out[1]) if with_meta else (None, None)
        if recv_idx is not None and recv_w is not None:
            tail = torch.arange(state.num_worst, device=dev) >= state.num_recv
            recv_idx.masked_fill_(tail.unsqueeze(1), -1)
            recv_w.masked_fill_(tail.unsqueeze(1), 0.0)
        if per_expert_t is None:
            per_expert_t = torch.empty(0, dtype=torch.int32, device=dev)
        return NormalDispatchOut(recv_x, recv_scales, recv_idx, recv_w, [], per_expert_t, None, state)

    def recv_offsets(self, state: _VarState) -> list[int]:
        """[N + 1] on the host (this backend has them there: a copy to the device per round would wait for the
        round's transfers): the first row a variable-size dispatch (``state``) received from each rank, then its
        rows."""
        return [0, *itertools.accumulate(state.recv_splits)]

    @_out_of_step_on_error
    def combine(
        self, y: torch.Tensor, state: _VarState | _FixedState, topk_weights: torch.Tensor | None,
        part_bf16: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """part_bf16 (bf16 y, several nodes): the rows from each other node are summed first and that sum rounded
        to bf16, as the nvshmem backend's forwarders send it (Buffer.combine's bf16_partial_sums)."""
        c = self.ctx
        dev = y.device
        if dev.type == "cpu":
            _agree(self, _COMBINE, y.dtype, (topk_weights is not None) | (part_bf16 << 1), state)
        parts = [y] + ([topk_weights] if topk_weights is not None else [])
        specs: list[tuple[torch.dtype, tuple[int, ...]]] = [(y.dtype, (c.hidden,))]
        if topk_weights is not None:
            specs.append((torch.float32, (c.num_topk,)))
        t = state.num_tokens
        if isinstance(state, _VarState):
            pairs = int(sum(state.send_splits))
            back = torch.empty(pairs, c.hidden, dtype=y.dtype, device=dev)
            self._all_to_all_into(back, y, state.recv_splits, state.send_splits)
            if part_bf16:
                x = _sum_by_node(state.t_idx, back, state.send_splits, t, c.ranks_per_node, c.rank)
            else:
                x = torch.zeros(t, c.hidden, dtype=torch.float32, device=dev)
                _sum_blocks_in_order(x, state.t_idx, back, state.send_splits)
            w = None
            if topk_weights is not None:
                w_back = torch.empty(pairs, c.num_topk, dtype=torch.float32, device=dev)
                self._all_to_all_into(w_back, topk_weights, state.recv_splits, state.send_splits)
                w = torch.zeros(t, c.num_topk, dtype=torch.float32, device=dev)
                _sum_blocks_in_order(w, state.t_idx, w_back, state.send_splits)
            return x.to(y.dtype), w
        packed = _pack(parts)
        n, cap = c.num_ranks, c.max_tokens_per_rank
        # y's rows, then the _DISCARD row (zeros: an empty slot's) and the _POISON row (all bits set: NaN in bf16 and
        # float32, sent for the rows of a dispatch whose rows did not fit)
        ext = torch.cat([packed, torch.zeros(1, packed.shape[1], dtype=torch.uint8, device=dev),
                         torch.full((1, packed.shape[1]), 255, dtype=torch.uint8, device=dev)])
        rows, _ = self._all_to_all(ext[state.dest], n * cap)
        rows = torch.cat([rows, torch.zeros(1, rows.shape[1], dtype=torch.uint8, device=dev)])
        fields = _unpack(rows[state.slot.reshape(-1)], specs)  # [T*N, ...], (token, rank) pairs
        x = fields[0].float().view(t, n, c.hidden)
        if part_bf16:
            p = c.ranks_per_node
            x = _round_other_nodes(x.view(t, n // p, p, c.hidden).sum(2), c.rank // p)
        else:
            x = x.sum(1)
        w = fields[1].view(t, n, c.num_topk).sum(1) if topk_weights is not None else None
        return x.to(y.dtype), w

    # -- low-latency mode ------------------------------------------------------------------------------------------
    def _ll_cap(self) -> int:
        return self.ctx.max_tokens_per_rank * self.ctx.num_topk

    def _ll_checks_peers(self) -> bool:
        """Whether a low-latency dispatch's counts carry each rank's use_fp8 and refusal, and a combine starts with
        its marker (_LL_COMBINE) (CPU groups: there the host reads the counts anyway; on GPUs that would cost a
        device sync, and a CUDA graph could not hold it)."""
        return self.ctx.device.type == "cpu" and self.ctx.num_ranks > 1

    def _ll_check_peers(self, recv_counts: torch.Tensor) -> None:
        """PeerRefusedError naming the ranks whose counts say they refused this low-latency dispatch (their last
        column), or ArgumentError where a rank is in a low-latency combine instead (its marker, _LL_COMBINE, came in
        the same place): every rank then skips the rows' exchange, and every Buffer stays usable."""
        calls = recv_counts[:, -1].tolist()
        if _LL_COMBINE in calls or _LL_COMBINE_REFUSED in calls:
            raise checks.calls_disagree("low_latency_dispatch", _ll_call_names(recv_counts), _LL_SAME_CALL)
        refused = [r for r, v in enumerate(calls) if v]
        if refused:
            raise checks.refused_round("low_latency_dispatch", self.ctx.rank, refused, None, self.ctx.num_experts)

    def _ll_call_exchange(self, second: int, call: int) -> torch.Tensor:
        """The first exchange of a low-latency call that moves no counts (a refused dispatch's void round, a
        combine's marker): [N, E/N + 2] int64 words, zero but for the last two columns (``second``, ``call``), in the
        dispatch's count exchange's shape; returns what every rank sent."""
        n = self.ctx.num_ranks
        words = torch.zeros(n, self.ctx.experts_per_rank + 2, dtype=torch.int64)
        words[:, -2], words[:, -1] = second, call
        return self._all_to_all(words, n)[0]

    def low_latency_refusal_reaches_peers(self) -> bool:
        """Whether low_latency_refuse tells the other ranks (CPU groups), so that the Buffer calls it."""
        return self._ll_checks_peers()

    @_out_of_step_on_error
    def low_latency_refuse(self, op: str, refusal: str) -> None:
        """This rank's part in the other ranks' low-latency call ``op`` (a dispatch or a combine) that it refused
        (``refusal``: its reason; the caller raises it): on CPU groups the call's first exchange says so, and every
        other rank raises PeerRefusedError naming it, nothing moved, every Buffer usable. Where another rank was in
        the other kind of call instead, this rank's error says so too (ArgumentError: the refusal, then each rank's
        call), as the others' does. On GPUs (no such check, see _ll_checks_peers) it does nothing: the others' call
        then waits for this rank until the process group's timeout, or pairs with this rank's next call."""
        if not self._ll_checks_peers():
            return
        self._op = op
        combine = op == "low_latency_combine"
        got = self._ll_call_exchange(0, _LL_COMBINE_REFUSED if combine else _LL_REFUSED)
        other = (_LL_DISPATCH, _LL_REFUSED) if combine else (_LL_COMBINE, _LL_COMBINE_REFUSED)
        if any(v in other for v in got[:, -1].tolist()):
            raise ArgumentError(f"{refusal} -- and the others were in another call: "
                                f"{checks.calls_disagree(op, _ll_call_names(got), _LL_SAME_CALL)}")

    def refusal_reaches_peers(self) -> bool:
        """Whether ``refuse`` tells the other ranks (CPU groups, where a cached dispatch and a combine start with
        _agree), so that the Buffer calls it."""
        return self.ctx.device.type == "cpu" and self.ctx.num_ranks > 1

    @_out_of_step_on_error
    def refuse(self, op: str, refusal: str) -> None:
        """This rank's part in the other ranks' cached dispatch or combine (``op``) that it refused for its arguments
        (``refusal``: its reason; the caller raises it), on CPU groups: _REFUSED in the exchange that starts the
        others' call (_agree), where they raise PeerRefusedError naming this rank before any row moves, every Buffer
        usable (a fresh dispatch meeting it raises the same). Where another rank was in another kind of call, this
        rank's error says so too (ArgumentError: the refusal, then each rank's call). On GPUs it does nothing (those
        calls have no host wait there): the others' call pairs with this rank's next one."""
        if not self.refusal_reaches_peers():
            return
        self._op = op
        c = self.ctx
        n = c.num_ranks
        call = _COMBINE if op == "combine" else _CACHED
        mine = torch.zeros(n, 1 + c.experts_per_rank + _SIG, dtype=torch.int64)
        mine[:, -_SIG] = _REFUSED
        mine[:, -_SIG + 1] = call
        got, _ = self._all_to_all(mine, n)
        rows = [tuple(int(v) for v in r) for r in got[:, -_SIG:].tolist()]
        if any(r[0] not in (_REFUSED, call) for r in rows):
            rule = "make the same call (a fresh dispatch, a cached dispatch or a combine)"
            raise ArgumentError(f"{refusal} -- and the others were in another call: "
                                f"{checks.calls_disagree(op, [_describe_call(r) for r in rows], rule)}")

    @_out_of_step_on_error
    def low_latency_dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, use_fp8: bool, round_scale: bool, async_recv: bool,
        topk_weights: torch.Tensor | None = None, bf16_partial_sums: bool = False,
    ) -> LowLatencyDispatchOut:
        # (topk_weights: the Buffer checked that the combine gets the same tensor; the combine here applies a copy
        # taken now at the source, which is the same sum as the nvshmem backend's on the experts' ranks)
        c = self.ctx
        dev = x.device
        n, epr, m, k = c.num_ranks, c.experts_per_rank, c.max_tokens_per_rank, c.num_topk
        cap = self._ll_cap()
        t = x.shape[0]
        # a token naming an expert more than once sends it once (SPEC: once per expert): the first k naming it owns
        # the copy; the others read its row in combine (first[t, k]: that owner's k)
        first = _first_naming(topk_idx)
        # (an id >= E, which only an unchecked call lets through, is not sent, as in the nvshmem kernels)
        valid = (topk_idx >= 0) & (topk_idx < c.num_experts) & (first == torch.arange(k, device=dev))
        dest = torch.where(valid, topk_idx // epr, n).reshape(-1)  # [T*K], n = none
        local = torch.where(valid, topk_idx % epr, 0).reshape(-1)
        copies = t * k
        # Rows for one destination are ordered by (local expert, token, k): keys are unique.
        key = dest * (epr * copies) + local * copies + torch.arange(copies, device=dev)
        order = torch.argsort(key)
        # (not bincount: its output size depends on the data, which a CUDA graph capture cannot read)
        per_dest = torch.zeros(n + 1, dtype=torch.int64, device=dev).index_add_(0, dest, torch.ones_like(dest))[:n]
        sorted_dest = dest[order]
        start = torch.cat([_exclusive_cumsum(per_dest), per_dest.sum().view(1)])
        pos = torch.arange(copies, device=dev) - start[sorted_dest]
        slot_sorted = torch.where(sorted_dest < n, sorted_dest * cap + pos, n * cap)
        slot = torch.empty_like(slot_sorted)
        slot[order] = slot_sorted
        counts = torch.zeros(n * epr + 1, dtype=torch.int64, device=dev)
        counts.index_add_(0, torch.where(dest < n, dest * epr + local, n * epr), torch.ones_like(dest))
        counts = counts[: n * epr].view(n, epr)
        token = torch.arange(t, device=dev, dtype=torch.int32).repeat_interleave(k)
        if use_fp8:
            q, s = fp8.quantize(x, round_scale=round_scale)
            parts = [q.repeat_interleave(k, dim=0), s.repeat_interleave(k, dim=0)]
            specs: list[tuple[torch.dtype, tuple[int, ...]]] = [
                (fp8.FP8_DTYPE, (c.hidden,)), (torch.float32, (c.hidden // fp8.GROUP,)),
            ]
        else:
            parts = [x.repeat_interleave(k, dim=0)]
            specs = [(x.dtype, (c.hidden,))]
        parts += [token.unsqueeze(1), local.to(torch.int32).unsqueeze(1)]
        specs += [(torch.int32, (1,)), (torch.int32, (1,))]
        packed = _pack(parts)
        send = torch.zeros(n * cap + 1, packed.shape[1], dtype=torch.uint8, device=dev)
        send[slot] = packed
        # On CPU groups each rank's use_fp8 travels with its counts: rows of another width would meet in the next
        # collective, which gloo answers by aborting the process; every rank raises here instead. So does a rank's
        # refusal of its call (low_latency_refuse).
        check_kind = self._ll_checks_peers()
        if check_kind:
            counts = torch.cat([counts, torch.tensor([[int(use_fp8), _LL_DISPATCH]] * n, dtype=torch.int64)], dim=1)
        recv_counts, _ = self._all_to_all(counts, n)  # [N src, E/N]
        if check_kind:
            self._ll_check_peers(recv_counts)
            kinds = [bool(v) for v in recv_counts[:, -2].tolist()]
            recv_counts = recv_counts[:, :-2]
            if any(v != use_fp8 for v in kinds):
                raise checks.calls_disagree("low_latency_dispatch", [f"use_fp8={v}" for v in kinds],
                                            "pass the same use_fp8")
            self._ll_dispatches += 1
        rows, work = self._all_to_all(send[: n * cap], n * cap, async_op=async_recv)
        rows_per_expert = n * m
        x_out = torch.empty(epr, rows_per_expert, c.hidden, dtype=fp8.FP8_DTYPE if use_fp8 else x.dtype, device=dev)
        s_out = (
            torch.empty(epr, rows_per_expert, c.hidden // fp8.GROUP, dtype=torch.float32, device=dev)
            if use_fp8
            else None
        )
        src_info = torch.full((epr, rows_per_expert, 2), -1, dtype=torch.int32, device=dev)
        num_per_expert = recv_counts.sum(0).to(torch.int32)
        # combine reads each (t, k)'s row back from the copy sent for it (a repeated expert's: its owner's)
        back_slot = slot.view(t, k).gather(1, first).reshape(-1)
        kept = topk_weights.clone() if topk_weights is not None else None
        state = _LowLatencyState(back_slot, torch.empty(0, dtype=torch.int64, device=dev), t, kept,
                                 bool(bf16_partial_sums and kept is not None),
                                 topk_idx.clone() if kept is not None else None, self._ll_dispatches)

        def finish() -> None:
            self._wait(work, "low_latency_dispatch")
            fields = _unpack(rows, specs)
            tok, le = fields[-2].view(-1).long(), fields[-1].view(-1).long()
            j = torch.arange(cap, device=dev).repeat(n)
            s_of = torch.arange(n, device=dev).repeat_interleave(cap)
            total = recv_counts.sum(1)
            ok = j < total[s_of]
            block_start = _exclusive_cumsum(recv_counts, dim=1)  # [S, E/N]: first row of e in s's block
            off = _exclusive_cumsum(recv_counts, dim=0)  # [S, E/N]: first output row of s in expert e
            le = torch.where(ok, le, 0)
            p = off[s_of, le] + j - block_start[s_of, le]
            ok = ok & (p < rows_per_expert)
            dump = epr * rows_per_expert
            out_index = torch.where(ok, le * rows_per_expert + p, dump)
            state.out_index = out_index
            flat = x_out.view(epr * rows_per_expert, c.hidden)
            ext = torch.empty(dump + 1, c.hidden, dtype=flat.dtype, device=dev)
            ext[out_index] = fields[0]
            flat.copy_(ext[:dump])
            if s_out is not None:
                sflat = torch.empty(dump + 1, c.hidden // fp8.GROUP, dtype=torch.float32, device=dev)
                sflat[out_index] = fields[1]
                s_out.view(dump, -1).copy_(sflat[:dump])
            info = torch.full((dump + 1, 2), -1, dtype=torch.int32, device=dev)
            info[out_index] = torch.stack([s_of.to(torch.int32), tok.to(torch.int32)], dim=1)
            src_info.view(dump, 2).copy_(info[:dump])

        if not async_recv:
            finish()
            return LowLatencyDispatchOut(x_out, s_out, num_per_expert, src_info, state, None)
        return LowLatencyDispatchOut(x_out, s_out, num_per_expert, src_info, state,
                                     self._finishing("low_latency_dispatch", finish))

    @_out_of_step_on_error
    def low_latency_combine(
        self,
        y: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        state: _LowLatencyState,
        out: torch.Tensor,
        async_recv: bool,
    ) -> Callable[[], None] | None:
        c = self.ctx
        dev = y.device
        n, k = c.num_ranks, c.num_topk
        if self._ll_checks_peers():  # (which call each rank is in, see _LL_COMBINE)
            got = self._ll_call_exchange(state.number, _LL_COMBINE)
            refused = [r for r, v in enumerate(got[:, -1].tolist()) if v == _LL_COMBINE_REFUSED]
            if refused:
                raise checks.refused_call("low_latency_combine", c.rank, refused, "low_latency_combine")
            if any((v, k) != (_LL_COMBINE, state.number) for k, v in got[:, -2:].tolist()):
                raise checks.calls_disagree("low_latency_combine", _ll_call_names(got), _LL_SAME_CALL)
        flat = y.reshape(-1, c.hidden)
        ext = torch.cat([flat, torch.zeros(1, c.hidden, dtype=y.dtype, device=dev)])
        rows, work = self._all_to_all(ext[state.out_index], n * self._ll_cap(), async_op=async_recv)

        def finish() -> None:
            self._wait(work, "low_latency_combine")
            back = torch.cat([rows, torch.zeros(1, c.hidden, dtype=rows.dtype, device=dev)])[state.slot]
            given = state.weights_kept if state.weights_kept is not None else topk_weights
            ids = state.idx_kept if state.idx_kept is not None else topk_idx
            valid = (ids >= 0) & (ids < c.num_experts)
            w = torch.where(valid, given, 0.0)
            if state.sum_one:
                rows3 = back.float().view(state.num_tokens, k, c.hidden)
                out.copy_(_bf16_partial_sums(rows3, w, ids, valid, c.experts_per_rank, n))
            else:
                # a k adds only where the dispatch sent a row for it and the combine names an expert there: the
                # others are left out, not multiplied by 0 (an inf or NaN there would spoil the token's sum)
                adds = (valid & (state.slot.view(state.num_tokens, k) < n * self._ll_cap())).reshape(-1, 1)
                terms = torch.where(adds, back.float() * w.reshape(-1, 1), 0.0)
                out.copy_(terms.view(state.num_tokens, k, c.hidden).sum(1))

        if not async_recv:
            finish()
            return None
        return self._finishing("low_latency_combine", finish)
