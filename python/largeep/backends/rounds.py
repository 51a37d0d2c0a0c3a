"""Normal mode in rounds: bounded receive buffers for large groups (``Buffer(tokens_per_round=...)``).

A backend's receive buffers hold a round's worst case, N x max_tokens_per_rank rows, because every token of every
rank may name one of a rank's experts. At hundreds of ranks and prefill sizes that is more memory than a GPU has
(docs/scaling.md). With ``tokens_per_round`` set, the inner backend is sized for that many tokens per rank, and each
dispatch and combine of up to max_tokens_per_rank tokens runs as R = ceil(max_tokens_per_rank / tokens_per_round)
rounds of the inner backend's own calls, each on a contiguous slice of the rank's tokens:

- every rank runs all R rounds of every call (ranks do not know each other's token counts before the count
  exchange), so a call of few tokens still costs R count exchanges; a rank's T tokens are split evenly, round i
  taking tokens [i*T // R, (i+1)*T // R);
- the dispatch output keeps SPEC's order (source rank, then token): round i's rows from source s land after the
  rows of s's earlier rounds (a scatter on the device, computed from each round's receive counts; no host wait
  besides the rounds' own count exchanges);
- the combine gathers each round's rows from y in that order and runs the round's combine; the rounds' tokens are
  contiguous slices, so their outputs are concatenated. Each token's rows are summed by the inner backend exactly
  as without rounds (the same rows, in the same order), so results are bit for bit those of one round;
- the cached path (a handle) replays the rounds with their own routing.

The price: R host waits per fresh dispatch instead of one, a copy of the received rows (the scatter) and of the
combine input (the gather), and about twice the output's memory while the rounds' outputs are merged.
``num_worst_tokens`` (no host wait) is not available in rounds: a round's row count is known only on the device,
so the merged output could not be sized, nor an overflow of num_worst_tokens across rounds be reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from largeep.backends.base import GroupContext, NormalDispatchOut, align_up
from largeep.errors import ArgumentError, PeerRefusedError
from largeep.layout import Layout


@dataclass
class _RoundsState:
    """Handle of a dispatch in rounds: the inner backend's state of each round, the token slice of each round
    (bounds [R + 1]), and dest[i] int64 [rows of round i]: the output row of each of round i's rows."""

    states: list[Any]
    bounds: list[int]
    dest: list[torch.Tensor]
    num_rows: int


def round_bounds(num_tokens: int, num_rounds: int) -> list[int]:
    """The token slices of a call of ``num_tokens`` tokens in ``num_rounds`` rounds: round i takes tokens
    [b[i], b[i + 1]), as even as integers allow."""
    return [i * num_tokens // num_rounds for i in range(num_rounds + 1)]


def merge_positions(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """Where the rounds' received rows go in the merged output (SPEC order: source rank, then token).
    ``offsets``: int [R, N + 1], round i's first row from each source (a source's rows are contiguous and in token
    order within a round; offsets[i, N] = the round's rows); ``total``: the rows of all rounds, known on the host.
    Returns int64 [total] for the rounds' rows one after the other (round 0's, then round 1's, ...): row j of
    round i, from source s, goes to (rows of sources < s, all rounds) + (rows of s in rounds < i) + (j - first row
    of s in round i). A dozen small ops whatever R (host time adds up on small calls)."""
    c = (offsets[:, 1:] - offsets[:, :-1]).to(torch.int64)  # [R, N]
    r, n = c.shape
    flat = c.reshape(-1)
    concat_first = torch.cumsum(flat, 0) - flat  # first row of (i, s) with the rounds one after the other
    by_source = c.t().reshape(-1)
    final_first = (torch.cumsum(by_source, 0) - by_source).view(n, r).t().reshape(-1)  # ... in the merged order
    return torch.arange(total, dtype=torch.int64, device=c.device) + torch.repeat_interleave(
        final_first - concat_first, flat, output_size=total)


def stack_offsets(parts: list[torch.Tensor] | list[list[int]], device: torch.device) -> torch.Tensor:
    """The rounds' receive offsets (each round's ``recv_offsets``: a device tensor, or a host list where the backend
    has them on the host) as one [R, N + 1] tensor on ``device``. Host lists go in one copy, from pinned memory and
    without waiting for the device where it is a GPU (a copy per round, or from pageable memory, would make the host
    wait for each round's transfers)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(parts)  # type: ignore[arg-type]
    host = torch.tensor(parts, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def as_words(t: torch.Tensor) -> torch.Tensor:
    """A contiguous [rows, ...] tensor's rows viewed as the widest integer words that divide a row's bytes (a
    row copy by index_copy_ / index_select moves an element per thread: 8-byte words move rows 8x faster than
    bytes)."""
    flat = t.reshape(t.shape[0], -1) if t.dim() != 2 else t
    row, start = flat.shape[1] * flat.element_size(), flat.storage_offset() * flat.element_size()
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if row % size == 0 and start % size == 0:
            return flat.view(torch.uint8).view(dtype)
    return flat.view(torch.uint8)


class RoundsBackend:
    """Runs ``inner`` (a normal-mode backend sized for ``tokens_per_round`` tokens per rank) over calls of up to
    ``ctx.max_tokens_per_rank`` tokens, in ``num_rounds`` rounds (see the module's text)."""

    def __init__(self, inner: Any, ctx: GroupContext, num_rounds: int) -> None:
        assert not ctx.low_latency and num_rounds > 1
        self.inner = inner
        self.ctx = ctx
        self.num_rounds = num_rounds
        self.name = inner.name
        self._out_of_step = ""  # why this rank's rounds no longer match its peers' (see _raised_in_round)

    def _check_in_step(self, op: str) -> None:
        if self._out_of_step:
            raise RuntimeError(f"{op}: {self._out_of_step}; this rank's rounds no longer match the other ranks', "
                               "so the Buffer is unusable now (destroy it on every rank)")

    def _raised_in_round(self, op: str, i: int, exc: BaseException) -> None:
        """``exc`` was raised on this rank in round ``i`` of a call (in the inner backend's call, or around it: the
        gather of a combine's input, a dispatch's receive offsets, an interrupt between two rounds). Raised on this
        rank alone (out of memory, say: a dispatch drains its round and raises, and its peers go on to the next round)
        it leaves this rank's rounds out of step with its peers' (a retry's round 0 would pair with their round i or
        i + 1), so the Buffer refuses every later call. A refusal (ArgumentError, PeerRefusedError) voids that round
        on every rank, all of which raise there: the Buffer stays usable."""
        if isinstance(exc, (ArgumentError, PeerRefusedError)) or self._out_of_step:
            return
        self._out_of_step = (f"an earlier {op} in rounds (tokens_per_round) raised in round {i} of "
                             f"{self.num_rounds} ({type(exc).__name__}: {exc})"[:400])

    @property
    def checks_layout_ids(self) -> bool:
        return bool(getattr(self.inner, "checks_layout_ids", False))

    @property
    def checks_dispatch_ids(self) -> bool:
        # Each round checks its own slice's ids with its count exchange (a refusal voids that round on every rank,
        # which all raise there, the Buffer usable). A bad id of a later round is found after the earlier rounds'
        # rows have moved into this call's own outputs, which are dropped: the error says so, and the caller's
        # tensors are untouched.
        return bool(getattr(self.inner, "checks_dispatch_ids", False))

    def refusal_reaches_peers(self) -> bool:
        reaches = getattr(self.inner, "refusal_reaches_peers", None)
        return bool(reaches is not None and reaches())

    def refuse(self, op: str, refusal: str) -> None:
        """A cached dispatch's or a combine's refusal (Buffer._tell_refusal), told in the others' round 0: the inner
        backend's refuse, once (their call starts with its round 0's first exchange)."""
        self._check_in_step(op)
        self.inner.refuse(op, refusal)

    def destroy(self) -> None:
        destroy = getattr(self.inner, "destroy", None)
        if destroy is not None:
            destroy()

    def void_dispatch(self, *args: Any, **kwargs: Any) -> NormalDispatchOut:
        """Buffer._void_dispatch's one-token round, refused by this rank's id check, run as round 0 of the others'
        dispatch: the inner backend's dispatch, once. The refusal voids that round on every rank, which all raise
        there, before any of their rounds has moved rows, and each backend reports a refusal before comparing the
        ranks' kinds of rows (the void round's row is this rank's own kind, or bf16 after a layout's refusal).
        Through ``dispatch`` the token would fall in the last round: rounds 0..R-2 would move rows first (or be
        refused for their kind of rows, the refusal unseen)."""
        self._check_in_step("dispatch")
        try:
            return self.inner.dispatch(*args, **kwargs)  # type: ignore[no-any-return]
        except BaseException as exc:
            self._raised_in_round("dispatch", 0, exc)
            raise

    def get_dispatch_layout(self, topk_idx: torch.Tensor, **kwargs: Any) -> Layout:
        # (no per-rank buffer holds a layout's tokens: the whole call at once)
        self._check_in_step("get_dispatch_layout")
        return self.inner.get_dispatch_layout(topk_idx, **kwargs)  # type: ignore[no-any-return]

    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        state: _RoundsState | None,
        expert_alignment: int,
        num_worst_tokens: int,
        caller_stream: int | None = None,
        check_ids: bool = False,
    ) -> NormalDispatchOut:
        # (caller_stream: the inner backend's zero-copy outputs are merged here, on the current stream, and
        # released after that: the merged output is an ordinary tensor)
        self._check_in_step("dispatch")
        assert num_worst_tokens == 0 and (state is None or isinstance(state, _RoundsState)), \
            "dispatch: rounds need the host's row counts (the Buffer refuses num_worst_tokens with rounds)"
        outs: list[NormalDispatchOut] = []
        try:
            return self._dispatch(x, x_scales, topk_idx, topk_weights, state, expert_alignment, outs, check_ids)
        except (ArgumentError, PeerRefusedError) as exc:
            if len(outs) == 0:
                raise
            # (a later round's refusal: say what the earlier rounds did; same class, same buffer_usable)
            note = (f" [in round {len(outs)} of {self.num_rounds} (tokens_per_round): rounds 0..{len(outs) - 1} "
                    "had moved their rows into this call's outputs, which are dropped]")
            new = type(exc)(str(exc) + note) if isinstance(exc, ArgumentError) else \
                PeerRefusedError(str(exc) + note, buffer_usable=exc.buffer_usable)
            raise new from None
        finally:
            outs.clear()  # (the rounds' outputs, zero-copy slots among them, also when a round raised)

    def _dispatch(
        self, x: torch.Tensor, x_scales: torch.Tensor | None, topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None, state: _RoundsState | None, expert_alignment: int,
        outs: list[NormalDispatchOut], check_ids: bool,
    ) -> NormalDispatchOut:
        t = x.shape[0]
        bounds = state.bounds if state is not None else round_bounds(t, self.num_rounds)
        offsets: list[Any] = []  # (each round's recv_offsets: device tensors, or host lists; see stack_offsets)
        i = 0
        try:
            for i in range(self.num_rounds):
                lo, hi = bounds[i], bounds[i + 1]
                # (no local name holds a round's output: a traceback keeps this frame, and the caller's finally
                # releases them, zero-copy slots among them, by clearing outs)
                outs.append(self.inner.dispatch(
                    x[lo:hi], None if x_scales is None else x_scales[lo:hi],
                    None if topk_idx is None else topk_idx[lo:hi],
                    None if topk_weights is None else topk_weights[lo:hi],
                    None if state is None else state.states[i], 1, 0,
                    **({"check_ids": True} if check_ids and hi > lo else {}),
                ))
                if state is None:
                    offsets.append(self.inner.recv_offsets(outs[-1].state))
        except BaseException as exc:
            self._raised_in_round("dispatch", i, exc)
            raise
        if state is None:
            rows = [o.x.shape[0] for o in outs]
            total = sum(rows)
            dest = merge_positions(stack_offsets(offsets, x.device), total) if total else \
                torch.empty(0, dtype=torch.int64, device=x.device)
            state = _RoundsState([o.state for o in outs], bounds, list(dest.split(rows)), total)
        total = state.num_rows

        def merged(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
            first = parts[0]
            if first is None:
                return None
            out = torch.empty(total, *first.shape[1:], dtype=first.dtype, device=first.device)
            for d, p in zip(state.dest, parts, strict=True):
                assert p is not None
                as_words(out).index_copy_(0, d, as_words(p))
            return out

        out_x = merged([o.x for o in outs])
        out_s = merged([o.x_scales for o in outs])
        out_idx = merged([o.topk_idx for o in outs])
        out_w = merged([o.topk_weights for o in outs])
        assert out_x is not None
        a = expert_alignment
        per_expert_list: list[int] = []
        if topk_idx is not None:  # (a fresh dispatch: the rounds' host counts)
            raw = [sum(v) for v in zip(*(o.num_tokens_per_expert for o in outs), strict=True)]
            per_expert_list = [align_up(v, a) for v in raw]
        tensors = [o.num_tokens_per_expert_tensor for o in outs]
        if tensors[0].numel():
            per_expert_t = torch.stack(tensors).sum(0, dtype=torch.int32)
            if a > 1:
                per_expert_t = align_up(per_expert_t, a)
        else:
            per_expert_t = tensors[0]
        return NormalDispatchOut(out_x, out_s, out_idx, out_w, per_expert_list, per_expert_t, total, state)

    def combine(
        self, y: torch.Tensor, state: _RoundsState, topk_weights: torch.Tensor | None, part_bf16: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_in_step("combine")
        xs: list[torch.Tensor] = []
        ws: list[torch.Tensor] = []
        if y.numel() == 0:  # (an empty y may have any strides, as an empty gradient does; as_words needs rows)
            y = torch.empty(y.shape, dtype=y.dtype, device=y.device)
        i = 0
        try:
            for i, d in enumerate(state.dest):
                y_i = as_words(y).index_select(0, d).view(y.dtype).view(-1, y.shape[1])
                w_i = None if topk_weights is None else topk_weights.index_select(0, d)
                x_i, w_i = self.inner.combine(y_i, state.states[i], w_i, part_bf16)
                xs.append(x_i)
                if w_i is not None:
                    ws.append(w_i)
        except BaseException as exc:  # (the gathers too: round i's peers are in its combine already)
            self._raised_in_round("combine", i, exc)
            raise
        return torch.cat(xs), (torch.cat(ws) if ws else None)
