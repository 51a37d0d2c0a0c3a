"""Good calls checked against ``reference.py``, split into phases so tests can interleave them.

Used by the error tests (a good round after every bad call), the property tests, the long runs and the two-group
test. Every rank draws every rank's inputs from the case's seed, so each rank knows what it must receive.

Checks never raise: they append to a :class:`Checker`. A rank that raised halfway through a round would leave the
other ranks waiting in a collective; collecting keeps every rank issuing the same calls, and the parent asserts on
what each rank returns. Exceptions raised by the library itself do propagate (the test fails either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import largeep
import torch
import torch.distributed as dist
from largeep import fp8
from reference import (
    RankInputs,
    RefDispatch,
    fp8_check,
    make_inputs,
    ref_combine,
    ref_dispatch,
    ref_layout,
    ref_low_latency,
    ref_low_latency_combine,
)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (any dtype, any strides) as uint8 on the CPU: equality that also holds for NaN."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@dataclass
class Checker:
    """Collects failed checks of one rank. ``where`` prefixes every message (case and phase)."""

    where: str = ""
    failures: list[str] = field(default_factory=list)
    checks: int = 0

    def expect(self, ok: bool, what: str) -> bool:
        self.checks += 1
        if not ok:
            self.failures.append(f"{self.where}: {what}")
        return ok

    def equal(self, got: torch.Tensor, want: torch.Tensor, what: str) -> bool:
        got = got.detach().cpu()
        if not self.expect(tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != "
                           f"{tuple(want.shape)}"):
            return False
        if not self.expect(got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"):
            return False
        return self.expect(torch.equal(bits(got), bits(want)), f"{what}: values differ")

    def close(
        self, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str, mag: torch.Tensor | None = None
    ) -> bool:
        """float32 accumulation then one rounding to ``dtype``. ``mag``: the sum of the terms' magnitudes (bounds
        the accumulation error where terms cancel); default |want|."""
        got64, want64 = got.detach().double().cpu(), want.double().cpu()
        if not self.expect(got64.shape == want64.shape, f"{what}: shape {tuple(got64.shape)} != "
                           f"{tuple(want64.shape)}"):
            return False
        if not self.expect(bool(torch.isfinite(got64).all()), f"{what}: non-finite values"):
            return False
        if want64.numel() == 0:
            return True
        rel = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
        err = (got64 - want64).abs()
        scale = want64.abs() if mag is None else torch.maximum(want64.abs(), mag.double().cpu())
        bound = rel * scale + rel * 1e-2 + 1e-6
        worst = float((err / bound).max())
        return self.expect(worst <= 1.0, f"{what}: max error {float(err.max()):.3g} exceeds bound ({worst:.3g}x)")


def _y_rows(seed: int, counts: list[int], hidden: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Expert outputs [R_r, H] for every rank r, drawn from ``seed`` (known to every rank)."""
    g = torch.Generator().manual_seed(seed * 7919 + 3)
    return [torch.randn(c, hidden, generator=g).to(dtype) for c in counts]


def _snapshot(*ts: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(t, t.clone()) for t in ts if t is not None]


def _unchanged(chk: Checker, snap: list[tuple[torch.Tensor, torch.Tensor]], what: str) -> None:
    chk.expect(all(same_bits(t, c) for t, c in snap), f"{what}: the caller's input tensors were modified")


# -- normal mode --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormalCase:
    """One normal-mode round. ``worst``: dispatch with num_worst_tokens = N * max_tokens (no host sync)."""

    tokens: tuple[int, ...]
    hidden: int
    num_experts: int
    num_topk: int
    seed: int
    dtype: str = "bfloat16"
    use_fp8: bool = False
    alignment: int = 1
    worst: bool = False
    minus_one: float = 0.1
    distinct: bool = True
    max_tokens: int = 0  # 0: max(tokens), at least 1
    ranks_per_node: int | None = None

    @property
    def buffer_max_tokens(self) -> int:
        return self.max_tokens or max(max(self.tokens), 1)

    def buffer_kwargs(self) -> dict[str, Any]:
        return dict(
            hidden=self.hidden, num_experts=self.num_experts, num_topk=self.num_topk,
            max_tokens_per_rank=self.buffer_max_tokens, ranks_per_node=self.ranks_per_node,
        )


@dataclass
class Adjoint:
    """This rank's share of <dispatch(x), y> and <x, combine(y)> (float64); of sum |x| |combine(y)| (bounds the
    output rounding) and of sum |x| combine(|y|) (bounds the float32 accumulation)."""

    lhs: float
    rhs: float
    rounding: float
    accumulation: float


class NormalRound:
    """dispatch() then combine() of one :class:`NormalCase` on ``buf``, every output checked."""

    def __init__(self, buf: largeep.Buffer, case: NormalCase, chk: Checker, group: dist.ProcessGroup | None = None):
        self.buf, self.case, self.chk = buf, case, chk
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.dev = buf.ctx.device  # the group's device, or the current CUDA device for nvshmem on a gloo group
        self.dtype: torch.dtype = getattr(torch, case.dtype)
        assert len(case.tokens) == self.world, "case made for another world size"
        c = case
        self.inputs: list[RankInputs] = [
            make_inputs(c.seed, r, c.tokens[r], c.hidden, c.num_experts, c.num_topk, self.dtype, c.minus_one,
                        c.distinct)
            for r in range(self.world)
        ]
        self.refs: list[RefDispatch] = [ref_dispatch(self.inputs, r, c.num_experts) for r in range(self.world)]
        self.num_worst = self.world * c.buffer_max_tokens if c.worst else 0
        self.res: largeep.DispatchResult | None = None
        self.combined: torch.Tensor | None = None
        self.adjoint: Adjoint | None = None

    def _tokens_in(self, x: torch.Tensor) -> Any:
        if self.case.use_fp8:
            q, s = fp8.quantize(x.float())
            return q.to(self.dev), s.to(self.dev)
        return x.to(self.dev)

    def _rows_of(self, xs: list[torch.Tensor], ref: RefDispatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What rank receives for per-rank inputs ``xs``: (rows, scales) in the wire format."""
        h = self.case.hidden
        if self.case.use_fp8:
            qs = [fp8.quantize(x.float()) for x in xs]
            if not ref.src:
                return torch.empty(0, h, dtype=fp8.FP8_DTYPE), torch.empty(0, h // fp8.GROUP)
            return (torch.stack([qs[s][0][t] for s, t in ref.src]), torch.stack([qs[s][1][t] for s, t in ref.src]))
        if not ref.src:
            return torch.empty(0, h, dtype=self.dtype), None
        return torch.stack([xs[s][t] for s, t in ref.src]), None

    def _check_rows(self, got: Any, want: tuple[torch.Tensor, torch.Tensor | None], what: str) -> None:
        rows = self.num_worst or want[0].shape[0]
        r = want[0].shape[0]
        if self.case.use_fp8:
            self.chk.expect(isinstance(got, tuple) and len(got) == 2, f"{what}: expected an FP8 pair")
            q, s = got
            self.chk.expect(q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32,
                            f"{what}: dtypes {q.dtype}, {s.dtype}, expected float8_e4m3fn, float32")
            self.chk.expect(q.shape[0] == rows and s.shape[0] == rows, f"{what}: {q.shape[0]} rows, expected {rows}")
            self.chk.equal(q[:r].view(torch.uint8), want[0].view(torch.uint8), f"{what} e4m3")
            assert want[1] is not None
            self.chk.equal(s[:r], want[1], f"{what} scales")
        else:
            self.chk.expect(got.dtype == self.dtype, f"{what}: dtype {got.dtype}, expected {self.dtype}")
            self.chk.expect(tuple(got.shape) == (rows, self.case.hidden), f"{what}: shape {tuple(got.shape)}")
            self.chk.equal(got[:r], want[0], what)

    def dispatch(self) -> None:
        c, rank, chk = self.case, self.rank, self.chk
        mine, ref = self.inputs[rank], self.refs[rank]
        idx, w = mine.topk_idx.to(self.dev), mine.topk_weights.to(self.dev)
        x_in = self._tokens_in(mine.x)
        snap = _snapshot(idx, w, *(x_in if isinstance(x_in, tuple) else (x_in,)))

        lay = self.buf.get_dispatch_layout(idx)
        p = c.ranks_per_node or self.world  # (the case's own: every rank of a test group is on this host)
        chk.expect(self.buf.ctx.ranks_per_node == p, f"the Buffer took ranks_per_node {self.buf.ctx.ranks_per_node}")
        in_rank = lay.is_token_in_rank
        chk.expect(in_rank.dtype == torch.bool, f"layout is_token_in_rank: dtype {in_rank.dtype}")
        chk.expect(in_rank.is_contiguous(), f"layout is_token_in_rank: strides {in_rank.stride()}")  # (both backends)
        for key, want in ref_layout(mine.topk_idx, self.world, c.num_experts, p).items():
            got = getattr(lay, key)
            chk.expect(got.device == idx.device, f"layout {key}: on {got.device}, expected {idx.device}")
            chk.equal(got.cpu().to(want.dtype), want, f"layout {key}")  # (SPEC names no dtype for the counts)

        res = self.buf.dispatch(x_in, idx, w, expert_alignment=c.alignment, num_worst_tokens=self.num_worst)
        self.res = res
        r = len(ref.src)
        self._check_rows(res.x, self._rows_of([i.x for i in self.inputs], ref), "dispatch x")
        assert res.topk_idx is not None and res.topk_weights is not None
        chk.equal(res.topk_idx[:r], ref.topk_idx, "dispatch topk_idx")
        chk.equal(res.topk_weights[:r], ref.topk_weights, "dispatch topk_weights")
        want_counts = [-(-n // c.alignment) * c.alignment for n in ref.per_expert]
        if self.num_worst:
            chk.expect(bool((res.topk_idx[r:] == -1).all()), "dispatch topk_idx: tail rows must be -1")
            # (no host sync on GPUs: empty there; on CPU, where reading them is free, the counts)
            want_list = [] if res.num_tokens_per_expert_tensor.is_cuda else want_counts
            chk.expect(res.num_tokens_per_expert == want_list,
                       f"num_worst_tokens: num_tokens_per_expert {res.num_tokens_per_expert} != {want_list}")
        else:
            chk.expect(res.num_tokens_per_expert == want_counts,
                       f"num_tokens_per_expert {res.num_tokens_per_expert} != {want_counts}")
        counts_t = res.num_tokens_per_expert_tensor.cpu().tolist()
        chk.expect(counts_t == want_counts, f"num_tokens_per_expert_tensor {counts_t} != {want_counts}")

        # the cached path: new tokens, the same routing
        g = torch.Generator().manual_seed(c.seed * 31 + 1)
        xs2 = [torch.randn(t, c.hidden, generator=g).to(self.dtype) for t in c.tokens]
        res2 = self.buf.dispatch(self._tokens_in(xs2[rank]), handle=res.handle, num_worst_tokens=self.num_worst)
        self._check_rows(res2.x, self._rows_of(xs2, ref), "cached dispatch x")
        chk.expect(res2.topk_idx is None, "cached dispatch: topk_idx must be None")
        # (expert_alignment left out: the handle's dispatch's counts, aligned as it aligned them)
        chk.expect(res2.num_tokens_per_expert == res.num_tokens_per_expert,
                   f"cached dispatch: num_tokens_per_expert {res2.num_tokens_per_expert} != "
                   f"{res.num_tokens_per_expert}")
        counts2 = res2.num_tokens_per_expert_tensor.cpu().tolist()
        chk.expect(counts2 == want_counts, f"cached dispatch: num_tokens_per_expert_tensor {counts2} != {want_counts}")
        _unchanged(chk, snap, "dispatch")

    def combine(self) -> None:
        assert self.res is not None, "dispatch() first"
        c, rank, chk, res = self.case, self.rank, self.chk, self.res
        ref = self.refs[rank]
        r = len(ref.src)
        # y in the dispatch dtype (bf16 for FP8 dispatches); NaN in the tail rows no token owns
        ydtype = torch.bfloat16 if c.use_fp8 else self.dtype
        ys = _y_rows(c.seed, [len(d.src) for d in self.refs], c.hidden, ydtype)
        y = ys[rank]
        assert res.topk_weights is not None
        w = res.topk_weights
        if self.num_worst:
            y = torch.cat([y, torch.full((self.num_worst - r, c.hidden), float("nan"), dtype=ydtype)])
        y = y.to(self.dev)
        snap = _snapshot(y, w)
        comb = self.buf.combine(y, res.handle, topk_weights=w)
        _unchanged(chk, snap, "combine")
        t = c.tokens[rank]
        chk.expect(comb.x.dtype == ydtype, f"combine x: dtype {comb.x.dtype}, expected {ydtype}")
        mag = ref_combine([v.abs() for v in ys], self.refs, rank, t)
        chk.close(comb.x, ref_combine(ys, self.refs, rank, t), ydtype, "combine x", mag)
        assert comb.topk_weights is not None
        wsum = ref_combine([d.topk_weights for d in self.refs], self.refs, rank, t)
        chk.close(comb.topk_weights, wsum, torch.float32, "combine topk_weights")
        self.combined = comb.x
        # adjoint shares: <dispatch(x), y> over this rank's rows and <x, combine(y)> over its tokens
        if c.use_fp8:
            q, s = res.x
            got = fp8.dequantize(q[:r].cpu(), s[:r].cpu()).double()
            q0, s0 = fp8.quantize(self.inputs[rank].x.float())
            x_mine = fp8.dequantize(q0, s0).double()
        else:
            assert isinstance(res.x, torch.Tensor)
            got = res.x[:r].cpu().double()
            x_mine = self.inputs[rank].x.double()
        y64, c64 = ys[rank].double(), comb.x.cpu().double()
        self.adjoint = Adjoint(
            lhs=float((got * y64).sum()), rhs=float((x_mine * c64).sum()),
            rounding=float((x_mine.abs() * c64.abs()).sum()), accumulation=float((x_mine.abs() * mag).sum()),
        )

    def run(self) -> NormalRound:
        self.dispatch()
        self.combine()
        return self


def adjoint_ok(shares: list[Adjoint], dtype: str, use_fp8: bool) -> tuple[bool, str]:
    """Summed over ranks, <dispatch(x), y> == <x, combine(y)> up to combine's one rounding per element."""
    lhs = sum(a.lhs for a in shares)
    rhs = sum(a.rhs for a in shares)
    rel = 2.0**-8 if (dtype == "bfloat16" or use_fp8) else 2.0**-23
    tol = rel * sum(a.rounding for a in shares) + 2.0**-20 * sum(a.accumulation for a in shares) + 1e-9
    return abs(lhs - rhs) <= tol, f"adjoint: <D x, y> = {lhs:.10g}, <x, C y> = {rhs:.10g}, tolerance {tol:.3g}"


# -- low-latency mode ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LowLatencyCase:
    tokens: tuple[int, ...]
    max_tokens: int
    hidden: int
    num_experts: int
    num_topk: int
    seed: int
    use_fp8: bool = True
    round_scale: bool = False
    use_ue8m0: bool = False  # (rounds the scales as round_scale does)
    hook: bool = False
    minus_one: float = 0.1
    ranks_per_node: int | None = None
    distinct: bool = True  # False: a token may name an expert more than once (sent once, SPEC)
    # which ranks give low_latency_dispatch their topk_weights (summed on the experts' ranks by the nvshmem combine):
    # "none", "all", or "some" (ranks with (seed + rank) even: sources of both kinds in one round)
    weighted: str = "none"
    # ranks that give their weights also ask for bf16_partial_sums (each rank's sum back as one bf16 row; the
    # combine's bound, float32 accumulation over the terms' magnitudes, covers that rounding too)
    bf16_sums: bool = False

    def buffer_kwargs(self) -> dict[str, Any]:
        return dict(
            hidden=self.hidden, num_experts=self.num_experts, num_topk=self.num_topk,
            max_tokens_per_rank=self.max_tokens, ranks_per_node=self.ranks_per_node, low_latency=True,
        )

    def weighted_on(self, rank: int) -> bool:
        return self.weighted == "all" or (self.weighted == "some" and (self.seed + rank) % 2 == 0)


class LowLatencyRound:
    """dispatch() (sends; with ``hook`` the receive waits for receive()), receive(), combine() of one case."""

    def __init__(
        self, buf: largeep.Buffer, case: LowLatencyCase, chk: Checker, group: dist.ProcessGroup | None = None
    ) -> None:
        self.buf, self.case, self.chk = buf, case, chk
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.dev = buf.ctx.device
        c = case
        assert len(c.tokens) == self.world and max(c.tokens) <= c.max_tokens
        self.inputs = [
            make_inputs(c.seed, r, c.tokens[r], c.hidden, c.num_experts, c.num_topk, torch.bfloat16, c.minus_one,
                        c.distinct)
            for r in range(self.world)
        ]
        self.epr = c.num_experts // self.world
        self.res: largeep.LowLatencyDispatchResult | None = None
        # y of (global expert, source rank, token) = A[expert] + B[rank] + C[token]: every row distinct, cheap
        g = torch.Generator().manual_seed(c.seed * 104729 + 5)
        self._a = torch.randn(c.num_experts, c.hidden, generator=g)
        self._b = torch.randn(self.world, c.hidden, generator=g)
        self._c = torch.randn(max(c.max_tokens, 1), c.hidden, generator=g)

    def y_of(self, ge: int, s: int, t: int) -> torch.Tensor:
        return (self._a[ge] + self._b[s] + self._c[t]).to(torch.bfloat16)

    def dispatch(self) -> None:
        c, mine = self.case, self.inputs[self.rank]
        self.x, self.idx, self.w = mine.x.to(self.dev), mine.topk_idx.to(self.dev), mine.topk_weights.to(self.dev)
        self._snap = _snapshot(self.x, self.idx, self.w)
        self.res = self.buf.low_latency_dispatch(
            self.x, self.idx, use_fp8=c.use_fp8, round_scale=c.round_scale, use_ue8m0=c.use_ue8m0,
            return_recv_hook=c.hook,
            topk_weights=self.w if c.weighted_on(self.rank) else None,
            bf16_partial_sums=c.bf16_sums and c.weighted_on(self.rank),
        )

    def receive(self) -> None:
        assert self.res is not None, "dispatch() first"
        c, chk, res = self.case, self.chk, self.res
        if c.hook:
            if chk.expect(res.hook is not None, "return_recv_hook=True: hook missing"):
                assert res.hook is not None
                res.hook()
        _unchanged(chk, self._snap, "low_latency_dispatch")
        ref = ref_low_latency(self.inputs, self.rank, c.num_experts)
        nt = res.num_tokens_per_expert
        chk.expect(nt.dtype == torch.int32 and nt.device == self.x.device,
                   f"low-latency num_tokens_per_expert: {nt.dtype} on {nt.device}, expected int32 on {self.x.device}")
        counts = nt.cpu().tolist()
        want_counts = [len(ref[e]) for e in range(self.epr)]
        if not chk.expect(counts == want_counts, f"low-latency counts {counts} != {want_counts}"):
            return
        rows = self.world * c.max_tokens
        if c.use_fp8:
            q, s = res.x
            chk.expect(q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32,
                       f"low-latency x: dtypes {q.dtype}, {s.dtype}, expected float8_e4m3fn, float32")
            chk.expect(tuple(q.shape) == (self.epr, rows, c.hidden), f"low-latency x shape {tuple(q.shape)}")
            chk.expect(tuple(s.shape) == (self.epr, rows, c.hidden // 128), f"low-latency scales {tuple(s.shape)}")
        else:
            assert isinstance(res.x, torch.Tensor)
            chk.expect(res.x.dtype == torch.bfloat16, f"low-latency x: dtype {res.x.dtype}, expected bfloat16")
            chk.expect(tuple(res.x.shape) == (self.epr, rows, c.hidden), f"low-latency x shape {tuple(res.x.shape)}")
        info = res.src_info.cpu()
        padded = torch.zeros(self.world, max(c.max_tokens, 1), c.hidden, dtype=torch.bfloat16)
        for r, inp in enumerate(self.inputs):
            padded[r, : inp.x.shape[0]] = inp.x
        for e in range(self.epr):
            n = counts[e]
            keys = [(int(a), int(b)) for a, b in info[e, :n].tolist()]
            if not chk.expect(sorted(keys) == sorted(ref[e]), f"expert {e}: (source, token) rows differ"):
                continue
            srcs = [k[0] for k in keys]
            chk.expect(srcs == sorted(srcs), f"expert {e}: rows not grouped by source rank")
            if not n:
                continue
            want = padded[info[e, :n, 0].long(), info[e, :n, 1].long()].float()
            if c.use_fp8:
                q, s = res.x
                # the rows' e4m3 values and scales against SPEC's quantisation of the tokens sent
                why = fp8_check(q[e, :n].cpu(), s[e, :n].cpu(), want, c.round_scale or c.use_ue8m0)
                chk.expect(why is None, f"expert {e}: FP8 rows: {why}")
            else:
                assert isinstance(res.x, torch.Tensor)
                chk.equal(res.x[e, :n], want.to(torch.bfloat16), f"expert {e}: rows")

    def combine(self) -> None:
        assert self.res is not None
        c, chk, res = self.case, self.chk, self.res
        counts = res.num_tokens_per_expert.cpu().tolist()
        info = res.src_info.cpu()
        rows = self.world * c.max_tokens
        # rows past each expert's count are NaN: combine must never read them
        y = torch.full((self.epr, rows, c.hidden), float("nan"), dtype=torch.bfloat16)
        for e in range(self.epr):
            for j in range(min(counts[e], rows)):
                s, t = info[e, j].tolist()
                y[e, j] = self.y_of(self.rank * self.epr + e, s, t)
        y = y.to(self.dev)
        t = c.tokens[self.rank]
        # half the cases give out= (NaN-filled: every row must be written), the others take the combine's own tensor
        out = torch.full((t, c.hidden), float("nan"), dtype=torch.bfloat16, device=self.dev) if c.seed % 2 else None
        snap = _snapshot(y, self.idx, self.w)
        comb = self.buf.low_latency_combine(y, self.idx, self.w, res.handle, out=out, return_recv_hook=c.hook)
        if c.hook and chk.expect(comb.hook is not None, "low_latency_combine: hook missing"):
            assert comb.hook is not None
            comb.hook()
        _unchanged(chk, snap, "low_latency_combine")
        if out is not None:
            chk.expect(comb.x.data_ptr() == out.data_ptr() or t == 0, "low_latency_combine: 'out' not used")
        chk.expect(comb.x.dtype == torch.bfloat16 and comb.x.device == self.x.device
                   and tuple(comb.x.shape) == (t, c.hidden),
                   f"low-latency combine x: {comb.x.dtype} {tuple(comb.x.shape)} on {comb.x.device}, expected "
                   f"bfloat16 ({t}, {c.hidden}) on {self.x.device}")
        mine = self.inputs[self.rank]
        want = ref_low_latency_combine(mine, self.rank, c.num_experts, self.world, self.y_of)
        mag = ref_low_latency_combine(
            RankInputs(mine.x, mine.topk_idx, mine.topk_weights.abs()), self.rank, c.num_experts, self.world,
            lambda e, s, t: self.y_of(e, s, t).abs(),
        )
        chk.close(comb.x, want, torch.bfloat16, "low-latency combine x", mag)

    def run(self) -> LowLatencyRound:
        self.dispatch()
        self.receive()
        self.combine()
        return self


def make_buffer(
    case: NormalCase | LowLatencyCase, backend: str, group: dist.ProcessGroup | None = None
) -> largeep.Buffer:
    return largeep.Buffer(group, backend=backend, **case.buffer_kwargs())
