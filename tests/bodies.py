"""Test bodies run on every rank of a pool: ``fn(rank, world, *args)``. Shared by the CPU (torch backend on gloo)
and GPU (torch on NCCL, nvshmem) tests; every check is against ``reference.py``."""

from __future__ import annotations

from typing import Any

import largeep
import torch
import torch.distributed as dist
from largeep import fp8
from reference import (
    fp8_check,
    make_inputs,
    ref_combine,
    ref_dispatch,
    ref_layout,
    ref_low_latency,
    ref_low_latency_combine,
)


def device_for(backend: str) -> torch.device:
    """Where a Buffer of ``backend`` on the default group keeps its tensors: CUDA on an NCCL group, and for the
    nvshmem backend on a gloo group too (ranks sharing GPUs); else the CPU."""
    if dist.get_backend() == "nccl" or (backend == "nvshmem" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    if ref64.numel() == 0:
        assert out64.numel() == 0, what
        return
    # float32 accumulation, then one rounding to the output dtype
    rel = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    err = (out64 - ref64).abs()
    bound = rel * ref64.abs() + rel * 1e-2 + 1e-6
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: max error {err.max().item():.3g} exceeds bound (ratio {worst:.3g})"


def normal_roundtrip(
    rank: int, world: int, backend: str, tokens: list[int], hidden: int, num_experts: int, num_topk: int,
    dtype_name: str, use_fp8: bool, alignment: int, seed: int, ranks_per_node: int | None = None,
    num_worst_tokens: int = 0, tokens_per_round: int | None = None, no_expert_rank: int | None = None,
    num_sms: int | None = None,
) -> dict[str, Any]:
    """tokens_per_round: a Buffer that moves calls in rounds (of at most this many tokens per rank).
    no_expert_rank: every id of that rank's tokens is -1. num_sms: the Buffer's (None: its default)."""
    dtype = getattr(torch, dtype_name)
    dev = device_for(backend)
    inputs = [make_inputs(seed, r, tokens[r], hidden, num_experts, num_topk, dtype) for r in range(world)]
    if no_expert_rank is not None:
        inputs[no_expert_rank].topk_idx.fill_(-1)
    refs = [ref_dispatch(inputs, r, num_experts) for r in range(world)]
    mine = inputs[rank]
    buf = largeep.Buffer(
        None, hidden=hidden, num_experts=num_experts, num_topk=num_topk,
        max_tokens_per_rank=max(max(tokens), 1), backend=backend, ranks_per_node=ranks_per_node,
        tokens_per_round=tokens_per_round, num_sms=num_sms,
    )
    try:
        idx, w = mine.topk_idx.to(dev), mine.topk_weights.to(dev)
        idx_copy, w_copy = idx.clone(), w.clone()
        # layout
        lay = buf.get_dispatch_layout(idx)
        p = ranks_per_node or world  # (the test's own: every rank of a test group is on this host)
        assert buf.ctx.ranks_per_node == p, f"the Buffer took ranks_per_node {buf.ctx.ranks_per_node}, asked {p}"
        assert lay.is_token_in_rank.is_contiguous(), lay.is_token_in_rank.stride()  # (a view before, on torch)
        rl = ref_layout(mine.topk_idx, world, num_experts, p)
        for key, want in rl.items():
            got = getattr(lay, key).cpu()
            assert torch.equal(got.to(want.dtype), want), f"layout {key}: {got} != {want}"
        # dispatch
        if use_fp8:
            q, s = fp8.quantize(mine.x.float())
            x_in: Any = (q.to(dev), s.to(dev))
        else:
            x_in = mine.x.to(dev)
        x_copy = x_in[0].clone() if use_fp8 else x_in.clone()
        res = buf.dispatch(x_in, idx, w, expert_alignment=alignment, num_worst_tokens=num_worst_tokens)
        ref = refs[rank]
        r_rows = len(ref.src)
        got_rows = num_worst_tokens if num_worst_tokens else r_rows
        if use_fp8:
            gq, gs = res.x
            assert gq.shape[0] == got_rows and gs.shape[0] == got_rows
            rq, rs = fp8.quantize(ref.x.float()) if r_rows else (torch.empty(0, hidden), torch.empty(0, hidden // 128))
            assert torch.equal(gq[:r_rows].cpu().view(torch.uint8), rq.view(torch.uint8)), "fp8 x differs"
            assert torch.equal(gs[:r_rows].cpu(), rs), "fp8 scales differ"
        else:
            assert res.x.shape == (got_rows, hidden), f"x shape {tuple(res.x.shape)}"
            assert res.x.dtype == dtype
            assert torch.equal(res.x[:r_rows].cpu(), ref.x), "dispatched x differs"
        assert torch.equal(res.topk_idx[:r_rows].cpu(), ref.topk_idx), "topk_idx differs"
        assert torch.equal(res.topk_weights[:r_rows].cpu(), ref.topk_weights), "topk_weights differ"
        if num_worst_tokens:
            assert (res.topk_idx[r_rows:] == -1).all(), "tail topk_idx must be -1"
            # (no host sync on GPUs: the list is empty there; on CPU it is filled from the tensor)
            assert res.num_tokens_per_expert == ([] if res.num_tokens_per_expert_tensor.is_cuda
                                                 else res.num_tokens_per_expert_tensor.tolist())
            counts = res.num_tokens_per_expert_tensor.cpu().tolist()
        else:
            counts = res.num_tokens_per_expert
        want_counts = [((c + alignment - 1) // alignment) * alignment for c in ref.per_expert]
        assert counts == want_counts, f"num_tokens_per_expert {counts} != {want_counts}"
        on_device = res.num_tokens_per_expert_tensor.cpu().tolist()
        assert on_device == want_counts, f"num_tokens_per_expert_tensor {on_device} != {want_counts}"
        # cached dispatch with new data
        g = torch.Generator().manual_seed(seed + 7)
        xs2 = [torch.randn(tokens[r], hidden, generator=g).to(dtype) for r in range(world)]
        if not use_fp8:
            res2 = buf.dispatch(xs2[rank].to(dev), handle=res.handle, num_worst_tokens=num_worst_tokens)
            want2 = torch.stack([xs2[s][t] for s, t in ref.src]) if r_rows else torch.empty(0, hidden, dtype=dtype)
            assert torch.equal(res2.x[:r_rows].cpu(), want2), "cached dispatch differs"
            assert res2.topk_idx is None
        # combine (with weights) against the reference
        ys = [torch.randn(len(refs[r].src), hidden, generator=g).to(dtype) for r in range(world)]
        y_mine = ys[rank]
        if num_worst_tokens:
            y_mine = torch.cat([y_mine, torch.randn(num_worst_tokens - r_rows, hidden, generator=g).to(dtype)])
        comb = buf.combine(y_mine.to(dev), res.handle, topk_weights=res.topk_weights)
        want = ref_combine(ys, refs, rank, tokens[rank])
        assert comb.x.dtype == dtype and comb.x.shape == (tokens[rank], hidden)
        _close(comb.x, want, dtype, "combine x")
        wsum = ref_combine([r.topk_weights for r in refs], refs, rank, tokens[rank])
        _close(comb.topk_weights, wsum, torch.float32, "combine topk_weights")
        # adjoint: <dispatch(x), y> == <x, combine(y)> summed over ranks (float32 data)
        xf = torch.randn(tokens[rank], hidden, generator=torch.Generator().manual_seed(seed * 31 + rank))
        if dtype == torch.float32 and not use_fp8:
            d = buf.dispatch(xf.to(dev), handle=res.handle, num_worst_tokens=num_worst_tokens)
            yf = torch.randn(d.x.shape, generator=torch.Generator().manual_seed(seed * 37 + rank)).to(dev)
            if num_worst_tokens:
                yf[r_rows:] = 0
            c = buf.combine(yf, res.handle)
            lhs = torch.tensor([(d.x[:r_rows].double() * yf[:r_rows].double()).sum().item()], dtype=torch.float64)
            rhs = torch.tensor([(xf.double() * c.x.double().cpu()).sum().item()], dtype=torch.float64)
            both = torch.cat([lhs, rhs]).to(dev)
            dist.all_reduce(both)
            a, b = both.tolist()
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"adjoint: {a} != {b}"
        # the caller's tensors are untouched
        assert torch.equal(idx, idx_copy) and torch.equal(w, w_copy)
        assert torch.equal(x_in[0] if use_fp8 else x_in, x_copy)
        import hashlib

        digest = hashlib.sha256()  # the combine's bits: a rerun on the same inputs must give them again
        digest.update(comb.x.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(comb.topk_weights.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return {"rows": r_rows, "combine_sha256": digest.hexdigest()}
    finally:
        buf.destroy()


def normal_combine_exact(rank: int, world: int, backend: str, tokens: list[int], hidden: int,
                         ranks_per_node: int | None = None, worst: bool = False) -> None:
    """SPEC's float32 accumulation in the normal combine, bit for bit: every token goes to every rank (one expert of
    each, 2 experts per rank), and rank r returns for the row of (s, t) in column c the BF16 value 256 where
    r == (s + t + c) % world, else 1 (both negated where c % 7 == 3). Every element must be the exact sum,
    +-(256 + world - 1), rounded to BF16 once; a BF16 accumulation gives other bits wherever the 256 is summed first
    or second (256 + 1 rounds back to 256), so the 256's position moving with s, t and c catches one whatever the
    order of the sum. ``worst``: the dispatch with num_worst_tokens = world x max tokens (the fixed-size path), the
    rows past the received ones NaN in y (not summed)."""
    assert world >= 3, "at 2 ranks BF16 accumulation gives the same bits"
    dev = device_for(backend)
    e = 2 * world
    m = max(max(tokens), 1)
    buf = largeep.Buffer(None, hidden=hidden, num_experts=e, num_topk=world, max_tokens_per_rank=m,
                         backend=backend, ranks_per_node=ranks_per_node)
    rows = world * m if worst else 0
    try:
        t_me = tokens[rank]
        idx = torch.tensor([[2 * r + t % 2 for r in range(world)] for t in range(t_me)], dtype=torch.int64)
        idx = idx.reshape(t_me, world)
        x = torch.randn(t_me, hidden, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
        w = torch.ones(t_me, world)
        res = buf.dispatch(x.to(dev), idx.to(dev), w.to(dev), num_worst_tokens=rows)
        # rows: every (s, t), s ascending, then t
        src = [(s, t) for s in range(world) for t in range(tokens[s])]
        assert res.x.shape[0] == (rows or len(src)), (res.x.shape, len(src))
        col = torch.arange(hidden)
        sign = torch.where(col % 7 == 3, -1.0, 1.0)
        y = torch.stack([torch.where((s + t + col) % world == rank, 256.0, 1.0) * sign for s, t in src]) \
            if src else torch.empty(0, hidden)
        if rows:
            y = torch.cat([y, torch.full((rows - len(src), hidden), float("nan"))])
        comb = buf.combine(y.to(torch.bfloat16).to(dev), res.handle)
        want_row = (256.0 + (world - 1)) * sign  # (every rank's terms, the 256 from one of them)
        want = want_row.expand(t_me, hidden).to(torch.bfloat16)
        got = comb.x.cpu()
        assert got.dtype == torch.bfloat16
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (
            f"rank {rank}: combine sums not float32: got {got[:1, :8].tolist()}, want {want[:1, :8].tolist()}"
        )
    finally:
        buf.destroy()


def normal_combine_bf16_partials(rank: int, world: int, backend: str, tokens: list[int], hidden: int,
                                 ranks_per_node: int | None, worst: bool = False,
                                 tokens_per_round: int | None = None) -> None:
    """Buffer.combine(bf16_partial_sums=True), bit for bit: each other node's sum of a token's rows is rounded to
    bf16 before it is added to the rows of the token's own node, the whole rounded to bf16 once; without the flag
    (and within one node, with it) one float32 sum rounded once. Integers of at most 7 significant bits (exact in
    bf16) times 1, 2 or 4, of mixed signs, below 2**9: every float32 sum here is exact in any order, while sums of
    rows from several ranks need more bits than bf16 has, and cancel (so that the final rounding is finer than a
    partial's); dyadic weights. Random routing (-1 entries, tokens that reach some nodes only, 0 tokens on a rank;
    token 0 of each rank reaches every rank); the reference is computed here from the routing alone. The two
    roundings must differ somewhere in nodes of several ranks (else the test could not tell them apart), and
    nowhere in nodes of one rank (a node's partial is then one bf16 row: the flag only halves the bytes)."""
    dev = device_for(backend)
    p = ranks_per_node or world
    e, k = 2 * world, max(3, world)
    m = max(max(tokens), 1)
    buf = largeep.Buffer(None, hidden=hidden, num_experts=e, num_topk=k, max_tokens_per_rank=m, backend=backend,
                         ranks_per_node=ranks_per_node, tokens_per_round=tokens_per_round)
    try:
        idxs, ws = [], []
        for s in range(world):  # (every rank's routing, from seeds all ranks know; token 0 goes to every rank)
            g = torch.Generator().manual_seed(500 + s)
            idxs.append(torch.randint(-1, e, (tokens[s], k), generator=g))
            idxs[s][:1, :world] = 2 * torch.arange(world) + s % 2
            ws.append(torch.randint(0, 9, (tokens[s], k), generator=g).float() / 8)
        reach = [[sorted({v // 2 for v in idxs[s][t].tolist() if v >= 0}) for t in range(tokens[s])]
                 for s in range(world)]
        x = torch.randn(tokens[rank], hidden, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
        rows = world * m if worst else 0
        res = buf.dispatch(x.to(dev), idxs[rank].to(dev), ws[rank].to(dev), num_worst_tokens=rows)
        src = [(s, t) for s in range(world) for t in range(tokens[s]) if rank in reach[s][t]]
        col = torch.arange(hidden, dtype=torch.float64)

        def value(r: int, s: int, t: int) -> torch.Tensor:  # rank r's output row for token (s, t)
            v = ((r * 7 + s * 13 + t * 5 + col * 3) % 97 + 1) * 2.0 ** ((r + col) % 3)
            return torch.where((col + r) % 3 == 0, -v, v)  # (signs mixed across ranks: sums that cancel)

        y = torch.stack([value(rank, s, t) for s, t in src]) if src else torch.empty(0, hidden, dtype=torch.float64)
        if rows:
            y = torch.cat([y, torch.full((rows - len(src), hidden), float("nan"), dtype=torch.float64)])
        assert torch.equal(y[: len(src)], y[: len(src)].to(torch.bfloat16).double()), "values exact in bf16"
        y = y.to(torch.bfloat16)
        yw = res.topk_weights
        plain = buf.combine(y.to(dev), res.handle, topk_weights=yw)
        part = buf.combine(y.to(dev), res.handle, topk_weights=yw, bf16_partial_sums=True)
        want_plain = torch.zeros(tokens[rank], hidden, dtype=torch.float64)
        want_part = torch.zeros(tokens[rank], hidden, dtype=torch.float64)
        want_w = torch.zeros(tokens[rank], k, dtype=torch.float64)
        for t in range(tokens[rank]):
            for node in range(world // p):
                ranks = [r for r in reach[rank][t] if r // p == node]
                if not ranks:
                    continue
                total = sum((value(r, rank, t) for r in ranks), torch.zeros(hidden, dtype=torch.float64))
                want_plain[t] += total
                want_part[t] += total if node == rank // p else total.to(torch.bfloat16).double()
                for r in ranks:  # (the weights of every expert of t on r)
                    want_w[t] += torch.where(idxs[rank][t] // 2 == r, ws[rank][t].double(), 0.0)
        got_plain, got_part = plain.x.cpu(), part.x.cpu()
        assert got_part.dtype == torch.bfloat16 and got_part.shape == (tokens[rank], hidden)
        for got, want, what in ((got_plain, want_plain, "plain"), (got_part, want_part, "bf16 partials")):
            want16 = want.to(torch.bfloat16)
            bad = (got.view(torch.int16) != want16.view(torch.int16)).nonzero()[:4].tolist()
            assert not bad, (f"rank {rank}: combine ({what}) differs at {bad}: got "
                             f"{[got[i, j].item() for i, j in bad]}, want {[want16[i, j].item() for i, j in bad]}")
        for got_w in (plain.topk_weights.cpu(), part.topk_weights.cpu()):
            assert torch.equal(got_w.double(), want_w), f"rank {rank}: summed weights"
        differs = torch.tensor([int(not torch.equal(want_plain.to(torch.bfloat16), want_part.to(torch.bfloat16)))])
        if dist.get_backend() == "nccl":
            differs = differs.to(dev)
        dist.all_reduce(differs)
        assert (int(differs.item()) > 0) == (1 < p < world), (
            "the two roundings differ" if p == 1 or p == world else "the test's values do not tell them apart")
    finally:
        buf.destroy()


def low_latency_partial_sums(
    rank: int, world: int, backend: str, tokens: list[int], max_tokens: int, hidden: int, num_experts: int,
    num_topk: int, seed: int, modes: list[str], hook: bool = False, ranks_per_node: int | None = None,
    distinct: bool = True, use_fp8: bool = False,
) -> None:
    """modes[r]: what rank r's dispatch asks for: "none" (no weights sent), "split" (weights sent: a token's sum over
    its experts on one rank comes back in two bf16 rows) or "bf16" (bf16_partial_sums: in one, its rounding). The
    values make every float32 sum exact (expert outputs multiples of 1/64 below 4 in magnitude, weights powers of
    two from 1/16 to 1), so the combine must equal, bit for bit, bf16 of the sum over ranks r of P_r, the token's
    exact sum over its experts on r, rounded to bf16 in "bf16" mode where the token has two or more distinct
    experts on r (float64 reference; twins, -1 entries and ranks in other modes mixed in)."""
    dev = device_for(backend)
    inputs, buf = _ll_case(world, backend, tokens, max_tokens, hidden, num_experts, num_topk, seed, ranks_per_node)
    epr = num_experts // world
    try:
        mine = inputs[rank]
        if not distinct:  # repeated experts: a token names some expert at two k (twins share one copy)
            mine.topk_idx[::3, 1] = mine.topk_idx[::3, 0]
        g = torch.Generator().manual_seed(seed * 7919 + rank)
        w = 2.0 ** -torch.randint(0, 5, mine.topk_idx.shape, generator=g).float()
        x, idx, w_dev = mine.x.to(dev), mine.topk_idx.to(dev), w.to(dev)
        mode = modes[rank]
        # two rounds without weights first (one per slot buffer): every combine slot then holds a real row, so a
        # side that read or wrote a slot the other did not would show (fresh symmetric memory is zero)
        for _ in range(2):
            pre = buf.low_latency_dispatch(x, idx, use_fp8=use_fp8)
            noise = torch.randn(epr, world * max_tokens, hidden, generator=g).to(torch.bfloat16).to(dev)
            buf.low_latency_combine(noise, idx, w_dev, pre.handle)
        res = buf.low_latency_dispatch(x, idx, use_fp8=use_fp8, return_recv_hook=hook,
                                       topk_weights=None if mode == "none" else w_dev,
                                       bf16_partial_sums=mode == "bf16")
        if hook:
            assert res.hook is not None
            res.hook()

        def y_of(ge: int, s: int, t: int) -> torch.Tensor:
            gy = torch.Generator().manual_seed(seed * 100003 + ge * 1009 + s * 101 + t)
            return (torch.randint(-255, 256, (hidden,), generator=gy).double() / 64).to(torch.bfloat16)

        counts = res.num_tokens_per_expert.cpu().tolist()
        info = res.src_info.cpu()
        y = torch.zeros(epr, world * max_tokens, hidden, dtype=torch.bfloat16)
        for e in range(epr):
            for j in range(counts[e]):
                s, t = info[e, j].tolist()
                y[e, j] = y_of(rank * epr + e, s, t)
        comb = buf.low_latency_combine(y.to(dev), idx, w_dev, res.handle, return_recv_hook=hook)
        if hook:
            assert comb.hook is not None
            comb.hook()
        want = torch.zeros(tokens[rank], hidden, dtype=torch.float64)
        exact = torch.zeros_like(want)
        for t in range(tokens[rank]):
            part: dict[int, torch.Tensor] = {}
            experts: dict[int, set[int]] = {}
            for k, e in enumerate(mine.topk_idx[t].tolist()):
                if e < 0:
                    continue
                r = e // epr
                term = float(w[t, k]) * y_of(e, rank, t).double()
                part[r] = part[r] + term if r in part else term
                experts.setdefault(r, set()).add(e)
            for r, p in part.items():
                exact[t] += p
                rounded = mode == "bf16" and len(experts[r]) >= 2
                want[t] += p.float().to(torch.bfloat16).double() if rounded else p
        if mode == "bf16" and tokens[rank] >= 8 and num_topk >= 4:  # (the case exercises the rounding)
            assert not torch.equal(want.to(torch.bfloat16), exact.to(torch.bfloat16))
        got = comb.x.cpu()
        bad = (got != want.to(torch.bfloat16)).nonzero()
        assert bad.numel() == 0, (
            f"rank {rank} ({mode}): {bad.shape[0]} of {got.numel()} values differ, first at {bad[0].tolist()}: "
            f"{got[tuple(bad[0])].item()} against {want[tuple(bad[0])].item()}"
        )
    finally:
        buf.destroy()


def low_latency_roundtrip_inference(rank: int, world: int, *args: Any) -> None:
    """low_latency_roundtrip under torch.inference_mode (whose tensors have no version counter: the check that the
    combine gets the dispatch's weights unchanged falls back to their identity)."""
    with torch.inference_mode():
        low_latency_roundtrip(rank, world, *args)


def _ll_case(
    world: int, backend: str, tokens: list[int], max_tokens: int, hidden: int, num_experts: int, num_topk: int,
    seed: int, ranks_per_node: int | None = None,
) -> tuple[list[Any], largeep.Buffer]:
    """Every rank's inputs (make_inputs, bf16) and a low-latency Buffer for them."""
    inputs = [
        make_inputs(seed, r, tokens[r], hidden, num_experts, num_topk, torch.bfloat16) for r in range(world)
    ]
    buf = largeep.Buffer(
        None, hidden=hidden, num_experts=num_experts, num_topk=num_topk, max_tokens_per_rank=max_tokens,
        backend=backend, ranks_per_node=ranks_per_node, low_latency=True,
    )
    return inputs, buf


def low_latency_roundtrip(
    rank: int, world: int, backend: str, tokens: list[int], max_tokens: int, hidden: int, num_experts: int,
    num_topk: int, use_fp8: bool, round_scale: bool | str, hook: bool, seed: int, ranks_per_node: int | None = None,
    weighted: str = "none", scramble_ids: bool = False,
) -> None:
    """round_scale: True, False, or "ue8m0" (the scales rounded through use_ue8m0=True, round_scale=False).
    weighted: which ranks give the dispatch their topk_weights ("none", "all", "some": even ranks).
    scramble_ids: a rank that sent weights sets its topk_idx to -1 in place after the dispatch (under inference
    mode no version counter shows it to the Buffer's check): the combine must still sum over the experts the
    dispatch named, on either backend."""
    dev = device_for(backend)
    inputs, buf = _ll_case(world, backend, tokens, max_tokens, hidden, num_experts, num_topk, seed, ranks_per_node)
    mine = inputs[rank]
    epr = num_experts // world
    try:
        x, idx, w = mine.x.to(dev), mine.topk_idx.to(dev, copy=True), mine.topk_weights.to(dev)
        send_w = weighted == "all" or (weighted == "some" and rank % 2 == 0)
        ue8m0 = round_scale == "ue8m0"
        res = buf.low_latency_dispatch(x, idx, use_fp8=use_fp8, round_scale=bool(round_scale) and not ue8m0,
                                       use_ue8m0=ue8m0, return_recv_hook=hook, topk_weights=w if send_w else None)
        if hook:
            assert res.hook is not None
            res.hook()
        if scramble_ids and send_w:
            assert idx.is_inference(), "scramble_ids needs torch.inference_mode (else the Buffer refuses the change)"
            idx.fill_(-1)
        ref = ref_low_latency(inputs, rank, num_experts)
        counts = res.num_tokens_per_expert.cpu().tolist()
        assert counts == [len(ref[e]) for e in range(epr)], f"counts {counts}"
        info = res.src_info.cpu()
        if use_fp8:
            q, s = (t.cpu() for t in res.x)
        else:
            vals = res.x.cpu().float()
        for e in range(epr):
            c = counts[e]
            keys = [tuple(v) for v in info[e, :c].tolist()]
            assert sorted(keys) == sorted(ref[e].keys()), f"expert {e}: rows differ"
            srcs = [k[0] for k in keys]
            assert srcs == sorted(srcs), f"expert {e}: rows not grouped by source rank"
            for j, key in enumerate(keys):
                if use_fp8:  # the row's e4m3 values and scales against SPEC's quantisation of the token sent
                    why = fp8_check(q[e, j], s[e, j], ref[e][key], bool(round_scale))
                    assert why is None, f"expert {e} row {j}: {why}"
                else:
                    assert torch.equal(vals[e, j], ref[e][key].float()), f"expert {e} row {j}: values differ"
        # weighted combine: y = f(expert, source rank, token), known to every rank
        def y_of(ge: int, s: int, t: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed * 100003 + ge * 1009 + s * 101 + t)
            return torch.randn(hidden, generator=g).to(torch.bfloat16)

        y = torch.randn(epr, world * max_tokens, hidden).to(torch.bfloat16)
        for e in range(epr):
            for j in range(counts[e]):
                s, t = info[e, j].tolist()
                y[e, j] = y_of(rank * epr + e, s, t)
        out = torch.full((tokens[rank], hidden), float("nan"), dtype=torch.bfloat16, device=dev)
        # weights the dispatch did not get may be a temporary the caller drops before the hook: the pending
        # receive must keep them (freed, their memory could hold other data by the time the hook runs)
        w_given = w if send_w else w.clone()
        comb = buf.low_latency_combine(y.to(dev), idx, w_given, res.handle, out=out, return_recv_hook=hook)
        if hook:
            assert comb.hook is not None
            if not send_w:
                del w_given
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    junk = torch.full_like(w, 1e4)  # (the freed block, if nothing kept it)
                    del junk
            comb.hook()
        assert comb.x.data_ptr() == out.data_ptr()
        want = ref_low_latency_combine(mine, rank, num_experts, world, y_of)
        _close(comb.x, want, torch.bfloat16, "low-latency combine")
    finally:
        buf.destroy()


def low_latency_ops_weighted(
    rank: int, world: int, backend: str, tokens: list[int], max_tokens: int, hidden: int, num_experts: int,
    num_topk: int, seed: int,
) -> None:
    """The custom-op path of a low-latency dispatch given topk_weights (and once without them, eager and compiled:
    the default call failed there): ops.low_latency_dispatch/combine with
    use_custom_ops, and both under torch.compile(fullgraph) with aot_eager and with Inductor, equal the eager Buffer
    calls bit for bit and the float64 reference within bf16 rounding (expert e returns its rows times 2^(e % 3),
    exact in bf16). A combine given another tensor of the same values is refused (ArgumentError naming
    topk_weights) and leaves the handle for the corrected call; a view of the same memory is accepted; weights
    changed in place after the dispatch are refused. Compiled, a combine given other weights that Inductor may
    place in the dispatch's weights' memory is refused or applies the dispatch's weights, never others. No handle
    stays behind."""
    from largeep import ArgumentError, ops

    dev = device_for(backend)
    inputs, buf = _ll_case(world, backend, tokens, max_tokens, hidden, num_experts, num_topk, seed)
    mine = inputs[rank]
    epr = num_experts // world
    try:
        bid = ops.register_buffer(buf)
        x, idx, w = mine.x.to(dev), mine.topk_idx.to(dev), mine.topk_weights.to(dev)
        factor = torch.tensor([2.0 ** ((rank * epr + e) % 3) for e in range(epr)], device=dev)

        def expert(xe: torch.Tensor) -> torch.Tensor:
            return (xe.float() * factor[:, None, None]).to(torch.bfloat16)

        d = buf.low_latency_dispatch(x, idx, use_fp8=False, topk_weights=w)
        want = buf.low_latency_combine(expert(d.x), idx, w, d.handle).x

        def y_of(ge: int, s: int, t: int) -> torch.Tensor:
            return inputs[s].x[t].float() * 2.0 ** (ge % 3)

        _close(want, ref_low_latency_combine(mine, rank, num_experts, world, y_of), torch.bfloat16,
               "eager weighted low-latency combine")

        def step(xs: torch.Tensor, ids: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
            o = ops.low_latency_dispatch(bid, xs, ids, use_fp8=False, use_custom_ops=True, topk_weights=ws)
            return ops.low_latency_combine(bid, expert(o.x), ids, ws, o.handle)[0]

        assert torch.equal(step(x, idx, w), want), "custom-op path differs from the eager calls"
        # without weights (SPEC's default call): the op's Python function takes the schema's defaults (the
        # dispatcher drops trailing arguments equal to them), eager and compiled
        d0 = buf.low_latency_dispatch(x, idx, use_fp8=False)
        want0 = buf.low_latency_combine(expert(d0.x), idx, w, d0.handle).x

        def plain(xs: torch.Tensor, ids: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
            o = ops.low_latency_dispatch(bid, xs, ids, use_fp8=False, use_custom_ops=True)
            return ops.low_latency_combine(bid, expert(o.x), ids, ws, o.handle)[0]

        assert torch.equal(plain(x, idx, w), want0), "custom-op path without weights differs from the eager calls"
        compiled0 = torch.compile(plain, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled0(x, idx, w), want0), "compiled custom-op path without weights differs"
        o = ops.low_latency_dispatch(bid, x, idx, use_fp8=False, use_custom_ops=True, topk_weights=w)
        try:
            ops.low_latency_combine(bid, expert(o.x), idx, w.clone(), o.handle)
        except ArgumentError as exc:
            assert "topk_weights" in str(exc), str(exc)
        else:
            raise AssertionError("a combine given a copy of the dispatch's weights was accepted")
        try:
            ops.low_latency_combine(bid, expert(o.x), idx.clone(), w, o.handle)
        except ArgumentError as exc:
            assert "'topk_idx' is not the tensor given" in str(exc), str(exc)
        else:
            raise AssertionError("a combine given a copy of the weighted dispatch's ids was accepted")
        got = ops.low_latency_combine(bid, expert(o.x), idx, w, o.handle)[0]
        assert torch.equal(got, want), "the corrected combine after a refused one differs"
        o = ops.low_latency_dispatch(bid, x, idx, use_fp8=False, use_custom_ops=True, topk_weights=w)
        got = ops.low_latency_combine(bid, expert(o.x), idx, w.view(w.shape), o.handle)[0]
        assert torch.equal(got, want), "a combine given a view of the dispatch's weights differs"
        w2 = w.clone()
        o = ops.low_latency_dispatch(bid, x, idx, use_fp8=False, use_custom_ops=True, topk_weights=w2)
        w2.mul_(2)
        try:
            ops.low_latency_combine(bid, expert(o.x), idx, w2, o.handle)
        except ArgumentError as exc:
            assert "changed in place" in str(exc), str(exc)
        else:
            raise AssertionError("a combine given weights changed in place since the dispatch was accepted")
        assert ops.live_handles(bid) == 1 and ops.release_handles(bid) == 1

        # other weights at the combine, computed from the dispatch's after it (Inductor may reuse their memory)
        d3 = buf.low_latency_dispatch(x, idx, use_fp8=False, topk_weights=w * 3)
        want3 = buf.low_latency_combine(expert(d3.x), idx, d3.handle.weights, d3.handle).x

        def swap(xs: torch.Tensor, ids: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
            wa = ws * 3
            o = ops.low_latency_dispatch(bid, xs, ids, use_fp8=False, use_custom_ops=True, topk_weights=wa)
            wb = wa * 2 + o.num_tokens_per_expert.sum().float() * 0
            return ops.low_latency_combine(bid, expert(o.x), ids, wb, o.handle)[0]

        for how in ("aot_eager", "inductor"):
            torch._dynamo.reset()
            compiled = torch.compile(step, backend=how, fullgraph=True)
            assert torch.equal(compiled(x, idx, w), want), f"compiled ({how}) custom-op path differs from eager"
            torch._dynamo.reset()
            try:
                got = torch.compile(swap, backend=how, fullgraph=True)(x, idx, w)
            except ArgumentError as exc:
                assert "topk_weights" in str(exc), str(exc)
                ops.release_handles(bid)
            else:
                assert torch.equal(got, want3), f"compiled ({how}): a combine applied weights other than the dispatch's"
        torch._dynamo.reset()
        assert ops.live_handles(bid) == 0, f"{ops.live_handles(bid)} handles left in the registry"
    finally:
        buf.destroy()


def rounds_match_one_round(
    rank: int, world: int, backend: str, tokens: list[int], hidden: int, num_experts: int, num_topk: int,
    dtype_name: str, use_fp8: bool, tokens_per_round: int, seed: int, ranks_per_node: int | None = None,
) -> dict[str, Any]:
    """A Buffer in rounds (tokens_per_round) against one without, on the same inputs: dispatch outputs (fresh and
    cached), counts and combine outputs equal bit for bit (the same rows, summed in the same order); and the
    refusals that rounds add (num_worst_tokens, tokens_per_round out of range or with low_latency)."""
    dtype = getattr(torch, dtype_name)
    dev = device_for(backend)
    mine = make_inputs(seed, rank, tokens[rank], hidden, num_experts, num_topk, dtype)
    m = max(max(tokens), 1)
    kw = dict(hidden=hidden, num_experts=num_experts, num_topk=num_topk, max_tokens_per_rank=m, backend=backend,
              ranks_per_node=ranks_per_node)
    for bad, why in ((m + 1, "must be <= "), (0, "must be >= 1")):
        try:
            largeep.Buffer(None, **kw, tokens_per_round=bad)  # type: ignore[arg-type]
            raise AssertionError(f"tokens_per_round={bad} was accepted")
        except largeep.ArgumentError as exc:
            assert "tokens_per_round" in str(exc) and why in str(exc), str(exc)
    try:
        largeep.Buffer(None, **kw, low_latency=True, tokens_per_round=1)  # type: ignore[arg-type]
        raise AssertionError("tokens_per_round with low_latency was accepted")
    except largeep.ArgumentError as exc:
        assert "normal mode only" in str(exc), str(exc)
    one = largeep.Buffer(None, **kw)  # type: ignore[arg-type]
    rounds = largeep.Buffer(None, **kw, tokens_per_round=tokens_per_round)  # type: ignore[arg-type]
    try:
        assert rounds.num_rounds == -(-m // tokens_per_round) and one.num_rounds == 1
        idx, w = mine.topk_idx.to(dev), mine.topk_weights.to(dev)
        if use_fp8:
            q, s = fp8.quantize(mine.x.float())
            x_in: Any = (q.to(dev), s.to(dev))
        else:
            x_in = mine.x.to(dev)
        try:
            rounds.dispatch(x_in, idx, w, num_worst_tokens=world * m)
            raise AssertionError("num_worst_tokens with rounds was accepted")
        except largeep.ArgumentError as exc:
            assert "num_worst_tokens" in str(exc) and "tokens_per_round" in str(exc), str(exc)
        a = one.dispatch(x_in, idx, w, expert_alignment=3)
        b = rounds.dispatch(x_in, idx, w, expert_alignment=3)

        def same(p: Any, q: Any, what: str) -> None:
            if isinstance(p, tuple):
                same(p[0].view(torch.uint8), q[0].view(torch.uint8), what + " (e4m3)")
                same(p[1], q[1], what + " (scales)")
                return
            assert p.shape == q.shape and p.dtype == q.dtype, f"{what}: {p.shape} {p.dtype} vs {q.shape} {q.dtype}"
            assert torch.equal(p.cpu(), q.cpu()), f"{what} differs"

        same(a.x, b.x, "dispatch x")
        same(a.topk_idx, b.topk_idx, "dispatch topk_idx")
        same(a.topk_weights, b.topk_weights, "dispatch topk_weights")
        assert a.num_tokens_per_expert == b.num_tokens_per_expert, (a.num_tokens_per_expert, b.num_tokens_per_expert)
        same(a.num_tokens_per_expert_tensor, b.num_tokens_per_expert_tensor, "num_tokens_per_expert_tensor")
        assert a.handle.num_recv_tokens == b.handle.num_recv_tokens
        rows = a.handle.num_recv_tokens
        g = torch.Generator().manual_seed(seed + rank)
        if not use_fp8:  # cached, new data
            x2 = torch.randn(tokens[rank], hidden, generator=g).to(dtype).to(dev)
            same(one.dispatch(x2, handle=a.handle).x, rounds.dispatch(x2, handle=b.handle).x, "cached dispatch")
        y = torch.randn(rows, hidden, generator=g).to(dtype).to(dev)
        ca, cb = one.combine(y, a.handle, topk_weights=a.topk_weights), rounds.combine(y, b.handle,
                                                                                     topk_weights=b.topk_weights)
        same(ca.x, cb.x, "combine x")
        same(ca.topk_weights, cb.topk_weights, "combine topk_weights")
        same(one.combine(y, a.handle).x, rounds.combine(y, b.handle).x, "combine x without weights")
        # a bad id in rank 0's last round (when it has tokens there): every rank raises in that round, the error
        # says which, and the Buffer takes the next call
        if tokens[0] and rounds.num_rounds > 1:
            bad = idx.clone()
            if rank == 0:
                bad[-1, 0] = num_experts
            try:
                rounds.dispatch(x_in, bad, w)
                raise AssertionError("a bad id in the last round was accepted")
            except (largeep.ArgumentError, largeep.PeerRefusedError) as exc:
                want = largeep.ArgumentError if rank == 0 else largeep.PeerRefusedError
                assert type(exc) is want and f"of {rounds.num_rounds} (tokens_per_round)" in str(exc), repr(exc)
            again = rounds.dispatch(x_in, idx, w, expert_alignment=3)
            same(a.x, again.x, "dispatch after a refused one")
        # every token to rank 0's experts: the other ranks receive no rows, and combine an empty y of any strides
        # (as the gradient of a sum is: a scalar expanded, strides (0, 0))
        to0 = torch.where(idx >= 0, idx % (num_experts // world), idx)
        a0, b0 = one.dispatch(x_in, to0, w), rounds.dispatch(x_in, to0, w)
        rows0 = a0.handle.num_recv_tokens
        assert rows0 == b0.handle.num_recv_tokens and (rank == 0 or rows0 == 0), (rank, rows0)
        y0 = torch.randn(rows0, hidden, generator=g).to(dtype).to(dev) if rows0 else \
            torch.zeros((), dtype=dtype, device=dev).expand(0, hidden)
        same(one.combine(y0, a0.handle).x, rounds.combine(y0, b0.handle).x, "combine of an empty or full y")
        return {"rows": rows}
    finally:
        rounds.destroy()
        one.destroy()


def sweep_keeps_records_of_a_failed_backend(rank: int, world: int, part: str) -> dict[str, int]:
    """A benchmark backend that fails at its second size point: the sweep raises, and the part file holds the
    records of the points before (the launcher says "its results so far are kept")."""
    import json

    from largeep.bench import adapters, sweep

    class FailsAtSixteen(adapters.LargeepAdapter):
        def dispatch(self, *args: Any, **kwargs: Any) -> Any:
            if args[1].shape[0] == 16:
                raise RuntimeError("injected: the second size point fails")
            return super().dispatch(*args, **kwargs)

    real = sweep.make_adapter
    sweep.make_adapter = lambda name: FailsAtSixteen("torch")
    try:
        mp = sweep.ModePlan(tokens=[8, 16], hidden=[128], topk=[2], experts=[4 * world], dtypes=["bf16"])
        plan = sweep.Plan(preset="quick", backends=["torch"], modes=["normal"], normal=mp, low_latency=mp,
                          num_sms=[24], warmup=0, iters=2, part=part, plots=False)
        s = sweep.Sweep(plan, torch.device("cpu"))
        try:
            s.run()
        except RuntimeError as exc:
            assert "injected" in str(exc), str(exc)
        else:
            raise AssertionError("the failing backend did not raise")
    finally:
        sweep.make_adapter = real
    if rank != 0:
        return {"in_memory": len(s.records), "in_file": -1}
    with open(part) as f:
        doc = json.load(f)
    return {"in_memory": len(s.records), "in_file": len(doc["records"])}


def low_latency_fp8_not_finite(rank: int, world: int, backend: str, round_scale: bool) -> None:
    """A low-latency FP8 dispatch of tokens holding NaN or an infinity: that group's scale is NaN (NaN) or infinite
    (an infinity) and all its values dequantise to NaN, never to a finite number; the token's other groups and the
    finite tokens (one of bf16 values far past 448) are SPEC's rows (fp8_check). Every rank sends the same 5 tokens
    to experts 0 and E - 1."""
    hidden, experts = 384, 2 * world
    dev = device_for(backend)
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=2, max_tokens_per_rank=8,
                         backend=backend, low_latency=True)
    try:
        g = torch.Generator().manual_seed(7)
        x = torch.randn(5, hidden, generator=g)
        x[0, 5] = float("nan")  # group 0 of token 0
        x[1, 200] = float("inf")  # group 1 of token 1
        x[2, 300] = -float("inf")  # group 2 of token 2
        x[3, 130] = 1e30  # token 3: finite, far past the e4m3 range
        x = x.to(torch.bfloat16)
        bad = {(0, 0): "nan", (1, 1): "inf", (2, 2): "inf"}
        idx = torch.tensor([[0, experts - 1]] * 5)
        res = buf.low_latency_dispatch(x.to(dev), idx.to(dev), use_fp8=True, round_scale=round_scale)
        q, s = (t.cpu() for t in res.x)
        counts = res.num_tokens_per_expert.cpu().tolist()
        info = res.src_info.cpu()
        mine = [e for e in (0, experts - 1) if e // 2 == rank]
        for e in mine:
            le = e % 2
            assert counts[le] == 5 * world, f"expert {e}: counts {counts}"
            for j in range(counts[le]):
                t = int(info[le, j, 1])
                for grp in range(hidden // 128):
                    cols = slice(128 * grp, 128 * (grp + 1))
                    sc = float(s[le, j, grp])
                    deq = q[le, j, cols].float() * sc
                    kind = bad.get((t, grp))
                    if kind == "nan":
                        assert sc != sc and bool(deq.isnan().all()), f"token {t} group {grp}: scale {sc}"
                    elif kind == "inf":
                        assert sc == float("inf") and bool(deq.isnan().all()), f"token {t} group {grp}: scale {sc}"
                    else:
                        why = fp8_check(q[le, j, cols], s[le, j, grp:grp + 1], x[t, cols], round_scale)
                        assert why is None, f"token {t} group {grp}: {why}"
    finally:
        buf.destroy()


def low_latency_skipped_not_finite(rank: int, world: int, backend: str, mode: str = "plain") -> None:
    """A low-latency combine leaves out the k it skips, whatever their values. Every rank sends 3 tokens to experts 0
    and E - 1 (token 2 to expert 0 twice); expert E - 1's output rows are 1.
    mode "plain": expert 0's rows are inf for token 0 of every source, 2 otherwise. The combine masks token 0's
    expert 0 (its inf row) and names expert 0 with an inf weight at token 1's k=0, which the dispatch left at -1:
    neither adds anything (never 0 x inf = NaN); token 2's repeated expert adds each weight times its row.
    mode "weights" / "partial" (the dispatch sends the weights; "partial": bf16_partial_sums): expert 0's rows are
    inf for token 2, 2 otherwise; token 2's sum is inf (the kernels' split of a sum in two bf16 rows leaves the
    remainder 0 where the rounding is infinite, not inf - inf), the others finite and exact."""
    hidden, experts = 128, 2 * world
    dev = device_for(backend)
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=2, max_tokens_per_rank=4,
                         backend=backend, low_latency=True)
    try:
        last = experts - 1
        idx = torch.tensor([[0, last], [-1, last], [0, 0]])
        w = torch.tensor([[0.5, 0.25], [0.5, 0.25], [0.5, 0.125]])
        x = torch.ones(3, hidden, dtype=torch.bfloat16)
        sent = mode != "plain"
        idxd, wd = idx.to(dev), w.to(dev)  # (a combine after a dispatch given weights takes those very tensors)
        res = buf.low_latency_dispatch(x.to(dev), idxd, use_fp8=False, topk_weights=wd if sent else None,
                                       bf16_partial_sums=mode == "partial")
        y = torch.ones_like(res.x)
        if rank == 0:  # expert 0 (local 0)
            tok = res.src_info[0, :, 1]
            y[0] = torch.where((tok == (2 if sent else 0)).unsqueeze(1), float("inf"), 2.0).to(y.dtype)
        if sent:
            out = buf.low_latency_combine(y, idxd, wd, res.handle).x.float().cpu()
            assert torch.equal(out[:2], torch.tensor([[2.0 * 0.5 + 0.25], [0.25]]).expand(2, hidden)), out[:, :4]
            assert bool((out[2] == float("inf")).all()), out[2, :4]
            return
        idx_c = torch.tensor([[-1, last], [0, last], [0, 0]])
        w_c = torch.tensor([[0.5, 0.25], [float("inf"), 0.25], [0.5, 0.125]])
        out = buf.low_latency_combine(y, idx_c.to(dev), w_c.to(dev), res.handle).x.float().cpu()
        want = torch.tensor([0.25, 0.25, 2.0 * (0.5 + 0.125)])
        assert torch.equal(out, want.unsqueeze(1).expand(3, hidden)), (out[:, :4], want)
    finally:
        buf.destroy()


def no_autograd(rank: int, world: int, hook: bool) -> None:
    """Buffer calls record no autograd on any backend (largeep.ops holds it): given inputs that require grad, every
    output has none, an ``out`` given to low_latency_combine stays a leaf, and the results are the bits of the same
    calls on detached inputs. ``hook``: the low-latency calls complete through their receive hooks."""
    hidden, experts, topk, m = 128, 4 * world, 3, 6
    inputs = [make_inputs(71, r, m - r, hidden, experts, topk, torch.bfloat16, distinct=False) for r in range(world)]
    me = inputs[rank]
    x, w = me.x.clone().requires_grad_(True), me.topk_weights.clone().requires_grad_(True)
    ll = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=m,
                        backend="torch", low_latency=True)
    try:
        got = []
        for grad in (True, False):
            xs, ws = (x, w) if grad else (x.detach(), w.detach())
            for sent in (None, ws):  # the weights sent with the dispatch, or given to the combine only
                d = ll.low_latency_dispatch(xs, me.topk_idx, use_fp8=False, return_recv_hook=hook, topk_weights=sent)
                if hook:
                    d.hook()
                assert not d.x.requires_grad and d.x.grad_fn is None, "low_latency_dispatch x has autograd"
                y = (d.x.float() * 1.5).to(torch.bfloat16).requires_grad_(grad)
                out = torch.full((me.x.shape[0], hidden), float("nan"), dtype=torch.bfloat16)
                c = ll.low_latency_combine(y, me.topk_idx, ws, d.handle, out=out, return_recv_hook=hook)
                if hook:
                    c.hook()
                assert c.x is out and out.is_leaf and out.grad_fn is None and not out.requires_grad, \
                    f"low_latency_combine (weights sent: {sent is not None}): out={out.grad_fn}, {out.requires_grad}"
                got.append(out)
        for a, b in zip(got[:2], got[2:], strict=True):
            assert torch.equal(a, b), "low_latency_combine: other bits with inputs that require grad"
    finally:
        ll.destroy()
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=m,
                         backend="torch")
    try:
        d = buf.dispatch(x, me.topk_idx, w)
        c = buf.combine(d.x.detach().requires_grad_(True), d.handle, topk_weights=d.topk_weights.requires_grad_(True))
        for name, t in (("dispatch x", d.x), ("combine x", c.x), ("combine topk_weights", c.topk_weights)):
            assert t is not None and t.grad_fn is None, f"{name} has autograd ({t.grad_fn})"
    finally:
        buf.destroy()


def hooks_across_inference_mode(rank: int, world: int) -> None:
    """A low-latency call made under torch.inference_mode whose receive hook is called outside it, and the reverse:
    the hook completes the receive (as the native one does, whatever the mode) with the bits of the same calls
    without hooks, and the Buffer stays usable."""
    hidden, experts, topk, m = 128, 4 * world, 2, 6
    me = make_inputs(83, rank, m - rank, hidden, experts, topk, torch.bfloat16)
    ll = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=m,
                        backend="torch", low_latency=True)
    try:
        d0 = ll.low_latency_dispatch(me.x, me.topk_idx, use_fp8=False)
        y = (d0.x.float() * 0.75).to(torch.bfloat16)
        c0 = ll.low_latency_combine(y, me.topk_idx, me.topk_weights, d0.handle)
        for call_in in (True, False):
            with torch.inference_mode(call_in):
                d = ll.low_latency_dispatch(me.x, me.topk_idx, use_fp8=False, return_recv_hook=True)
            with torch.inference_mode(not call_in):
                d.hook()
            counts = d.num_tokens_per_expert.tolist()
            assert counts == d0.num_tokens_per_expert.tolist(), f"counts (call in inference mode: {call_in})"
            for e, n in enumerate(counts):
                assert torch.equal(d.x[e, :n], d0.x[e, :n]) and torch.equal(d.src_info[e, :n], d0.src_info[e, :n]), \
                    f"expert {e}: rows (call in inference mode: {call_in})"
            with torch.inference_mode(call_in):
                c = ll.low_latency_combine(y, me.topk_idx, me.topk_weights, d.handle, return_recv_hook=True)
            with torch.inference_mode(not call_in):
                c.hook()
            assert torch.equal(c.x, c0.x), f"combine (call in inference mode: {call_in})"
    finally:
        ll.destroy()


def events_on_cpu(rank: int, world: int) -> None:
    """async_finish and previous_event on CPU groups: every call returns an EventOverlap whose methods do nothing
    there, and gives the same bits as the call without them (normal dispatch and combine, low-latency both)."""
    hidden, experts, topk, m = 256, 4 * world, 2, 9
    inputs = [make_inputs(61, r, m - 2 * r, hidden, experts, topk, torch.bfloat16) for r in range(world)]
    me = inputs[rank]
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=m,
                         backend="torch")
    try:
        plain = buf.dispatch(me.x, me.topk_idx, me.topk_weights)
        d = buf.dispatch(me.x, me.topk_idx, me.topk_weights, async_finish=True, previous_event=plain.event)
        assert isinstance(d.event, largeep.EventOverlap) and isinstance(plain.event, largeep.EventOverlap)
        d.event.current_stream_wait()
        d.event.synchronize()
        ref = ref_dispatch(inputs, rank, experts)
        assert torch.equal(d.x, ref.x) and torch.equal(d.topk_idx, ref.topk_idx), "async dispatch rows"
        c0 = buf.combine(d.x, d.handle, topk_weights=d.topk_weights)
        c1 = buf.combine(d.x, d.handle, topk_weights=d.topk_weights, previous_event=d.event, async_finish=True)
        c1.event.current_stream_wait()
        assert torch.equal(c0.x, c1.x) and torch.equal(c0.topk_weights, c1.topk_weights), "async combine"
    finally:
        buf.destroy()
    ll = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=m,
                        backend="torch", low_latency=True)
    try:
        r0 = ll.low_latency_dispatch(me.x, me.topk_idx, use_fp8=False)
        r1 = ll.low_latency_dispatch(me.x, me.topk_idx, use_fp8=False, async_finish=True)
        assert isinstance(r1.event, largeep.EventOverlap)
        r1.event.current_stream_wait()
        counts = r0.num_tokens_per_expert.tolist()
        assert counts == r1.num_tokens_per_expert.tolist()
        for e, n in enumerate(counts):
            assert torch.equal(r0.x[e, :n], r1.x[e, :n]) and torch.equal(r0.src_info[e, :n], r1.src_info[e, :n])
        y = r1.x.clone()
        o0 = ll.low_latency_combine(y, me.topk_idx, me.topk_weights, r0.handle)
        o1 = ll.low_latency_combine(y, me.topk_idx, me.topk_weights, r1.handle, async_finish=True)
        o1.event.current_stream_wait()
        assert torch.equal(o0.x, o1.x), "async low-latency combine"
    finally:
        ll.destroy()
