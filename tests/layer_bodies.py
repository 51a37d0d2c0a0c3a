"""Bodies for test_ops.py and test_layers.py, run on every rank of a pool: ``fn(rank, world, *args)``.

Every rank draws every rank's inputs and the global weights from shared seeds, so each can compute a single-process
dense reference (every expert, every rank's tokens, float64) without talking to anyone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import largeep
import torch
import torch._dynamo
import torch.distributed as dist
import torch.nn.functional as F
from bodies import device_for
from checked_calls import same_bits
from largeep import layers, ops
from reference import fp8_round_trip, make_inputs, ref_dispatch


def _gen(*key: int) -> torch.Generator:
    s = 0
    for k in key:
        s = s * 1000003 + k
    return torch.Generator().manual_seed(s % (2**62))


def close(out: Any, ref: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    """|out - ref| <= rtol * (|ref| + max|ref|): relative to each value and to the tensor's scale."""
    assert isinstance(out, torch.Tensor), f"{what}: got {type(out).__name__}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, f"{what}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    if ref64.numel() == 0:
        return
    err = (out64 - ref64).abs()
    bound = rtol * (ref64.abs() + ref64.abs().max()) + 1e-12
    worst = (err / bound).max().item()
    scale = ref64.abs().max().item()
    assert worst <= 1.0, f"{what}: max error {err.max().item():.3g} (scale {scale:.3g}), x{worst:.3g}"


def _allsum(t: Any) -> torch.Tensor:
    assert isinstance(t, torch.Tensor)
    t = t.detach().clone()
    dist.all_reduce(t)
    return t

def check_shared_grads(layer: Any, ref: dict[str, Any], what: str) -> None:
    """The shared experts' grads, summed over ranks, against the dense reference's."""
    if layer.shared_experts is not None:
        for name, key in (("w1", "s1"), ("w3", "s3"), ("w2", "s2")):
            got = _allsum(getattr(layer.shared_experts, name).grad)
            close(got, ref["grads"][key], f"{what}: grad of shared {name}")


def expert_grad(ex: Any, name: str) -> torch.Tensor | None:
    """The grad of GroupedExperts' w1, w3 (halves of w13's grad) or w2; b1, b3 (halves of b13's) or b2."""
    if name in ("w2", "b2"):
        return getattr(ex, name).grad  # type: ignore[no-any-return]
    g = ex.w13.grad if name[0] == "w" else ex.b13.grad
    if g is None:
        return None
    f = ex.ffn_hidden
    return g[..., :f] if name[1] == "1" else g[..., f:]  # type: ignore[no-any-return]


def local_logical_experts(phys_to_log: torch.Tensor | None, ep_rank: int, epr: int) -> torch.Tensor:
    """The logical expert of each of this rank's physical experts (itself without replicas)."""
    if phys_to_log is not None:
        return phys_to_log[ep_rank * epr : (ep_rank + 1) * epr]
    return torch.arange(ep_rank * epr, (ep_rank + 1) * epr)


def finish_variant(results: list[list[Any]], layer: Any, out: torch.Tensor, x: torch.Tensor, ref: dict[str, Any],
                   what: str) -> None:
    """The checks every variant of a training body ends with (shared experts' grads, no handle left alive), then
    its outputs and grads kept for compare_variants."""
    check_shared_grads(layer, ref, what)
    results.append([out.detach(), x.grad] + [p.grad for p in layer.parameters()])
    assert ops.live_handles(layer.buffer_id) == 0


def compare_variants(variants: list[Any], results: list[list[Any]]) -> None:
    """Every variant's outputs and grads equal the first variant's (to float32 reordering)."""
    for kw, res in zip(variants[1:], results[1:], strict=True):
        for a, b in zip(results[0], res, strict=True):
            close(b, a, f"{variants[0]} vs {kw}", rtol=2e-6)

def compiled_equals_eager(model: torch.nn.Module, x: torch.Tensor, what: str, backend: str = "aot_eager") -> None:
    """torch.compile(model, fullgraph, backend) gives eager's output, x grad and parameter grads, twice (the second
    call reuses the compiled graphs); loss = sum(y * y)."""

    def run(fn: Any) -> list[torch.Tensor]:
        x.grad = None
        model.zero_grad()
        y = fn(x)
        (y * y).sum().backward()
        return [y.detach(), x.grad] + [p.grad for p in model.parameters()]

    eager = run(model)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for _ in range(2):
        for i, (a, b) in enumerate(zip(run(compiled), eager, strict=True)):
            close(a, b, f"{what}compiled vs eager, tensor {i}", rtol=1e-6)




# ---------------------------------------------------------------------------------------------------------------
# ops: dispatch / combine autograd against the loop reference
# ---------------------------------------------------------------------------------------------------------------


def ops_returned_idx_changed(rank: int, world: int) -> dict[str, Any]:
    """A caller who changes the topk_idx a dispatch returned in place (here clamp_, as to index per-expert tensors)
    gets the same gradients on both paths (their backwards keep masks of their own, made by the dispatch; with and
    without num_worst_tokens, whose rows past the received count get no gradient). A dispatch made without grad mode
    keeps the returned tensor instead: a combine's backward through it (y needs a gradient of its own) reads it, and
    raises a RuntimeError saying so if it was changed, instead of giving wrong gradients. And a raised
    max_live_handles stays when MoELayer or the ops register the Buffer again."""
    hidden, experts, topk = 8, 2 * world, 2
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=4,
                         backend="torch")
    try:
        g = torch.Generator().manual_seed(5 + rank)
        idx = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(3)])
        idx[2, 1] = -1
        x0, w0 = torch.randn(3, hidden, generator=g), torch.rand(3, topk, generator=g)
        for custom in (False, True):
            for worst in (0, 16):
                grads = []
                for change in (False, True):
                    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
                    p = torch.linspace(0.5, 1.5, hidden).requires_grad_()
                    d = ops.dispatch(buf, x, idx, w, num_worst_tokens=worst, use_custom_ops=custom)
                    if change:
                        d.topk_idx.clamp_(min=0)
                    rx = torch.nan_to_num(d.x)  # (rows past the received count are unspecified)
                    c = ops.combine(buf, rx * p, d.handle)
                    loss = c.x.square().sum() + (d.topk_weights * 3.0).sum()
                    loss.backward()
                    grads.append([x.grad, w.grad, p.grad])
                for name, a, b in zip(("x", "topk_weights", "expert"), *grads, strict=True):
                    assert torch.equal(a, b), f"custom={custom} worst={worst}: {name} grad changed with topk_idx"
        # eager, the dispatch without grad mode: the combine's backward reads the returned ids (rows past the
        # received count, num_worst_tokens), unchanged or refused
        for change in (False, True):
            with torch.no_grad():
                d = ops.dispatch(buf, x0, idx, w0, num_worst_tokens=16)
            assert isinstance(d.handle, ops.OpHandle) and d.handle.recv_valid is None
            if change:
                d.topk_idx.clamp_(min=0)
            p = torch.linspace(0.5, 1.5, hidden).requires_grad_()
            c = ops.combine(buf, torch.nan_to_num(d.x) * p, d.handle)
            if not change:
                c.x.sum().backward()
                # each received row's (past the received count: none) -- a mask off by one id would drop some
                rows = torch.nan_to_num(d.x)[(d.topk_idx >= 0).any(dim=1)]
                assert p.grad is not None and torch.allclose(p.grad, rows.sum(0), rtol=1e-5, atol=1e-6), p.grad
                continue
            try:
                c.x.sum().backward()
                raise AssertionError("a backward through a no-grad dispatch took a changed topk_idx")
            except RuntimeError as exc:
                assert "changed in place" in str(exc), exc
        bid = ops.register_buffer(buf, max_live_handles=1000)
        layers.MoELayer(buf, ffn_hidden=4, dtype=torch.float32)
        assert ops.register_buffer(buf) == bid and ops._REG.limits[bid] == 1000, ops._REG.limits[bid]
        ops.release_handles(bid)
    finally:
        buf.destroy()
    return {}


def ops_autograd(
    rank: int, world: int, tokens: list[int], hidden: int, num_experts: int, num_topk: int, num_worst: int,
    use_custom_ops: bool, seed: int, use_fp8: bool = False, dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Grads of dispatch (x, topk_weights) and combine (y) against the loop reference, float32 (or ``dtype``).
    ``use_fp8``: the received x must be each row's FP8 round trip (the plain-torch reference), bit for bit, and the
    grads as without FP8 (the quantisation passes the gradient straight through)."""
    inputs = [make_inputs(seed, r, tokens[r], hidden, num_experts, num_topk, dtype) for r in range(world)]
    sent = [replace(i, x=fp8_round_trip(i.x)) for i in inputs] if use_fp8 else inputs
    refs = [ref_dispatch(sent, r, num_experts) for r in range(world)]
    rows = [len(d.src) for d in refs]
    # cotangents of each rank's received x and weights, and of each rank's combined output
    ax = [torch.randn(rows[r], hidden, generator=_gen(seed, 1, r)) for r in range(world)]
    aw = [torch.randn(rows[r], num_topk, generator=_gen(seed, 2, r)) for r in range(world)]
    gc = [torch.randn(tokens[r], hidden, generator=_gen(seed, 3, r)) for r in range(world)]
    mine = inputs[rank]
    buf = largeep.Buffer(
        None, hidden=hidden, num_experts=num_experts, num_topk=num_topk, max_tokens_per_rank=max(max(tokens), 1),
        backend="torch",
    )
    try:
        bid = ops.register_buffer(buf)
        x = mine.x.clone().requires_grad_()
        w = mine.topk_weights.clone().requires_grad_()
        sent_kinds: list[Any] = []  # what reached the Buffer: an FP8 pair with use_fp8, never rows quantised back
        plain = buf.dispatch

        def spy(x: Any, *args: Any, **kwargs: Any) -> Any:
            sent_kinds.append(tuple(t.dtype for t in x) if isinstance(x, tuple) else x.dtype)
            return plain(x, *args, **kwargs)

        buf.dispatch = spy  # type: ignore[method-assign]
        d = ops.dispatch(bid, x, mine.topk_idx, w, num_worst_tokens=num_worst, use_custom_ops=use_custom_ops,
                         use_fp8=use_fp8)
        assert sent_kinds == [(torch.float8_e4m3fn, torch.float32) if use_fp8 else dtype], sent_kinds
        r_rows = rows[rank]
        out_rows = num_worst or r_rows
        assert d.x.shape == (out_rows, hidden) and d.topk_weights.shape == (out_rows, num_topk)
        assert d.x.dtype == dtype, d.x.dtype
        assert torch.equal(d.x[:r_rows].detach(), refs[rank].x)
        assert torch.equal(d.topk_idx[:r_rows], refs[rank].topk_idx)
        # the tail of a worst-size dispatch gets a poisoned (NaN) cotangent: it must not reach x or the weights
        tail_x = torch.full((out_rows - r_rows, hidden), float("nan"))
        tail_w = torch.full((out_rows - r_rows, num_topk), float("nan"))
        ax_mine = torch.cat([ax[rank], tail_x]) if num_worst else ax[rank]
        aw_mine = torch.cat([aw[rank], tail_w]) if num_worst else aw[rank]
        # combine of an independent y through the same handle; one backward for both (either may run first)
        y = torch.randn(out_rows, hidden, generator=_gen(seed, 4, rank)).to(dtype).requires_grad_()
        c = ops.combine(bid, y, d.handle)
        assert c.x.shape == (tokens[rank], hidden)
        loss = (d.x * ax_mine).sum() + (d.topk_weights * aw_mine).sum() + (c.x * gc[rank]).sum()
        loss.backward()
        want_gx = torch.zeros(tokens[rank], hidden, dtype=torch.float64)
        want_gw = torch.zeros(tokens[rank], num_topk, dtype=torch.float64)
        for r, ref in enumerate(refs):
            for row, (s, t) in enumerate(ref.src):
                if s == rank:
                    want_gx[t] += ax[r][row].double()
                    want_gw[t] += torch.where(ref.topk_idx[row] >= 0, aw[r][row].double(), 0.0)
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # (bf16: the cotangents rounded, the sums in bf16)
        close(x.grad, want_gx, "dispatch: grad of x", tol)
        close(w.grad, want_gw, "dispatch: grad of topk_weights")
        # combine backward: grad of y row (s, t) = cotangent of token t on s
        assert y.grad is not None
        want_gy = torch.zeros(out_rows, hidden)
        for row, (s, t) in enumerate(refs[rank].src):
            want_gy[row] = gc[s][t]
        # (a permutation of the cotangents, each rounded once to y's dtype: exact, not within a tolerance)
        assert y.grad.dtype == dtype and torch.equal(y.grad, want_gy.to(dtype)), "combine: grad of y"
        if num_worst:
            assert (y.grad[r_rows:] == 0).all(), "combine: rows past the received count must get a zero grad"
        if use_custom_ops:
            assert ops.live_handles(bid) == 0, "handles must be released after backward"
        return {"rows": r_rows}
    finally:
        buf.destroy()


def ops_registry_errors(rank: int, world: int) -> None:
    """A released or evicted handle raises; register_buffer is idempotent; no-grad combine releases."""
    buf = largeep.Buffer(None, hidden=64, num_experts=2 * world, num_topk=2, max_tokens_per_rank=8, backend="torch")
    try:
        bid = ops.register_buffer(buf, max_live_handles=2)
        assert ops.register_buffer(buf, max_live_handles=2) == bid
        x = torch.randn(5, 64, generator=_gen(7, rank))
        idx = torch.tensor([[0, 1]] * 5, dtype=torch.int64)
        w = torch.rand(5, 2, generator=_gen(8, rank))
        with torch.no_grad():
            d = ops.dispatch(bid, x, idx, w, use_custom_ops=True)
            ops.combine(bid, d.x, d.handle)
        assert ops.live_handles(bid) == 0
        handles = [ops.dispatch(bid, x, idx, w, use_custom_ops=True).handle for _ in range(3)]
        assert ops.live_handles(bid) == 2
        try:
            ops.combine(bid, torch.zeros(5, 64), handles[0])
        except RuntimeError as exc:
            assert "evicted" in str(exc) and "max_live_handles" in str(exc)
        else:
            raise AssertionError("an evicted handle must raise")
        assert ops.release_handles(bid) == 2 and ops.live_handles(bid) == 0
    finally:
        buf.destroy()


# ---------------------------------------------------------------------------------------------------------------
# layers: the MoE layer against a dense single-process reference
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GlobalModel:
    gate: torch.Tensor  # [L, H]
    w1: torch.Tensor  # [L, H, F]
    w3: torch.Tensor
    w2: torch.Tensor  # [L, F, H]
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # [H, Fs], [H, Fs], [Fs, H]
    xs: list[torch.Tensor]  # per rank [T_r, H]
    gs: list[torch.Tensor]  # per rank cotangent of the output [T_r, H]
    biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # the experts' b1, b3 [L, F], b2 [L, H]
    activation: Any = "silu"  # the experts' (MoELayer's expert_activation)


# GPT-OSS-style experts in the tests: biases and the clamped activation, with a limit low enough that the clamps
# bite on a good share of the (unit-scale) projections
GPT_OSS_TEST_ACTIVATION = layers.ClampedSwiGLU(alpha=1.702, limit=0.9)


def _act(h1: torch.Tensor, h3: torch.Tensor, activation: Any) -> torch.Tensor:
    """The experts' activation, written out (the reference's; ``activation``: "silu" or a ClampedSwiGLU)."""
    if activation == "silu":
        return F.silu(h1) * h3
    g = torch.minimum(h1, torch.full_like(h1, activation.limit))
    u = torch.maximum(torch.minimum(h3, torch.full_like(h3, activation.limit)), torch.full_like(h3, -activation.limit))
    return (u + 1.0) * g / (1.0 + torch.exp(-activation.alpha * g))


def make_global(seed: int, tokens: list[int], hidden: int, ffn: int, shared_ffn: int, num_logical: int,
                gpt_oss: bool = False) -> GlobalModel:
    """``gpt_oss``: experts with biases (drawn after everything else, so the rest is the same) and
    GPT_OSS_TEST_ACTIVATION."""
    g = _gen(seed, 99)
    h, f = hidden, ffn
    gate = torch.randn(num_logical, h, generator=g) * h**-0.5
    w1 = torch.randn(num_logical, h, f, generator=g) * h**-0.5
    w3 = torch.randn(num_logical, h, f, generator=g) * h**-0.5
    w2 = torch.randn(num_logical, f, h, generator=g) * f**-0.5
    shared = None
    if shared_ffn:
        shared = (
            torch.randn(h, shared_ffn, generator=g) * h**-0.5,
            torch.randn(h, shared_ffn, generator=g) * h**-0.5,
            torch.randn(shared_ffn, h, generator=g) * shared_ffn**-0.5,
        )
    xs = [torch.randn(t, h, generator=_gen(seed, 5, r)) for r, t in enumerate(tokens)]
    gs = [torch.randn(t, h, generator=_gen(seed, 6, r)) for r, t in enumerate(tokens)]
    if not gpt_oss:
        return GlobalModel(gate, w1, w3, w2, shared, xs, gs)
    b = _gen(seed, 98)
    biases = (torch.randn(num_logical, f, generator=b) * 0.5, torch.randn(num_logical, f, generator=b) * 0.5,
              torch.randn(num_logical, h, generator=b) * 0.5)
    return GlobalModel(gate, w1, w3, w2, shared, xs, gs, biases, GPT_OSS_TEST_ACTIVATION)


def _dense_moe(x: torch.Tensor, p: dict[str, torch.Tensor], topk: int, fp8: bool = False,
               activation: Any = "silu") -> torch.Tensor:
    """One dense MoE layer, one expert at a time (float64 params ``p``) on x float64 [T, H]; routing chosen from
    float32 logits exactly as the built-in router does (so near-ties pick the same experts). ``fp8``: the routed
    experts see each token's FP8 round trip (of its float32 value), the gradient passing through as the identity."""
    idx = F.linear(x.detach().float(), p["gate"].detach().float()).softmax(dim=-1).topk(topk, dim=-1).indices
    probs = (x @ p["gate"].t()).softmax(dim=-1).gather(1, idx)
    wts = probs / probs.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    routed = x + (fp8_round_trip(x.detach().float()).double() - x.detach()) if fp8 else x
    for e in range(p["gate"].shape[0]):
        tok, k = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = routed[tok]
        if "b1" in p:  # (experts with biases)
            ye = _act(xe @ p["w1"][e] + p["b1"][e], xe @ p["w3"][e] + p["b3"][e], activation) @ p["w2"][e] + p["b2"][e]
        else:
            ye = _act(xe @ p["w1"][e], xe @ p["w3"][e], activation) @ p["w2"][e]
        out = out.index_add(0, tok, ye * wts[tok, k].unsqueeze(1))
    if "s1" in p:
        out = out + (F.silu(x @ p["s1"]) * (x @ p["s3"])) @ p["s2"]
    return out


def dense_reference(m: GlobalModel, topk: int, fp8: bool = False) -> dict[str, Any]:
    """Every rank's output and every grad, float64, one expert at a time. Routing is chosen from float32 logits
    exactly as the built-in router does (so near-ties pick the same experts); the weights are float64. ``fp8``: as
    _dense_moe's."""
    p = {
        "gate": m.gate.double().requires_grad_(),
        "w1": m.w1.double().requires_grad_(),
        "w3": m.w3.double().requires_grad_(),
        "w2": m.w2.double().requires_grad_(),
    }
    if m.shared is not None:
        for name, t in zip(("s1", "s3", "s2"), m.shared, strict=True):
            p[name] = t.double().requires_grad_()
    if m.biases is not None:
        for name, t in zip(("b1", "b3", "b2"), m.biases, strict=True):
            p[name] = t.double().requires_grad_()
    xs = [x.double().requires_grad_() for x in m.xs]
    outs = []
    loss = torch.zeros((), dtype=torch.float64)
    for x, g in zip(xs, m.gs, strict=True):
        out = _dense_moe(x, p, topk, fp8, m.activation)  # (x float64 rounds back to the float32 input exactly: the
        # routing is the same)
        outs.append(out)
        loss = loss + (out * g.double()).sum()
    loss.backward()
    grads = {k: v.grad for k, v in p.items()}
    return {"outs": [o.detach() for o in outs], "x_grads": [x.grad for x in xs], "grads": grads}


def random_placement(num_experts: int, replicas: int, seed: int) -> tuple[int, torch.Tensor | None]:
    """(logical experts, phys_to_log or None): E physical slots holding E - replicas logical experts, the first
    ``replicas`` of them twice, in a seeded random order (None without replicas)."""
    num_logical = num_experts - replicas
    if not replicas:
        return num_logical, None
    phys_to_log = torch.cat([torch.arange(num_logical), torch.arange(replicas)])
    return num_logical, phys_to_log[torch.randperm(num_experts, generator=_gen(seed, 11))]


def _replica_table(phys_to_log: torch.Tensor, num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(phys_to_log[phys_to_log >= 0], minlength=num_logical)
    table = torch.zeros(num_logical, int(counts.max()), dtype=torch.int64)
    fill = [0] * num_logical
    for slot, e in enumerate(phys_to_log.tolist()):
        if e >= 0:
            table[e, fill[e]] = slot
            fill[e] += 1
    return table, counts


class RoundRobinReplicas:
    """Logical -> physical: choice (t, k) of logical e goes to replica (t + k) mod count(e)."""

    def __init__(self, phys_to_log: torch.Tensor, num_logical: int) -> None:
        self.phys_to_log = phys_to_log
        self.table, self.counts = _replica_table(phys_to_log, num_logical)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        t, k = idx.shape
        pick = (torch.arange(t).unsqueeze(1) + torch.arange(k).unsqueeze(0)) % self.counts[idx]
        return self.table[idx, pick]


def _build_layer(
    buf: largeep.Buffer, m: GlobalModel, ffn: int, shared_ffn: int, placement: Any = None, **kw: Any
) -> layers.MoELayer:
    if m.biases is not None:
        kw = {"expert_mlp_bias": True, "expert_activation": m.activation, **kw}
    layer = layers.MoELayer(
        buf, ffn_hidden=ffn, shared_ffn_hidden=shared_ffn, num_logical_experts=m.gate.shape[0], placement=placement,
        **kw,
    )
    with torch.no_grad():
        gate_weight: Any = layer.gate.weight
        gate_weight.copy_(m.gate)
        if m.shared is not None:
            assert layer.shared_experts is not None
            se = layer.shared_experts
            for mine, full in zip((se.w1, se.w3, se.w2), m.shared, strict=True):
                mine.copy_(full)
    if m.biases is not None:
        layer.load_global_experts(m.w1, m.w3, m.w2, b1=m.biases[0], b3=m.biases[1], b2=m.biases[2])
    else:
        layer.load_global_experts(m.w1, m.w3, m.w2)
    return layer


def layer_vs_reference(
    rank: int, world: int, tokens: list[int], hidden: int, ffn: int, shared_ffn: int, num_experts: int,
    topk: int, seed: int, variants: list[dict[str, Any]], replicas: int = 0, tokens_per_round: int | None = None,
    fp8: bool = False, gpt_oss: bool = False,
) -> dict[str, Any]:
    """Forward and grads (x, gate, experts, shared experts) of the layer against the dense reference, float32.
    ``tokens_per_round``: the Buffer's (calls in rounds). ``fp8``: the variants dispatch FP8 (``use_fp8``), the
    reference's routed experts see the tokens' FP8 round trips. ``gpt_oss``: experts with biases and the clamped
    activation (make_global's), the biases' grads checked too.

    ``variants``: MoELayer options to run (e.g. num_chunks, num_worst_tokens, use_custom_ops); all must agree
    with the reference, and with each other to float32 rounding. ``replicas`` > 0: E physical slots hold
    E - replicas logical experts, the first ``replicas`` of them twice; grads go through allreduce_replica_grads.
    """
    num_logical, phys_to_log = random_placement(num_experts, replicas, seed)
    m = make_global(seed, tokens, hidden, ffn, shared_ffn, num_logical, gpt_oss)
    ref = dense_reference(m, topk, fp8)
    epr = num_experts // world
    buf = largeep.Buffer(
        None, hidden=hidden, num_experts=num_experts, num_topk=topk, max_tokens_per_rank=max(max(tokens), 1),
        backend="torch", tokens_per_round=tokens_per_round,
    )
    results = []
    try:
        for kw in variants:
            placement = RoundRobinReplicas(phys_to_log, num_logical) if phys_to_log is not None else None
            layer = _build_layer(buf, m, ffn, shared_ffn, placement=placement, **kw)
            x = m.xs[rank].clone().requires_grad_()
            out = layer(x)
            what = f"rank {rank} {kw}"
            close(out, ref["outs"][rank], f"{what}: output")
            (out * m.gs[rank]).sum().backward()
            close(x.grad, ref["x_grads"][rank], f"{what}: grad of x")
            close(_allsum(layer.gate.weight.grad), ref["grads"]["gate"], f"{what}: grad of the gate")
            ex = layer.experts
            if phys_to_log is not None:
                assert layers.allreduce_replica_grads(list(ex.parameters()), phys_to_log) == replicas
            logical = local_logical_experts(phys_to_log, rank, epr)
            for name in ("w1", "w3", "w2") + (("b1", "b3", "b2") if gpt_oss else ()):
                close(expert_grad(ex, name), ref["grads"][name][logical], f"{what}: grad of {name}")
            finish_variant(results, layer, out, x, ref, what)
        compare_variants(variants, results)
        return {"variants": len(results)}
    finally:
        buf.destroy()


def layer_with_topk_gate(rank: int, world: int, tokens: list[int], seed: int) -> None:
    """The layer with ``largeep.gate.TopKGate`` (group-limited routing) equals the dense computation with the
    gate's own routing (every rank runs the gate on every rank's tokens)."""
    from largeep.gate import GateConfig, TopKGate

    hidden, ffn, experts, topk = 32, 16, 4 * world, 2
    cfg = GateConfig(
        hidden=hidden, num_experts=experts, topk=topk, num_groups=world, topk_groups=1, bias_balancing=False
    )
    torch.manual_seed(seed)
    gate = TopKGate(cfg).eval()
    m = make_global(seed, tokens, hidden, ffn, 0, experts)
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=max(tokens),
                         backend="torch")
    try:
        layer = layers.MoELayer(buf, ffn_hidden=ffn, gate=gate)
        layer.load_global_experts(m.w1, m.w3, m.w2)
        with torch.no_grad():
            out = layer(m.xs[rank])
            route = gate(m.xs[rank])
            want = torch.zeros(tokens[rank], hidden, dtype=torch.float64)
            x = m.xs[rank].double()
            for t in range(tokens[rank]):
                for k in range(topk):
                    e = int(route.topk_idx[t, k])
                    if e < 0:
                        continue
                    y = (F.silu(x[t] @ m.w1[e].double()) * (x[t] @ m.w3[e].double())) @ m.w2[e].double()
                    want[t] += float(route.topk_weights[t, k]) * y
        close(out, want, "layer with TopKGate")
    finally:
        buf.destroy()


class _FixedGate(torch.nn.Module):
    """A gate that returns the routing it was given, whatever its input."""

    def __init__(self, routed: Any) -> None:
        super().__init__()
        self.routed = routed

    def forward(self, x: torch.Tensor) -> Any:
        return self.routed


def low_latency_vs_normal(
    rank: int, world: int, tokens: list[int], hidden: int, ffn: int, shared_ffn: int, num_experts: int, topk: int,
    seed: int, use_fp8: bool, gpt_oss: bool = False,
) -> None:
    """Low-latency forward (bf16 transfer, or FP8) equals the normal forward; the two-micro-batch overlap and the
    custom-op path equal plain calls exactly. ``gpt_oss``: experts with biases and the clamped activation."""
    m = make_global(seed, tokens, hidden, ffn, shared_ffn, num_experts, gpt_oss)
    max_t = max(max(tokens), 1)
    common = dict(hidden=hidden, num_experts=num_experts, num_topk=topk, max_tokens_per_rank=max_t, backend="torch")
    nbuf = largeep.Buffer(None, **common)  # type: ignore[arg-type]
    lbuf = largeep.Buffer(None, low_latency=True, **common)  # type: ignore[arg-type]
    try:
        normal = _build_layer(nbuf, m, ffn, shared_ffn)
        fast = _build_layer(lbuf, m, ffn, shared_ffn, ll_use_fp8=use_fp8)
        x = m.xs[rank]
        with torch.no_grad():
            if use_fp8:  # the normal layer's experts get the tokens as the FP8 rows carry them (reference
                # quantisation of the bf16 tokens the low-latency dispatch sends), routed as x is: the two then
                # differ by the bf16 transfers only, as without FP8
                routed = normal.gate(x)
                normal.gate = _FixedGate(routed)
                want = normal(fp8_round_trip(x.to(torch.bfloat16)).to(x.dtype))
            else:
                want = normal(x)
            got = fast(x)
        assert got.dtype == x.dtype and got.shape == want.shape
        close(got, want, f"low-latency vs normal (fp8={use_fp8})", rtol=2.0**-8)
        half = tokens[rank] // 2
        xa, xb = x[:half], x[half:]
        with torch.no_grad():
            ya, yb = layers.TwoBatchOverlap(fast)(xa, xb)
            assert torch.equal(ya, fast(xa)) and torch.equal(yb, fast(xb)), "two-batch overlap differs"
            fast.ll_send_weights = False  # (the torch backend applies the weights at the source either way)
            assert torch.equal(fast(x), got), "low-latency layer without weights in the dispatch differs"
            fast.ll_send_weights = True
            fast.ll_bf16_partial_sums = True  # one more bf16 rounding of each rank's partial sum
            rounded = fast(x)
            close(rounded, want, "low-latency layer with bf16 partial sums vs normal", rtol=2.0**-6)
            if world >= 2 and topk >= 3:  # (else no token has a rounded partial sum beside another rank's)
                assert not torch.equal(rounded, got), "bf16 partial sums changed nothing"
            fast.use_custom_ops = True
            assert torch.equal(fast(x), rounded), "custom-op low-latency path with bf16 partial sums differs"
            if world == 2:
                torch._dynamo.reset()
                got_c = torch.compile(fast, backend="aot_eager", fullgraph=True)(x)
                assert torch.equal(got_c, rounded), "compiled low-latency layer with bf16 partial sums differs"
                torch._dynamo.reset()
            fast.ll_bf16_partial_sums = False
            assert torch.equal(fast(x), got), "custom-op low-latency path differs"
            if world == 2:
                # aot_eager runs the same ops: bit for bit; Inductor fuses the gate's and experts' float math
                for how in ("aot_eager", "inductor"):
                    torch._dynamo.reset()
                    got_c = torch.compile(fast, backend=how, fullgraph=True)(x)
                    if how == "aot_eager":
                        assert torch.equal(got_c, got), "compiled low-latency layer differs"
                    else:
                        close(got_c, got, "compiled (inductor) low-latency layer", rtol=1e-6)
                torch._dynamo.reset()
        assert ops.live_handles(fast.buffer_id) == 0
    finally:
        nbuf.destroy()
        lbuf.destroy()


def compiled_two_layers(rank: int, world: int, tokens: list[int], num_worst: int, num_chunks: int, seed: int,
                        backend: str = "aot_eager", use_fp8: bool = False, gpt_oss: bool = False) -> None:
    """torch.compile(fullgraph=True, backend) of two MoE layers (sharing one Buffer) equals eager in the
    output and every grad; with num_worst_tokens nothing breaks the graph even without fullgraph, in inference and
    in training (the backward's shapes are static too: weighted_row_sum's backward once split the frame).
    ``use_fp8``: the layers dispatch FP8 (hidden 128). ``gpt_oss``: experts with (random) biases and the clamped
    activation."""
    hidden, ffn, experts, topk = 128 if use_fp8 else 32, 16, 4 * world, 3
    torch._dynamo.reset()
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=max(tokens),
                         backend="torch")
    try:
        torch.manual_seed(seed)  # the same weights on every rank: the gate and shared experts are replicated
        kw: dict[str, Any] = dict(ffn_hidden=ffn, num_worst_tokens=num_worst, num_chunks=num_chunks, use_fp8=use_fp8)
        if gpt_oss:
            kw.update(expert_mlp_bias=True, expert_activation=GPT_OSS_TEST_ACTIVATION)
        first = layers.MoELayer(buf, shared_ffn_hidden=8, **kw)
        model = torch.nn.Sequential(first, layers.MoELayer(buf, **kw))
        if gpt_oss:
            with torch.no_grad():
                for layer in model:
                    for b in (layer.experts.b13, layer.experts.b2):
                        b.normal_()
        x = torch.randn(tokens[rank], hidden, generator=_gen(seed, rank)).requires_grad_()
        compiled_equals_eager(model, x, "", backend)
        if num_worst:
            torch._dynamo.reset()
            with torch.no_grad():
                explained = torch._dynamo.explain(model)(x)
            assert explained.graph_break_count == 0 and explained.graph_count == 1, str(explained.break_reasons)
            torch._dynamo.reset()
            counters = torch._dynamo.utils.counters
            counters.clear()
            torch.compile(model, backend=backend)(x).float().sum().backward()
            graphs = counters["stats"]["unique_graphs"]
            assert graphs == 1, f"training with num_worst_tokens compiled into {graphs} graphs: {dict(counters)}"
        ops.release_handles(first.buffer_id)
    finally:
        torch._dynamo.reset()
        buf.destroy()


def _native_gemms_ran() -> dict[str, int]:
    """The grouped GEMMs run since the last reset, all by torch._grouped_mm on sm90/sm100 (asserted there)."""
    ran = ops.grouped_mm_stats()
    if torch.cuda.get_device_capability()[0] in (9, 10):
        assert set(ran) == {"native"}, ran
    return ran


def layer_chunked_gpu(rank: int, world: int, backend: str, tokens: list[int], use_fp8: bool = False) -> dict[str, Any]:
    """On CUDA, bf16: the chunked schedule (dispatches issued from ops' side stream, expert GEMMs under the SM
    carveout) gives the unchunked output and grads up to bf16 rounding, and the grouped GEMM ran natively on
    sm90/sm100. ``use_fp8``: the layer dispatches FP8 (its exact values are test_layer_fp8_dispatch's and
    test_dispatch_fp8_gpu's); here the chunks agree, and the output is that of the bf16 layer up to FP8's
    rounding, not equal to it."""
    hidden, ffn, experts, topk = 1024, 256, 16 * world, 4
    buf = largeep.Buffer(
        None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=max(tokens), backend=backend
    )
    try:
        torch.manual_seed(5)  # the same gate on every rank
        with torch.device("cuda"):
            layer = layers.MoELayer(buf, ffn_hidden=ffn, dtype=torch.bfloat16, use_fp8=use_fp8)
        g = torch.Generator(device="cuda").manual_seed(50 + rank)
        x = torch.randn(tokens[rank], hidden, device="cuda", generator=g).to(torch.bfloat16)
        cot = torch.randn(tokens[rank], hidden, device="cuda", generator=g)
        ops.reset_grouped_mm_stats()
        results = []
        for chunks in (1, 2, 3):
            layer.num_chunks = chunks
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y = layer(xi)
            (y.float() * cot).sum().backward()
            torch.cuda.synchronize()
            results.append([y.detach().float(), xi.grad] + [p.grad for p in layer.experts.parameters()])
        for chunks, res in zip((2, 3), results[1:], strict=True):
            for i, (a, b) in enumerate(zip(results[0], res, strict=True)):
                assert a is not None and b is not None
                if a.numel() == 0:
                    continue
                scale = a.float().abs().max().clamp(min=1e-30)
                diff = float((a.float() - b.float()).abs().max() / scale)
                assert diff <= 2e-2, f"rank {rank}: num_chunks={chunks}, tensor {i}: relative difference {diff:.3g}"
        if use_fp8:  # (on every rank: a collective call)
            layer.num_chunks, layer.use_fp8 = 1, False
            with torch.no_grad():
                plain = layer(x).float()
            layer.use_fp8 = True
            if tokens[rank]:
                diff = float((results[0][0] - plain).abs().max() / plain.abs().max().clamp(min=1e-30))
                assert 1e-3 <= diff <= 0.1, f"rank {rank}: the FP8 layer's output differs from bf16's by {diff:.3g}"
        return {"grouped_mm": _native_gemms_ran()}
    finally:
        buf.destroy()


def layer_unaligned_chunks_gpu(rank: int, world: int) -> None:
    """Chunks of a batch whose rows are not a multiple of 16 bytes (hidden 30, float32: 120 bytes) start at
    addresses the Buffer refuses on CUDA (not 16-byte aligned); the layer copies them, and the chunked output
    equals the unchunked one (torch backend: the nvshmem backend refuses such a hidden size)."""
    hidden = 30
    buf = largeep.Buffer(None, hidden=hidden, num_experts=4 * world, num_topk=2, max_tokens_per_rank=16,
                         backend="torch")
    try:
        for custom in (False, True):
            got = []
            for chunks in (1, 3):
                torch.manual_seed(5)
                with torch.device("cuda"):
                    layer = layers.MoELayer(buf, ffn_hidden=8, num_chunks=chunks, use_custom_ops=custom)
                x = torch.randn(7 + rank, hidden, device="cuda", generator=_gen_cuda(80 + rank))
                with torch.no_grad():
                    y0 = layer(x)
                # the backward hands each chunk's combine a view of the output's gradient: unaligned too
                xg = x.clone().requires_grad_()
                y = layer(xg)
                (y * y).sum().backward()
                assert torch.equal(y.detach(), y0)
                got.append((y0, xg.grad, layer.experts.w13.grad))
            for i, (a, b) in enumerate(zip(got[1], got[0], strict=True)):
                close(a, b, f"rank {rank}: chunked layer with unaligned chunk views (custom ops {custom}), "
                            f"tensor {i}", rtol=1e-5)
    finally:
        buf.destroy()


def _gen_cuda(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def layer_strided_input_gpu(rank: int, world: int, backend: str, tokens: list[int]) -> None:
    """A strided x (every row a view into a wider tensor) gives the contiguous x's output bit for bit: through the
    chunked layer, and through send_chunk given an event recorded before a long kernel on the caller's stream (the
    dispatch waited for that event only and read the copy of x unwritten)."""
    hidden, ffn, experts, topk = 1024, 256, 16 * world, 4
    buf = largeep.Buffer(
        None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=max(tokens), backend=backend
    )
    try:
        torch.manual_seed(5)  # the same gate on every rank
        with torch.device("cuda"):
            layer = layers.MoELayer(buf, ffn_hidden=ffn, dtype=torch.bfloat16, num_chunks=3)
        g = torch.Generator(device="cuda").manual_seed(70 + rank)
        x = torch.randn(tokens[rank], hidden, device="cuda", generator=g).to(torch.bfloat16)
        wide = torch.randn(tokens[rank], 2 * hidden, device="cuda", generator=g).to(torch.bfloat16)
        wide[:, hidden:] = x
        strided = wide[:, hidden:]
        assert not strided.is_contiguous() or tokens[rank] <= 1
        # (every call first, the checks after: a rank that failed early would leave its peer waiting in a call)
        with torch.no_grad():
            want_layer = layer(x)
            got_layer = layer(strided)
            idx, w = layer.route(x)

            def one_chunk(xi: torch.Tensor, stall: bool) -> torch.Tensor:
                poison = torch.full_like(x, float("nan"))  # the block the copy of xi is likely to get
                del poison
                ready = ops.capture_event(x.device)
                if stall:
                    torch.cuda._sleep(20_000_000)  # (tens of ms: the copy below runs after the dispatch could)
                d = layer.send_chunk(xi, idx, w, ready)
                c = layer.combine_chunk(layer.experts_chunk(d), d)
                ops.wait(c.event)
                return c.x

            want_chunk = one_chunk(x, False)
            got_chunk = one_chunk(strided, True)
        torch.cuda.synchronize()
        bad = [what for what, got, want in (("the chunked layer", got_layer, want_layer),
                                            ("send_chunk", got_chunk, want_chunk)) if not torch.equal(got, want)]
        assert not bad, f"rank {rank}: {bad} on a strided x differ from the contiguous x's output"
    finally:
        buf.destroy()


def decode_step_cuda_graph(rank: int, world: int, tokens: int, replays: int,
                           with_placement: bool = False, use_fp8: bool = True) -> dict[str, Any]:
    """The low-latency decode step of a MoE layer (gate, dispatch -- FP8 with ``use_fp8``, its valid rows
    dequantised by the native kernel after they are gathered --, grouped expert GEMMs, combine, shared experts)
    captured once in a CUDA graph on the nvshmem backend and replayed on fresh inputs: every replay equals
    the eager layer on the same input exactly, and the expert slots stay consistent across replays (the Buffer's
    round counters live on the device). ``with_placement``: the layer holds replicas of hot experts (a Placement,
    the same logical weights in every replica); the graph routes with table_route, eager with route, so a replay
    equals eager to bf16 rounding (the replicas' GEMMs see other row groupings)."""
    hidden, ffn, experts, topk = 1024, 256, 8 * world, 4
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=tokens,
                         backend="nvshmem", low_latency=True)
    try:
        torch.manual_seed(7)  # the same gate and experts on every rank
        kw: dict[str, Any] = {}
        if with_placement:
            from largeep import placement as pl

            logical = experts - 3
            load = torch.ones(logical)
            load[:3] = 8.0
            topo = pl.Topology(num_nodes=1, gpus_per_node=world, slots_per_gpu=experts // world)
            kw = {"num_logical_experts": logical, "placement": pl.greedy_placement(load, topo)}
        with torch.device("cuda"):
            layer = layers.MoELayer(buf, ffn_hidden=ffn, shared_ffn_hidden=64, dtype=torch.bfloat16,
                                    ll_use_fp8=use_fp8, **kw)
        if with_placement:
            g0, n_log = torch.Generator().manual_seed(8), kw["num_logical_experts"]
            w13 = [torch.randn(n_log, hidden, ffn, generator=g0) * hidden**-0.5 for _ in range(2)]
            layer.load_global_experts(*w13, torch.randn(n_log, ffn, hidden, generator=g0) * ffn**-0.5)
        g = torch.Generator(device="cuda").manual_seed(70 + rank)
        x_static = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph wants
                for _ in range(3):
                    layer(x_static)
            torch.cuda.current_stream().wait_stream(side)
            dist.barrier()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y_static = layer(x_static)
            mismatches = 0
            for i in range(replays):
                x_new = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
                x_static.copy_(x_new)
                graph.replay()
                got = y_static.clone()
                want = layer(x_new)  # eager, the same routing and weights
                if with_placement:
                    close(got.float(), want.float(), f"rank {rank}: replay {i} with a placement", rtol=2.0**-6)
                elif not torch.equal(got, want):
                    mismatches += 1
                    err = float((got.float() - want.float()).abs().max())
                    raise AssertionError(f"rank {rank}: replay {i} differs from eager (max abs diff {err:.3g})")
            torch.cuda.synchronize()
        return {"replays": replays, "mismatches": mismatches}
    finally:
        buf.destroy()


# ---------------------------------------------------------------------------------------------------------------
# MoEPipeline: a stack of layers with a residual add + RMSNorm between, chunks flowing across layers
# ---------------------------------------------------------------------------------------------------------------


def _rms(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The token-wise function between the layers: residual add, then RMSNorm over H."""
    return F.rms_norm(x + y, (x.shape[-1],), weight=weight, eps=1e-6)


def _grad(t: torch.Tensor) -> torch.Tensor:
    assert t.grad is not None
    return t.grad


def pipeline_vs_sequential(
    rank: int, world: int, tokens: list[int], hidden: int, ffn: int, shared_ffn: int, num_experts: int,
    topk: int, seed: int, chunk_counts: list[int], layer_kw: dict[str, Any], final_between: bool,
    backend: str = "torch",
) -> dict[str, Any]:
    """MoEPipeline of 3 layers (residual + RMSNorm between; with ``final_between`` also after the last) against
    the same layers run one after another on the whole batch, and against a dense float64 composition of
    :func:`dense_reference`'s layer: output, grads of x, of every layer's gate, experts and shared experts, and
    of the norm weights. Layers 0 and 2 share a Buffer, layer 1 has its own. On a CUDA pool (float32 layers on
    the rank's GPU, ``backend``), the pipeline's side stream and the Buffers' streams run as they do in a model;
    the pipeline must match the sequential layers to float32 rounding of chunked GEMMs."""
    dev = device_for(backend)
    tol, dense_tol = (2e-6, 1e-5) if dev.type == "cpu" else (1e-4, 1e-4)
    num_layers = 3
    ms = [make_global(seed + 17 * j, tokens, hidden, ffn, shared_ffn, num_experts) for j in range(num_layers)]
    xs, gs = ms[0].xs, ms[0].gs
    norms = [1 + 0.1 * torch.randn(hidden, generator=_gen(seed, 40, j)) for j in range(num_layers)]
    num_between = num_layers if final_between else num_layers - 1

    # dense float64 reference over every rank's tokens
    ps: list[dict[str, Any]] = []
    for m in ms:
        p = {k: getattr(m, k).double().requires_grad_() for k in ("gate", "w1", "w3", "w2")}
        if m.shared is not None:
            p.update({k: t.double().requires_grad_() for k, t in zip(("s1", "s3", "s2"), m.shared, strict=True)})
        ps.append(p)
    n64 = [w.double().requires_grad_() for w in norms[:num_between]]
    x64s = [x.double().requires_grad_() for x in xs]
    want_out = []
    loss = torch.zeros((), dtype=torch.float64)
    for x64, g in zip(x64s, gs, strict=True):
        h = x64
        for j in range(num_layers):
            y = _dense_moe(h, ps[j], topk, layer_kw.get("use_fp8", False))
            h = _rms(h, y, n64[j]) if j < num_between else y
        want_out.append(h.detach())
        loss = loss + (h * g.double()).sum()
    loss.backward()

    epr = num_experts // world
    mine = torch.arange(rank * epr, (rank + 1) * epr)
    common = dict(hidden=hidden, num_experts=num_experts, num_topk=topk, max_tokens_per_rank=max(max(tokens), 1),
                  backend=backend)
    bufs = [largeep.Buffer(None, **common), largeep.Buffer(None, **common)]  # type: ignore[arg-type]
    try:
        stack = [_build_layer(bufs[j % 2], ms[j], ffn, shared_ffn, **layer_kw).to(dev) for j in range(num_layers)]
        nw = [w.to(dev, copy=True).requires_grad_() for w in norms[:num_between]]
        between = [lambda a, b, w=w: _rms(a, b, w) for w in nw]

        def grads(x: torch.Tensor) -> list[torch.Tensor]:
            out: list[Any] = [x.grad] + [p.grad for layer in stack for p in layer.parameters()]
            return out + [w.grad for w in nw]

        def run(fn: Any) -> list[torch.Tensor]:
            for layer in stack:
                layer.zero_grad()
            for w in nw:
                w.grad = None
            x = xs[rank].to(dev, copy=True).requires_grad_()
            out = fn(x)
            (out * gs[rank].to(dev)).sum().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            for one in bufs:
                assert ops.live_handles(ops.register_buffer(one)) == 0
            return [out.detach()] + grads(x)

        def sequential(x: torch.Tensor) -> torch.Tensor:
            for j, layer in enumerate(stack):
                y = layer(x)
                x = between[j](x, y) if j < num_between else y
            return x

        seq = run(sequential)
        close(seq[0], want_out[rank], f"rank {rank}: sequential output vs dense", rtol=dense_tol)
        for count in chunk_counts:
            pipe = layers.MoEPipeline(stack, between, num_chunks=count)
            got = run(pipe)
            what = f"rank {rank} {layer_kw} chunks={count}"
            for i, (a, b) in enumerate(zip(got, seq, strict=True)):
                close(a, b, f"{what}: pipeline vs sequential, tensor {i}", rtol=tol)
            close(got[0], want_out[rank], f"{what}: output vs dense", rtol=dense_tol)
            close(got[1], _grad(x64s[rank]), f"{what}: grad of x vs dense", rtol=dense_tol)
            for j, layer in enumerate(stack):
                assert layer.gate.weight.grad is not None
                close(_allsum(layer.gate.weight.grad), ps[j]["gate"].grad, f"{what}: layer {j} grad of the gate",
                      rtol=dense_tol)
                for name in ("w1", "w3", "w2"):
                    got_w = expert_grad(layer.experts, name)
                    close(got_w, ps[j][name].grad[mine], f"{what}: layer {j} grad of {name}", rtol=dense_tol)
                if layer.shared_experts is not None:
                    for name, key in (("w1", "s1"), ("w3", "s3"), ("w2", "s2")):
                        got_s = _allsum(getattr(layer.shared_experts, name).grad)
                        close(got_s, ps[j][key].grad, f"{what}: layer {j} grad of shared {name}", rtol=dense_tol)
            for j, w in enumerate(nw):
                close(_allsum(w.grad), _grad(n64[j]), f"{what}: grad of norm {j}", rtol=dense_tol)
            assert pipe.aux_losses == [[] for _ in stack]
        if 3 in chunk_counts:
            assert _pipeline_order(stack, between) == [
                "s0", "e0", "s0", "c0", "e0", "s1", "c0", "e1", "s0", "c1", "e0", "s1", "c0", "e1", "s2", "c1",
                "e2", "s1", "c2", "e1", "s2", "c1", "e2", "s2", "c2", "e2", "c2",
            ], "not the wavefront: (0,0) (0,1) (1,0) (0,2) (1,1) (2,0) (1,2) (2,1) (2,2)"
        return {"chunks": chunk_counts}
    finally:
        for one in bufs:
            one.destroy()


def pipeline_aux_losses(rank: int, world: int) -> None:
    """MoEPipeline with gates that return an aux loss: every layer after the first computes one per chunk; after
    a forward, its ``aux_loss`` is their mean weighted by the chunks' tokens, and ``aux_losses`` lists them."""
    from largeep.gate import GateConfig, TopKGate

    hidden, experts = 32, 4 * world
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=2, max_tokens_per_rank=16,
                         backend="torch")
    try:
        torch.manual_seed(3)
        stack = [
            layers.MoELayer(buf, ffn_hidden=8, gate=TopKGate(GateConfig(hidden, experts, 2, aux_loss_coef=0.01)))
            for _ in range(2)
        ]
        pipe = layers.MoEPipeline(stack, num_chunks=3)
        x = torch.randn(10 + rank, hidden, generator=_gen(4, rank))
        pipe(x)
        rows = [c.shape[0] for c in x.tensor_split(3)]
        assert len(pipe.aux_losses[0]) == 1 and stack[0].aux_loss is pipe.aux_losses[0][0]
        assert len(pipe.aux_losses[1]) == 3, pipe.aux_losses
        want = sum(loss * r for loss, r in zip(pipe.aux_losses[1], rows, strict=True)) / sum(rows)
        got = stack[1].aux_loss
        assert got is not None and torch.allclose(got, want, rtol=1e-6), (got, want)
        assert not torch.allclose(got, pipe.aux_losses[1][-1]), "layer 1's aux_loss is still its last chunk's"
    finally:
        buf.destroy()


def _pipeline_order(stack: list[layers.MoELayer], between: list[Any]) -> list[str]:
    """The issue order of a 3-chunk MoEPipeline's chunk steps: s (send), e (experts), c (combine) and the layer."""
    order: list[str] = []

    def recorder(f: Any, tag: str) -> Any:
        def rec(*a: Any, **kw: Any) -> Any:
            order.append(tag)
            return f(*a, **kw)

        return rec

    for j, layer in enumerate(stack):
        for step, name in (("s", "send_chunk"), ("e", "experts_chunk"), ("c", "combine_chunk")):
            object.__setattr__(layer, name, recorder(getattr(layer, name), f"{step}{j}"))
    try:
        with torch.no_grad():
            dev = next(stack[0].parameters()).device
            layers.MoEPipeline(stack, between, num_chunks=3)(torch.randn(7, stack[0].hidden, device=dev))
    finally:
        for layer in stack:
            for name in ("send_chunk", "experts_chunk", "combine_chunk"):
                object.__delattr__(layer, name)
    return order


def pipeline_compiled(rank: int, world: int, tokens: list[int], num_worst: int, seed: int,
                      backend: str = "aot_eager") -> None:
    """torch.compile(fullgraph=True, backend) of a 2-layer MoEPipeline with 2 chunks equals eager in the output and
    every grad. Under Inductor this needs largeep._inductor_order: the ranks' token counts differ, so they compile
    graphs of different shapes, whose communication ops Inductor would otherwise order differently."""
    hidden, ffn, experts, topk = 32, 16, 4 * world, 2
    torch._dynamo.reset()
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=max(tokens),
                         backend="torch")
    try:
        torch.manual_seed(seed)
        stack = [layers.MoELayer(buf, ffn_hidden=ffn, num_worst_tokens=num_worst, shared_ffn_hidden=8)
                 for _ in range(2)]
        norm = torch.nn.RMSNorm(hidden)
        pipe = layers.MoEPipeline(stack, [lambda a, b: norm(a + b)], num_chunks=2)
        x = torch.randn(tokens[rank], hidden, generator=_gen(seed, rank)).requires_grad_()

        def run(fn: Any) -> list[torch.Tensor]:
            x.grad = None
            pipe.zero_grad()
            norm.zero_grad()
            y = fn(x)
            (y * y).sum().backward()
            return [y.detach(), x.grad] + [p.grad for p in pipe.parameters()] + [norm.weight.grad]  # type: ignore[list-item]

        eager = run(pipe)
        compiled = torch.compile(pipe, backend=backend, fullgraph=True)
        for _ in range(2):
            got = run(compiled)
            for i, (a, b) in enumerate(zip(got, eager, strict=True)):
                close(a, b, f"compiled vs eager pipeline, tensor {i}", rtol=1e-6)
        ops.release_handles(stack[0].buffer_id)
    finally:
        torch._dynamo.reset()
        buf.destroy()


def pipeline_errors(rank: int, world: int) -> list[str]:
    """Wrong stacks raise ArgumentError naming the problem, before any communication."""
    kw = dict(num_experts=2 * world, num_topk=2, max_tokens_per_rank=8, backend="torch")
    normal = largeep.Buffer(None, hidden=32, **kw)  # type: ignore[arg-type]
    wide = largeep.Buffer(None, hidden=64, **kw)  # type: ignore[arg-type]
    ll = largeep.Buffer(None, hidden=32, low_latency=True, **kw)  # type: ignore[arg-type]
    try:
        a, b = layers.MoELayer(normal, ffn_hidden=8), layers.MoELayer(normal, ffn_hidden=8)
        linear: Any = torch.nn.Linear(32, 32)
        three: Any = 3
        cases: list[tuple[Any, list[str]]] = [
            (lambda: layers.MoEPipeline([]), ["empty"]),
            (lambda: layers.MoEPipeline([a, linear]), ["layers[1]", "MoELayer"]),
            (lambda: layers.MoEPipeline([a, layers.MoELayer(ll, ffn_hidden=8)]), ["layers[1]", "low-latency"]),
            (lambda: layers.MoEPipeline([a, layers.MoELayer(wide, ffn_hidden=8)]), ["hidden size 64", "32"]),
            (lambda: layers.MoEPipeline([a, b], num_chunks=0), ["num_chunks", ">= 1"]),
            (lambda: layers.MoEPipeline([a, b], between=[]), ["'between' has 0", "layers take 1"]),
            (lambda: layers.MoEPipeline([a, b], between=[torch.add] * 3), ["'between' has 3", "layers take 1"]),
            (lambda: layers.MoEPipeline([a, b], between=[three]), ["between[0]", "not callable"]),
            (lambda: layers.MoEPipeline([a, layers.MoELayer(normal, ffn_hidden=8).to("meta")]), ["different devices"]),
        ]
        seen = []
        for make, words in cases:
            try:
                make()
            except largeep.ArgumentError as exc:
                for w in words:
                    assert w in str(exc), f"{exc!r} does not say {w!r}"
                seen.append(str(exc))
            else:
                raise AssertionError(f"no error for a stack that should say {words}")
        # one layer twice and a between of length L are fine
        layers.MoEPipeline([a, a], between=[torch.add, torch.add], num_chunks=1)
        return seen
    finally:
        for buf in (normal, wide, ll):
            buf.destroy()


def layer_id_checks(rank: int, world: int, native: bool) -> dict[str, Any]:
    """native (the backend checks each dispatch's ids with its count exchange, as largeep's do): no id check in
    Python, and a bad id ends the dispatch of its chunk on every rank. Else (a backend made to check nothing): the
    Buffer checks each chunk's dispatch in Python. Either way ids out of range raise ArgumentError before any row
    of that chunk moves, and the Buffer stays usable. Returns the number of Python id checks per forward, by
    num_chunks."""
    from largeep import checks

    hidden, experts, topk, t = 32, 2 * world, 2, 9

    class FixedGate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bad = False

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            g = _gen(rank, 5)
            idx = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(x.shape[0])])
            if self.bad:
                idx[x.shape[0] - 1, 1] = experts  # in the last chunk
            return idx, torch.rand(x.shape[0], topk, generator=g)

    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=t,
                         backend="torch")
    if not native:
        buf._impl.checks_dispatch_ids = False  # type: ignore[attr-defined]
    where = "dispatch"
    calls = [0]
    real = checks._id_range

    def counted(idx: torch.Tensor) -> tuple[int, int]:
        calls[0] += 1
        return real(idx)

    checks._id_range = counted
    try:
        gate = FixedGate()
        layer = layers.MoELayer(buf, ffn_hidden=8, gate=gate)
        x = torch.randn(t, hidden, generator=_gen(rank, 6))
        per_chunks, outs = {}, {}
        with torch.no_grad():
            for n in (1, 3):
                layer.num_chunks = n
                calls[0] = 0
                outs[n] = layer(x)
                per_chunks[n] = calls[0]
            close(outs[3], outs[1].double(), "num_chunks 3 against 1")
            gate.bad = True
            try:
                layer(x)
            except largeep.ArgumentError as exc:
                msg = str(exc)
                assert where in msg and "topk_idx" in msg and f"expert id {experts}" in msg, msg
            else:
                raise AssertionError("an expert id out of range went through the layer")
            gate.bad = False
            close(layer(x), outs[1].double(), "after the refused call")
            # a state dict of the earlier layout (experts.w1 / experts.w3) loads into experts.w13
            sd = layer.state_dict()
            w13 = sd.pop("experts.w13")
            f = layer.experts.ffn_hidden
            sd["experts.w1"], sd["experts.w3"] = w13[:, :, :f].clone(), w13[:, :, f:].clone()
            other = layers.MoELayer(buf, ffn_hidden=8, gate=FixedGate())
            other.load_state_dict(sd)
            assert torch.equal(other.experts.w13, layer.experts.w13)
            close(other(x), outs[1].double(), "layer loaded from the earlier layout")
            # a pipeline's dispatches check their chunks' ids like the layer's
            gate2 = FixedGate()
            second = layers.MoELayer(buf, ffn_hidden=8, gate=gate2)
            pipe = layers.MoEPipeline([layer, second], num_chunks=2)
            calls[0] = 0
            pipe(x)
            per_chunks["pipeline"] = calls[0]
            gate2.bad = True
            try:
                pipe(x)
            except largeep.ArgumentError as exc:
                assert f"expert id {experts}" in str(exc), str(exc)
            else:
                raise AssertionError("an expert id out of range went through the pipeline's second layer")
        return per_chunks
    finally:
        checks._id_range = real
        buf.destroy()


def ops_zero_rows_backward(rank: int, world: int) -> None:
    """A dispatch of no tokens, differentiated through both paths (eager autograd, custom ops): the empty gradients
    (strides of 0 from the expanded sum) go back through the combine."""
    buf = largeep.Buffer(None, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=4, backend="torch")
    try:
        for custom in (False, True):
            x = torch.zeros(0, 32, requires_grad=True)
            w = torch.ones(0, 2, requires_grad=True)
            d = ops.dispatch(buf, x, torch.zeros(0, 2, dtype=torch.int64), w, use_custom_ops=custom)
            (d.x.sum() + d.topk_weights.sum()).backward()
            assert x.grad is not None and x.grad.shape == (0, 32) and w.grad is not None, custom
        # a handle abandoned before its combine goes away with its Buffer
        bid = ops.register_buffer(buf)
        with torch.no_grad():
            ops.dispatch(bid, torch.zeros(1, 32), torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 2),
                         use_custom_ops=True)
        assert ops.live_handles(bid) >= 1
    finally:
        buf.destroy()
    del buf
    import gc

    gc.collect()
    assert ops.live_handles(bid) == 0


class _Received:
    """Watches ``ops.<name>`` (a dispatch) while in use: each call first notes which earlier calls' received tensors
    (``fields`` of their outputs) still have their memory alive -- their storages, which any view or detached alias
    keeps, as any such tensor keeps a zero-copy receive slot -- then keeps weak references to its own; ``note``
    (optional: another ops function, e.g. a combine) notes the same at each of its calls, in ``alive_at`` too,
    marked by its name."""

    def __init__(self, name: str, fields: tuple[str, ...], note: str | None = None) -> None:
        self.name, self.fields, self.note = name, fields, note
        self.refs: list[list[Any]] = []
        self.alive_at: list[Any] = []
        self.plain = {n: getattr(ops, n) for n in (name, note) if n is not None}

    def _alive(self) -> list[bool]:
        return [any(not r.expired() for r in rs) for rs in self.refs]

    def __enter__(self) -> _Received:
        from torch.multiprocessing.reductions import StorageWeakRef

        def watched(*args: Any, **kwargs: Any) -> Any:
            self.alive_at.append(self._alive())
            d = self.plain[self.name](*args, **kwargs)
            self.refs.append([StorageWeakRef(getattr(d, f).untyped_storage()) for f in self.fields])
            return d

        def noted(*args: Any, **kwargs: Any) -> Any:
            self.alive_at.append((self.note, self._alive()))
            return self.plain[self.note](*args, **kwargs)  # type: ignore[index]

        setattr(ops, self.name, watched)
        if self.note is not None:
            setattr(ops, self.note, noted)
        return self

    def __exit__(self, *exc: Any) -> None:
        for n, fn in self.plain.items():
            setattr(ops, n, fn)


def chunks_freed_in_forward(rank: int, world: int, use_custom_ops: bool) -> None:
    """A MoELayer in 3 chunks under autograd, eager and custom-op paths: when chunk i + 2 is dispatched, chunk i's
    received rows, ids and weights are gone (its experts ran and its combine was queued): on the nvshmem backend
    they sit in one of two zero-copy receive slots, and a forward that kept them to its end (its list of dispatches
    for releasing tickets after an error held the outputs) made every third chunk's dispatch copy its rows."""
    buf = largeep.Buffer(None, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=16, backend="torch")
    try:
        torch.manual_seed(5)
        layer = layers.MoELayer(buf, ffn_hidden=8, num_chunks=3, use_custom_ops=use_custom_ops)
        x = torch.randn(24, 32, generator=_gen(9, rank)).requires_grad_()
        with _Received("dispatch", ("x", "topk_idx", "topk_weights")) as watch:
            out = layer(x)
        alive_at = watch.alive_at
        assert alive_at == [[], [True], [False, True]], f"earlier chunks' outputs alive at each dispatch: {alive_at}"
        out.square().sum().backward()
        assert x.grad is not None and ops.live_handles(layer.buffer_id) == 0
    finally:
        buf.destroy()


def _only_last(count: int) -> list[list[bool]]:
    """The live set a chunked schedule allows at each of ``count`` dispatches: the outputs of the one before it
    (whose experts were just queued, its combine not yet), none older."""
    return [[i == k - 1 for i in range(k)] for k in range(count)]


def pipeline_chunks_freed(rank: int, world: int, use_custom_ops: bool, one_buffer: bool) -> None:
    """MoEPipeline of 2 layers (shared experts, a residual add and norm between) in 3 chunks under autograd, on one
    Buffer or one each: at every dispatch of the wavefront only the previous (layer, chunk)'s received rows, ids
    and weights are alive (its experts queued, its combine not yet), so two zero-copy receive slots always suffice;
    the output and x's gradient equal the layers run one after another."""
    hidden, experts = 32, 2 * world
    kw = dict(hidden=hidden, num_experts=experts, num_topk=2, max_tokens_per_rank=32, backend="torch")
    bufs = [largeep.Buffer(None, **kw) for _ in range(1 if one_buffer else 2)]  # type: ignore[arg-type]
    try:
        torch.manual_seed(6)
        stack = [layers.MoELayer(bufs[j % len(bufs)], ffn_hidden=8, shared_ffn_hidden=8, use_custom_ops=use_custom_ops)
                 for j in range(2)]
        between = [lambda a, b: F.layer_norm(a + b, (hidden,))]
        x0 = torch.randn(24, hidden, generator=_gen(11, rank))
        x = x0.clone().requires_grad_()
        with _Received("dispatch", ("x", "topk_idx", "topk_weights")) as watch:
            out = layers.MoEPipeline(stack, between, num_chunks=3)(x)
        assert watch.alive_at == _only_last(6), f"earlier outputs alive at each dispatch: {watch.alive_at}"
        out.square().sum().backward()
        ref_x = x0.clone().requires_grad_()
        ref = stack[1](between[0](ref_x, stack[0](ref_x)))
        ref.square().sum().backward()
        close(out, ref, f"rank {rank}: pipeline vs the layers one after another")
        close(x.grad, ref_x.grad, f"rank {rank}: grad of x, pipeline vs the layers one after another")
        assert all(ops.live_handles(ops.register_buffer(b)) == 0 for b in bufs)
    finally:
        for b in bufs:
            b.destroy()


def layer_chunks_freed(rank: int, world: int, use_custom_ops: bool, tp: int, use_fp8: bool) -> None:
    """A MoELayer with shared experts in 3 chunks under autograd, with the experts split over a TP group of ``tp``
    ranks (the received rows all-gathered over it) or whole, the rows sent as FP8 or not: when chunk i + 1 is
    dispatched only chunk i's received outputs are alive; the output and x's gradient equal the same layer in one
    chunk."""
    from largeep.expert_tp import make_expert_tp_groups

    groups = make_expert_tp_groups(tp)
    buf = largeep.Buffer(groups.ep_group, hidden=128, num_experts=4, num_topk=2, max_tokens_per_rank=32,
                         backend="torch")
    try:
        torch.manual_seed(8)
        layer = layers.MoELayer(buf, ffn_hidden=8, shared_ffn_hidden=8, num_chunks=3, use_custom_ops=use_custom_ops,
                                use_fp8=use_fp8, expert_tp_group=groups.tp_group if tp > 1 else None)
        x0 = torch.randn(20 + rank, 128, generator=_gen(12, rank))
        x = x0.clone().requires_grad_()
        with _Received("dispatch", ("x", "topk_idx", "topk_weights")) as watch:
            out = layer(x)
        assert watch.alive_at == _only_last(3), f"earlier chunks' outputs alive at each dispatch: {watch.alive_at}"
        out.square().sum().backward()
        layer.num_chunks = 1
        ref_x = x0.clone().requires_grad_()
        ref = layer(ref_x)
        ref.square().sum().backward()
        close(out, ref, f"rank {rank}: 3 chunks vs 1")
        close(x.grad, ref_x.grad, f"rank {rank}: grad of x, 3 chunks vs 1")
        assert ops.live_handles(layer.buffer_id) == 0
    finally:
        buf.destroy()


def checkpointed_chunks_held(rank: int, world: int, pipeline: bool) -> None:
    """Custom-op path under ``ops.checkpoint_context_fn``, the checkpointed function being a MoELayer in 3 chunks or
    a MoEPipeline of 2 layers in 3 chunks itself (so the recomputation stops inside its forward: torch ends it, by
    an exception, once it has the tensors the backward asked for; the forward must neither release the saved
    dispatches' handles then -- they are the forward's own -- nor fail). The policy saves each dispatch_recv's
    outputs, so every dispatch's received memory stays until the backward (docs/usage.md, zero-copy: with two
    zero-copy slots the third dispatch's rows are copied) and goes with it; output and grads equal the same
    without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    buf = largeep.Buffer(None, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=16, backend="torch")
    try:
        torch.manual_seed(10)
        stack = [layers.MoELayer(buf, ffn_hidden=8, num_chunks=3, use_custom_ops=True) for _ in range(2)]
        fn: Any = layers.MoEPipeline(stack, [lambda a, b: a + b], num_chunks=3) if pipeline else stack[0]
        x0 = torch.randn(24, 32, generator=_gen(14, rank))
        count = 6 if pipeline else 3

        def run(keep: bool) -> list[torch.Tensor]:
            for layer in stack:
                layer.zero_grad()
            x = x0.clone().requires_grad_()
            with _Received("dispatch", ("x", "topk_idx", "topk_weights")) as watch:
                out = checkpoint(fn, x, use_reentrant=False, context_fn=ops.checkpoint_context_fn) if keep else fn(x)
            if keep:
                assert watch.alive_at == [[True] * k for k in range(count)], f"saved outputs: {watch.alive_at}"
            else:
                assert watch.alive_at == _only_last(count), f"outputs alive at each dispatch: {watch.alive_at}"
            out.square().sum().backward()
            assert watch._alive() == [False] * count, "received outputs outlived the backward"
            assert ops.live_handles(ops.register_buffer(buf)) == 0
            grads = [p.grad for layer in stack for p in layer.parameters() if p.grad is not None]
            return [out.detach(), x.grad, *grads]

        want = run(False)
        for step in range(2):  # (the second: nothing was left behind by the first)
            got = run(True)
            assert len(got) == len(want)
            for i, (a, b) in enumerate(zip(got, want, strict=True)):
                close(a, b, f"rank {rank} pipeline={pipeline} step {step}: checkpointed vs plain, tensor {i}")
    finally:
        buf.destroy()


def two_batch_freed(rank: int, world: int) -> None:
    """TwoBatchOverlap: when micro-batch B's combine is sent (B's experts done), A's received rows are gone -- A's
    experts ran and its combine was sent before B's experts -- so the two micro-batches' received rows
    ([E/N, N*M, H] each) are not both held through B's experts; both results equal separate calls."""
    buf = largeep.Buffer(None, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=8, backend="torch",
                         low_latency=True)
    try:
        torch.manual_seed(9)
        layer = layers.MoELayer(buf, ffn_hidden=8, shared_ffn_hidden=8)
        x = torch.randn(11, 32, generator=_gen(13, rank))
        xa, xb = x[:5], x[5:]
        with _Received("low_latency_dispatch", ("x",), note="low_latency_combine") as watch:
            ya, yb = layers.TwoBatchOverlap(layer)(xa, xb)
        assert watch.alive_at == [[], [True], ("low_latency_combine", [True, True]),
                                  ("low_latency_combine", [False, True])], \
            f"received rows alive at each dispatch and combine: {watch.alive_at}"
        with torch.no_grad():
            assert torch.equal(ya, layer(xa)) and torch.equal(yb, layer(xb)), "two-batch overlap differs"
    finally:
        buf.destroy()


def compiled_dynamic_chunked(rank: int, world: int, tokens: list[list[int]]) -> None:
    """A training user's varying batch: torch.compile(dynamic=True, fullgraph=True) of a MoELayer in 2 chunks, forward
    and backward at each step's token counts (0 and 1 among them, different on each rank), equals eager in the output
    and every grad, in at most 3 graphs (counts >= 4, 0, 1). The chunks were cut with tensor_split, whose sizes of a
    dynamic T made Dynamo guard on T % 2: a graph per remainder (with more chunks, the recompile limit of 8
    raised)."""
    torch._dynamo.reset()
    buf = largeep.Buffer(None, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=12, backend="torch")
    try:
        torch.manual_seed(3)
        layer = layers.MoELayer(buf, ffn_hidden=8, num_chunks=2)
        compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)
        counters = torch._dynamo.utils.counters
        counters.clear()

        def run(fn: Any, x: torch.Tensor) -> list[torch.Tensor]:
            x = x.clone().requires_grad_()
            layer.zero_grad()
            y = fn(x)
            (y * y).sum().backward()
            return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]

        for step, counts in enumerate(tokens):
            x = torch.randn(counts[rank], 32, generator=_gen(step, rank))
            for i, (a, b) in enumerate(zip(run(compiled, x), run(layer, x), strict=True)):
                close(a, b, f"{counts[rank]} tokens: compiled vs eager, tensor {i}")
        graphs = counters["stats"]["unique_graphs"]
        assert graphs <= 3, f"{graphs} graphs for the token counts {[c[rank] for c in tokens]}"
        assert ops.live_handles(layer.buffer_id) == 0
    finally:
        torch._dynamo.reset()
        buf.destroy()


def placement_compiled(rank: int, world: int, tokens: list[int], seed: int) -> None:
    """A layer with a largeep.placement.Placement (replicas of hot experts) under torch.compile(fullgraph=True),
    aot_eager and Inductor: the trace routes with Placement.table_route (no host wait) where eager routes with
    route; the replicas hold the same weights, so the output and the grad of x equal eager's to float32 rounding."""
    from largeep import placement as pl

    hidden, ffn, topk, logical = 32, 16, 2, 6
    slots = 4 * world
    torch._dynamo.reset()
    buf = largeep.Buffer(None, hidden=hidden, num_experts=slots, num_topk=topk, max_tokens_per_rank=max(tokens),
                         backend="torch")
    try:
        topo = pl.Topology(num_nodes=1, gpus_per_node=world, slots_per_gpu=slots // world)
        plc = pl.greedy_placement(torch.tensor([6.0, 3, 1, 1, 1, 1]), topo)
        assert int(plc.replica_count.max()) > 1
        with torch.device("meta"):  # another default device than the Buffer's, as `with torch.device("cuda")`
            meta = layers.MoELayer(buf, ffn_hidden=ffn, num_logical_experts=logical, placement=plc)
        assert meta.experts.w13.device.type == "meta"
        torch.manual_seed(seed)
        layer = layers.MoELayer(buf, ffn_hidden=ffn, num_logical_experts=logical, placement=plc)
        g = torch.Generator().manual_seed(seed)
        w1, w3 = (torch.randn(logical, hidden, ffn, generator=g) * 0.2 for _ in range(2))
        layer.load_global_experts(w1, w3, torch.randn(logical, ffn, hidden, generator=g) * 0.2)
        x = torch.randn(tokens[rank], hidden, generator=_gen(seed, rank)).requires_grad_()

        def run(fn: Any) -> list[torch.Tensor]:
            x.grad = None
            y = fn(x)
            (y * y).sum().backward()
            return [y.detach(), x.grad]

        eager = run(layer)
        for how in ("aot_eager", "inductor"):
            torch._dynamo.reset()
            got = run(torch.compile(layer, backend=how, fullgraph=True))
            for i, (a, b) in enumerate(zip(got, eager, strict=True)):
                close(a, b, f"rank {rank}: compiled ({how}) layer with a placement, tensor {i}", rtol=1e-5)
        ops.release_handles(layer.buffer_id)
    finally:
        torch._dynamo.reset()
        buf.destroy()


def ops_two_batches_compiled(rank: int, world: int, num_worst: int, backend: str) -> None:
    """A user's MoE step on largeep.ops: two micro-batches (no data dependency between them), each dispatch ->
    expert (rows times their weights' sum) -> combine, under torch.compile(fullgraph=True, backend): outputs and the
    grads of x and topk_weights equal eager's (aot_eager bit for bit; Inductor to float32 rounding). The ranks have
    different token counts, so they compile graphs of different shapes (the ordering fix itself is guarded by
    test_pipeline_compiled, which fails without it; this case happens to keep its order either way)."""
    buf = largeep.Buffer(None, hidden=32, num_experts=4 * world, num_topk=2, max_tokens_per_rank=20, backend="torch")
    try:
        bid = ops.register_buffer(buf)
        g = torch.Generator().manual_seed(rank)

        def make(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x = torch.randn(t, 32, generator=g).requires_grad_()
            idx = torch.rand(t, 4 * world, generator=g).topk(2, dim=1).indices
            return x, idx, torch.rand(t, 2, generator=g).requires_grad_()

        a, b = make(10 + 3 * rank), make(7 + 5 * rank)

        def moe(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            d = ops.dispatch(bid, x, idx, w, num_worst_tokens=num_worst)
            return ops.combine(bid, d.x * d.topk_weights.sum(1, keepdim=True), d.handle).x

        def two(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return moe(*a), moe(*b)

        def run(fn: Any) -> list[torch.Tensor]:
            for t in (*a, *b):
                t.grad = None
            ya, yb = fn(a, b)
            ((ya * ya).sum() + (yb * yb).sum()).backward()
            return [ya.detach(), yb.detach(), a[0].grad, a[2].grad, b[0].grad, b[2].grad]

        want = run(two)
        torch._dynamo.reset()
        got = run(torch.compile(two, backend=backend, fullgraph=True))
        for i, (x, y) in enumerate(zip(got, want, strict=True)):
            close(x, y, f"rank {rank}: compiled ({backend}) two micro-batches, tensor {i}", rtol=1e-6)
        ops.release_handles(bid)
    finally:
        torch._dynamo.reset()
        buf.destroy()


def layer_checks_nodes_and_ll_chunks(rank: int, world: int) -> None:
    """A placement planned for another node shape than the Buffer's ranks_per_node is refused naming both (route
    would take far replicas for near ones); the Buffer's shape is accepted. A low-latency layer refuses
    num_chunks > 1 (a low-latency call moves at most max_tokens_per_rank tokens at once)."""
    from largeep import placement as pl

    buf = largeep.Buffer(None, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=16,
                         backend="torch", ranks_per_node=1)
    ll = largeep.Buffer(None, hidden=32, num_experts=2 * world, num_topk=2, max_tokens_per_rank=16,
                        backend="torch", low_latency=True)
    try:
        load = torch.tensor([4.0] + [1.0] * (2 * world - 2))
        flat = pl.greedy_placement(load, pl.Topology(num_nodes=1, gpus_per_node=world, slots_per_gpu=2))
        try:
            layers.MoELayer(buf, ffn_hidden=8, placement=flat)
            raise AssertionError("a placement of one node was taken for a Buffer of one rank per node")
        except largeep.ArgumentError as exc:
            assert f"{world} GPUs per node" in str(exc) and "1 ranks per node" in str(exc), exc
        layers.MoELayer(buf, ffn_hidden=8,
                        placement=pl.greedy_placement(load, pl.Topology(num_nodes=world, gpus_per_node=1,
                                                                        slots_per_gpu=2)))
        try:
            layers.MoELayer(ll, ffn_hidden=8, num_chunks=2)
            raise AssertionError("a low-latency layer took num_chunks=2")
        except largeep.ArgumentError as exc:
            assert "'num_chunks' = 2" in str(exc) and "low_latency_steps" in str(exc), exc
    finally:
        buf.destroy()
        ll.destroy()


def layer_checks_placement_sizes(rank: int, world: int) -> None:
    """MoELayer with a Placement: one of another group size or slot count is refused naming it, as are a
    num_logical_experts other than the placement's and a gate over another number of experts; without
    num_logical_experts the default gate chooses among the placement's logical experts (not the physical ones)."""
    from largeep import placement as pl

    buf = largeep.Buffer(None, hidden=32, num_experts=4, num_topk=2, max_tokens_per_rank=16, backend="torch")
    try:
        good = pl.greedy_placement(torch.tensor([5.0, 1.0, 1.0]), pl.Topology(num_nodes=1, gpus_per_node=1,
                                                                                slots_per_gpu=4))
        for bad, kw, words in (
            (pl.greedy_placement(torch.tensor([5.0, 1.0]), pl.Topology(num_nodes=1, gpus_per_node=1, slots_per_gpu=2)),
             {}, ("'placement'", "2 physical experts", "4 physical experts")),
            (good, {"num_logical_experts": 4}, ("'num_logical_experts' = 4", "3 logical experts")),
            # without a placement the logical experts are the physical ones: another count is refused (8 built a
            # layer whose default router chose ids the Buffer refused at random; 0 was taken as 4)
            (None, {"num_logical_experts": 8}, ("'num_logical_experts' = 8 without a placement", "it has 4")),
            (None, {"num_logical_experts": 0}, ("'num_logical_experts'", "an int >= 1", "got 0")),
            (None, {"num_logical_experts": 1}, ("default router", "num_topk = 2", "1 logical experts")),
            (good, {"num_logical_experts": 3.0}, ("'num_logical_experts'", "an int", "got 3.0")),
        ):
            try:
                layers.MoELayer(buf, ffn_hidden=8, placement=bad, **kw)
                raise AssertionError(f"MoELayer accepted {kw} with {getattr(bad, 'topology', None)}")
            except largeep.ArgumentError as exc:
                assert all(w in str(exc) for w in words), exc
        from largeep.gate import GateConfig, TopKGate

        for gate in (layers.LinearTopKRouter(32, 4, 2), TopKGate(GateConfig(hidden=32, num_experts=5, topk=2))):
            try:  # a gate over another number of experts than the placement's logical ones
                layers.MoELayer(buf, ffn_hidden=8, placement=good, gate=gate)
                raise AssertionError(f"MoELayer accepted {type(gate).__name__} with another expert count")
            except largeep.ArgumentError as exc:
                assert "'gate' chooses among" in str(exc) and "3 logical experts" in str(exc), exc
        layer = layers.MoELayer(buf, ffn_hidden=8, placement=good, gate=layers.LinearTopKRouter(32, 3, 2))
        layer = layers.MoELayer(buf, ffn_hidden=8, placement=good)
        assert layer.num_logical_experts == 3
        assert layers.MoELayer(buf, ffn_hidden=8, num_logical_experts=4).num_logical_experts == 4
        # fewer logical experts than physical ones without a placement (ids stay in range), a numpy integer, and
        # one logical expert under top-2 with a gate of one's own: taken
        assert layers.MoELayer(buf, ffn_hidden=8, num_logical_experts=3).num_logical_experts == 3
        import numpy as np

        assert layers.MoELayer(buf, ffn_hidden=8, num_logical_experts=np.int64(4)).num_logical_experts == 4
        one = pl.greedy_placement(torch.tensor([1.0]), pl.Topology(num_nodes=1, gpus_per_node=1, slots_per_gpu=4))
        assert layers.MoELayer(buf, ffn_hidden=8, placement=one, num_logical_experts=1,
                               gate=lambda x: (torch.zeros(x.shape[0], 2, dtype=torch.int64),
                                               torch.full((x.shape[0], 2), 0.5))).num_logical_experts == 1
        out = layer(torch.randn(5, 32))
        assert out.shape == (5, 32) and torch.isfinite(out).all()
    finally:
        buf.destroy()


def layer_saves_slot_layout(rank: int, world: int) -> None:
    """A MoELayer saves the logical expert of each of its slots in its state dict; a state loads into a layer whose
    slots hold the same experts (weights equal after), and is refused naming the key, strict or not, by a layer of
    another placement, by one without a placement, and by the same layer on another rank (each rank saves its own
    slots), since its slots would hold other experts' weights; a state without the key (from elsewhere) is read
    as slot s holding expert s, and one with the earlier global ``slot_layout`` table by that table."""
    from largeep import placement as pl

    buf = largeep.Buffer(None, hidden=32, num_experts=4 * world, num_topk=2, max_tokens_per_rank=16,
                         backend="torch")
    try:
        topo = pl.Topology(num_nodes=1, gpus_per_node=world, slots_per_gpu=4)
        p1 = pl.greedy_placement(torch.tensor([5.0, 1.0, 1.0] * world), topo)
        p2 = pl.Placement(topo, 3 * world, p1.phys_to_log.roll(1))
        lo = 4 * rank
        assert not torch.equal(p1.phys_to_log[lo : lo + 4], p2.phys_to_log[lo : lo + 4])
        a = layers.MoELayer(buf, ffn_hidden=8, placement=p1)
        state = a.state_dict()
        assert torch.equal(state["slot_experts"], p1.phys_to_log[lo : lo + 4])
        b = layers.MoELayer(buf, ffn_hidden=8, placement=pl.Placement(topo, 3 * world, p1.phys_to_log.clone()))
        b.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

        def refused(layer: layers.MoELayer, st: dict[str, torch.Tensor], words: tuple[str, ...]) -> None:
            for strict in (True, False):
                try:
                    layer.load_state_dict(st, strict=strict)
                except RuntimeError as exc:
                    assert all(w in str(exc) for w in words + ("load_global_experts",)), exc
                else:
                    raise AssertionError(f"rank {rank}: a state of other slots was loaded (strict={strict})")

        plain = layers.MoELayer(buf, ffn_hidden=8)
        for other in (layers.MoELayer(buf, ffn_hidden=8, placement=p2), plain):
            refused(other, state, ("slot_experts",))
        # states of the plain layer: this rank's loads; another rank's is refused (world > 1)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, plain.state_dict())
        layers.MoELayer(buf, ffn_hidden=8).load_state_dict(gathered[rank])
        if world > 1:
            refused(layers.MoELayer(buf, ffn_hidden=8), gathered[(rank + 1) % world], ("slot_experts", f"rank {rank}"))
        # without the key: slot s holds expert s
        bare = {k: v for k, v in plain.state_dict().items() if k != "slot_experts"}
        layers.MoELayer(buf, ffn_hidden=8).load_state_dict(bare)
        shifted = pl.Placement(topo, 4 * world, torch.arange(4 * world).roll(1))
        refused(layers.MoELayer(buf, ffn_hidden=8, placement=shifted), bare, ("slot_experts", "absent"))
        # a partial load without the expert weights (strict=False) checks nothing
        placed = layers.MoELayer(buf, ffn_hidden=8, placement=shifted)
        placed.load_state_dict({}, strict=False)
        placed.load_state_dict({"gate.weight": plain.state_dict()["gate.weight"]}, strict=False)
        # an earlier state: the placement's whole table under slot_layout
        legacy = {**{k: v for k, v in state.items() if k != "slot_experts"}, "slot_layout": p1.phys_to_log.clone()}
        layers.MoELayer(buf, ffn_hidden=8, placement=p1).load_state_dict(legacy)
        refused(layers.MoELayer(buf, ffn_hidden=8, placement=p2), legacy, ("slot_layout",))
    finally:
        buf.destroy()


def interleaved_refusals(rank: int, world: int) -> None:
    """Low-latency micro-batches whose step raises on every rank leave the Buffer usable: TwoBatchOverlap with B
    over max_tokens_per_rank (A's dispatch was sent: its receive is completed before the error propagates), and
    three generators on one Buffer through run_interleaved (the third dispatch is refused: two calls in flight).
    The next plain call equals the one before."""
    m = make_global(5, [6] * world, 32, 16, 0, 4 * world)
    buf = largeep.Buffer(None, hidden=32, num_experts=4 * world, num_topk=2, max_tokens_per_rank=6,
                         low_latency=True, backend="torch")
    try:
        layer = _build_layer(buf, m, 16, 0)
        x = m.xs[rank]
        with torch.no_grad():
            want = layer(x)
            for what, run, words in (
                ("B over max_tokens_per_rank", lambda: layers.TwoBatchOverlap(layer)(x[:3], torch.cat([x, x[:1]])),
                 ("max_tokens_per_rank",)),
                ("three generators", lambda: layers.run_interleaved([layer.low_latency_steps(x) for _ in range(3)]),
                 ("two calls", "in flight")),
            ):
                try:
                    run()
                except largeep.ArgumentError as exc:
                    assert all(w in str(exc) for w in words), (what, exc)
                else:
                    raise AssertionError(f"rank {rank}: {what} was not refused")
                assert torch.equal(layer(x), want), f"rank {rank}: the call after {what} differs"
    finally:
        buf.destroy()


def replicas_start_equal(rank: int, world: int) -> None:
    """With every rank's generator seeded alike, a MoELayer's slots that hold one logical expert start with the same
    weights on every rank (replicas), and slots of different experts with different weights (also at the same
    local index on different ranks, which plain per-rank draws would make equal)."""
    from largeep import placement as pl

    buf = largeep.Buffer(None, hidden=32, num_experts=3 * world, num_topk=2, max_tokens_per_rank=8, backend="torch")
    try:
        topo = pl.Topology(num_nodes=1, gpus_per_node=world, slots_per_gpu=3)
        plc = pl.greedy_placement(torch.tensor([8.0] + [1.0] * (3 * world - 2)), topo)
        table = plc.phys_to_log.tolist()
        assert len(set(table)) < len(table), table  # some expert has replicas
        for placement in (plc, None):
            torch.manual_seed(11)
            layer = layers.MoELayer(buf, ffn_hidden=8, placement=placement)
            experts = table if placement is not None else list(range(3 * world))
            for name in ("w13", "w2"):
                mine = getattr(layer.experts, name).detach()
                parts = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(parts, mine)
                slots = torch.cat(parts)
                for i in range(len(experts)):
                    for j in range(i):
                        same = torch.equal(slots[i], slots[j])
                        if (experts[i] == experts[j]) != same:
                            raise AssertionError(
                                f"rank {rank}: {name} of slots {j} and {i} (experts {experts[j]}, {experts[i]}) "
                                f"{'equal' if same else 'differ'}"
                            )
            # built on the meta device, materialised and reset: the same weights
            torch.manual_seed(11)
            with torch.device("meta"):
                meta = layers.MoELayer(buf, ffn_hidden=8, placement=placement)
            meta.to_empty(device="cpu")
            meta.experts.reset_parameters()
            assert torch.equal(meta.experts.w13, layer.experts.w13) and torch.equal(meta.experts.w2, layer.experts.w2)
            # every module with parameters can draw them again (the usual loop after to_empty): the router's and
            # the shared experts' too, which held uninitialised memory before
            with torch.device("meta"):
                meta = layers.MoELayer(buf, ffn_hidden=8, placement=placement, shared_ffn_hidden=16)
            meta.to_empty(device="cpu")
            for m in meta.modules():
                if any(True for _ in m.parameters(recurse=False)):
                    assert hasattr(m, "reset_parameters"), f"{type(m).__name__} cannot draw its parameters again"
                    m.reset_parameters()
            for name, p in meta.named_parameters():
                want = p.shape[-2] ** -0.5 if name.startswith("experts.") else p.shape[0 if "shared" in name else
                                                                                       1] ** -0.5
                got = float(p.detach().float().std())
                assert 0.7 * want < got < 1.3 * want, f"{name}: std {got:.3g}, drawn with {want:.3g}"
    finally:
        buf.destroy()


def layer_refuses_worst_with_rounds(rank: int, world: int) -> None:
    """MoELayer(num_worst_tokens=...) on a Buffer in rounds is refused when made, naming both."""
    buf = largeep.Buffer(None, hidden=32, num_experts=4, num_topk=2, max_tokens_per_rank=16, backend="torch",
                         tokens_per_round=4)
    try:
        try:
            layers.MoELayer(buf, ffn_hidden=8, num_worst_tokens=64)
            raise AssertionError("MoELayer(num_worst_tokens=...) on a Buffer in rounds was accepted")
        except largeep.ArgumentError as exc:
            assert "num_worst_tokens" in str(exc) and "tokens_per_round" in str(exc) and "4 rounds" in str(exc), exc
    finally:
        buf.destroy()


def inference_mode_matches_no_grad(rank: int, world: int, tokens: list[int]) -> None:
    """Normal-mode MoELayer (plain, in chunks, with num_worst_tokens), MoEPipeline and ops.dispatch/combine under
    torch.inference_mode (prefill) equal the same calls under no_grad bit for bit (the eager dispatch read the
    returned ids' version counter, which inference tensors do not have)."""
    dev = device_for("torch")
    buf = largeep.Buffer(None, hidden=16, num_experts=4 * world, num_topk=2, max_tokens_per_rank=16,
                         backend="torch")
    try:
        torch.manual_seed(0)
        layer = layers.MoELayer(buf, ffn_hidden=8).to(dev)
        x = torch.randn(tokens[rank], 16, generator=_gen(rank, 5)).to(dev)
        idx = torch.stack([torch.randperm(4 * world, generator=_gen(rank, t))[:2] for t in range(tokens[rank])])
        w = torch.rand(tokens[rank], 2, generator=_gen(rank, 9))
        calls = {
            "plain": lambda: layer(x),
            "chunks": lambda: layers.MoELayer(buf, ffn_hidden=8, num_chunks=2).to(dev).eval()(x),
            "pipeline": lambda: layers.MoEPipeline([layer], num_chunks=2)(x),
            "ops": lambda: (lambda d: ops.combine(buf, d.x, d.handle).x)(ops.dispatch(buf, x, idx.to(dev),
                                                                                       w.to(dev))),
        }
        for name, call in calls.items():
            torch.manual_seed(1)
            with torch.no_grad():
                want = call()
            torch.manual_seed(1)
            with torch.inference_mode():
                got = call()
            assert torch.equal(got, want), name
        layer.num_worst_tokens = 16 * world
        with torch.no_grad():
            want = layer(x)
        with torch.inference_mode():
            assert torch.equal(layer(x), want), "num_worst_tokens"
    finally:
        buf.destroy()


def _layer_refused(buf: largeep.Buffer, want: str, **kw: Any) -> None:
    """MoELayer(buf, **kw) raises ArgumentError whose message holds ``want``."""
    try:
        layers.MoELayer(buf, **kw)
    except largeep.ArgumentError as exc:
        assert want in str(exc), str(exc)
    else:
        raise AssertionError(f"MoELayer accepted {kw} on a {'low-latency' if buf.ctx.low_latency else 'normal'} "
                             "Buffer")


def layer_size_checks(rank: int, world: int) -> None:
    """MoELayer's sizes are ints of their range, refused naming the argument (they failed later: a negative
    dimension, a division by zero, tensor_split's TypeError); the FP8 and low-latency settings where they do not
    apply."""
    buf = largeep.Buffer(None, hidden=16, num_experts=4 * world, num_topk=2, max_tokens_per_rank=8, backend="torch")
    try:
        for arg, value in (("ffn_hidden", 0), ("ffn_hidden", -8), ("ffn_hidden", 8.0), ("num_chunks", 2.5),
                           ("shared_ffn_hidden", -1), ("num_worst_tokens", True)):
            _layer_refused(buf, f"argument '{arg}' must be an int", **{"ffn_hidden": 8, arg: value})
        # FP8 dispatch: a bool, a hidden size of whole 128-channel groups (16 is not), normal mode only
        _layer_refused(buf, "argument 'use_fp8' must be a bool", ffn_hidden=8, use_fp8=1)
        _layer_refused(buf, "use_fp8 needs hidden % 128 == 0, hidden is 16", ffn_hidden=8, use_fp8=True)
        _layer_refused(buf, "argument 'bf16_partial_sums' must be a bool", ffn_hidden=8, bf16_partial_sums="yes")
        # the weights' dtype: a floating-point torch.dtype (an int dtype met the parameters' requires_grad, a string
        # torch.empty), and the Buffer itself (it met an AttributeError on .ctx); TwoBatchOverlap's layer likewise
        for dtype in (torch.int32, "float32", torch.bool):
            _layer_refused(buf, "argument 'dtype' must be None or a floating-point torch.dtype", ffn_hidden=8,
                           dtype=dtype)
        _raises(("MoELayer: argument 'buffer' must be a largeep.Buffer, got str",), layers.MoELayer, "buf",
                ffn_hidden=8)
        _raises(("TwoBatchOverlap: argument 'layer' must be a MoELayer, got NoneType",), layers.TwoBatchOverlap, None)
    finally:
        buf.destroy()
    ll = largeep.Buffer(None, hidden=128, num_experts=4 * world, num_topk=2, max_tokens_per_rank=8, backend="torch",
                        low_latency=True)
    try:
        _layer_refused(ll, "'use_fp8' applies to normal mode; a low-latency Buffer takes ll_use_fp8", ffn_hidden=8,
                       use_fp8=True)
        _layer_refused(ll, "'ll_bf16_partial_sums' = True needs ll_send_weights=True", ffn_hidden=8,
                       ll_bf16_partial_sums=True, ll_send_weights=False)
        _layer_refused(ll, "'bf16_partial_sums' applies to normal mode; a low-latency Buffer takes "
                       "ll_bf16_partial_sums", ffn_hidden=8, bf16_partial_sums=True)
    finally:
        ll.destroy()
    # the low-latency settings on a normal-mode Buffer, which would be ignored there
    nb = largeep.Buffer(None, hidden=128, num_experts=4 * world, num_topk=2, max_tokens_per_rank=8, backend="torch")
    try:
        _layer_refused(nb, "'ll_use_fp8' applies to low-latency mode; a normal-mode Buffer takes use_fp8",
                       ffn_hidden=8, ll_use_fp8=True)
        _layer_refused(nb, "'ll_bf16_partial_sums' = True applies to low-latency mode", ffn_hidden=8,
                       ll_bf16_partial_sums=True)
        _layer_refused(nb, "'ll_send_weights' = False applies to low-latency mode", ffn_hidden=8,
                       ll_send_weights=False)
    finally:
        nb.destroy()


def _raises(words: tuple[str, ...], fn: Any, *args: Any, **kwargs: Any) -> None:
    """fn(*args, **kwargs) raises ArgumentError whose message holds each of ``words``."""
    try:
        fn(*args, **kwargs)
    except largeep.ArgumentError as exc:
        msg = str(exc)
        assert all(w in msg for w in words), f"message {msg!r} lacks {words}"
    else:
        raise AssertionError(f"no ArgumentError (expected one saying {words})")


def layer_input_checks(rank: int, world: int) -> None:
    """Inputs the layer cannot take are refused naming them, in either mode (the low-latency layer took any dtype,
    integers included, and handed back x's dtype; a wrong H met the router's matmul), by load_global_experts on every
    rank (a rank whose slots lay below a short L loaded silently where the others raised IndexError; a longer L took
    its first rows) and by MoEPipeline's num_chunks (a float or a bool failed in the first forward)."""
    h, f, e = 16, 8, 4 * world
    nb = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=2, max_tokens_per_rank=8, backend="torch")
    lb = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=2, max_tokens_per_rank=8, backend="torch",
                        low_latency=True)
    try:
        torch.manual_seed(0)
        for layer in (layers.MoELayer(nb, ffn_hidden=f), layers.MoELayer(lb, ffn_hidden=f)):
            for dtype in (torch.int64, torch.float16, torch.float64):
                _raises((f"MoELayer: argument 'x' has dtype {dtype}, expected torch.bfloat16, torch.float32",),
                        layer, torch.ones(3, h, dtype=dtype))
            _raises((f"MoELayer: argument 'x' has shape (3, {h + 1}), expected ('*', {h}) (dim 1)",), layer,
                    torch.randn(3, h + 1))
            _raises((f"MoELayer: argument 'x' has 1 dimensions ({h},), expected 2",), layer, torch.randn(h))
            _raises(("MoELayer: argument 'x' must be a torch.Tensor, got list",), layer, [[0.0] * h])
            assert layer(torch.randn(3, h)).shape == (3, h)  # (and the layer still works)
        # bf16_partial_sums: bf16 x only (the expert rows the combines sum are in x's dtype), refused before any
        # dispatch, and the layer still works
        part = layers.MoELayer(nb, ffn_hidden=f, bf16_partial_sums=True, dtype=torch.bfloat16)
        _raises(("MoELayer: argument 'bf16_partial_sums' = True needs x in bfloat16", "torch.float32"), part,
                torch.randn(3, h))
        assert part(torch.randn(3, h).bfloat16()).dtype == torch.bfloat16
        layer = layers.MoELayer(nb, ffn_hidden=f)
        for el, ff in ((e - 1, f), (2 * e, f), (e, f + 1)):
            w1, w3, w2 = torch.randn(el, h, ff), torch.randn(el, h, ff), torch.randn(el, ff, h)
            _raises(("MoELayer.load_global_experts: argument 'w1' has shape",), layer.load_global_experts, w1, w3, w2)
        _raises((f"argument 'w2' has shape ({e}, {h}, {f}), expected (L, {f}, {h}) with L = {e}",),
                layer.load_global_experts, torch.randn(e, h, f), torch.randn(e, h, f), torch.randn(e, h, f))
        layer.load_global_experts(torch.randn(e, h, f), torch.randn(e, h, f), torch.randn(e, f, h))
        # its phys_to_log: one int per physical slot, -1 the least (a short one met an IndexError, a float one
        # indexed the weights with floats)
        for table, got in ((torch.tensor([0]), "torch.int64 tensor of shape (1,)"),
                           (torch.arange(e).float(), "torch.float32 tensor"), (torch.full((e,), -2), "a value -2")):
            _raises(("MoELayer.load_global_experts: argument 'phys_to_log' must be an integer tensor", got),
                    layer.load_global_experts, torch.randn(e, h, f), torch.randn(e, h, f), torch.randn(e, f, h), table)
        _raises(("GroupedExperts.seeded_init_: argument 'experts' has 1 entries, expected one per slot (2)",),
                layers.GroupedExperts(2, h, f).seeded_init_, [0], 1)
        for chunks in (2.5, True, "2", 0):
            _raises(("MoEPipeline: argument 'num_chunks' must be an int >= 1",), layers.MoEPipeline, [layer],
                    None, chunks)
    finally:
        nb.destroy()
        lb.destroy()


def repeated_expert_gate(rank: int, world: int) -> None:
    """A gate that names one expert at several k (no distinct_experts attribute): every (token, k) is computed and
    weighted, with variable and fixed (num_worst_tokens) outputs, against a per-token loop over the experts (the
    layer took the dispatch's rows per expert for its (row, k) entries, and dropped or misread the extra ones)."""
    dev = device_for("torch")
    e, k, h, f = 4 * world, 3, 32, 16
    buf = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=8, backend="torch")

    class RepeatGate(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = torch.arange(x.shape[0], device=x.device)
            idx = torch.stack([t % e, t % e, (t * 5 + 1) % e], dim=1)  # k 0 and 1 name one expert
            idx[::4, 2] = -1
            return idx, torch.linspace(0.1, 0.9, x.shape[0] * k, device=x.device).view(-1, k)

    try:
        x = torch.randn(7, h, generator=_gen(rank, 3)).to(dev)
        for worst in (0, 8 * world):
            torch.manual_seed(5)
            layer = layers.MoELayer(buf, ffn_hidden=f, gate=RepeatGate(), num_worst_tokens=worst).to(dev)
            with torch.no_grad():
                y = layer(x)
                idx, wts = RepeatGate()(x)
                ref = _per_entry_reference(layer, x, idx, wts, world)
            close(y, ref, f"repeated experts, num_worst_tokens={worst}")
    finally:
        buf.destroy()


def _per_entry_reference(layer: layers.MoELayer, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor,
                         world: int) -> torch.Tensor:
    """sum over (t, k) with idx[t, k] >= 0 of wts[t, k] * SwiGLU of physical expert idx[t, k] (the experts'
    weights gathered from every rank), one entry at a time."""
    f = layer.experts.w2.shape[1]
    w13 = torch.cat([torch.empty_like(layer.experts.w13)] * world)
    dist.all_gather_into_tensor(w13, layer.experts.w13.contiguous())
    w2 = torch.cat([torch.empty_like(layer.experts.w2)] * world)
    dist.all_gather_into_tensor(w2, layer.experts.w2.contiguous())
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            ex = int(idx[t, j])
            if ex >= 0:
                a = x[t] @ w13[ex]
                ref[t] += wts[t, j] * ((F.silu(a[:f]) * a[f:]) @ w2[ex])
    return ref


def merging_placement(rank: int, world: int) -> None:
    """A gate whose choices are distinct (distinct_experts = True) and a placement callable that sends two logical
    experts to one physical expert: the layer must not take the dispatch's rows per expert for its (row, k) entries
    (it dropped one of the two, half the output), with variable and fixed outputs; against a per-entry loop."""
    dev = device_for("torch")
    e, k, h, f = 4 * world, 2, 32, 16
    buf = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=8, backend="torch")

    class DistinctGate(torch.nn.Module):
        distinct_experts = True

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = torch.arange(x.shape[0], device=x.device)
            idx = torch.stack([t % e, t % e + e], dim=1)  # distinct logical experts, one physical expert
            return idx, torch.linspace(0.1, 0.9, x.shape[0] * k, device=x.device).view(-1, k)

    try:
        x = torch.randn(7, h, generator=_gen(rank, 4)).to(dev)
        for worst in (0, 8 * world):
            torch.manual_seed(6)
            layer = layers.MoELayer(buf, ffn_hidden=f, gate=DistinctGate(), num_logical_experts=2 * e,
                                    placement=lambda i: i % e, num_worst_tokens=worst).to(dev)
            with torch.no_grad():
                y = layer(x)
                idx, wts = DistinctGate()(x)
                ref = _per_entry_reference(layer, x, idx % e, wts, world)
            close(y, ref, f"a placement that merges experts, num_worst_tokens={worst}")
    finally:
        buf.destroy()


def deepcopy_of_a_model(rank: int, world: int) -> None:
    """copy.deepcopy of a model holding an MoELayer (an EMA copy, a frozen reference): the copy has new parameters
    and shares the Buffer, and gives the same output; pickling the Buffer raises a TypeError that says why."""
    import copy
    import pickle

    buf = largeep.Buffer(None, hidden=32, num_experts=4 * world, num_topk=2, max_tokens_per_rank=8,
                         backend="torch")
    try:
        torch.manual_seed(3)
        model = torch.nn.Sequential(layers.MoELayer(buf, ffn_hidden=16))
        twin = copy.deepcopy(model)
        assert twin[0].buffer is buf
        assert all(a is not b for a, b in zip(model.parameters(), twin.parameters(), strict=True))
        x = torch.randn(5, 32, generator=_gen(rank, 9))
        with torch.no_grad():
            assert torch.equal(model(x), twin(x))
        try:
            pickle.dumps(buf)
        except TypeError as exc:
            assert "cannot be pickled" in str(exc) and "state_dict" in str(exc), str(exc)
        else:
            raise AssertionError("a Buffer was pickled")
    finally:
        buf.destroy()


def replica_grads_with_empty_slots(rank: int, world: int) -> None:
    """allreduce_replica_grads on a table with empty slots (-1) whose last logical expert (the highest id) is
    replicated: each replicated expert's slots get the sum of all its copies' grads (float64 loop over every rank's
    grads, drawn from shared seeds), and every other slot -- an empty one, a single copy -- keeps its own grad.
    An empty slot must not be read as logical expert -1 (which Python indexing would take for the last one)."""
    s = 4
    # 4 slots per rank; logical 0 and 3 (the highest id) have two copies, 1 and 2 one; slots 1 and 6 are empty
    table = torch.tensor([3, -1, 0, 1, 0, 3, -1, 2] + [2, 1, -1, -1] * (world - 2), dtype=torch.int64)
    assert table.numel() == world * s
    shapes = [(s, 2, 3), (s, 5)]
    grads = [[torch.randn(*shape, generator=_gen(17, r, i)) for i, shape in enumerate(shapes)]
             for r in range(world)]
    params = [torch.nn.Parameter(torch.zeros(*shape)) for shape in shapes]
    for p, g in zip(params, grads[rank], strict=True):
        p.grad = g.clone()
    counts = torch.bincount(table[table >= 0])
    q = layers.allreduce_replica_grads(params, table)
    assert q == int((counts > 1).sum()), q
    for i, p in enumerate(params):
        for local in range(s):
            slot = rank * s + local
            e = int(table[slot])
            if e >= 0 and counts[e] > 1:
                want = torch.zeros(shapes[i][1:], dtype=torch.float64)
                for other in (table == e).nonzero().flatten().tolist():
                    want += grads[other // s][i][other % s].double()
            else:
                want = grads[rank][i][local].double()
            assert p.grad is not None
            close(p.grad[local], want, f"rank {rank}: grad of param {i}, slot {slot} (expert {e})", rtol=1e-6)


def gate_output_checks(rank: int, world: int) -> None:
    """A gate whose output is not (topk_idx, topk_weights), or whose ids are not integers, is refused naming the
    gate (it failed with AttributeError or IndexError, and float ids were truncated to other experts); so are a
    phys_to_log of allreduce_replica_grads that is not an integer tensor or holds ids below -1 (a list failed with
    AttributeError; -2 counted as an empty slot)."""
    h, e = 16, 4 * world
    buf = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=2, max_tokens_per_rank=8, backend="torch")
    try:
        x = torch.randn(4, h)
        idx = torch.tensor([[0, 1]] * 4)
        w = torch.full((4, 2), 0.5)
        for out, words in (
            (idx, ("returned a torch.int64 tensor of shape (4, 2)", "expected (topk_idx, topk_weights)")),
            ((idx,), ("returned a tuple",)),
            ((idx.float() + 0.9, w), ("topk_idx as a torch.float32 tensor", "expected an integer tensor")),
            ((idx, idx), ("topk_weights as a torch.int64 tensor", "expected a float tensor")),
            ((idx.tolist(), w), ("topk_idx as a list",)),
        ):
            layer = layers.MoELayer(buf, ffn_hidden=8, gate=lambda _x, out=out: out)
            _raises(("argument 'gate'", *words), layer, x)
        # shapes other than [T, K] (they were refused as the dispatch's own arguments)
        for out, words in (((idx[:, :1], w[:, :1]), ("topk_idx of shape (4, 1), expected (4, 2)",)),
                           ((idx, w[:3]), ("topk_weights of shape (3, 2), expected (4, 2)",))):
            layer = layers.MoELayer(buf, ffn_hidden=8, gate=lambda _x, out=out: out)
            _raises(("argument 'gate'", *words), layer, x)
        # a placement callable's output: integer ids of the choices' shape (float ids were truncated to other
        # physical experts, silently)
        for place, words in ((lambda i: i.float() + 0.9, ("returned a torch.float32 tensor of shape (4, 2)",)),
                             (lambda i: i[:, :1], ("returned a torch.int64 tensor of shape (4, 1)",))):
            layer = layers.MoELayer(buf, ffn_hidden=8, gate=lambda _x: (idx, w), placement=place)
            _raises(("argument 'placement'", *words, "expected an integer tensor (int64) of shape (4, 2)"), layer, x)
        layer = layers.MoELayer(buf, ffn_hidden=8, gate=lambda _x: (idx.int(), w.double()))  # (other widths: fine)
        assert layer(x).shape == (4, h)
        params = [layer.experts.w13, layer.experts.w2]
        n_slots = world * layer.experts.w13.shape[0]
        _raises(("argument 'phys_to_log'", "integer tensor", "list"), layers.allreduce_replica_grads, params,
                list(range(n_slots)))
        bad = torch.arange(n_slots)
        bad[0] = -2
        _raises(("argument 'phys_to_log'", "holds -2"), layers.allreduce_replica_grads, params, bad)
    finally:
        buf.destroy()


def layer_node_limited_replicas(rank: int, world: int, tokens: list[int], seed: int) -> None:
    """Found by review: with replicas, a node-limited gate's tokens reached more nodes than its limit, and its
    capacity counted a replicated expert as one slot. 3 nodes of 1 rank, expert 3 held on nodes 1 (its home) and
    2, tokens steered to experts 2 and 3 (both homed on node 1) under a limit of 1 node: the layer routes with
    node_limited (each token reaches only its node and its experts' home nodes; plain route sends some of node 0's
    to node 2), and the gate's capacity takes the placement's replica counts."""
    from largeep import placement as pl
    from largeep.gate import GateConfig, TopKGate

    assert world == 3
    hidden = 16
    p = pl.Placement(pl.Topology(3, 1, slots_per_gpu=3), 6, torch.tensor([0, 1, -1, 2, 3, -1, 4, 5, 3]))
    torch.manual_seed(seed)
    gate = TopKGate(GateConfig(hidden=hidden, num_experts=6, topk=2, topk_groups=1, bias_balancing=False,
                               capacity_factor=4.0), group_of_expert=p.home_node()).eval()
    with torch.no_grad():
        gate.weight[2:4] += 3.0  # (x below has a positive mean: experts 2 and 3 come first)
    buf = largeep.Buffer(None, hidden=hidden, num_experts=9, num_topk=2, max_tokens_per_rank=max(tokens),
                         backend="torch", ranks_per_node=1)
    try:
        layer = layers.MoELayer(buf, ffn_hidden=8, placement=p, gate=gate)
        assert torch.equal(gate.expert_replicas, p.replica_count), gate.expert_replicas
        x = torch.randn(tokens[rank], hidden, generator=_gen(seed, rank)) + 1.0
        with torch.no_grad():
            idx, _ = layer.route(x)
            logical = gate(x).topk_idx
        assert torch.equal(idx, p.route(logical, rank, node_limited=True))
        home = p.home_node()  # (its numbers are the nodes here: every node is a home)
        for row, lrow in zip(idx.tolist(), logical.tolist(), strict=True):
            allowed = {rank} | {int(home[e]) for e in lrow if e >= 0}
            assert {s // 3 for s in row if s >= 0} <= allowed, (rank, row, lrow)
        if rank == 0:  # (the case the limit changes: plain route sends some of expert 3's choices to node 2)
            plain = p.route(logical, 0)
            assert (plain == 8).any() and not (idx == 8).any(), plain
    finally:
        buf.destroy()


def layer_bf16_partial_sums(rank: int, world: int, ranks_per_node: int | None, seed: int) -> None:
    """MoELayer(bf16_partial_sums=True), bf16 layer: every combine it runs (whole batch, 2 chunks, the layers of a
    MoEPipeline) gives, bit for bit, the combine of its expert rows with each other node's float32 partial sum
    rounded to bf16 (ops_bodies.node_partials_reference), and x's gradient (a fixed gate, no shared experts: the
    dispatch's backward alone) the same of its gradient rows; without the flag, the float32 partials. The two
    layers' outputs and x grads differ exactly where those references do, which is somewhere with 2 nodes of 2
    ranks and nowhere with one node. The custom-op path and torch.compile(fullgraph, aot_eager) of the flagged
    layer give the eager bits."""
    from ops_bodies import node_partials_reference

    hidden, ffn, e, k = 32, 16, 2 * world, 3
    tokens = [13, 0, 18, 11]
    buf = largeep.Buffer(None, hidden=hidden, num_experts=e, num_topk=k, max_tokens_per_rank=max(tokens),
                         backend="torch", ranks_per_node=ranks_per_node)
    p = ranks_per_node or world
    x = torch.randn(tokens[rank], hidden, generator=_gen(seed, rank)).to(torch.bfloat16)
    cot = torch.randn(tokens[rank], hidden, generator=_gen(seed, rank, 1))

    def build(flag: bool, routed: Any = None, **kw: Any) -> layers.MoELayer:
        torch.manual_seed(seed)  # (the same weights in every layer built here, on every rank)
        layer = layers.MoELayer(buf, ffn_hidden=ffn, dtype=torch.bfloat16, bf16_partial_sums=flag, **kw)
        assert layer.bf16_partial_sums is flag
        if routed is not None:
            layer.gate = _FixedGate(routed)
        return layer

    def checked(layer: layers.MoELayer, grads: list[Any]) -> None:
        """Wraps the layer's combine_chunk: each combine's output against the reference of its rows, and the
        gradient rows of its dispatch kept (with the handle) for the reference of x's gradient."""
        orig = layer.combine_chunk

        def combine_chunk(y: torch.Tensor, d: ops.DispatchOutput) -> ops.CombineOutput:
            res = orig(y, d)
            ops.wait(res.event)
            assert isinstance(d.handle, ops.OpHandle)
            want = node_partials_reference(buf, d.handle.handle, y.detach())[int(layer.bf16_partial_sums)]
            assert torch.equal(res.x.detach().view(torch.int16), want.view(torch.int16)), (
                f"rank {rank}: combine with bf16_partial_sums={layer.bf16_partial_sums} differs from the reference")
            if d.x.requires_grad:
                slot: list[Any] = [d.handle.handle]
                grads.append(slot)
                d.x.register_hook(slot.append)
            return res

        layer.combine_chunk = combine_chunk  # type: ignore[method-assign]

    try:
        with torch.no_grad():
            routed = build(False).route(x)
        for chunks in (1, 2):
            outs, xgrads = [], []
            for flag in (False, True):
                layer = build(flag, routed, num_chunks=chunks)
                grads: list[Any] = []
                checked(layer, grads)
                xg = x.clone().requires_grad_()
                out = layer(xg)
                (out.float() * cot).sum().backward()
                assert xg.grad is not None and len(grads) == chunks
                # x's gradient: the dispatch's backward of each chunk, a combine of the chunk's gradient rows
                want = [node_partials_reference(buf, h, g)[int(flag)] for h, g in grads]
                assert torch.equal(xg.grad.view(torch.int16), torch.cat(want).view(torch.int16)), (
                    f"rank {rank}: x's gradient with bf16_partial_sums={flag} ({chunks} chunks) differs from the "
                    "reference")
                outs.append(out.detach())
                xgrads.append(xg.grad)
                assert ops.live_handles(layer.buffer_id) == 0
            # (the same expert rows and gradient rows in both layers: they differ by the roundings alone)
            for what, a, b in (("output", outs[0], outs[1]), ("x grad", xgrads[0], xgrads[1])):
                differs = a.view(torch.int16) != b.view(torch.int16)
                assert not differs.any() or 1 < p < world, f"rank {rank}: {what} changed within one node"
                found = torch.tensor([int(differs.any())])
                dist.all_reduce(found)
                assert (int(found.item()) > 0) == (1 < p < world), (
                    f"{what}: the flag changed {'nothing' if not found.item() else 'something'} with "
                    f"{world // p} nodes of {p} ranks")
        # the cross-layer pipeline: each of its combines (2 layers, 2 chunks) checked as above
        stack = [build(True, routed), build(True)]
        grads = []
        for layer in stack:
            checked(layer, grads)
        layers.MoEPipeline(stack, num_chunks=2)(x)
        # the custom-op path and a compiled layer: the eager flagged layer's bits
        want_out, want_grad = outs[1], xgrads[1]
        for how in ("custom", "aot_eager") if 1 < p < world else ("custom",):  # (compiled: where the flag acts)
            layer = build(True, routed, num_chunks=2, use_custom_ops=how == "custom")
            fn: Any = layer
            if how != "custom":
                torch._dynamo.reset()
                fn = torch.compile(layer, backend=how, fullgraph=True)
            for _ in range(2 if how != "custom" else 1):
                xg = x.clone().requires_grad_()
                out = fn(xg)
                (out.float() * cot).sum().backward()
                assert torch.equal(out.view(torch.int16), want_out.view(torch.int16)), f"rank {rank}: {how} output"
                assert xg.grad is not None and torch.equal(xg.grad, want_grad), f"rank {rank}: {how} x grad"
            assert ops.live_handles(layer.buffer_id) == 0
    finally:
        torch._dynamo.reset()
        buf.destroy()


def error_frees_custom_op_handles(rank: int, world: int) -> None:
    """A forward on the custom-op path that raises after a dispatch (the last chunk's ids refused after the chunks
    before it went: 2 chunks, and 3, whose middle chunk is dispatched in the loop over chunks; a pipeline's between
    function failing) frees the registry entries of its dispatches, which no combine or backward will use now: none
    is left, and the next call gives the eager path's output."""
    e, k, h, f = 2 * world, 2, 16, 8
    buf = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=8, backend="torch")
    other = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=8, backend="torch")

    class LateBadGate(torch.nn.Module):
        distinct_experts = True

        def __init__(self) -> None:
            super().__init__()
            self.bad = True

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = torch.arange(x.shape[0])
            idx = torch.stack([t % e, (t + 1) % e], dim=1)
            if self.bad:
                idx[-1, 0] = e + 5  # in the last chunk only
            return idx, torch.linspace(0.2, 0.8, x.shape[0] * k).view(-1, k)

    try:
        x = torch.randn(6, h, generator=_gen(rank, 8))
        for grad, chunks in ((False, 2), (True, 2), (False, 3), (True, 3)):
            gate = LateBadGate()
            torch.manual_seed(9)
            layer = layers.MoELayer(buf, ffn_hidden=f, gate=gate, num_chunks=chunks, use_custom_ops=True)
            torch.manual_seed(9)
            eager = layers.MoELayer(buf, ffn_hidden=f, gate=gate, num_chunks=chunks)
            xi = x.clone().requires_grad_(grad)
            for _ in range(3):
                try:
                    layer(xi)
                    raise AssertionError("expert id refused: no error")
                except largeep.ArgumentError as exc:
                    assert "expert id" in str(exc), exc
            assert ops.live_handles(layer.buffer_id) == 0, ops.live_handles(layer.buffer_id)
            gate.bad = False
            close(layer(xi), eager(xi), f"custom-op layer after errors (grad {grad})", rtol=1e-6)

        def between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == 2:
                raise ValueError("between failed")
            return a + b

        # (the pipeline's second layer on a Buffer of its own: its dispatches' entries are that Buffer's)
        torch.manual_seed(10)
        stack = [layers.MoELayer(b, ffn_hidden=f, use_custom_ops=True) for b in (buf, other)]
        pipe = layers.MoEPipeline(stack, [between], num_chunks=3)
        xg = x.clone().requires_grad_()
        calls = [0]
        try:
            pipe(xg)
            raise AssertionError("between raised: no error")
        except ValueError:
            pass
        for layer in stack:
            assert ops.live_handles(layer.buffer_id) == 0, (layer.buffer_id, ops.live_handles(layer.buffer_id))
        calls[0] = -100
        want = stack[1](stack[0](x) + x)
        close(pipe(x), want, "custom-op pipeline after an error", rtol=1e-5)
    finally:
        other.destroy()
        buf.destroy()


# ---------------------------------------------------------------------------------------------------------------
# data parallelism over the replicated parameters (DDP) + expert parallelism, against a dense single process
# ---------------------------------------------------------------------------------------------------------------


class _Block(torch.nn.Module):
    """Linear, LayerNorm, then ``moe`` (an MoELayer, or the dense reference's function) with a residual."""

    def __init__(self, h: int, moe: Any) -> None:
        super().__init__()
        self.pre, self.norm = torch.nn.Linear(h, h), torch.nn.LayerNorm(h)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.pre(x))
        return z + self.moe(z)  # type: ignore[no-any-return]


class _DataParallelSteps:
    """The setting of docs/usage.md's data-parallel recipes ("Gradients the layer leaves to you"): a _Block whose
    MoELayer has a TopKGate and shared experts, global expert weights and each step's tokens (the union of every
    rank's) drawn alike on every rank; :meth:`check` trains it under a data-parallel wrapper and holds it to a dense
    single-process model of the same weights."""

    h, k, f, fs, steps, lr = 16, 2, 12, 8, 2, 0.05

    def __init__(self, rank: int, world: int, tokens: list[int], seed: int, device: str) -> None:
        self.rank, self.world, self.tokens, self.seed, self.device = rank, world, tokens, seed, device
        self.e = 2 * world
        h, e, f = self.h, self.e, self.f
        self.total = sum(tokens)
        self.mine = slice(sum(tokens[:rank]), sum(tokens[: rank + 1]))
        g = _gen(seed, 1)
        w1, w3 = (torch.randn(e, h, f, generator=g) * h**-0.5 for _ in range(2))
        w2 = torch.randn(e, f, h, generator=g) * f**-0.5
        self.w = [w.to(device) for w in (w1, w3, w2)]
        self.data = [(torch.randn(self.total, h, generator=g).to(device),
                      torch.randn(self.total, h, generator=g).to(device)) for _ in range(self.steps)]

    def gate(self) -> Any:
        from largeep.gate import GateConfig, TopKGate

        return TopKGate(GateConfig(hidden=self.h, num_experts=self.e, topk=self.k, bias_update_rate=0.05))

    def layer(self, buf: largeep.Buffer, chunks: int = 1) -> layers.MoELayer:
        torch.manual_seed(self.seed)  # the same replicated weights on every rank
        return layers.MoELayer(buf, ffn_hidden=self.f, gate=self.gate(), shared_ffn_hidden=self.fs, num_chunks=chunks)

    def check(self, buf: largeep.Buffer, chunks: int, wrap: Callable[[_Block, Any], Any], how: str,
              full: Callable[[torch.Tensor], torch.Tensor] = lambda p: p) -> _Block:
        """``wrap(model, moe)`` gives what the forward goes through (DDP's module, or the model FSDP sharded in
        place). Each rank's loss is its share of the mean over all ranks' tokens times the world size (the
        wrapper averages), the expert grads divided by it, SGD, then ``update_bias`` over the group: two steps
        equal the dense model's on the union of the tokens (every expert in one process): the output, the gate's
        load, every parameter (``full`` gathers a sharded one) and the gate's bias. Returns the model."""
        rank, world, k, dev = self.rank, self.world, self.k, self.device
        moe = self.layer(buf, chunks)
        model = _Block(self.h, moe).to(dev)
        moe.load_global_experts(*self.w)
        # the dense reference: the same replicated weights, every expert
        ref = _Block(self.h, None).to(dev)
        ref.load_state_dict({n: v for n, v in model.state_dict().items() if not n.startswith("moe.")})
        rgate, rshared = self.gate().to(dev), layers.SwiGLU(self.h, self.fs).to(dev)
        rgate.load_state_dict(moe.gate.state_dict())
        rshared.load_state_dict(moe.shared_experts.state_dict())  # type: ignore[union-attr]
        rw = [torch.nn.Parameter(w.clone()) for w in self.w]

        def dense(z: torch.Tensor) -> torch.Tensor:
            out = rgate(z)
            y = rshared(z)
            for j in range(k):
                ids = out.topk_idx[:, j]
                a, b = (torch.einsum("th,thf->tf", z, w[ids]) for w in rw[:2])
                y = y + out.topk_weights[:, j : j + 1] * torch.einsum("tf,tfh->th", F.silu(a) * b, rw[2][ids])
            return y

        ref.moe = dense
        ref_params = list(ref.parameters()) + list(rgate.parameters()) + list(rshared.parameters()) + rw
        forward = wrap(model, moe)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr)
        ref_opt = torch.optim.SGD(ref_params, lr=self.lr)
        for step, (x, t) in enumerate(self.data):
            what = f"rank {rank}, {how}, {chunks} chunk(s), step {step}"
            out = forward(x[self.mine])
            loss = ((out - t[self.mine]) ** 2).sum() / self.total * world  # (the wrapper divides by world)
            opt.zero_grad()
            loss.backward()
            for p in moe.experts.parameters():
                p.grad /= world  # type: ignore[operator]
            opt.step()
            load = moe.gate.update_bias(dist.group.WORLD)
            rout = ref(x)
            ref_opt.zero_grad()
            (((rout - t) ** 2).sum() / self.total).backward()
            ref_opt.step()
            close(out, rout[self.mine], f"{what}: output")
            assert torch.equal(load, rgate.update_bias()), f"{what}: the gate's load"
            slots = slice(rank * 2, rank * 2 + 2)
            for name, got, want in (
                ("pre.weight", model.pre.weight, ref.pre.weight), ("pre.bias", model.pre.bias, ref.pre.bias),
                ("norm.weight", model.norm.weight, ref.norm.weight), ("norm.bias", model.norm.bias, ref.norm.bias),
                ("gate.weight", moe.gate.weight, rgate.weight), ("gate bias", moe.gate.expert_bias, rgate.expert_bias),
                ("shared w1", moe.shared_experts.w1, rshared.w1),  # type: ignore[union-attr]
                ("shared w3", moe.shared_experts.w3, rshared.w3),  # type: ignore[union-attr]
                ("shared w2", moe.shared_experts.w2, rshared.w2),  # type: ignore[union-attr]
                ("experts w1", moe.experts.w1, rw[0][slots]),
                ("experts w3", moe.experts.w3, rw[1][slots]),
                ("experts w2", moe.experts.w2, rw[2][slots]),
            ):
                close(full(got), want, f"{what}: {name} after the step")
        assert not torch.equal(moe.gate.expert_bias, torch.zeros(self.e, device=dev)), "the bias never moved"
        assert ops.live_handles(moe.buffer_id) == 0
        return model


def ddp_training_steps(rank: int, world: int, tokens: list[int], seed: int, backend: str = "torch",
                       device: str = "cpu") -> dict[str, Any]:
    """docs/usage.md's recipe, "Gradients the layer leaves to you": a block (Linear, LayerNorm, MoELayer with a
    TopKGate and shared experts, residual) under ``DistributedDataParallel`` after ``layers.ddp_ignore_experts``
    (DDP's default buffer broadcast), each rank's loss its share of the mean over all ranks' tokens times the world
    size (DDP averages), the expert grads divided by it, SGD, then ``update_bias`` over the group: two steps equal
    the dense single-process model's on the union of the tokens (every expert in one process), every parameter and
    the gate's bias, with one chunk and two (:class:`_DataParallelSteps`). A DDP over the whole model without
    ``ddp_ignore_experts`` (its construction copied rank 0's experts everywhere) is refused at the forward, on every
    rank. On CUDA (``device``) DDP's all-reduces in the backward run beside the Buffer's backward dispatches and
    combines."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    case = _DataParallelSteps(rank, world, tokens, seed, device)

    def wrap(model: _Block, moe: Any) -> Any:
        assert sorted(layers.ddp_ignore_experts(model)) == ["moe.experts.w13", "moe.experts.w2",
                                                              "moe.gate.expert_load"]
        return DDP(model)

    buf = largeep.Buffer(None, hidden=case.h, num_experts=case.e, num_topk=case.k,
                         max_tokens_per_rank=max(max(tokens), 1), backend=backend)
    try:
        for chunks in (1, 2):
            case.check(buf, chunks, wrap, "DDP")
        # the mistake: the whole model in DDP, experts included
        model = _Block(case.h, case.layer(buf)).to(device)
        try:
            DDP(model)(case.data[0][0][case.mine])
        except largeep.ArgumentError as exc:
            assert "layers.ddp_ignore_experts(model)" in str(exc), str(exc)
        else:
            raise AssertionError("a DDP that averages the experts was not refused")
        return {"steps": case.steps}
    finally:
        buf.destroy()


def fsdp_training_steps(rank: int, world: int, tokens: list[int], seed: int) -> dict[str, Any]:
    """docs/usage.md's FSDP2 recipe, "Gradients the layer leaves to you": a block (Linear, LayerNorm, MoELayer with
    a TopKGate and shared experts, residual) whose replicated parameters ``fully_shard`` shards over the world
    (gloo, CPU) while the routed experts stay each rank's own: ``fully_shard(model, ignored_params=<the experts'
    parameters>)`` (one chunk and two), or ``fully_shard`` on the Linear, the LayerNorm, the gate and the shared
    experts each (two chunks). Each rank's loss is its share of the mean over all ranks' tokens times
    the world size (FSDP averages), the expert grads divided by it, SGD, then ``update_bias`` over the group: two
    steps equal the dense single-process model's on the union of the tokens (every expert in one process), every
    parameter (the sharded ones gathered) and the gate's bias (:class:`_DataParallelSteps`). layers.clip_grad_norm_
    refuses the sharded grads. The whole model sharded (experts included) is refused at the forward on every rank,
    and, past that check, clip_grad_norm_ and allreduce_replica_grads refuse the sharded experts."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    case = _DataParallelSteps(rank, world, tokens, seed, "cpu")
    mesh = init_device_mesh("cpu", (world,))

    def wrap(how: str) -> Callable[[_Block, Any], Any]:
        def shard(model: _Block, moe: Any) -> Any:
            if how == "ignored":
                fully_shard(model, mesh=mesh, ignored_params=set(moe.experts.parameters()))
            else:
                for m in (model.pre, model.norm, moe.gate, moe.shared_experts):
                    fully_shard(m, mesh=mesh)
            sharded = sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))
            assert sharded == ["moe.gate.weight", "moe.shared_experts.w1", "moe.shared_experts.w2",
                               "moe.shared_experts.w3", "norm.bias", "norm.weight", "pre.bias", "pre.weight"], sharded
            return model

        return shard

    def full(p: torch.Tensor) -> torch.Tensor:
        return p.full_tensor() if isinstance(p, DTensor) else p

    buf = largeep.Buffer(None, hidden=case.h, num_experts=case.e, num_topk=case.k,
                         max_tokens_per_rank=max(max(tokens), 1), backend="torch")
    try:
        for how, chunks in (("ignored", 1), ("ignored", 2), ("submodules", 2)):
            model = case.check(buf, chunks, wrap(how), how, full)
        # layers.clip_grad_norm_ refuses FSDP2's sharded grads, naming them (the last model: the recipe's)
        refusals = [(lambda: layers.clip_grad_norm_(model, 1.0), "sharded by FSDP2 (DTensors)")]
        # the whole model sharded, experts included (FSDP would gather a mix of the ranks' experts): refused at
        # the forward, on every rank
        moe = case.layer(buf)
        whole = _Block(case.h, moe)
        fully_shard(whole, mesh=mesh)
        x0 = case.data[0][0][case.mine]
        try:
            whole(x0)
        except largeep.ArgumentError as exc:
            assert "FSDP2 (fully_shard over a module holding this layer) manages experts.w13 over a mesh holding " \
                   f"ranks {list(range(world))}" in str(exc), str(exc)
        else:
            raise AssertionError("a fully_shard over the experts was not refused at the forward")
        # and, where the forward cannot see it (a torch without the registry the check reads), where the experts'
        # grads are handled after the backward
        seen = layers._fsdp_managers
        layers._fsdp_managers = lambda: None  # type: ignore[assignment]
        try:
            whole(x0).sum().backward()
        finally:
            layers._fsdp_managers = seen  # type: ignore[assignment]
        refusals += [(lambda: layers.clip_grad_norm_(whole, 1.0), "routed experts' parameters are sharded by FSDP2"),
                     (lambda: layers.allreduce_replica_grads([moe.experts.w13], torch.arange(case.e)),
                      "params[0] is a DTensor")]
        for call, want in refusals:
            try:
                call()
            except largeep.ArgumentError as exc:
                assert want in str(exc), str(exc)
            else:
                raise AssertionError(f"not refused: {want}")
        return {"steps": case.steps}
    finally:
        buf.destroy()


def fsdp_experts_over_ep_copies(rank: int, world: int) -> None:
    """fully_shard of the routed experts over ranks that hold the same slots (data-parallel copies of the
    expert-parallel group: EP groups {0, 1} and {2, 3}, experts sharded over {0, 2} and {1, 3}) is not refused
    at the forward and computes with the same experts: the output equals an unsharded layer's on the same tokens,
    and the expert grads after the backward are the mean over the copies (FSDP's average) of the unsharded
    layer's grads. A mesh over one EP group ({0, 1}) is refused, on both of its ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    assert world == 4
    h, f, e, k = 16, 8, 4, 2
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))  # dp pairs {0, 2} and {1, 3}
    buf = largeep.Buffer(groups[rank // 2], hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=8,
                         backend="torch")
    try:
        x = torch.randn(6, h, generator=_gen(5, rank))

        def layer() -> layers.MoELayer:
            torch.manual_seed(3)  # the same experts in both EP groups
            return layers.MoELayer(buf, ffn_hidden=f)

        plain, sharded = layer(), layer()
        want = plain(x)
        want.square().sum().backward()
        fully_shard(sharded, mesh=mesh["dp"])  # (the layer: FSDP unshards in its module's forward)
        assert isinstance(sharded.experts.w13, DTensor)
        got = sharded(x)
        close(got, want, f"rank {rank}: experts sharded over the EP copies")
        got.square().sum().backward()
        # the copies' own grads: every rank's (gathered by EP rank over the dp pair) to average
        mine = [p.grad for p in plain.experts.parameters()]
        pair = [r for r in range(world) if r % 2 == rank % 2]
        for name, p, g in zip(("w13", "w2"), sharded.experts.parameters(), mine, strict=True):
            every = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(every, g)
            close(p.grad.full_tensor(), sum(every[r] for r in pair) / 2, f"rank {rank}: {name}'s grad")
        wrong = layer()
        fully_shard(wrong, mesh=mesh["ep"])  # over the EP group itself
        try:
            wrong(x)
        except largeep.ArgumentError as exc:
            assert f"over a mesh holding ranks {[rank // 2 * 2, rank // 2 * 2 + 1]}" in str(exc), str(exc)
        else:
            raise AssertionError("experts sharded over their own EP group were not refused")
    finally:
        buf.destroy()


def layer_global_experts(rank: int, world: int) -> None:
    """MoELayer.gather_global_experts is load_global_experts' inverse: global weights loaded (a placement with a
    replicated expert and an empty slot, every rank) come back exactly, indexed by logical expert; other per-slot
    tensors (an optimizer's state) gather alike and local_experts cuts them back into the slots; replicas that
    differ are refused on every rank naming the expert. A checkpoint of the gathered experts (and the replicated
    gate and shared experts' state dict) loads into a layer on one rank (another EP size): its outputs equal the
    original layer's on every rank's tokens. With expert TP (TP 2) the members' shards are joined along F."""
    from largeep import placement as pl
    from largeep.errors import ArgumentError
    from largeep.expert_tp import make_expert_tp_groups
    from largeep.gate import GateConfig, TopKGate

    hidden, ffn, per_rank, topk = 16, 8, 3, 2
    slots = per_rank * world
    logical = slots - 2
    table = torch.arange(slots) % logical  # expert 0 on the first and the second-to-last slot...
    table[-1] = -1  # ...and the last slot empty
    g = _gen(71)
    w1, w3 = (torch.randn(logical, hidden, ffn, generator=g) for _ in range(2))
    w2 = torch.randn(logical, ffn, hidden, generator=g)
    want = [w1, w3, w2]
    topo = pl.Topology(num_nodes=1, gpus_per_node=world, slots_per_gpu=per_rank)
    buf = largeep.Buffer(None, hidden=hidden, num_experts=slots, num_topk=topk, max_tokens_per_rank=32,
                         backend="torch")
    own = [dist.new_group([r]) for r in range(world)]  # (collective: every rank makes every one-rank group)
    try:
        torch.manual_seed(rank)  # per-rank seeds: the replicas start different
        layer = layers.MoELayer(buf, ffn_hidden=ffn, placement=pl.Placement(topo, logical, table.clone()),
                                shared_ffn_hidden=4)
        if world > 1:
            try:
                layer.gather_global_experts()
            except ArgumentError as exc:
                assert "replicas of logical expert 0 differ" in str(exc), exc
            else:
                raise AssertionError(f"rank {rank}: replicas that differ were gathered")
        layer.load_global_experts(w1, w3, w2)
        got = layer.gather_global_experts()
        every: list[Any] = [None] * world
        dist.all_gather_object(every, layer.state_dict())  # (every rank's file, as a checkpoint would hold them)
        offline = layers.global_experts_from_states([{"moe." + k: v for k, v in st.items()} for st in every], "moe.")
        for name, a, b, c in zip(("w1", "w3", "w2"), got, want, offline, strict=True):
            assert a.shape == b.shape and torch.equal(a, b), f"rank {rank}: gathered {name}"
            assert torch.equal(c, b), f"rank {rank}: {name} from the states"
        # other per-slot tensors (as an optimizer's moments): gathered the same way, cut back by local_experts
        m13, m2 = layer.experts.w13 * 3, layer.experts.w2 * 3
        g1, g3, g2 = layer.gather_global_experts(m13, m2)
        assert torch.equal(g1, want[0] * 3) and torch.equal(g3, want[1] * 3) and torch.equal(g2, want[2] * 3)
        c13, c2 = layer.local_experts(g1, g3, g2)
        assert torch.equal(c13, m13) and torch.equal(c2, m2), f"rank {rank}: local_experts"
        try:
            layer.gather_global_experts(m13[:1], m2)
        except ArgumentError as exc:
            assert "argument 'w13' has shape" in str(exc), exc
        else:
            raise AssertionError("a w13 of other shape was gathered")
        # resharding: the whole checkpoint into a layer on one rank (all slots), the same outputs
        ck = {k: v for k, v in layer.state_dict().items() if not k.startswith("experts.") and k != "slot_experts"}
        x = torch.randn(5 + rank, hidden, generator=_gen(72, rank))
        with torch.no_grad():
            out = layer(x)
        one = largeep.Buffer(own[rank], hidden=hidden, num_experts=slots, num_topk=topk, max_tokens_per_rank=32,
                             backend="torch")
        try:
            solo = layers.MoELayer(one, ffn_hidden=ffn, shared_ffn_hidden=4, placement=pl.Placement(
                pl.Topology(num_nodes=1, gpus_per_node=1, slots_per_gpu=slots), logical, table.clone()))
            solo.load_state_dict(ck, strict=False)
            solo.load_global_experts(*got)
            with torch.no_grad():
                torch.testing.assert_close(solo(x), out, rtol=0, atol=1e-5 * float(out.abs().max()))  # (float32 sums)
        finally:
            one.destroy()
    finally:
        buf.destroy()
    if world != 2:
        return
    # expert TP 2: each member holds F/2 of every expert; the gather joins them (a TopKGate, every expert held)
    groups = make_expert_tp_groups(2)
    ep = largeep.Buffer(groups.ep_group, hidden=hidden, num_experts=4, num_topk=topk, max_tokens_per_rank=32,
                        backend="torch")
    try:
        gate = TopKGate(GateConfig(hidden=hidden, num_experts=4, topk=topk))
        tp = layers.MoELayer(ep, ffn_hidden=ffn, gate=gate, expert_tp_group=groups.tp_group)
        tp.load_global_experts(w1[:4], w3[:4], w2[:4])
        assert tp.experts.w13.shape[2] == ffn  # (2 * F/2 columns)
        for name, a, b in zip(("w1", "w3", "w2"), tp.gather_global_experts(), (w1[:4], w3[:4], w2[:4]), strict=True):
            assert torch.equal(a, b), f"rank {rank}: expert TP gathered {name}"
        c13, c2 = tp.local_experts(w1[:4], w3[:4], w2[:4])
        assert torch.equal(c13, tp.experts.w13) and torch.equal(c2, tp.experts.w2)
    finally:
        ep.destroy()


def checkpoint_at_another_ep_size(rank: int, world: int) -> None:
    """docs/usage.md "Checkpoints", as the docs give it: EP 4 (a TopKGate, shared experts) takes a step of AdamW,
    rank 0 gathers the experts and AdamW's moments on its CPU (dst=0, device="cpu") and saves them with the rest
    of the layer and the optimizer's state; a job at EP 2 (ranks 0 and 1; each takes the tokens of two EP-4
    ranks) loads that file on every rank. Its second step (outputs, then the outputs after that step's update)
    equals EP 4's own second step (float32 rounding): the experts and their moments came back in the right slots.
    Each job's loss is the sum over all tokens (replicated grads summed over its group)."""
    import os
    import tempfile

    from largeep.gate import GateConfig, TopKGate

    assert world == 4
    h, f, e, k, t = 16, 8, 8, 2, 6
    two = dist.new_group([0, 1])  # (collective: every rank makes it)

    def build(buf: largeep.Buffer) -> tuple[Any, Any]:
        torch.manual_seed(7)  # (the same gate and shared experts in both jobs; the experts are loaded)
        layer = layers.MoELayer(buf, ffn_hidden=f, gate=TopKGate(GateConfig(hidden=h, num_experts=e, topk=k,
                                                                            bias_balancing=False)),
                                shared_ffn_hidden=4)
        return layer, torch.optim.AdamW(layer.parameters(), lr=1e-2)

    def data(j: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = _gen(97, j, r)
        return torch.randn(t + r, h, generator=g), torch.randn(t + r, h, generator=g)

    def step(layer: Any, opt: Any, x: torch.Tensor, target: torch.Tensor, group: Any) -> torch.Tensor:
        opt.zero_grad()
        out = layer(x)
        ((out - target) ** 2).sum().backward()
        for p in [*layer.gate.parameters(), *layer.shared_experts.parameters()]:  # (replicated: summed)
            dist.all_reduce(p.grad, group=group)
        opt.step()
        return out.detach()

    path = [os.path.join(tempfile.mkdtemp(), "ck.pt") if rank == 0 else None]
    dist.broadcast_object_list(path, src=0)
    g1, g3 = (torch.randn(e, h, f, generator=_gen(98, i)) for i in range(2))
    g2 = torch.randn(e, f, h, generator=_gen(98, 2))
    four = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=2 * t + 4, backend="torch")
    try:
        layer, opt = build(four)
        layer.load_global_experts(g1, g3, g2)
        step(layer, opt, *data(0, rank), dist.group.WORLD)
        # the docs' save, word for word
        i13, i2 = [i for i, p in enumerate(layer.parameters()) if p is layer.experts.w13 or p is layer.experts.w2]
        st = opt.state_dict()
        lean = {"dst": 0, "device": "cpu"}
        experts = layer.gather_global_experts(**lean)
        moments = {m: layer.gather_global_experts(st["state"][i13][m], st["state"][i2][m], **lean)
                   for m in ("exp_avg", "exp_avg_sq")}
        assert (experts is not None) == (rank == 0) and all((v is not None) == (rank == 0) for v in moments.values())
        if experts is not None:
            assert all(w.device.type == "cpu" for w in experts)
            rest = {n: v for n, v in layer.state_dict().items() if not n.startswith("experts.") and n != "slot_experts"}
            torch.save({"rest": rest, "experts": experts, "opt": st, "moments": moments}, path[0])
        # EP 4's own second step, and the outputs after it, on every rank's tokens
        x2, t2 = data(1, rank)
        want = step(layer, opt, x2, t2, dist.group.WORLD)
        with torch.no_grad():
            after = layer(x2)
    finally:
        four.destroy()
    wants: list[Any] = [None] * world
    dist.all_gather_object(wants, (want, after))  # (EP 2's rank r takes EP 4's ranks r and r + 2)
    if rank >= 2:
        dist.barrier()
        return
    buf = largeep.Buffer(two, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=2 * t + 4, backend="torch")
    try:
        layer, opt = build(buf)
        # the docs' load, word for word
        i13, i2 = [i for i, p in enumerate(layer.parameters()) if p is layer.experts.w13 or p is layer.experts.w2]
        ck = torch.load(path[0], map_location="cpu")
        layer.load_state_dict(ck["rest"], strict=False)
        layer.load_global_experts(*ck["experts"])
        for m, glob in ck["moments"].items():
            ck["opt"]["state"][i13][m], ck["opt"]["state"][i2][m] = layer.local_experts(*glob)
        opt.load_state_dict(ck["opt"])
        (xa, ta), (xb, tb) = data(1, rank), data(1, rank + 2)
        got = step(layer, opt, torch.cat([xa, xb]), torch.cat([ta, tb]), two)
        with torch.no_grad():
            got_after = layer(torch.cat([xa, xb]))
        close(got, torch.cat([wants[rank][0], wants[rank + 2][0]]), f"rank {rank}: EP 2's second step")
        close(got_after, torch.cat([wants[rank][1], wants[rank + 2][1]]), f"rank {rank}: after EP 2's second step")
    finally:
        buf.destroy()
    dist.barrier()
    if rank == 0:
        os.remove(path[0])


def layer_global_experts_lean(rank: int, world: int, device: str = "cpu") -> None:
    """MoELayer.gather_global_experts(dst=, device=): the result of the default gather (every rank, all at once),
    bit for bit, on rank dst only (None on the others: dst 0 and the last rank) or on every rank, assembled on the
    weights' device or on the CPU; the optimizer-moments variant (w13=/w2=) alike. Refused on every rank alike:
    replicas that differ (the receiver's verdict sent to all), ranks that give other dsts, dtypes or placements,
    a dst outside the group, a device that is none. With expert TP (4 ranks: TP 2 x EP 2; a replicated expert)
    the receiver is TP member 0 of EP rank dst, the shards are joined along F, and a replica's shard that differs
    on another member, or a dst that differs between the TP members, is refused on every rank. ``device``: where
    the weights live ("cuda": an NCCL group, the transfers over CUDA tensors)."""
    from largeep import placement as pl
    from largeep.errors import ArgumentError
    from largeep.expert_tp import make_expert_tp_groups

    hidden, ffn, topk = 16, 8, 2
    per_rank = 4 if world == 1 else 3
    slots = per_rank * world
    logical = slots - 2
    table = torch.arange(slots) % logical  # expert 0 on the first and the second-to-last slot...
    table[-1] = -1  # ...and the last slot empty
    g = _gen(73)
    w1, w3 = (torch.randn(logical, hidden, ffn, generator=g) for _ in range(2))
    w2 = torch.randn(logical, ffn, hidden, generator=g)
    topo = pl.Topology(num_nodes=1, gpus_per_node=world, slots_per_gpu=per_rank)
    wdev = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")

    def refused(words: str, *args: Any, on: Any = None, **kwargs: Any) -> None:
        try:
            (on or layer).gather_global_experts(*args, **kwargs)
        except ArgumentError as exc:
            assert words in str(exc), f"rank {rank}: {exc}"
        else:
            raise AssertionError(f"rank {rank}: not refused ({words}) with {kwargs}")

    def same(got: Any, want: Any, where: torch.device, what: str) -> None:
        assert got is not None, f"rank {rank}: {what}: None"
        for name, a, b in zip(("w1", "w3", "w2"), got, want, strict=True):
            ok = a.device == where and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
            assert ok, f"rank {rank}: {what} {name}"

    buf = largeep.Buffer(None, hidden=hidden, num_experts=slots, num_topk=topk, max_tokens_per_rank=8,
                         backend="torch")
    try:
        layer = layers.MoELayer(buf, ffn_hidden=ffn, placement=pl.Placement(topo, logical, table.clone()))
        layer.to(wdev)
        with torch.no_grad():  # expert 0's replica (the second-to-last slot, on the last rank) differs
            if rank == world - 1:
                layer.experts.w13[per_rank - 2, 0, 0] += 1
        for kw in ({"dst": 0}, {"dst": world - 1, "device": "cpu"}, {"device": "cpu"}):
            refused("replicas of logical expert 0 differ (slots 0 and", **kw)
        layer.load_global_experts(w1, w3, w2)
        full = layer.gather_global_experts()
        same(full, (w1, w3, w2), wdev, "the default gather")
        cpu = torch.device("cpu")
        for dst in sorted({0, world - 1}):
            for dev in (None, "cpu"):
                got = layer.gather_global_experts(dst=dst, device=dev)
                if rank == dst:
                    same(got, full, wdev if dev is None else cpu, f"dst={dst}, device={dev}")
                else:
                    assert got is None, f"rank {rank}: dst={dst} returned {type(got).__name__}"
        same(layer.gather_global_experts(device="cpu"), full, cpu, "every rank, device=cpu")
        # the optimizer's moments: other per-slot tensors, gathered alike
        m13, m2 = layer.experts.w13.detach() * 3, layer.experts.w2.detach() * 3
        moments = layer.gather_global_experts(m13, m2)
        got = layer.gather_global_experts(m13, m2, dst=world - 1, device="cpu")
        if rank == world - 1:
            same(got, moments, cpu, "the moments")
        else:
            assert got is None
        # refusals, on every rank alike
        refused("argument 'dst' must be None or a rank of the Buffer's group", dst=world)
        refused("argument 'device' must be None or a torch.device", dst=0, device="nowhere")
        if world > 1:
            refused("the ranks gave different 'dst'", dst=rank % 2)
            refused("argument 'w13' is torch.float64 on rank 1, torch.float32 on rank 0",
                    m13.double() if rank == 1 else m13, m2, dst=0)
            odd = table.clone()
            if rank == 1:
                odd[[0, 1]] = odd[[1, 0]]
            other = layers.MoELayer(buf, ffn_hidden=ffn, placement=pl.Placement(topo, logical, odd)).to(wdev)
            refused("different placements: rank 1's slot 0", on=other, dst=world - 1, device="cpu")
        # the layer is still in step: a last gather after the refusals
        same(layer.gather_global_experts(device="cpu"), full, cpu, "after the refusals")
    finally:
        buf.destroy()
    if world != 4:
        return
    # expert TP 2 x EP 2: 6 slots, 5 logical experts (expert 0 on slots 0 and 5, on both EP ranks)
    groups = make_expert_tp_groups(2)
    ep = largeep.Buffer(groups.ep_group, hidden=hidden, num_experts=6, num_topk=topk, max_tokens_per_rank=8,
                        backend="torch")
    try:
        tp_table = torch.tensor([0, 1, 2, 3, 4, 0])
        place = pl.Placement(pl.Topology(num_nodes=1, gpus_per_node=2, slots_per_gpu=3), 5, tp_table)
        layer = layers.MoELayer(ep, ffn_hidden=ffn, placement=place, expert_tp_group=groups.tp_group).to(wdev)
        want = (w1[:5], w3[:5], w2[:5])
        layer.load_global_experts(*want)
        assert layer.experts.w13.shape[2] == ffn  # (2 * F/2 columns)
        full = layer.gather_global_experts()
        same(full, want, wdev, "expert TP, the default gather")
        for dst in (0, 1):
            got = layer.gather_global_experts(dst=dst, device="cpu")
            if groups.ep_rank == dst and groups.tp_rank == 0:
                same(got, full, torch.device("cpu"), f"expert TP, dst={dst}")
            else:
                assert got is None, f"rank {rank}: expert TP, dst={dst} returned {type(got).__name__}"
        refused("the TP group's members gave different 'dst'", dst=groups.tp_rank)
        with torch.no_grad():  # member 1 of EP rank 1: its shard of slot 5 (expert 0's replica) differs
            if groups.ep_rank == 1 and groups.tp_rank == 1:
                layer.experts.w2[2] += 1
        refused("replicas of logical expert 0 differ (slots 0 and 5, of ranks 0 and 1)", dst=0)
        refused("replicas of logical expert 0 differ (slots 0 and 5, of ranks 0 and 1)", device="cpu")
    finally:
        ep.destroy()


def layer_replace_experts(rank: int, world: int) -> None:
    """Moving a training layer to a new placement by building a new layer (the checkpoint path, in memory, which
    MoELayer.set_placement replaces on the same ranks: docs/usage.md, "Moving experts to a new placement during
    training"): a step of AdamW under a placement planned from made-up loads, a new plan from the gate's measured
    loads (other replicas), the weights and AdamW's moments moved by gather_global_experts / local_experts into a
    layer built with it, the gate's state carried over (set_replicas); the next step's outputs, every logical
    expert's weights and the gate equal those of a layer that never moved (same data), and the replicas stay
    equal. A rank holding another placement than the others is refused by the gather on every rank."""
    from largeep import placement as pl
    from largeep.errors import ArgumentError
    from largeep.gate import GateConfig, TopKGate

    h, f, k, logical, per_rank, t = 16, 8, 2, 6, 2, 12
    topo = pl.Topology(num_nodes=1, gpus_per_node=world, slots_per_gpu=per_rank)
    buf = largeep.Buffer(None, hidden=h, num_experts=world * per_rank, num_topk=k, max_tokens_per_rank=t,
                         backend="torch")

    def build(plan: Any) -> tuple[Any, Any]:
        torch.manual_seed(5)  # (alike everywhere: both layers, every rank, start from the same weights)
        layer = layers.MoELayer(buf, ffn_hidden=f, gate=TopKGate(GateConfig(hidden=h, num_experts=logical, topk=k)),
                                placement=plan, shared_ffn_hidden=4)
        return layer, torch.optim.AdamW(layer.parameters(), lr=1e-2)

    def step(layer: Any, opt: Any, plan: Any, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = _gen(91, j, rank)
        x, target = torch.randn(t, h, generator=g), torch.randn(t, h, generator=g)
        opt.zero_grad()
        out = layer(x)
        (((out - target) ** 2).sum() / (t * world)).backward()
        for p in [*layer.gate.parameters(), *layer.shared_experts.parameters()]:  # (replicated: summed)
            dist.all_reduce(p.grad)
        layers.allreduce_replica_grads([layer.experts.w13, layer.experts.w2], plan.phys_to_log)
        opt.step()
        return out.detach(), layer.gate.update_bias(buf.ctx.group)

    try:
        old_plan = pl.plan_placement(torch.tensor([9.0, 7, 1, 1, 1, 1]), topo)  # experts 0 and 1 replicated
        ref, ref_opt = build(old_plan)
        layer, opt = build(old_plan)
        step(ref, ref_opt, old_plan, 0)
        _, load = step(layer, opt, old_plan, 0)
        shared: list[Any] = [pl.plan_placement(load, topo) if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        new_plan = shared[0]
        assert not torch.equal(new_plan.phys_to_log, old_plan.phys_to_log), "the measured loads gave the old plan"
        # the move through a new layer (as docs/usage.md's checkpoints show it)
        i13, i2 = [i for i, p in enumerate(layer.parameters()) if p is layer.experts.w13 or p is layer.experts.w2]
        st = opt.state_dict()
        weights = layer.gather_global_experts()
        moments = {m: layer.gather_global_experts(st["state"][i13][m], st["state"][i2][m])
                   for m in ("exp_avg", "exp_avg_sq")}
        rest = {n: v for n, v in layer.state_dict().items() if not n.startswith("experts.") and n != "slot_experts"}
        moved, moved_opt = build(new_plan)
        assert int(new_plan.replica_count.max()) > 1
        # (a state saved under another placement: counts of its own, here none replicated)
        moved.load_state_dict({**rest, "gate.expert_replicas": torch.ones_like(rest["gate.expert_replicas"])},
                              strict=False)
        # the layer's placement's counts, not the state's: the layer sets them again after a load
        assert torch.equal(moved.gate.expert_replicas.cpu(), new_plan.replica_count)
        moved.load_global_experts(*weights)
        for m, glob in moments.items():
            st["state"][i13][m], st["state"][i2][m] = moved.local_experts(*glob)
        moved_opt.load_state_dict(st)
        # the next step: as the layer that never moved
        want, want_load = step(ref, ref_opt, old_plan, 1)
        got, got_load = step(moved, moved_opt, new_plan, 1)
        close(got, want, f"rank {rank}: output of the step after the move")
        assert torch.equal(got_load, want_load), f"rank {rank}: loads {got_load} != {want_load}"
        for name, a, b in zip(("w1", "w3", "w2"), moved.gather_global_experts(), ref.gather_global_experts(),
                              strict=True):  # (the gather also checks that the replicas are equal)
            close(a, b, f"rank {rank}: expert {name} after the step")
        for name, p in moved.state_dict().items():
            if not name.startswith("experts.") and name != "slot_experts":
                close(p.float(), ref.state_dict()[name].float(), f"rank {rank}: {name} after the step")
        # a rank with another placement: refused on every rank, naming it
        table = new_plan.phys_to_log.clone()
        if rank == 1:
            table[[0, 1]] = table[[1, 0]]
        odd, _ = build(pl.Placement(topo, logical, table))
        try:
            odd.gather_global_experts()
        except ArgumentError as exc:
            assert "different placements: rank 1's slot 0" in str(exc), exc
        else:
            raise AssertionError(f"rank {rank}: layers with different placements were gathered")
        # a layer without a placement loading that state (the old plan's counts, experts 0 and 1 replicated): its
        # gate's counts are all ones again, as set_placement(None) leaves them
        assert int(rest["gate.expert_replicas"].max()) > 1
        plain = layers.MoELayer(buf, ffn_hidden=f, gate=TopKGate(GateConfig(hidden=h, num_experts=logical, topk=k)),
                                num_logical_experts=logical, shared_ffn_hidden=4)
        plain.load_state_dict(rest, strict=False)
        assert torch.equal(plain.gate.expert_replicas.cpu(), torch.ones(logical, dtype=torch.int64))
    finally:
        buf.destroy()


def _serve_dense(x: torch.Tensor, w: dict[str, Any], topk: int, bf16_io: bool) -> torch.Tensor:
    """One MoE layer with every expert here, float32, routed as a TopKGate without groups or capacity does
    (softmax scores, + bias for the choice only, the chosen scores normalised), one (token, k) at a time.
    ``bf16_io``: the routed experts see the token rounded to bf16, and each expert's output and the weighted sum
    are rounded to bf16 (where the low-latency mode's transfers round); the shared experts see x as it is."""
    scores = F.linear(x.float(), w["gate"]).softmax(-1)
    idx = (scores + w["bias"]).topk(topk, dim=-1).indices
    wt = scores.gather(1, idx)
    wt = wt / wt.sum(-1, keepdim=True)
    xin = x.to(torch.bfloat16).float() if bf16_io else x
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk):
            e = int(idx[t, k])
            y = (F.silu(xin[t] @ w["w1"][e]) * (xin[t] @ w["w3"][e])) @ w["w2"][e]
            out[t] += wt[t, k] * (y.to(torch.bfloat16).float() if bf16_io else y)
    if bf16_io:
        out = out.to(torch.bfloat16).float()
    if w["shared"] is not None:
        s1, s3, s2 = w["shared"]
        out = out + (F.silu(x @ s1) * (x @ s3)) @ s2
    return out


def serve_prefill_decode(rank: int, world: int) -> None:
    """Serving one model (two MoE layers, TopKGate with a learnt bias, shared experts on the first) in both modes:
    prefill through normal-mode layers in chunks, decode through ``for_buffer`` twins on a low-latency Buffer that
    share the weights (no copy, no draw from torch's generator). In eval mode, under no_grad and inference_mode,
    against a dense single-process float32 reference of the same weights: the prefill to float32 accuracy, decode
    steps (ranks with 0 to max_tokens_per_rank tokens) to the reference with the low-latency mode's bf16 roundings
    (and not to the plain float32 one: the transfers are bf16). One token too many on one rank is refused on every
    rank, the next step goes on; TwoBatchOverlap equals plain calls; eval mode counts no load, training mode counts
    both layers' choices in the shared gate; for_buffer refuses another Buffer's sizes and non-mode options."""
    from largeep.gate import GateConfig, TopKGate

    h, f, fs, e, k, chunk, m = 32, 16, 8, 4 * world, 3, 8, 5
    g = _gen(77, 1)
    ws = [dict(gate=torch.randn(e, h, generator=g) * h**-0.5, bias=torch.randn(e, generator=g) * 0.05,
               w1=torch.randn(e, h, f, generator=g) * h**-0.5, w3=torch.randn(e, h, f, generator=g) * h**-0.5,
               w2=torch.randn(e, f, h, generator=g) * f**-0.5,
               shared=tuple(torch.randn(a, b, generator=g) * a**-0.5 for a, b in ((h, fs), (h, fs), (fs, h)))
               if j == 0 else None) for j in range(2)]
    nbuf = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=chunk, backend="torch")
    lbuf = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=m, low_latency=True,
                          backend="torch")
    other = largeep.Buffer(None, hidden=h + 8, num_experts=e, num_topk=k, max_tokens_per_rank=m, low_latency=True,
                           backend="torch")
    try:
        prefill = []
        for w in ws:
            layer = layers.MoELayer(nbuf, ffn_hidden=f, gate=TopKGate(GateConfig(hidden=h, num_experts=e, topk=k)),
                                    shared_ffn_hidden=fs if w["shared"] is not None else 0, num_chunks=3)
            with torch.no_grad():
                layer.gate.weight.copy_(w["gate"])
                layer.gate.expert_bias.copy_(w["bias"])
                if layer.shared_experts is not None:
                    for mine, full in zip((layer.shared_experts.w1, layer.shared_experts.w3,
                                           layer.shared_experts.w2), w["shared"], strict=True):
                        mine.copy_(full)
            layer.load_global_experts(w["w1"], w["w3"], w["w2"])
            prefill.append(layer)
        rng = torch.get_rng_state()
        decode = [p.for_buffer(lbuf) for p in prefill]
        assert torch.equal(torch.get_rng_state(), rng), "for_buffer drew from torch's generator"
        for p, d in zip(prefill, decode, strict=True):
            assert d.low_latency and d.gate is p.gate and d.experts is p.experts
            assert d.shared_experts is p.shared_experts
            assert [t.data_ptr() for t in d.parameters()] == [t.data_ptr() for t in p.parameters()]
        model_p, model_d = torch.nn.Sequential(*prefill).eval(), torch.nn.Sequential(*decode).eval()

        def ref(x: torch.Tensor, bf16_io: bool) -> torch.Tensor:
            for w in ws:
                x = _serve_dense(x, w, k, bf16_io)
            return x

        xp = torch.randn([3 * chunk, 0, 17, 5][rank % 4], h, generator=_gen(77, 2, rank))
        for grad_off in (torch.no_grad, torch.inference_mode):
            with grad_off():
                close(model_p(xp), ref(xp, False), f"prefill under {grad_off.__name__}")
        far = 0.0
        for step, plan in enumerate(([1, 0, 3, m], [0, 0, 0, 2], [m] * 4, [0] * 4, [2, m, 0, 1])):
            x = torch.randn(plan[rank % 4], h, generator=_gen(77, 3, step, rank))
            with torch.inference_mode():
                got = model_d(x)
            with torch.no_grad():
                assert torch.equal(model_d(x), got), f"decode step {step}: no_grad differs from inference_mode"
            close(got, ref(x, True), f"decode step {step} vs the dense reference with bf16 transfers", rtol=2.0**-9)
            if x.shape[0]:
                want = ref(x, False)
                far = max(far, ((got - want).abs().max() / want.abs().max()).item())
        farthest = torch.tensor([far])
        dist.all_reduce(farthest, op=dist.ReduceOp.MAX)
        assert farthest.item() > 2.0**-9, "the decode outputs carried no bf16 rounding"
        # one token more than max_tokens_per_rank on the last rank: refused on every rank, nothing left pending
        x = torch.randn(m + 1 if rank == world - 1 else 2, h, generator=_gen(77, 4, rank))
        try:
            with torch.inference_mode():
                model_d(x)
        except largeep.ArgumentError as exc:
            assert rank == world - 1 and f"more than max_tokens_per_rank={m}" in str(exc), str(exc)
        except largeep.PeerRefusedError as exc:
            assert rank != world - 1 and f"rank(s) [{world - 1}]" in str(exc), str(exc)
        else:
            raise AssertionError("a decode step of max_tokens_per_rank + 1 tokens was not refused")
        x = x[:2]
        with torch.inference_mode():
            close(model_d(x), ref(x, True), "the decode step after the refusal", rtol=2.0**-9)
            xa, xb = (torch.randn(t, h, generator=_gen(77, 5, i, rank)) for i, t in enumerate((rank % 3, m - rank)))
            ya, yb = layers.TwoBatchOverlap(decode[0])(xa, xb)
            assert torch.equal(ya, decode[0](xa)) and torch.equal(yb, decode[0](xb)), "two-batch overlap differs"
        for p, w in zip(prefill, ws, strict=True):
            assert not p.gate.expert_load.any(), "eval mode counted loads"
            assert torch.equal(p.gate.expert_bias, w["bias"])
        # training mode: the shared gate counts the choices of both layers' calls
        prefill[0].gate.train()
        xd = xp[:2]
        with torch.no_grad():
            prefill[0](xp)
            decode[0](xd)
        chosen = torch.cat([(F.linear(t, ws[0]["gate"]).softmax(-1) + ws[0]["bias"]).topk(k, dim=-1).indices.flatten()
                            for t in (xp, xd)])
        assert torch.equal(prefill[0].gate.expert_load, torch.bincount(chosen, minlength=e).float())
        prefill[0].gate.eval()
        for buf, kw, want in ((other, {}, "argument 'buffer' has hidden = 40, this layer's Buffer 32"),
                              (lbuf, {"ffn_hidden": 8}, "argument 'ffn_hidden' is not a mode setting"),
                              (lbuf, {"num_chunks": 2}, "argument 'num_chunks' = 2 applies to normal mode")):
            try:
                prefill[0].for_buffer(buf, **kw)
            except largeep.ArgumentError as exc:
                assert want in str(exc), str(exc)
            else:
                raise AssertionError(f"for_buffer took {kw}")
        assert ops.live_handles(decode[0].buffer_id) == 0
    finally:
        nbuf.destroy()
        lbuf.destroy()
        other.destroy()


def serve_for_buffer_gpu(rank: int, world: int, backend: str, device: str = "cuda") -> None:
    """MoELayer.for_buffer on CUDA: a normal-mode layer (prefill) and its low-latency twin (decode), each Buffer on
    a group of its own, compute with the same weights: the twin's outputs equal the prefill layer's on the same
    tokens to the low-latency mode's bf16 roundings, and a change to the prefill layer's expert weights (w2 doubled
    in place) doubles the twin's routed output at once (no copy). Ranks with 0 and 5 tokens."""
    h, f, e, k, m = 128, 64, 4 * world, 2, 8
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    pg, dg = dist.new_group(), dist.new_group()
    nbuf = largeep.Buffer(pg, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=m, backend=backend)
    lbuf = largeep.Buffer(dg, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=m, low_latency=True,
                          backend=backend)
    try:
        torch.manual_seed(11)
        prefill = layers.MoELayer(nbuf, ffn_hidden=f).to(dev).eval()
        decode = prefill.for_buffer(lbuf, ll_use_fp8=False)
        assert decode.low_latency and decode.experts is prefill.experts and decode.gate is prefill.gate
        x = torch.randn([5, 0][rank % 2], h, generator=_gen(11, rank)).to(dev).bfloat16()
        with torch.inference_mode():
            want = prefill(x)
            got = decode(x)
            assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
            close(got.float(), want.float(), "decode twin vs prefill layer", rtol=2.0**-7)
            with torch.no_grad():
                prefill.experts.w2.mul_(2.0)
            doubled = decode(x)
            close(doubled.float(), 2.0 * got.float(), "decode twin after the prefill layer's w2 doubled", rtol=2.0**-7)
        assert ops.live_handles(decode.buffer_id) == 0
    finally:
        nbuf.destroy()
        lbuf.destroy()


def clip_grad_norm_ep(rank: int, world: int, backend: str = "torch", device: str = "cpu") -> None:
    """layers.clip_grad_norm_ under expert parallelism: a block (Linear, then an MoELayer whose placement has a
    replicated expert and an empty slot, with shared experts), after a backward, the replicated grads summed and
    allreduce_replica_grads: the norm (2 and inf) is that of the whole model's gradient with every logical expert
    once -- the reference takes the experts' grads per logical expert from gather_global_experts and the rest as
    held -- the same on every rank, and every grad is scaled by max_norm / norm. torch's own clip_grad_norm_ on a
    rank's parameters finds another norm on some rank (what this function exists for)."""
    from largeep import placement as pl

    h, f, k, t = 16, 8, 2, 10
    per_rank = 4 if world == 1 else 3
    slots = per_rank * world
    logical = slots - 2
    table = torch.arange(slots) % logical  # expert 0 on two slots
    table[-1] = -1  # the last slot empty
    topo = pl.Topology(num_nodes=1, gpus_per_node=world, slots_per_gpu=per_rank)
    buf = largeep.Buffer(None, hidden=h, num_experts=slots, num_topk=k, max_tokens_per_rank=t, backend=backend)
    try:
        for norm_type in (2.0, float("inf")):
            torch.manual_seed(3)
            moe = layers.MoELayer(buf, ffn_hidden=f, placement=pl.Placement(topo, logical, table.clone()),
                                  shared_ffn_hidden=4)
            model = torch.nn.Sequential(torch.nn.Linear(h, h), moe).to(device)
            x = torch.randn(t, h, generator=_gen(5, rank)).to(device)
            (model(x) ** 2).sum().backward()
            rest = [p for n, p in model.named_parameters() if ".experts." not in n]
            for p in rest:
                dist.all_reduce(p.grad)
            layers.allreduce_replica_grads([moe.experts.w13, moe.experts.w2], table)
            g1, g3, g2 = moe.gather_global_experts(moe.experts.w13.grad, moe.experts.w2.grad)
            flat = torch.cat([p.grad.flatten() for p in rest] + [g.flatten() for g in (g1, g3, g2)])
            want = torch.linalg.vector_norm(flat.double(), norm_type).item()
            local = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]).double(),
                                             norm_type).item()
            locals_ = [None] * world
            dist.all_gather_object(locals_, local)
            if norm_type == 2.0 and world > 1:  # (inf: a max may lie in what every rank holds)
                assert any(abs(v - want) > 1e-3 * want for v in locals_), "every rank's own norm was the model's"
            before = [p.grad.clone() for p in model.parameters()]
            max_norm = want / 3
            got = layers.clip_grad_norm_(model, max_norm, norm_type)
            assert abs(got.item() - want) <= 1e-5 * want, (norm_type, got.item(), want)
            every = [None] * world
            dist.all_gather_object(every, got.item())
            assert len(set(every)) == 1, every
            coef = max_norm / (got.item() + 1e-6)
            for p, b in zip(model.parameters(), before, strict=True):
                close(p.grad, b * coef, f"norm {norm_type}: a grad after clipping", rtol=1e-6)
            # under max_norm nothing changes
            again = [p.grad.clone() for p in model.parameters()]
            layers.clip_grad_norm_(model, 10 * want, norm_type)
            for p, b in zip(model.parameters(), again, strict=True):
                assert torch.equal(p.grad, b), f"norm {norm_type}: a grad changed below max_norm"
        for bad, arg in (({"max_norm": -1.0}, "max_norm"), ({"max_norm": float("nan")}, "max_norm"),
                         ({"norm_type": 0}, "norm_type"), ({"max_norm": True}, "max_norm")):
            kw = {"max_norm": 1.0, "norm_type": 2.0, **bad}
            try:
                layers.clip_grad_norm_(model, **kw)
            except largeep.ArgumentError as exc:
                assert f"'{arg}'" in str(exc), str(exc)
            else:
                raise AssertionError(f"clip_grad_norm_ took {bad}")
    finally:
        buf.destroy()


def layer_set_placement(rank: int, world: int, backend: str = "torch") -> None:
    """MoELayer.set_placement (docs/usage.md, "Moving experts to a new placement during training"): 8 slots, 6
    logical experts. A layer under a placement with experts 0 and 1 replicated takes an AdamW step, moves in place
    to a plan where experts leave their ranks, one is held twice on one rank and others stay; a second layer (two
    chunks, a twin made by for_buffer) starts without a placement, moves to a plan and back. After each move: the
    same Parameter objects (the optimizer's too), every logical expert's weights and AdamW moments exactly those of
    a layer that never moved, the gate's replica counts the plan's, the twin's routing the new table; the next
    step's outputs, weights, gate and loads equal the unmoved layer's. Refusals leave every rank's layer as it was:
    different plans on ranks, sizes wrong on every rank or on one, unequal replicas, non-zero grads, a callable."""
    from largeep import placement as pl
    from largeep.errors import ArgumentError
    from largeep.gate import GateConfig, TopKGate

    h, f, k, logical, slots, t = 16, 8, 2, 6, 8, 12
    per_rank = slots // world
    device = device_for(backend)
    topo = pl.Topology(num_nodes=1, gpus_per_node=world, slots_per_gpu=per_rank)
    old_plan = pl.Placement(topo, logical, torch.tensor([0, 1, 0, 2, 1, 3, 4, 5]))  # 0 and 1 replicated
    new_plan = pl.Placement(topo, logical, torch.tensor([2, 0, 5, 5, 3, 1, 0, 4]))  # 5 twice on one rank
    buf = largeep.Buffer(None, hidden=h, num_experts=slots, num_topk=k, max_tokens_per_rank=t, backend=backend)
    twin_buf = largeep.Buffer(None, hidden=h, num_experts=slots, num_topk=k, max_tokens_per_rank=t, backend=backend)

    def build(plan: Any, chunks: int = 1) -> tuple[Any, Any]:
        torch.manual_seed(5)  # (alike everywhere: every layer, every rank, starts from the same weights)
        layer = layers.MoELayer(buf, ffn_hidden=f, gate=TopKGate(GateConfig(hidden=h, num_experts=logical, topk=k)),
                                placement=plan, num_logical_experts=logical, shared_ffn_hidden=4,
                                num_chunks=chunks).to(device)
        return layer, torch.optim.AdamW(layer.parameters(), lr=1e-2)

    def step(layer: Any, opt: Any, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = _gen(93, j, rank)
        x, target = torch.randn(t, h, generator=g).to(device), torch.randn(t, h, generator=g).to(device)
        opt.zero_grad()
        out = layer(x)
        (((out - target) ** 2).sum() / (t * world)).backward()
        for p in [*layer.gate.parameters(), *layer.shared_experts.parameters()]:  # (replicated: summed)
            dist.all_reduce(p.grad)
        table = layer.phys_to_log if layer.phys_to_log is not None else torch.arange(slots)
        layers.allreduce_replica_grads([layer.experts.w13, layer.experts.w2], table)
        opt.step()
        opt.zero_grad()
        return out.detach(), layer.gate.update_bias(buf.ctx.group)

    def moments(layer: Any, opt: Any) -> list[torch.Tensor]:
        st = [opt.state[layer.experts.w13], opt.state[layer.experts.w2]]
        return [g for m in ("exp_avg", "exp_avg_sq") for g in layer.gather_global_experts(st[0][m], st[1][m])]

    def same(moved: Any, moved_opt: Any, ref: Any, ref_opt: Any, what: str, exact: bool) -> None:
        pairs = [*zip(moved.gather_global_experts(), ref.gather_global_experts(), strict=True),
                 *zip(moments(moved, moved_opt), moments(ref, ref_opt), strict=True)]
        for i, (a, b) in enumerate(pairs):  # (the gather also checks that the replicas are equal)
            a, b = a[:logical], b[:logical]  # (without a placement slots 6 and 7 hold experts the gate never picks)
            if exact:
                assert torch.equal(a, b), f"rank {rank}: {what}: expert tensor {i}"
            else:
                close(a, b, f"rank {rank}: {what}: expert tensor {i}")
        theirs = ref.state_dict()
        for name, p in moved.state_dict().items():
            if not name.startswith("experts.") and name not in ("slot_experts", "gate.expert_replicas"):
                close(p.float(), theirs[name].float(), f"rank {rank}: {what}: {name}")

    def moved_to(layer: Any, opt: Any, plan: Any, what: str) -> None:
        ids = [id(layer.experts.w13), id(layer.experts.w2)]
        in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
        layer.set_placement(plan, optimizer=opt)
        assert [id(layer.experts.w13), id(layer.experts.w2)] == ids, f"{what}: new Parameter objects"
        assert [id(p) for g in opt.param_groups for p in g["params"]] == in_opt, f"{what}: optimizer's params"
        want = plan.phys_to_log if plan is not None else torch.arange(slots)
        got = layer.phys_to_log if layer.phys_to_log is not None else torch.arange(slots)
        assert torch.equal(got, want) and (layer.phys_to_log is None) == (plan is None), what
        assert layer.state_dict()["slot_experts"].tolist() == want[rank * per_rank:(rank + 1) * per_rank].tolist()
        counts = plan.replica_count if plan is not None else torch.ones(logical, dtype=torch.int64)
        assert torch.equal(layer.gate.expert_replicas.cpu(), counts), f"{what}: the gate's replica counts"

    try:
        # 1. old plan -> new plan (one chunk), against a layer that stays on the old plan
        ref, ref_opt = build(old_plan)
        layer, opt = build(old_plan)
        step(ref, ref_opt, 0)
        step(layer, opt, 0)
        moved_to(layer, opt, new_plan, "to the new plan")
        same(layer, opt, ref, ref_opt, "right after the move", exact=True)
        want, want_load = step(ref, ref_opt, 1)
        got, got_load = step(layer, opt, 1)
        close(got, want, f"rank {rank}: output of the step after the move")
        assert torch.equal(got_load, want_load), f"rank {rank}: loads {got_load} != {want_load}"
        same(layer, opt, ref, ref_opt, "after the step", exact=False)

        # 2. refusals: on every rank, before anything moves
        before = [p.detach().clone() for p in (layer.experts.w13, layer.experts.w2)]
        mom = [v.clone() for v in opt.state[layer.experts.w13].values()]

        def refused(plan: Any, want: str, optimizer: Any = None) -> None:
            try:
                layer.set_placement(plan, optimizer=optimizer if optimizer is not None else opt)
            except ArgumentError as exc:
                assert want in str(exc), f"rank {rank}: {exc}"
            else:
                raise AssertionError(f"rank {rank}: not refused: {want}")
            assert torch.equal(layer.phys_to_log, new_plan.phys_to_log), f"rank {rank}: {want}: the table moved"
            for a, b in zip((layer.experts.w13, layer.experts.w2), before, strict=True):
                assert torch.equal(a, b), f"rank {rank}: {want}: weights moved"
            for a, b in zip(opt.state[layer.experts.w13].values(), mom, strict=True):
                assert torch.equal(a, b), f"rank {rank}: {want}: optimizer state moved"

        table = old_plan.phys_to_log.clone()
        if rank == 1:
            table[[0, 1]] = table[[1, 0]]
        refused(pl.Placement(topo, logical, table), "argument 'placement': the ranks' layers hold different "
                "placements: rank 1's slot 0")
        wide = pl.Topology(num_nodes=1, gpus_per_node=world, slots_per_gpu=per_rank + 1)
        refused(pl.Placement(wide, logical, torch.arange(slots + world) % logical),
                f"argument 'placement' has {world} GPUs of {per_rank + 1} slots")
        refused(pl.Placement(topo, logical + 1, torch.arange(slots) % (logical + 1)),
                f"argument 'placement' has {logical + 1} logical experts; this layer has {logical}")
        odd = old_plan if rank != world - 1 else pl.Placement(topo, logical + 1, torch.arange(slots) % (logical + 1))
        refused(odd, f"rank(s) [{world - 1}] refused" if rank != world - 1 else "logical experts; this layer has")
        refused(lambda idx: idx, "argument 'placement' must be None or a largeep.placement.Placement")
        refused(old_plan, "argument 'optimizer' does not optimize this layer's experts.w13",
                torch.optim.SGD(layer.shared_experts.parameters(), lr=1.0))
        layer.experts.w13.grad = torch.zeros_like(layer.experts.w13)
        if rank == 0:
            layer.experts.w13.grad[0, 0, 0] = 1.0
        refused(old_plan, "rank(s) [0] refused" if rank != 0 else "experts.w13 holds a non-zero .grad")
        layer.experts.w13.grad = None
        # rank 0's second slot holds expert 0, whose other replica is in slot 6 (rank 3 of 4, rank 1 of 2)
        kept = opt.state[layer.experts.w2]["exp_avg"].clone()
        if rank == 0:
            opt.state[layer.experts.w2]["exp_avg"][1, 0, 0] += 1.0
            mom_w2 = opt.state[layer.experts.w2]["exp_avg"].clone()
        refused(old_plan, "the replicas of logical expert 0 differ in optimizer state 'exp_avg' of experts.w2 "
                f"(slots 1 and 6, of ranks 0 and {6 // per_rank})")
        if rank == 0:
            assert torch.equal(opt.state[layer.experts.w2]["exp_avg"], mom_w2), "the unequal moments moved"
            opt.state[layer.experts.w2]["exp_avg"].copy_(kept)

        # 3. no placement -> a plan -> no placement, two chunks, a twin sharing the experts (for_buffer)
        ref, ref_opt = build(None, 2)
        layer, opt = build(None, 2)
        twin = layer.for_buffer(twin_buf, num_chunks=2)
        step(ref, ref_opt, 2)
        step(layer, opt, 2)
        for j, plan in enumerate((old_plan, None)):
            moved_to(layer, opt, plan, f"2 chunks, move {j}")
            assert (twin.phys_to_log is None) == (plan is None) and (plan is None or torch.equal(
                twin.phys_to_log, plan.phys_to_log)), f"rank {rank}: the twin's table"
            same(layer, opt, ref, ref_opt, f"2 chunks, right after move {j}", exact=j == 0)
            x = torch.randn(t, h, generator=_gen(94, j, rank)).to(device)
            layer.eval()
            with torch.no_grad():
                close(twin(x), layer(x), f"rank {rank}: the twin's output after move {j}")
            layer.train()
            want, want_load = step(ref, ref_opt, 3 + j)
            got, got_load = step(layer, opt, 3 + j)
            close(got, want, f"rank {rank}: 2 chunks, output of the step after move {j}")
            assert torch.equal(got_load, want_load), f"rank {rank}: loads {got_load} != {want_load}"
            same(layer, opt, ref, ref_opt, f"2 chunks, after the step after move {j}", exact=False)
    finally:
        twin_buf.destroy()
        buf.destroy()
    if backend != "torch":
        return
    # 4. node-limited routing (2 nodes, a gate limited to 1 node: its groups the placement's home nodes): the moved
    # layer is the layer built with the new plan (groups: the new home nodes), in outputs and state
    nodes = pl.Topology(num_nodes=2, gpus_per_node=world // 2, slots_per_gpu=per_rank)
    old_plan, new_plan = (pl.Placement(nodes, logical, p.phys_to_log) for p in (old_plan, new_plan))
    assert not torch.equal(old_plan.home_node(), new_plan.home_node())
    buf = largeep.Buffer(None, hidden=h, num_experts=slots, num_topk=k, max_tokens_per_rank=t, backend=backend,
                         ranks_per_node=world // 2)
    try:
        def limited(plan: Any) -> Any:
            torch.manual_seed(6)
            gate = TopKGate(GateConfig(hidden=h, num_experts=logical, topk=k, topk_groups=1),
                            group_of_expert=plan.home_node())
            return layers.MoELayer(buf, ffn_hidden=f, gate=gate, placement=plan, shared_ffn_hidden=4).eval()

        layer, fresh = limited(old_plan), limited(new_plan)
        assert layer._limits_nodes() and fresh._limits_nodes()
        layer.set_placement(new_plan)
        assert layer._limits_nodes(), "the moved layer no longer limits nodes"
        x = torch.randn(t, h, generator=_gen(95, rank))
        with torch.no_grad():
            close(layer(x), fresh(x), f"rank {rank}: node-limited, the moved layer against one built so")
        mine, theirs = layer.state_dict(), fresh.state_dict()
        assert mine.keys() == theirs.keys()
        for name, v in mine.items():
            assert torch.equal(v, theirs[name]), f"rank {rank}: node-limited, {name}"
    finally:
        buf.destroy()
    if world != 4:
        return
    # 5. expert TP 2 (EP groups of 2 ranks): each member moves its shard of every slot; a plan that differs
    # between the members of a TP group (alike within each EP group) is refused on every rank
    from largeep.expert_tp import make_expert_tp_groups

    groups = make_expert_tp_groups(2)
    ep = largeep.Buffer(groups.ep_group, hidden=h, num_experts=4, num_topk=k, max_tokens_per_rank=t, backend=backend)
    try:
        small = pl.Topology(num_nodes=1, gpus_per_node=2, slots_per_gpu=2)
        g = _gen(96)
        w1, w3 = (torch.randn(3, h, f, generator=g) for _ in range(2))
        w2 = torch.randn(3, f, h, generator=g)
        tp = layers.MoELayer(ep, ffn_hidden=f, gate=TopKGate(GateConfig(hidden=h, num_experts=3, topk=k)),
                             placement=pl.Placement(small, 3, torch.tensor([0, 1, 0, 2])),
                             expert_tp_group=groups.tp_group)
        tp.load_global_experts(w1, w3, w2)
        member = tp.expert_tp.rank
        try:
            tp.set_placement(pl.Placement(small, 3, torch.tensor([2, 0, 1, 1] if member == 0 else [1, 0, 2, 2])))
        except ArgumentError as exc:
            assert "expert-TP group holds (or moves to) another placement" in str(exc), f"rank {rank}: {exc}"
        else:
            raise AssertionError(f"rank {rank}: TP members moved to different plans")
        assert tp.phys_to_log.tolist() == [0, 1, 0, 2], f"rank {rank}: the refused plan was taken"
        tp.set_placement(pl.Placement(small, 3, torch.tensor([2, 0, 1, 1])))
        for name, a, b in zip(("w1", "w3", "w2"), tp.gather_global_experts(), (w1, w3, w2), strict=True):
            assert torch.equal(a, b), f"rank {rank}: expert TP, {name} after the move"
        c13, c2 = tp.local_experts(w1, w3, w2)
        assert torch.equal(tp.experts.w13, c13) and torch.equal(tp.experts.w2, c2), f"rank {rank}: TP shard"
    finally:
        ep.destroy()


def layer_set_placement_state(rank: int, world: int) -> None:
    """MoELayer.set_placement with optimizer state that is per slot without the parameter's shape, and after it:
    (1) Adafactor's factored moments (row_var [E_l, H, 1], col_var [E_l, 1, 2F] of w13, alike of w2) follow the
    slots: by logical expert exactly those of a layer that did not move (plan without replicas: Adafactor's
    whole-tensor step sizes would make replicas differ); (2) a state tensor neither scalar nor per slot is refused,
    on every rank, before anything moves; (3) experts.reset_parameters() after a move draws each slot's new expert
    (the weights a layer built with the new plan draws), not the old slot's."""
    from largeep import placement as pl
    from largeep.errors import ArgumentError

    h, f, k, slots, t = 16, 8, 2, 8, 12
    per_rank = slots // world
    topo = pl.Topology(num_nodes=1, gpus_per_node=world, slots_per_gpu=per_rank)
    buf = largeep.Buffer(None, hidden=h, num_experts=slots, num_topk=k, max_tokens_per_rank=t, backend="torch")
    old_plan = pl.Placement(topo, slots, torch.arange(slots))
    # (2 ranks: rank 0 swaps two of its own experts and takes two of rank 1's; rank 1 the mirror)
    new_plan = pl.Placement(topo, slots, torch.tensor([1, 0, 6, 7, 4, 5, 2, 3]))

    def build(plan: Any) -> Any:
        torch.manual_seed(5)
        return layers.MoELayer(buf, ffn_hidden=f, placement=plan, num_logical_experts=slots)

    def factored(layer: Any, opt: Any) -> list[torch.Tensor]:
        """Each Adafactor moment of w13 and w2 by logical expert (broadcast to the weights' shapes to gather)."""
        ex = layer.experts
        s13, s2 = opt.state[ex.w13], opt.state[ex.w2]
        out = []
        for key in ("row_var", "col_var"):
            got = layer.gather_global_experts(s13[key].expand_as(ex.w13).contiguous(),
                                              s2[key].expand_as(ex.w2).contiguous())
            out += list(got)
        return out

    try:
        ref, layer = build(old_plan), build(old_plan)
        opts = [torch.optim.Adafactor(m.experts.parameters(), lr=1e-2) for m in (ref, layer)]
        x = torch.randn(t, h, generator=_gen(97, rank))
        for m, opt in zip((ref, layer), opts, strict=True):
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
        assert tuple(opts[1].state[layer.experts.w13]["row_var"].shape) == (per_rank, h, 1)
        layer.set_placement(new_plan, optimizer=opts[1])
        for i, (a, b) in enumerate(zip(factored(layer, opts[1]), factored(ref, opts[0]), strict=True)):
            assert torch.equal(a, b), f"rank {rank}: Adafactor moment {i} by logical expert after the move"

        # 2. a state neither scalar nor per slot (on rank 0): refused everywhere, nothing moved
        adam = torch.optim.AdamW(layer.experts.parameters(), lr=1e-2)
        layer(x).square().sum().backward()
        adam.step()
        adam.zero_grad()
        if rank == 0:
            adam.state[layer.experts.w2]["odd"] = torch.zeros(3)
        before = [layer.experts.w13.clone(), adam.state[layer.experts.w13]["exp_avg"].clone()]
        try:
            layer.set_placement(old_plan, optimizer=adam)
        except ArgumentError as exc:
            want = ("holds experts.w2's state 'odd' of shape (3,), neither a scalar nor per slot" if rank == 0 else
                    "rank(s) [0] refused")
            assert want in str(exc), f"rank {rank}: {exc}"
        else:
            raise AssertionError(f"rank {rank}: a state of shape (3,) was not refused")
        assert torch.equal(layer.phys_to_log, new_plan.phys_to_log), f"rank {rank}: the refused plan was taken"
        assert torch.equal(layer.experts.w13, before[0]), f"rank {rank}: the weights moved"
        assert torch.equal(adam.state[layer.experts.w13]["exp_avg"], before[1]), f"rank {rank}: the state moved"

        # 3. reset_parameters after the move: the new plan's initial weights
        layer.experts.reset_parameters()
        fresh = build(new_plan)
        for name in ("w13", "w2"):
            assert torch.equal(getattr(layer.experts, name), getattr(fresh.experts, name)), \
                f"rank {rank}: experts.{name} drawn again after the move"
    finally:
        buf.destroy()


def fsdp_registry_reuse(rank: int, world: int) -> None:
    """MoELayer's FSDP2 check sees a fully_shard over its EP group applied after a forward even where torch's
    registry of composable states has as many entries as the forward before saw (another fully_shard module was
    collected in between): refused at the next forward, on every rank."""
    import gc

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    h, f, e, k = 16, 8, 2 * world, 2
    mesh = init_device_mesh("cpu", (world,))
    buf = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=8, backend="torch")
    try:
        torch.manual_seed(3)
        layer = layers.MoELayer(buf, ffn_hidden=f)
        other = torch.nn.Linear(4, 4)
        fully_shard(other, mesh=mesh)
        x = torch.randn(6, h, generator=_gen(98, rank))
        layer(x)  # (checked: nothing of the layer's is sharded)
        seen = len(layers._fsdp_managers())
        del other
        gc.collect()
        fully_shard(layer, mesh=mesh)  # over the EP group itself
        assert len(layers._fsdp_managers()) == seen, "the registry's size differs: the test proves nothing"
        try:
            layer(x)
        except largeep.ArgumentError as exc:
            assert f"over a mesh holding ranks {list(range(world))}" in str(exc), str(exc)
        else:
            raise AssertionError(f"rank {rank}: experts sharded over their own EP group were not refused")
    finally:
        buf.destroy()


# -- randomised re-placement: set_placement chains and gather_global_experts against global per-slot tensors --------
def random_table(rng: Any, world: int, per_rank: int, logical: int, prev: list[int] | None = None) -> list[int]:
    """A random valid table (the logical expert of each of ``world * per_rank`` slots, -1 empty; every expert of
    ``logical`` held at least once): fresh (replicas, empty slots, several replicas on one rank) or, from ``prev``,
    its ranks rotated (every expert leaves its rank), its slots shuffled within each rank (nothing crosses ranks)
    or ``prev`` itself."""
    slots = world * per_rank
    how = rng.choice(["fresh", "fresh", "fresh", "rotate", "shuffle", "same"]) if prev is not None else "fresh"
    if how == "rotate" and world > 1:
        r = rng.randrange(1, world)
        return prev[-r * per_rank:] + prev[:-r * per_rank]  # type: ignore[index]
    if how == "shuffle":
        out = []
        for g in range(world):
            part = prev[g * per_rank:(g + 1) * per_rank]  # type: ignore[index]
            rng.shuffle(part)
            out += part
        return out
    if how == "same":
        return list(prev)  # type: ignore[arg-type]
    table = [-1] * slots
    experts = list(range(logical))
    rng.shuffle(experts)
    for s, e in zip(rng.sample(range(slots), logical), experts, strict=True):
        table[s] = e
    empty_share = rng.choice([0.0, 0.3, 0.7])
    for s in range(slots):
        if table[s] != -1 or rng.random() < empty_share:
            continue
        mine = [e for e in table[s // per_rank * per_rank:(s // per_rank + 1) * per_rank] if e >= 0]
        # a replica: of an expert this rank holds already (several on one rank), or of any
        table[s] = rng.choice(mine) if mine and rng.random() < 0.5 else rng.randrange(logical)
    return table


def _by_slot(old: list[int], new: list[int], t: torch.Tensor) -> torch.Tensor:
    """The reference move: per-slot tensor ``t`` [slots, ...] under table ``old`` -> under ``new``: each slot the
    rows of the first old slot holding its expert, zeros for an empty slot or an expert no old slot held."""
    out = torch.zeros_like(t)
    for s, e in enumerate(new):
        if e >= 0 and e in old:
            out[s] = t[old.index(e)]
    return out


def layer_set_placement_random(rank: int, world: int, seeds: list[int], tp_size: int = 1) -> dict[str, Any]:
    """MoELayer.set_placement and gather_global_experts on random placements (``random_table``; None, the identity,
    among them, whose slots beyond the logical experts hold experts no placement has), one case per seed, drawn
    alike on every rank: a layer with AdamW state takes random per-slot weights and moments (equal over
    replicas, garbage in empty slots) and moves old -> a -> b -> old. After each move every rank's slots hold
    bit for bit the rows of the group's per-slot tensors moved by ``_by_slot`` (weights, exp_avg, exp_avg_sq;
    each TP member its shard; some cases without state, or with no optimizer), the Parameters and state
    tensors are the same objects, zero grads stay zero, the table and the gate's
    replica counts the plan's; back at the start each non-empty slot whose expert every step held is bit-equal to
    its start. After one of the moves gather_global_experts (default) equals the reference by logical expert, and
    with a random ``dst`` (None: every rank, then on the CPU) and device None / "cpu" the default gather on the
    receiver, None elsewhere; an AdamW moment's (``w13=``/``w2=``) likewise the reference; a forward (float32
    cases) gives the bits of a layer built with the plan that loaded the gathered weights.
    ``tp_size`` 2: expert TP (EP groups of world / 2). -> counts of what ran and the failures (checks do not
    raise, so every rank makes every collective call)."""
    import random

    from largeep import placement as pl
    from largeep.gate import GateConfig, TopKGate

    h, f, k = 8, 4, 1
    failures: list[str] = []
    counts = {"cases": 0, "moves": 0, "gathers": 0, "forwards": 0}
    group = None
    member, tp_group = 0, None
    if tp_size > 1:
        from largeep.expert_tp import make_expert_tp_groups

        groups = make_expert_tp_groups(tp_size)
        group, tp_group, member = groups.ep_group, groups.tp_group, dist.get_rank(groups.tp_group)
    ep_world = world // tp_size
    ep_rank = dist.get_rank(group) if group is not None else rank
    fs = f // tp_size
    bufs: dict[int, Any] = {}

    def expect(ok: bool, what: str) -> None:
        if not ok and len(failures) < 20:  # (the first ones: one bug fails many checks)
            failures.append(f"rank {rank}: {what}")

    try:
        for seed in seeds:
            rng = random.Random(seed)
            per_rank = rng.choice([1, 2, 3, 4])
            slots = ep_world * per_rank
            logical = rng.choice([1, max(1, slots // 2), max(1, slots - 1), slots, rng.randint(1, slots)])
            nodes = rng.choice([1, 2]) if ep_world == 4 else 1
            dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
            if (per_rank, nodes) not in bufs:
                bufs[(per_rank, nodes)] = largeep.Buffer(group, hidden=h, num_experts=slots, num_topk=k,
                                                         max_tokens_per_rank=4, backend="torch",
                                                         ranks_per_node=ep_world // nodes)
            topo = pl.Topology(num_nodes=nodes, gpus_per_node=ep_world // nodes, slots_per_gpu=per_rank)

            def plan(table: list[int] | None, topo: Any = topo, logical: int = logical) -> Any:
                return None if table is None else pl.Placement(topo, logical, torch.tensor(table))

            # old -> a -> b -> old; None (the identity) may stand for any of them
            chain: list[list[int] | None] = []
            for _ in range(3):
                prev = next((t for t in reversed(chain) if t is not None), None)
                chain.append(None if rng.random() < 0.15 else random_table(rng, ep_world, per_rank, logical, prev))
            chain.append(chain[0])
            tables = [t if t is not None else list(range(slots)) for t in chain]
            name = f"seed {seed} ({ep_world} EP ranks of {per_rank} slots, {nodes} node(s), {logical} experts, " \
                   f"{dtype}, TP {tp_size}): " \
                   f"{' -> '.join(str(t) for t in chain)}"
            # the group's per-slot tensors, every TP member's shard: the values of expert e (ids up to slots: the
            # identity's extra slots), replicas equal; empty slots garbage
            g = _gen(101, seed)
            shapes = {"w13": (h, 2 * fs), "w2": (fs, h)}
            keys = [(p, m) for p in ("w13", "w2") for m in ("param", "exp_avg", "exp_avg_sq")]
            values = {(j, p, m): torch.randn(slots, *shapes[p], generator=g).to(dtype) for j in range(tp_size)
                      for p, m in keys}
            full: dict[tuple[int, str, str], torch.Tensor] = {}
            for key, v in values.items():
                garbage = torch.randn(slots, *v.shape[1:], generator=g).to(dtype)
                full[key] = torch.stack([v[e] if e >= 0 else garbage[s] for s, e in enumerate(tables[0])])

            torch.manual_seed(seed)
            gate = TopKGate(GateConfig(hidden=h, num_experts=logical, topk=k))
            layer = layers.MoELayer(bufs[(per_rank, nodes)], ffn_hidden=f, gate=gate, placement=plan(chain[0]),
                                    num_logical_experts=logical, expert_tp_group=tp_group)
            ex = layer.experts.to(dtype)
            params = {"w13": ex.w13, "w2": ex.w2}
            opt = torch.optim.AdamW(ex.parameters(), lr=1e-3)
            # mostly an optimizer with state, grads None or zeros after it (not refused, and they stay zero);
            # else one never stepped (no state), given or not
            stepped = rng.random() < 0.8
            if stepped:
                for p in params.values():
                    p.grad = torch.ones_like(p)
                opt.step()
                opt.zero_grad(set_to_none=rng.random() < 0.7)
            else:
                keys = [(p, "param") for p in params]
            given = opt if stepped or rng.random() < 0.5 else None
            mine = slice(ep_rank * per_rank, (ep_rank + 1) * per_rank)

            def tensor_of(p: str, m: str, params: Any = params, opt: Any = opt) -> torch.Tensor:
                return params[p].data if m == "param" else opt.state[params[p]][m]

            with torch.no_grad():
                for p, m in keys:
                    tensor_of(p, m).copy_(full[(member, p, m)][mine])
            start = {key: t.clone() for key, t in full.items()}
            # (the weights' storage, the state's tensor objects: all written in place)
            ids = {key: tensor_of(*key).data_ptr() if key[1] == "param" else id(tensor_of(*key)) for key in keys}
            param_ids = [id(ex.w13), id(ex.w2)]
            opt_ids = [id(q) for grp in opt.param_groups for q in grp["params"]]
            survived = set(tables[0])
            gather_at = rng.randrange(1, 4)  # (the move after which the gathers run: all of them cost too much)
            for step in range(1, 4):
                old, new = tables[step - 1], tables[step]
                what = f"{name}, move {step}"
                layer.set_placement(plan(chain[step]), optimizer=given)
                counts["moves"] += 1
                full = {key: _by_slot(old, new, t) for key, t in full.items()}
                survived &= set(new)
                expect([id(ex.w13), id(ex.w2)] == param_ids and layer.experts is ex, f"{what}: new Parameters")
                expect([id(q) for grp in opt.param_groups for q in grp["params"]] == opt_ids and
                       all((params[p] in opt.state) == stepped for p in params), f"{what}: the optimizer's parameters")
                expect(all(q.grad is None or not q.grad.any() for q in params.values()), f"{what}: grads")
                for p, m in keys:
                    got = tensor_of(p, m)
                    expect((got.data_ptr() if m == "param" else id(got)) == ids[(p, m)], f"{what}: {p} {m} replaced")
                    expect(same_bits(got, full[(member, p, m)][mine]), f"{what}: {p} {m} of rank {ep_rank}'s slots")
                want_table = None if chain[step] is None else torch.tensor(new)
                expect((layer.phys_to_log is None and want_table is None) or (
                    layer.phys_to_log is not None and want_table is not None and
                    torch.equal(layer.phys_to_log.cpu(), want_table)), f"{what}: phys_to_log")
                want_counts = torch.ones(logical, dtype=torch.int64) if chain[step] is None else \
                    torch.bincount(torch.tensor([e for e in new if e >= 0]), minlength=logical)
                expect(torch.equal(layer.gate.expert_replicas.cpu(), want_counts), f"{what}: the gate's replicas")
                if step != gather_at:
                    continue
                # gather_global_experts: the weights by the default gather against the reference by logical expert,
                # then with a dst (None: every rank) and device against the default; a moment's with another
                # (without a placement: the layer's logical experts, the slots past them, which no token reaches,
                # left out)
                num = min(logical, slots) if chain[step] is None else logical
                for i, m in enumerate(("param", rng.choice(["exp_avg", "exp_avg_sq"]) if stepped else "param")):
                    ref = []
                    for p, part in (("w13", slice(0, fs)), ("w13", slice(fs, 2 * fs)), ("w2", None)):
                        rows = []
                        for e in range(num):
                            shards = [full[(j, p, m)][new.index(e)] if e in new else
                                      torch.zeros(shapes[p], dtype=dtype) for j in range(tp_size)]
                            rows.append(torch.cat([s[:, part] for s in shards], dim=1) if part is not None else
                                        torch.cat(shards, dim=0))
                        ref.append(torch.stack(rows))
                    args = () if m == "param" else (tensor_of("w13", m), tensor_of("w2", m))
                    if i == 0:
                        every = layer.gather_global_experts()
                        counts["gathers"] += 1
                        for i, (a, b) in enumerate(zip(every, ref, strict=True)):
                            expect(same_bits(a, b), f"{what}: gather_global_experts() [{i}] against the reference")
                        ref = list(every)
                    elif m == "param":
                        ref = list(every)
                    dst = rng.choice([None, *range(ep_world)])
                    device = "cpu" if dst is None else rng.choice([None, "cpu"])
                    got = layer.gather_global_experts(*args, dst=dst, device=device)
                    counts["gathers"] += 1
                    if dst is None or (ep_rank == dst and member == 0):
                        expect(got is not None and all(same_bits(a, b) for a, b in zip(got, ref, strict=True)),
                               f"{what}: gather_global_experts({m}, dst={dst}, device={device})")
                    else:
                        expect(got is None, f"{what}: gather_global_experts({m}, dst={dst}) off the receiver")
                if dtype == torch.float32:  # the moved layer routes as one built with the plan and its weights
                    fresh = layers.MoELayer(bufs[(per_rank, nodes)], ffn_hidden=f, gate=TopKGate(GateConfig(
                        hidden=h, num_experts=logical, topk=k)), placement=plan(chain[step]),
                        num_logical_experts=logical, expert_tp_group=tp_group)
                    fresh.gate.load_state_dict(layer.gate.state_dict())
                    fresh.load_global_experts(*every)
                    x = torch.randn(4, h, generator=_gen(102, seed, ep_rank))
                    with torch.no_grad():
                        expect(same_bits(layer(x), fresh(x)), f"{what}: the output against a layer built so")
                    counts["forwards"] += 1
            # back at the start: each slot whose expert every table held, bit for bit; the others zero
            for p, m in keys:
                want = torch.stack([start[(member, p, m)][s] if e >= 0 and e in survived else
                                    torch.zeros(shapes[p], dtype=dtype) for s, e in enumerate(tables[0])])
                expect(same_bits(tensor_of(p, m), want[mine]), f"{name}: {p} {m} after the round trip")
            counts["cases"] += 1
    finally:
        for b in bufs.values():
            b.destroy()
    return {**counts, "failures": failures}


def gpt_oss_slot_paths(rank: int, world: int) -> None:
    """Experts with biases (and the clamped activation) through every per-slot path: load_global_experts (the
    biases needed exactly then), gather_global_experts (all at once and to one rank; six tensors, other per-slot
    tensors given all four or none), global_experts_from_states, local_experts; set_placement with AdamW moves the
    biases and their moments (gathered before and after: equal; the outputs too); with expert TP 2 the gathers join
    b1/b3 and take b2 whole, and clip_grad_norm_ counts b2 once (against the norm of the gathered grads)."""
    from largeep import placement as pl
    from largeep.expert_tp import make_expert_tp_groups
    from largeep.gate import GateConfig, TopKGate

    h, f, per_rank, k = 16, 8, 3, 2
    slots = per_rank * world
    logical = slots - 2
    table = torch.arange(slots) % logical  # expert 0 on two slots, the last slot empty
    table[-1] = -1
    g = _gen(73)
    want = [torch.randn(logical, h, f, generator=g), torch.randn(logical, h, f, generator=g),
            torch.randn(logical, f, h, generator=g), torch.randn(logical, f, generator=g),
            torch.randn(logical, f, generator=g), torch.randn(logical, h, generator=g)]
    names = ("w1", "w3", "w2", "b1", "b3", "b2")
    topo = pl.Topology(num_nodes=1, gpus_per_node=world, slots_per_gpu=per_rank)
    buf = largeep.Buffer(None, hidden=h, num_experts=slots, num_topk=k, max_tokens_per_rank=32, backend="torch")

    def same(got: Any, what: str, scale: float = 1.0) -> None:
        assert got is not None and len(got) == 6, f"rank {rank}: {what}: {None if got is None else len(got)} tensors"
        for name, a, b in zip(names, got, want, strict=True):
            assert torch.equal(a, b * scale), f"rank {rank}: {what}: {name}"

    try:
        plan = pl.Placement(topo, logical, table.clone())
        layer = layers.MoELayer(
            buf, ffn_hidden=f, gate=TopKGate(GateConfig(hidden=h, num_experts=logical, topk=k, router_bias=True)),
            placement=plan, expert_mlp_bias=True, expert_activation=GPT_OSS_TEST_ACTIVATION)
        ex = layer.experts
        assert ex.b13 is not None and ex.b2 is not None and not bool(ex.b13.any()) and not bool(ex.b2.any())
        _raises(("argument 'b1' is missing",), layer.load_global_experts, *want[:3])
        _raises(("argument 'b2' has shape",), layer.load_global_experts, *want[:3], b1=want[3], b3=want[4],
                b2=want[5][:, :4])
        layer.load_global_experts(*want[:3], b1=want[3], b3=want[4], b2=want[5])
        same(layer.gather_global_experts(), "gather")
        lean = layer.gather_global_experts(dst=world - 1, device="cpu")
        if rank == world - 1:
            same(lean, "gather to one rank")
        else:
            assert lean is None
        every: list[Any] = [None] * world
        dist.all_gather_object(every, layer.state_dict())
        same(layers.global_experts_from_states(every), "global_experts_from_states")
        # the six the gathers give load as they are, positionally (w1, w3, w2, b1, b3, b2), as the three do without
        # biases (docs/usage.md's checkpoint code: load_global_experts(*ck["experts"])); five are refused
        fresh = layers.MoELayer(
            buf, ffn_hidden=f, gate=TopKGate(GateConfig(hidden=h, num_experts=logical, topk=k, router_bias=True)),
            placement=plan, expert_mlp_bias=True, expert_activation=GPT_OSS_TEST_ACTIVATION)
        fresh.load_global_experts(*layers.global_experts_from_states(every))
        same(fresh.gather_global_experts(), "load_global_experts of the six, positionally")
        _raises(("load_global_experts", "5 tensors", "b1, b3, b2"), fresh.load_global_experts, *want[:5])
        _raises(("load_global_experts", "'b1' given twice"), fresh.load_global_experts, *want, b1=want[3])
        mine = layer.local_experts(*want)
        assert len(mine) == 4 and all(torch.equal(a, b) for a, b in zip(mine, (ex.w13, ex.w2, ex.b13, ex.b2),
                                                                          strict=True)), "local_experts"
        _raises(("argument 'b13' is missing",), layer.gather_global_experts, ex.w13 * 2, ex.w2 * 2)
        same(layer.gather_global_experts(ex.w13 * 2, ex.w2 * 2, b13=ex.b13 * 2, b2=ex.b2 * 2), "gather of others", 2)
        # a step of AdamW, then a move: weights, biases and moments follow their experts
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        x = torch.randn(10 + rank, h, generator=_gen(74, rank))
        (layer(x) ** 2).sum().backward()
        layers.allreduce_replica_grads(list(ex.parameters()), plan.phys_to_log)
        opt.step()
        opt.zero_grad()
        params = list(ex.parameters())

        def moments() -> tuple[torch.Tensor, ...]:
            st = [opt.state[p]["exp_avg"] for p in params]
            return layer.gather_global_experts(st[0], st[1], b13=st[2], b2=st[3])

        before, m_before = layer.gather_global_experts(), moments()
        with torch.no_grad():
            y0 = layer(x)
        moved = table[torch.randperm(slots, generator=_gen(75))]
        layer.set_placement(pl.Placement(topo, logical, moved), optimizer=opt)
        assert torch.equal(layer.phys_to_log.cpu(), moved)
        for a, b, name in zip(layer.gather_global_experts() + moments(), before + m_before, names * 2, strict=True):
            assert torch.equal(a, b), f"rank {rank}: {name} after set_placement"
        with torch.no_grad():
            close(layer(x), y0, f"rank {rank}: output after set_placement")
        # a layer without biases refuses them
        plain = layers.MoELayer(buf, ffn_hidden=f, num_logical_experts=slots)
        _raises(("argument 'b1' given, but this layer's experts have no biases",), plain.load_global_experts,
                *(t[:1].expand(slots, *t.shape[1:]) for t in want[:3]), b1=want[3])
        _raises(("argument 'b13' given",), plain.gather_global_experts, b13=ex.b13)
    finally:
        buf.destroy()
    if world % 2:
        return
    # expert TP 2
    groups = make_expert_tp_groups(2)
    e = 2 * (world // 2)
    ep = largeep.Buffer(groups.ep_group, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=32,
                        backend="torch")
    try:
        gate = TopKGate(GateConfig(hidden=h, num_experts=e, topk=k, router_bias=True))
        tp = layers.MoELayer(ep, ffn_hidden=f, gate=gate, expert_tp_group=groups.tp_group, expert_mlp_bias=True,
                             expert_activation=GPT_OSS_TEST_ACTIVATION)
        full = [t[:e] for t in want]
        tp.load_global_experts(*full[:3], b1=full[3], b3=full[4], b2=full[5])
        te = tp.experts
        assert te.b13 is not None and te.b13.shape == (e // (world // 2), f) and te.b2_added_elsewhere == (
            groups.tp_rank > 0)
        got = tp.gather_global_experts()
        lean = tp.gather_global_experts(dst=0, device="cpu")
        for name, a, b in zip(names, got, full, strict=True):
            assert torch.equal(a, b), f"rank {rank}: expert TP gathered {name}"
        if lean is not None:
            assert groups.ep_rank == 0 and groups.tp_rank == 0
            assert all(torch.equal(a, b) for a, b in zip(lean, full, strict=True)), "expert TP, gather to one rank"
        cut = tp.local_experts(*full)
        assert all(torch.equal(a, b) for a, b in zip(cut, (te.w13, te.w2, te.b13, te.b2), strict=True))
        # clip_grad_norm_: each logical expert once, b2 once (every member holds its whole grad)
        xt = torch.randn(9 + rank, h, generator=_gen(76, rank))
        (tp(xt) * torch.randn(9 + rank, h, generator=_gen(77, rank))).sum().backward()
        grads = [p.grad for p in te.parameters()]
        assert all(gr is not None for gr in grads)
        every_b2 = [torch.empty_like(grads[3]) for _ in range(2)]
        dist.all_gather(every_b2, grads[3], group=groups.tp_group)
        assert torch.equal(every_b2[0], every_b2[1]), f"rank {rank}: the members' b2 grads differ"
        glob = tp.gather_global_experts(grads[0], grads[1], b13=grads[2], b2=grads[3])
        own = [p.grad for p in gate.parameters() if p.grad is not None]
        want_norm = (sum(float((t.double() ** 2).sum()) for t in list(glob) + own)) ** 0.5
        norm = layers.clip_grad_norm_(tp, max_norm=1e9)
        assert abs(float(norm) - want_norm) <= 1e-5 * want_norm, f"rank {rank}: clip norm {float(norm)} != {want_norm}"
    finally:
        ep.destroy()


def gpt_oss_layer_gpu(rank: int, world: int, backend: str) -> dict[str, Any]:
    """On CUDA: experts with biases and the clamped activation, float32, against the dense float64 reference
    (output and every grad, the biases' too; the padded-bmm GEMMs), chunked too; then with bf16 experts (the native
    grouped GEMM on sm90/sm100) within bf16 rounding of it, and twice bit for bit (the biases' grads are index_put
    sums: a rank's copies of one expert, e.g. expert-TP members' b2, must not drift apart)."""
    tokens = [37, 0, 21, 12][:world] if world > 1 else [37]
    hidden, ffn, experts, topk = 128, 64, 4 * world, 3
    m = make_global(31, tokens, hidden, ffn, 16, experts, gpt_oss=True)
    ref = dense_reference(m, topk)
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=64,
                         backend=backend)
    try:
        with torch.device("cuda"):
            layer = _build_layer(buf, m, ffn, 16)
        ex = layer.experts
        logical = local_logical_experts(None, rank, experts // world)
        x = m.xs[rank].cuda()
        for chunks in (1, 2):
            layer.num_chunks = chunks
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            out = layer(xi)
            (out * m.gs[rank].cuda()).sum().backward()
            what = f"rank {rank} {backend} float32 chunks {chunks}"
            close(out, ref["outs"][rank], f"{what}: output")
            close(xi.grad, ref["x_grads"][rank], f"{what}: grad of x")
            for name in ("w1", "w3", "w2", "b1", "b3", "b2"):
                close(expert_grad(ex, name), ref["grads"][name][logical], f"{what}: grad of {name}")
        # bf16: GPT-OSS's own limit (7), which these unit-scale projections do not reach: a bf16 rounding next to a
        # limit switches that element's derivative on or off, which the elementwise bound below cannot take (the
        # clamps in bf16 are test_hf_port.py's serving test's)
        layer.num_chunks = 1
        ex.to(torch.bfloat16)
        ex.activation = layers.ClampedSwiGLU()
        ref = dense_reference(replace(m, activation=ex.activation), topk)
        ops.reset_grouped_mm_stats()
        runs = []
        for _ in range(2):
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            out = layer(xi)
            (out.float() * m.gs[rank].cuda()).sum().backward()
            torch.cuda.synchronize()
            runs.append([out.detach(), xi.grad] + [p.grad for p in ex.parameters()])
        what = f"rank {rank} {backend} bf16"
        close(runs[0][0], ref["outs"][rank], f"{what}: output", rtol=2.0**-6)
        for name, i in (("w13", 2), ("w2", 3), ("b13", 4), ("b2", 5)):
            want = ref["grads"]
            full = torch.cat([want[name[0] + "1"], want[name[0] + "3"]], dim=-1) if name.endswith("13") else \
                want[name]
            close(runs[0][i], full[logical], f"{what}: grad of {name}", rtol=2.0**-5)
        for i, (a, b) in enumerate(zip(*runs, strict=True)):
            assert torch.equal(a, b), f"{what}: tensor {i} differs between two identical runs"
        return {"grouped_mm": _native_gemms_ran()}
    finally:
        buf.destroy()


def logical_below_slots(rank: int, world: int) -> None:
    """A layer without a placement whose num_logical_experts (8) is below the Buffer's experts (12; slot s holds
    expert s, slots 8-11 reached by no token) loads and gathers its 8 experts (it once expected 12); the gather
    loads into an 8-slot layer (another EP size) that computes the same outputs; allreduce_replica_grads takes its
    phys_to_log (None: no replicas) and returns 0."""
    from largeep.gate import GateConfig, TopKGate

    h, f, slots, logical, k = 16, 8, 12, 8, 2
    g = _gen(81)
    want = [torch.randn(logical, h, f, generator=g), torch.randn(logical, h, f, generator=g),
            torch.randn(logical, f, h, generator=g)]
    buf = largeep.Buffer(None, hidden=h, num_experts=slots, num_topk=k, max_tokens_per_rank=16, backend="torch")
    small = largeep.Buffer(None, hidden=h, num_experts=logical, num_topk=k, max_tokens_per_rank=16, backend="torch")
    try:
        torch.manual_seed(3)
        layer = layers.MoELayer(buf, ffn_hidden=f, gate=TopKGate(GateConfig(hidden=h, num_experts=logical, topk=k)),
                                num_logical_experts=logical)
        layer.load_global_experts(*want)
        got = layer.gather_global_experts()
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), f"rank {rank}: gathered experts"
        lean = layer.gather_global_experts(dst=0, device="cpu")
        assert (lean is not None) == (rank == 0)
        if lean is not None:
            assert all(torch.equal(a, b) for a, b in zip(lean, want, strict=True))
        assert layers.allreduce_replica_grads(list(layer.experts.parameters()), layer.phys_to_log) == 0
        other = layers.MoELayer(small, ffn_hidden=f, gate=TopKGate(GateConfig(hidden=h, num_experts=logical, topk=k)))
        other.load_state_dict({n: v for n, v in layer.state_dict().items() if n.startswith("gate.")}, strict=False)
        other.load_global_experts(*got)
        x = torch.randn(6 + rank, h, generator=_gen(82, rank))
        with torch.no_grad():
            close(other(x), layer(x), f"rank {rank}: the 8-slot layer against the 12-slot one")
    finally:
        small.destroy()
        buf.destroy()
