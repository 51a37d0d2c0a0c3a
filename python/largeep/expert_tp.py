"""Expert tensor parallelism: each routed expert's SwiGLU MLP split over a group of T ranks (Megatron-style).

Groups. W ranks form W/T *TP groups* of T ranks (consecutive ranks by default) and T *EP groups* of W/T ranks:
EP group j holds member j of every TP group. Each rank makes its :class:`largeep.Buffer` on its EP group, so a
token is dispatched among W/T ranks, and passes its TP group to ``MoELayer(..., expert_tp_group=...)``.
:func:`make_expert_tp_groups` builds both. The E experts sit on the W/T EP ranks ("slots") as without TP: EP rank s
holds slots [s*E_l, (s+1)*E_l), E_l = E*T/W. The T members of a TP group are rank s of their T EP groups, so they
hold the same slots; member j holds columns [j*F/T, (j+1)*F/T) of w1 and w3 (each [E_l, H, F/T]) and the same rows
of w2 ([E_l, F/T, H]).

One chunk on member j of a TP group (:meth:`ExpertTP.forward_rows`):

1. dispatch in its EP group (the Buffer): R_j rows whose experts sit on slot s. The members receive different
   rows: each from the source ranks of its own EP group.
2. count exchange: all-gather of (R_j, pairs_j) over the TP group, 2 int64 per member, one host wait. Skipped with
   ``num_worst_tokens`` (then R_j = num_worst_tokens).
3. all-gather of the rows (x [R_j, H], topk_weights and topk_idx [R_j, K]) padded to C = max_j R_j rows (padding
   names no expert): every member holds the same T*C rows.
4. the sharded SwiGLU on all T*C rows: ``silu(x W1_j) * (x W3_j)`` is elementwise in F, so ``(...) W2_j``,
   weighted by topk_weights and summed over k, is a partial [T*C, H] whose sum over j is the full output.
5. reduce-scatter (sum) over the TP group: member j gets its own C rows, sliced to R_j.
6. combine in its EP group.

Backward: the adjoint of 5 is an all-gather of the grads [C, H]; that of 3 a reduce-scatter of the grads of x and
topk_weights ([T*C, H] and [T*C, K]); dispatch and combine are each other's backward as without TP.

Communication per chunk and rank, beyond the EP dispatch/combine (C = max rows of a TP member, ring collectives):
forward (T-1)*C*(H*b_x + K*12) bytes all-gathered (x in its dtype, b_x bytes; weights float32; ids int64) plus
(T-1)*C*H*b_x reduce-scattered; backward the same two volumes again (the x and weight grads reduce-scattered, the
output grads all-gathered). An all-reduce of the partials would move twice the reduce-scatter's bytes. Without
``num_worst_tokens`` step 2 adds a small all-gather and a host wait. Uneven R_j cost padding: every member computes
and moves T*C rows, not sum_j R_j.

Under ``torch.compile`` (``fullgraph=True`` works) the collectives are issued synchronously (Dynamo traces them)
and the count exchange gives unbacked ints. Not done: the low-latency (decoding) mode, and sharding the shared
experts (they stay replicated on every rank).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from largeep import _collective
from largeep.errors import ArgumentError

__all__ = [
    "ExpertTP",
    "ExpertTPGroups",
    "all_gather_rows",
    "make_expert_tp_groups",
    "reduce_scatter_rows",
]

# torch 2.13 renamed the tensor-in, tensor-out collectives (the old names warn)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class ExpertTPGroups:
    """This rank's groups from :func:`make_expert_tp_groups`: ``ep_group`` (W/T ranks, for the Buffer) and
    ``tp_group`` (T ranks, for ``MoELayer(expert_tp_group=...)``); ``tp_size`` T, ``tp_rank`` this rank's position
    in ``tp_group``, ``ep_rank`` its position in ``ep_group`` (its slot)."""

    ep_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    tp_size: int
    tp_rank: int
    ep_rank: int


def make_expert_tp_groups(tp_size: int, group: dist.ProcessGroup | None = None) -> ExpertTPGroups:
    """Splits ``group`` (default: the world; W ranks) into W/T TP groups of T consecutive ranks and T EP groups of
    W/T ranks (EP group j: member j of every TP group), and returns this rank's two.

    Collective over the whole world: ``dist.new_group`` must be called by every rank of the default group, so
    ``group`` must span the world (ranks outside a smaller group would skip those calls and every later
    ``dist.new_group`` of the world would wait forever). For a smaller group, make its TP and EP groups with
    ``dist.new_group`` on every rank and build :class:`ExpertTPGroups` from them. Raises ArgumentError when T < 1,
    T does not divide W, this rank is not in ``group``, or ``group`` is smaller than the world.
    """
    op = "make_expert_tp_groups"
    if not dist.is_initialized():
        raise ArgumentError(f"{op}: torch.distributed is not initialised; call init_process_group first")
    group = group if group is not None else dist.group.WORLD
    assert group is not None
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ArgumentError(f"{op}: argument 'tp_size' must be a positive int, got {tp_size!r}")
    if dist.get_rank(group) < 0:
        raise ArgumentError(f"{op}: argument 'group' does not contain this rank (global rank {dist.get_rank()})")
    ranks = dist.get_process_group_ranks(group)
    w = len(ranks)
    if w != dist.get_world_size():
        raise ArgumentError(
            f"{op}: argument 'group' has {w} of the world's {dist.get_world_size()} ranks; the groups it makes need "
            "dist.new_group on every rank of the world, so give the world's group (or make the groups yourself "
            "with dist.new_group on every rank and build ExpertTPGroups from them)"
        )
    if w % tp_size:
        raise ArgumentError(f"{op}: argument 'tp_size' = {tp_size} does not divide the group size {w}")
    tp_lists = [ranks[b * tp_size : (b + 1) * tp_size] for b in range(w // tp_size)]
    ep_lists = [ranks[j::tp_size] for j in range(tp_size)]
    me = dist.get_rank()
    tp_group, ep_group = None, None
    for lst in tp_lists:  # every rank creates every group, in the same order
        g = dist.new_group(lst)
        if me in lst:
            tp_group = g
    for lst in ep_lists:
        g = dist.new_group(lst)
        if me in lst:
            ep_group = g
    assert tp_group is not None and ep_group is not None
    pos = ranks.index(me)
    return ExpertTPGroups(ep_group, tp_group, tp_size, pos % tp_size, pos // tp_size)


# ---------------------------------------------------------------------------------------------------------------
# Differentiable collectives along dim 0 over the TP group (each one's backward is the other)
# ---------------------------------------------------------------------------------------------------------------


def _run(
    fn: Any, outs: list[Tensor], ts: tuple[Tensor, ...], group: dist.ProcessGroup, what: str = "TP group"
) -> list[Tensor]:
    """Issues ``fn(out, t)`` for every pair, then waits for all (Dynamo traces only synchronous collectives). On
    CPU (gloo) each wait is bounded by LARGEEP_TIMEOUT_S, as the torch backend's are (a member that raised before
    the collective never joins it); on NCCL the group's own timeout applies. ``what`` names the group."""
    is_async = not torch.compiler.is_compiling()
    works = [fn(o, t.contiguous(), group=group, async_op=is_async) for o, t in zip(outs, ts, strict=True)]
    if not is_async:
        return outs  # (compiling: synchronous collectives, nothing to wait for here)
    _collective.wait_all(
        works, bool(ts) and ts[0].device.type == "cpu",
        f"expert TP: rank {dist.get_rank(group)} of its {what} waited for the others in vain",
        ": a member did not make the same call, or failed before it; the group is out of step now",
    )
    return outs


def _gather(ts: tuple[Tensor, ...], group: dist.ProcessGroup, what: str = "TP group") -> list[Tensor]:
    n = dist.get_world_size(group)
    return _run(_all_gather_single, [t.new_empty(n * t.shape[0], *t.shape[1:]) for t in ts], ts, group, what)


def _scatter(ts: tuple[Tensor, ...], group: dist.ProcessGroup) -> list[Tensor]:
    n = dist.get_world_size(group)
    return _run(_reduce_scatter_single, [t.new_empty(t.shape[0] // n, *t.shape[1:]) for t in ts], ts, group)


def _grads_or_zeros(
    ctx: Any, gs: tuple[Tensor | None, ...], like: list[tuple[torch.Size, torch.dtype]]
) -> list[Tensor]:
    """The grads to send for the inputs that need one: a missing grad (unused output) becomes zeros, so every member
    issues the same collectives."""
    out = []
    for need, g, (shape, dtype) in zip(ctx.needs_input_grad[1:], gs, like, strict=True):
        if need:
            out.append(g if g is not None else torch.zeros(shape, dtype=dtype, device=ctx.device))
    return out


def _remember(ctx: Any, group: dist.ProcessGroup, ts: tuple[Tensor, ...], outs: list[Tensor]) -> list[Tensor]:
    """What the backward of a rows collective needs: the group, the device, and each output's shape and dtype (for
    the zeros that stand in for missing grads)."""
    ctx.group = group
    ctx.device = ts[0].device
    ctx.out_like = [(o.shape, o.dtype) for o in outs]
    return outs


def _place(ctx: Any, grads: list[Tensor]) -> tuple[Tensor | None, ...]:
    it = iter(grads)
    return (None, *(next(it) if need else None for need in ctx.needs_input_grad[1:]))


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, group: dist.ProcessGroup, *ts: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        outs = _remember(ctx, group, ts, _gather(ts, group))
        ctx.mark_non_differentiable(*(o for o in outs if not o.is_floating_point()))
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *gs: Tensor | None) -> tuple[Tensor | None, ...]:
        return _place(ctx, _scatter(tuple(_grads_or_zeros(ctx, gs, ctx.out_like)), ctx.group))


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, group: dist.ProcessGroup, *ts: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(_remember(ctx, group, ts, _scatter(ts, group)))

    @staticmethod
    def backward(ctx: Any, *gs: Tensor | None) -> tuple[Tensor | None, ...]:
        return _place(ctx, _gather(tuple(_grads_or_zeros(ctx, gs, ctx.out_like)), ctx.group))


def all_gather_rows(group: dist.ProcessGroup, *ts: Tensor) -> tuple[Tensor, ...]:
    """Each [n, ...] tensor (n equal on every member of ``group``) -> [T*n, ...], member j's rows at [j*n, (j+1)*n).
    Differentiable: the backward reduce-scatters (sums) the grads. Integer tensors come back non-differentiable.
    Collective over ``group``; on CUDA the current stream waits for it, the host does not."""
    return _AllGatherRows.apply(group, *ts)  # type: ignore[no-any-return]


def reduce_scatter_rows(group: dist.ProcessGroup, *ts: Tensor) -> tuple[Tensor, ...]:
    """Each [T*n, ...] tensor -> [n, ...]: the sum over the members of ``group`` of their rows [j*n, (j+1)*n) on
    member j. Differentiable: the backward all-gathers the grads. Collective over ``group``."""
    return _ReduceScatterRows.apply(group, *ts)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------------------------
# The layer's side
# ---------------------------------------------------------------------------------------------------------------

_count_streams: dict[torch.device, torch.cuda.Stream] = {}


def _exchange_ints(
    vals: list[int], group: dist.ProcessGroup, device: torch.device, what: str = "TP group"
) -> list[list[int]]:
    """All-gathers a few host ints from every member -> [T][len(vals)]. Waits on the host. On CUDA (eager) it runs
    on a side stream, so the host waits for this exchange only, not for the expert GEMMs queued before it."""
    stream = None
    if device.type == "cuda" and not torch.compiler.is_compiling():
        stream = _count_streams.get(device)
        if stream is None:
            stream = _count_streams[device] = torch.cuda.Stream(device)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        t = torch.tensor(vals, dtype=torch.int64, device=device)
        (out,) = _gather((t,), group, what)
        return out.view(dist.get_world_size(group), len(vals)).tolist()  # type: ignore[no-any-return]


def _tp_verdict(op: str, mine: dict[str, int], rows: list[list[int]], size: int, ffn_hidden: int) -> str | None:
    """ExpertTP.check's refusal (a message) from the TP group's configuration ``rows`` (``mine``'s fields on every
    member), or None."""
    turned = [j for j, row in enumerate(rows) if row[0]]
    if turned:
        return (f"{op}: member(s) {turned} of 'expert_tp_group' refused their arguments (see the error there), so "
                "no member makes the layer")
    for j, row in enumerate(rows):
        if row[1] != 1:
            return (
                f"{op}: the Buffer's group of member {j} of 'expert_tp_group' holds {row[1]} of its ranks; it "
                "must hold that member only: make the Buffer on the EP group of "
                "largeep.expert_tp.make_expert_tp_groups, not on the whole world"
            )
    for name, want, got in zip(mine, mine.values(), zip(*rows, strict=True), strict=True):
        if len(set(got)) == 1:
            continue
        if name == "slot":
            return (
                f"{op}: the members of 'expert_tp_group' must hold the same expert slot (the same rank in "
                f"their Buffers' groups), got ranks {list(got)}: the Buffer's group must hold member j of every "
                "TP group for one j (see largeep.expert_tp.make_expert_tp_groups)"
            )
        return f"{op}: the members of 'expert_tp_group' disagree on {name}: {list(got)} (this rank: {want})"
    if size > 1 and mine["low_latency"]:
        return f"{op}: expert tensor parallelism (T = {size}) supports the normal mode only"
    if ffn_hidden % size:
        return f"{op}: argument 'ffn_hidden' = {ffn_hidden} is not divisible by the size {size} of 'expert_tp_group'"
    return None


def _ep_verdict(op: str, rows: list[list[int]], ep_rank: int, tp_rank: int, size: int) -> str | None:
    """ExpertTP.check's refusal from the Buffer's group's ``rows`` ([refused, index in its TP group, TP size] of
    every rank), or None."""
    if len({row[2] for row in rows}) > 1:
        return (f"{op}: the ranks of the Buffer's group have 'expert_tp_group's of sizes {[row[2] for row in rows]} "
                f"(this rank, rank {ep_rank} there: {size}); they must be equal")
    if len({row[1] for row in rows}) > 1:
        return (
            f"{op}: the ranks of the Buffer's group are members {[row[1] for row in rows]} of their "
            f"'expert_tp_group's (this rank, rank {ep_rank} there: member {tp_rank}); the Buffer's group must hold "
            "member j of every TP group for one j, so that its ranks hold the same shard of their experts "
            "(allreduce_replica_grads over it would sum different shards): see "
            "largeep.expert_tp.make_expert_tp_groups"
        )
    turned = [r for r, row in enumerate(rows) if row[0]]
    if turned:
        return (f"{op}: the expert-TP configuration was refused on rank(s) {turned} of the Buffer's group (see the "
                "error there), so no rank makes the layer")
    return None


def _pad_rows(t: Tensor, rows: int, value: float) -> Tensor:
    if not torch.compiler.is_compiling() and t.shape[0] == rows:
        return t
    return F.pad(t, (0, 0, 0, rows - t.shape[0]), value=value)


class ExpertTP:
    """The expert-TP state of one :class:`largeep.layers.MoELayer`: ``group`` (T ranks), ``size`` T, ``rank``
    (this rank's member index j). Made by :meth:`check`, which validates the configuration."""

    def __init__(self, group: dist.ProcessGroup, size: int, rank: int) -> None:
        self.group = group
        self.size = size
        self.rank = rank

    @classmethod
    def check(
        cls, group: Any, ep_ctx: Any, ffn_hidden: int, settings: dict[str, int],
        local_error: ArgumentError | None = None,
    ) -> ExpertTP:
        """Validates ``group`` against the Buffer's context ``ep_ctx`` and returns the state.

        Collective, once this rank is known to be in ``group``, so that a refusal anywhere raises on every rank of
        the TP and EP groups instead of leaving some waiting (in this check, or in a later call of the layers that
        the others made): an all-gather of the configuration over ``group``, one of each member's index in its TP
        group over the Buffer's group, and one of the verdicts over ``group`` again (a refusal seen in one EP group
        reaches every TP group through its members there, and from them every EP group). ``settings``: layer
        options that every member must share (they fix the order of the collectives). ``local_error``: the
        caller's own refusal of its arguments, raised after the exchanges (its values are not compared)."""
        op = "MoELayer"
        if group is dist.GroupMember.NON_GROUP_MEMBER:  # what dist.new_group returns on the ranks outside it
            raise ArgumentError(
                f"{op}: argument 'expert_tp_group' does not contain this rank (global rank {dist.get_rank()})"
            )
        if not isinstance(group, dist.ProcessGroup):
            raise ArgumentError(
                f"{op}: argument 'expert_tp_group' must be a torch.distributed ProcessGroup or None, got "
                f"{type(group).__name__}"
            )
        rank = dist.get_rank(group)
        if rank < 0:
            raise ArgumentError(
                f"{op}: argument 'expert_tp_group' does not contain this rank (global rank {dist.get_rank()})"
            )
        size = dist.get_world_size(group)
        # ranks of the TP group inside this rank's Buffer group: must be this rank alone
        overlap = len(set(dist.get_process_group_ranks(ep_ctx.group)) & set(dist.get_process_group_ranks(group)))
        refused = local_error is not None
        mine = {
            "refused": int(refused),
            "overlap": overlap,
            "slot": ep_ctx.rank,
            "the Buffer's group size": ep_ctx.num_ranks,
            "num_experts": ep_ctx.num_experts,
            "hidden": ep_ctx.hidden,
            "num_topk": ep_ctx.num_topk,
            "low_latency": int(ep_ctx.low_latency),
            # (a refused member's own values need not even be ints: zeros, not compared)
            "ffn_hidden": 0 if refused else ffn_hidden,
            **{k: 0 if refused else v for k, v in settings.items()},
        }
        error = str(local_error) if local_error is not None else None
        rows = _exchange_ints(list(mine.values()), group, ep_ctx.device) if size > 1 else [list(mine.values())]
        if error is None:
            error = _tp_verdict(op, mine, rows, size, ffn_hidden)
        if ep_ctx.num_ranks > 1:
            ep_rows = _exchange_ints([int(error is not None), rank, size], ep_ctx.group, ep_ctx.device, "EP group")
            if error is None:
                error = _ep_verdict(op, ep_rows, ep_ctx.rank, rank, size)
        if size > 1:
            flags = _exchange_ints([int(error is not None)], group, ep_ctx.device)
            if error is None and any(f[0] for f in flags):
                error = (
                    f"{op}: the expert-TP configuration was refused on another rank, so no rank makes the layer "
                    f"(members {[j for j, f in enumerate(flags) if f[0]]} of 'expert_tp_group' learned of it from "
                    "their Buffers' groups; see the error there)"
                )
        if local_error is not None:
            raise local_error
        if error is not None:
            raise ArgumentError(error)
        return cls(group, size, rank)

    def forward_rows(
        self, experts: Any, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, num_pairs: int | None,
        fixed_rows: int,
    ) -> Tensor:
        """Steps 2-5 of the module doc: the rows of this member's dispatch -> their weighted expert outputs.

        Args:
            experts: this member's :class:`largeep.layers.GroupedExperts` shard (F/T columns).
            x: [R, H]; topk_idx: int64 [R, K] local expert ids (-1: not here); topk_weights: float32 [R, K].
            num_pairs: the entries >= 0 of topk_idx when known on the host, else None.
            fixed_rows: > 0: every member has exactly this many rows (``num_worst_tokens``): no count exchange.

        Returns:
            y [R, H] in x's dtype, summed over the members' partials. Collective over the group; waits on the host
            for the count exchange unless ``fixed_rows``.
        """
        r = x.shape[0]
        if fixed_rows:
            cap, pairs = fixed_rows, None
        else:
            rows = _exchange_ints([r, -1 if num_pairs is None else num_pairs], self.group, x.device)
            cap = max(row[0] for row in rows)
            pairs = None
            if torch.compiler.is_compiling():
                # the counts are data-dependent there: tell the compiler what slicing y[:r] below needs
                for row in rows:
                    torch._check(row[0] >= 0)
                torch._check(r <= cap)
            elif all(row[1] >= 0 for row in rows):
                pairs = sum(row[1] for row in rows)
        xa, wa, ia = all_gather_rows(
            self.group, _pad_rows(x, cap, 0.0), _pad_rows(topk_weights, cap, 0.0), _pad_rows(topk_idx, cap, -1)
        )
        partial = experts.forward_rows(xa, ia, wa, pairs)  # [T*cap, H]
        (y,) = reduce_scatter_rows(self.group, partial)
        return y[:r]
