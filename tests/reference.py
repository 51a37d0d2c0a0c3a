"""Independent references for SPEC.md's semantics: plain loops over every rank's inputs, no collectives.

Every rank draws every rank's inputs from the same seeds (``make_inputs``), so each can compute what it must
receive without talking to anyone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RankInputs:
    x: torch.Tensor  # [T, H]
    topk_idx: torch.Tensor  # int64 [T, K]
    topk_weights: torch.Tensor  # float32 [T, K]


def make_inputs(
    seed: int, rank: int, num_tokens: int, hidden: int, num_experts: int, num_topk: int, dtype: torch.dtype,
    minus_one_frac: float = 0.1, distinct: bool = True,
) -> RankInputs:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    if distinct:
        scores = torch.rand(num_tokens, num_experts, generator=g)
        idx = scores.topk(num_topk, dim=1).indices
    else:
        idx = torch.randint(0, num_experts, (num_tokens, num_topk), generator=g)
    drop = torch.rand(num_tokens, num_topk, generator=g) < minus_one_frac
    idx = torch.where(drop, torch.full_like(idx, -1), idx)
    w = torch.rand(num_tokens, num_topk, generator=g) + 0.1
    return RankInputs(x, idx.to(torch.int64), w.float())


def ref_layout(idx: torch.Tensor, n: int, e: int, p: int) -> dict[str, torch.Tensor]:
    epr = e // n
    t = idx.shape[0]
    in_rank = torch.zeros(t, n, dtype=torch.bool)
    per_expert = torch.zeros(e, dtype=torch.int64)
    for i in range(t):
        seen = set()
        for v in idx[i].tolist():
            if v >= 0:
                in_rank[i, v // epr] = True
                seen.add(v)
        for v in seen:
            per_expert[v] += 1
    in_node = in_rank.view(t, n // p, p).any(2)
    return {
        "is_token_in_rank": in_rank,
        "num_tokens_per_rank": in_rank.sum(0),
        "num_tokens_per_node": in_node.sum(0),
        "num_tokens_per_expert": per_expert,
    }


@dataclass
class RefDispatch:
    src: list[tuple[int, int]]  # (source rank, token) of each received row
    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    per_expert: list[int]  # not rounded


def ref_dispatch(inputs: list[RankInputs], rank: int, e: int) -> RefDispatch:
    n = len(inputs)
    epr = e // n
    lo, hi = rank * epr, (rank + 1) * epr
    src, xs, idxs, ws = [], [], [], []
    per_expert = [0] * epr
    for s, inp in enumerate(inputs):
        for t in range(inp.x.shape[0]):
            ids = inp.topk_idx[t].tolist()
            if not any(lo <= v < hi for v in ids):
                continue
            src.append((s, t))
            xs.append(inp.x[t])
            local = [v - lo if lo <= v < hi else -1 for v in ids]
            idxs.append(local)
            ws.append([float(inp.topk_weights[t, k]) if local[k] >= 0 else 0.0 for k in range(len(ids))])
            for v in set(v for v in local if v >= 0):
                per_expert[v] += 1
    k = inputs[0].topk_idx.shape[1]
    h = inputs[0].x.shape[1]
    return RefDispatch(
        src,
        torch.stack(xs) if xs else torch.empty(0, h, dtype=inputs[0].x.dtype),
        torch.tensor(idxs, dtype=torch.int64).view(-1, k),
        torch.tensor(ws, dtype=torch.float32).view(-1, k),
        per_expert,
    )


def ref_combine(ys: list[torch.Tensor], dispatches: list[RefDispatch], rank: int, num_tokens: int) -> torch.Tensor:
    """x[t] on ``rank`` = sum over ranks r of y_r[row of (rank, t)], in float64."""
    h = ys[0].shape[1]
    out = torch.zeros(num_tokens, h, dtype=torch.float64)
    for r, d in enumerate(dispatches):
        for row, (s, t) in enumerate(d.src):
            if s == rank:
                out[t] += ys[r][row].double()
    return out


def ref_low_latency(
    inputs: list[RankInputs], rank: int, e: int
) -> dict[int, dict[tuple[int, int], torch.Tensor]]:
    """For each local expert: {(source rank, token): x row} of every copy this rank receives."""
    n = len(inputs)
    epr = e // n
    out: dict[int, dict[tuple[int, int], torch.Tensor]] = {le: {} for le in range(epr)}
    for s, inp in enumerate(inputs):
        for t in range(inp.x.shape[0]):
            for v in inp.topk_idx[t].tolist():
                if v >= 0 and v // epr == rank:
                    out[v % epr][(s, t)] = inp.x[t]
    return out


def ref_low_latency_combine(
    inp: RankInputs, rank: int, e: int, n: int, y_of: callable[[int, int, int], torch.Tensor]
) -> torch.Tensor:
    """x[t] = sum_k w[t,k] * y_of(expert, source rank, token), in float64."""
    t_count, h = inp.x.shape
    out = torch.zeros(t_count, h, dtype=torch.float64)
    for t in range(t_count):
        for k, v in enumerate(inp.topk_idx[t].tolist()):
            if v >= 0:
                out[t] += float(inp.topk_weights[t, k]) * y_of(v, rank, t).double()
    return out


def fp8_check(q: torch.Tensor, s: torch.Tensor, x: torch.Tensor, round_scale: bool) -> str | None:
    """SPEC.md's FP8 rows, checked from first principles (no largeep code): ``q`` e4m3 [..., H] and ``s`` float32
    [..., H/128] of rows ``x`` [..., H]. Each group's scale is amax(|x| over its 128 channels) / 448 in float32 (an
    all-zero group: 1e-4 / 448), with ``round_scale`` the power of two at or above it; each q is x / s rounded to the
    nearest e4m3 value (within half the e4m3 spacing at |x / s|, plus its float32 rounding), and exactly the e4m3
    code of x / s divided in float32 (every backend divides; a kernel that multiplied by 1 / s would land on the
    neighbouring code for about one value in a thousand). Computed on the CPU, whose division by a number is
    correctly rounded (torch on CUDA multiplies by its reciprocal). Returns what is wrong, or None."""
    q, s, x = q.cpu(), s.cpu(), x.cpu()
    g = x.float().reshape(*x.shape[:-1], -1, 128)
    want = g.abs().amax(-1).clamp_min(1e-4) / 448.0
    got = s.float().reshape(want.shape)
    if round_scale:
        mant, _ = torch.frexp(got)
        if not bool((mant == 0.5).all()):
            return "a rounded scale is not a power of two"
        if not bool(((got >= want) & (got < 2 * want)).all()):
            return "a rounded scale is not the power of two at or above amax / 448"
    elif not bool((got == want).all()):
        worst = float(((got - want).abs() / want).max())
        return f"scales differ from amax / 448 in float32 (relative error up to {worst:.3g})"
    v = g.double() / got.double().unsqueeze(-1)
    a = v.abs()
    spacing = torch.exp2(torch.floor(torch.log2(a.clamp_min(2.0**-6))) - 3)  # e4m3: 3 mantissa bits, min normal 2^-6
    qd = q.double().reshape(v.shape)
    err = (qd - v).abs()
    bad = err > spacing / 2 + a * 2.0**-23 + 1e-12  # (x / s is rounded to float32 before it is to e4m3)
    if bool(bad.any()):
        worst = float((err / spacing).max())
        return f"{int(bad.sum())} values not rounded to the nearest e4m3 (worst error {worst:.3g} steps)"
    exact = (g / got.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    off = exact != q.reshape(v.shape).view(torch.uint8)
    if bool(off.any()):
        return (f"{int(off.sum())} values are not the e4m3 code of x / s divided in float32 (first at "
                f"{[int(i) for i in off.nonzero()[0]]})")
    return None


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """x [..., H] through SPEC's FP8 rows and back, in plain torch: per 128 channels s = amax / 448 (an all-zero
    group 1e-4 / 448), q = x / s rounded to the nearest e4m3, then q * s in x's dtype."""
    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // 128, 128)
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448.0
    q = (g / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    return (q * s).reshape(x.shape).to(x.dtype)

