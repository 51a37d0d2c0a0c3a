"""Plain-PyTorch MoE blocks in the layout of the Hugging Face modules (one nn.Linear per expert projection, a loop
over experts; GPT-OSS's experts as fused, interleaved tensors) -- Mixtral, Qwen2-MoE / Qwen3-MoE, DeepSeek-V3,
GPT-OSS -- written from their published architectures, and the body that ports each to an MoELayer with the
functions of docs/usage.md ("Porting a Hugging Face MoE block", read from the file and run as they are) and compares
output and gradients."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import largeep
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def _routed(x: torch.Tensor, experts: nn.ModuleList, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum over k of w[t, k] * experts[idx[t, k]](x[t]), one expert at a time (w in x's dtype, as the modules do)."""
    w = w.to(x.dtype)
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        tok, slot = torch.where(idx == e)
        if tok.numel():
            out = out.index_add(0, tok, expert(x[tok]) * w[tok, slot, None])
    return out


class MixtralMLP(nn.Module):
    def __init__(self, h: int, f: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)  # gate, up
        self.w2 = nn.Linear(f, h, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Mixtral(nn.Module):
    """Router -> top-k of the logits -> softmax over those k -> per-expert SwiGLU."""

    def __init__(self, h: int, f: int, e: int, k: int) -> None:
        super().__init__()
        self.top_k = k
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList(MixtralMLP(h, f) for _ in range(e))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        top, idx = self.gate(x).topk(self.top_k, dim=-1)
        return _routed(x, self.experts, idx, F.softmax(top, dim=-1, dtype=torch.float)).view_as(hidden)


class MLP(nn.Module):
    def __init__(self, h: int, f: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class QwenMoE(nn.Module):
    """Softmax over all experts -> top-k (renormalised with norm_topk_prob); Qwen2-MoE (shared_f > 0) adds a shared
    expert scaled by sigmoid(shared_expert_gate(x)), Qwen3-MoE has none."""

    def __init__(self, h: int, f: int, e: int, k: int, norm_topk_prob: bool, shared_f: int = 0) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = k, norm_topk_prob
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList(MLP(h, f) for _ in range(e))
        if shared_f:
            self.shared_expert = MLP(h, shared_f)
            self.shared_expert_gate = nn.Linear(h, 1, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        w, idx = F.softmax(self.gate(x), dim=-1, dtype=torch.float).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        out = _routed(x, self.experts, idx, w)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view_as(hidden)


class DeepseekV3Router(nn.Module):
    """Sigmoid scores; the choice on scores + e_score_correction_bias, among the topk_group groups (of n_group
    contiguous ones) with the best sums of their two best choice scores; weights from the scores, normalised, times
    routed_scaling_factor. (Other groups masked with -inf, as DeepSeek's inference code does.)"""

    def __init__(self, h: int, e: int, k: int, n_group: int, topk_group: int, scale: float) -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = k, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = True, scale
        self.weight = nn.Parameter(torch.randn(e, h) * h**-0.5)
        self.register_buffer("e_score_correction_bias", torch.zeros(e))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, e = x.shape[0], self.weight.shape[0]
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        per_group = choice.view(t, self.n_group, e // self.n_group)
        best = per_group.topk(2, dim=-1).values.sum(-1).topk(self.topk_group, dim=-1).indices
        keep = torch.zeros(t, self.n_group, dtype=torch.bool).scatter_(1, best, True)
        masked = per_group.masked_fill(~keep[:, :, None], float("-inf")).view(t, e)
        idx = masked.topk(self.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * self.routed_scaling_factor


class DeepseekV3(nn.Module):
    def __init__(self, h: int, f: int, e: int, k: int, n_group: int, topk_group: int, scale: float,
                 n_shared: int) -> None:
        super().__init__()
        self.gate = DeepseekV3Router(h, e, k, n_group, topk_group, scale)
        self.experts = nn.ModuleList(MLP(h, f) for _ in range(e))
        self.shared_experts = MLP(h, f * n_shared)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        idx, w = self.gate(x)
        return (_routed(x, self.experts, idx, w) + self.shared_experts(x)).view_as(hidden)


class GptOssExperts(nn.Module):
    """GPT-OSS's experts as the transformers module stores them: gate_up_proj [E, H, 2F] ([in, out]) with the gate
    and up projections interleaved along the last dim (gate in the even columns, up in the odd), gate_up_proj_bias
    [E, 2F] likewise, down_proj [E, F, H], down_proj_bias [E, H]; the clamped SwiGLU of alpha and limit."""

    def __init__(self, h: int, f: int, e: int, alpha: float = 1.702, limit: float = 7.0) -> None:
        super().__init__()
        self.alpha, self.limit = alpha, limit
        # scaled so that |gate| and |up| pass the limit for a share of the entries (std about 5 against 7), and
        # with biases far from zero: both clamps and all four biases matter
        self.gate_up_proj = nn.Parameter(torch.randn(e, h, 2 * f) * 4.5 * h**-0.5)
        self.gate_up_proj_bias = nn.Parameter(torch.randn(e, 2 * f) * 2.0)
        self.down_proj = nn.Parameter(torch.randn(e, f, h) * f**-0.5 / 4)
        self.down_proj_bias = nn.Parameter(torch.randn(e, h))

    def gate_up(self, x: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's gate and up projections of x [T, H], biases added, before the clamps: ([T, F], [T, F])."""
        gu = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        return gu[..., ::2], gu[..., 1::2]

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = self.gate_up(x, e)
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return ((up + 1) * glu) @ self.down_proj[e] + self.down_proj_bias[e]


class GptOss(nn.Module):
    """Router nn.Linear(H, E, bias=True) -> top-k of the logits -> softmax over those k -> each chosen expert's
    clamped SwiGLU with biases, summed with those weights."""

    def __init__(self, h: int, f: int, e: int, k: int) -> None:
        super().__init__()
        self.top_k = k
        self.router = nn.Linear(h, e, bias=True)
        self.experts = GptOssExperts(h, f, e)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        top, idx = self.router(x).topk(self.top_k, dim=-1)
        w = F.softmax(top, dim=-1, dtype=torch.float).to(x.dtype)
        rows = [sum(w[t, j] * self.experts.expert(x[t : t + 1], int(idx[t, j])) for j in range(self.top_k))
                for t in range(x.shape[0])]  # token by token, each of its k experts
        return (torch.cat(rows) if rows else torch.zeros_like(x)).view_as(hidden)


def doc_ports() -> dict[str, Any]:
    """The porting functions of docs/usage.md, run from the file (so that the docs' mapping is the tested one)."""
    text = USAGE.read_text()
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M) if "def port_mixtral" in b]
    assert len(blocks) == 1, "docs/usage.md: expected one python block defining port_mixtral"
    ns: dict[str, Any] = {}
    exec(compile(blocks[0], str(USAGE), "exec"), ns)  # noqa: S102 - the project's own docs
    return ns


# (name, block maker, porting function) -- H 64, E 16 (4 per rank on 4 ranks), top-4; H != F, so the layouts differ
H, FFN, E, K = 64, 48, 16, 4
CASES = {
    "mixtral": (lambda: Mixtral(H, FFN, E, K), "port_mixtral"),
    "qwen3_norm": (lambda: QwenMoE(H, FFN, E, K, norm_topk_prob=True), "port_qwen_moe"),
    "qwen3": (lambda: QwenMoE(H, FFN, E, K, norm_topk_prob=False), "port_qwen_moe"),
    "qwen2": (lambda: QwenMoE(H, FFN, E, K, norm_topk_prob=False, shared_f=80), "port_qwen_moe"),
    "deepseek_v3": (lambda: DeepseekV3(H, FFN, E, K, n_group=4, topk_group=2, scale=2.5, n_shared=2),
                    "port_deepseek_v3"),
    "gpt_oss": (lambda: GptOss(H, FFN, E, K), "port_gpt_oss"),
}


def _block(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same block on every rank
    block = CASES[name][0]()
    if isinstance(block, DeepseekV3):
        with torch.no_grad():
            block.gate.e_score_correction_bias.normal_(std=0.1)  # large enough to change some choices
    if isinstance(block, GptOss):
        with torch.no_grad():
            block.router.bias.normal_(std=0.3)  # above nn.Linear's init (within +-H^-0.5): changes choices
    return block


def _grad(t: torch.Tensor) -> torch.Tensor:
    """t's gradient, zeros where none was made (a rank without tokens)."""
    return t.grad if t.grad is not None else torch.zeros_like(t)


def _expert_grads(block: nn.Module) -> tuple[tuple[str, ...], list[torch.Tensor]]:
    """The names and the gradients [E, ...] of the block's routed experts' weights in largeep's layout ([in, out];
    GPT-OSS's de-interleaved, its biases after the weights: w1, w3, w2, b1, b3, b2), zeros where none was made."""
    if isinstance(block, GptOss):
        ex = block.experts
        gu, gb = _grad(ex.gate_up_proj), _grad(ex.gate_up_proj_bias)
        grads = (gu[..., ::2], gu[..., 1::2], _grad(ex.down_proj), gb[:, ::2], gb[:, 1::2], _grad(ex.down_proj_bias))
        return (("gate_up_proj[..., ::2]", "gate_up_proj[..., 1::2]", "down_proj", "gate_up_proj_bias[:, ::2]",
                 "gate_up_proj_bias[:, 1::2]", "down_proj_bias"),
                [g.clone(memory_format=torch.contiguous_format) for g in grads])  # (copies: all_reduce'd in place)
    projs = ("w1", "w3", "w2") if isinstance(block, Mixtral) else ("gate_proj", "up_proj", "down_proj")
    return projs, [torch.stack([_grad(getattr(m, p).weight).t() for m in block.experts]) for p in projs]


def ported_blocks_match(rank: int, world: int, tokens: list[int], seed: int) -> None:
    """Each block ported by the docs' function: output, x's gradient, and the gradients of the router (and its bias),
    every local expert (and its biases) and the shared experts against the block's own (float32, to rounding), in
    train mode; ranks with different token counts (0 included)."""
    ports = doc_ports()
    buf = largeep.Buffer(None, hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=max(tokens))

    def close(got: torch.Tensor, want: torch.Tensor, name: str, what: str) -> None:
        # GPT-OSS: atol 1e-6 of the reference's largest value (where that exceeds 1). Its clamps bite only on
        # values near their limit (7), so its activations reach ~50 and its grads ~200 where the other blocks' stay
        # within ~10; float32 sums of such terms round by ~1e-6 of them, beyond 1e-6 absolute on an entry whose terms
        # cancel (measured on 1 rank, 64 tokens, 12 seeds: up to 16x the others' tolerance on down_proj's grad, at
        # most half of this one on any tensor; the other blocks' errors stay within a quarter of theirs)
        big = float(want.detach().abs().max()) if want.numel() else 0.0
        atol = 1e-6 * max(1.0, big) if name == "gpt_oss" else 1e-6
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=lambda m: f"{name} {what}: {m}")

    try:
        for i, name in enumerate(CASES):
            block = _block(name, seed + i)
            layer = ports[CASES[name][1]](block, buf)
            gen = torch.Generator().manual_seed(1000 * seed + 10 * i + rank)
            x = torch.randn(tokens[rank], H, generator=gen)
            dy = torch.randn(tokens[rank], H, generator=gen)
            xr, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
            want = block(xr)
            got = layer(xl)
            close(got, want, name, "output")
            if want.grad_fn is not None:  # (a rank without tokens and without shared experts: no graph)
                want.backward(dy)
            got.backward(dy)
            close(_grad(xl), _grad(xr), name, "x grad")
            # the gate and the shared experts are replicated: each rank's grads are its own tokens'
            if isinstance(block, GptOss):
                assert layer.gate.router_bias is not None, name
                close(_grad(layer.gate.weight), _grad(block.router.weight), name, "router weight grad")
                close(_grad(layer.gate.router_bias), _grad(block.router.bias), name, "router bias grad")
            else:
                close(_grad(layer.gate.weight), _grad(block.gate.weight), name, "router grad")
            # a routed expert's grads are every rank's tokens': the blocks' grads summed over the ranks, in
            # largeep's layout ([in, out]), at this rank's slots
            projs, grads = _expert_grads(block)
            if world > 1:
                for g in grads:
                    dist.all_reduce(g)
            lo, n_local = rank * (E // world), E // world
            grads = [g[lo : lo + n_local] for g in grads]
            f, ex = FFN, layer.experts
            mine = [_grad(ex.w13)[..., :f], _grad(ex.w13)[..., f:], _grad(ex.w2)]
            if ex.b13 is not None and ex.b2 is not None:
                mine += [_grad(ex.b13)[:, :f], _grad(ex.b13)[:, f:], _grad(ex.b2)]
            assert len(mine) == len(projs), f"{name}: the layer's experts have {len(mine)} tensors, {len(projs)} wanted"
            for p, a, b in zip(projs, mine, grads, strict=True):
                close(a, b, name, f"experts' {p} grad")
            shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
            assert (shared is None) == (layer.shared_experts is None), name
            if shared is not None:
                s = layer.shared_experts
                pairs = [(s.w1, shared.gate_proj), (s.w3, shared.up_proj), (s.w2, shared.down_proj)]
                if hasattr(block, "shared_expert_gate"):
                    pairs.append((s.wg, block.shared_expert_gate))
                for mine_p, lin in pairs:
                    close(_grad(mine_p), _grad(lin.weight).t(), name, "shared grads")
    finally:
        buf.destroy()


def layer_layout_checks(rank: int, world: int) -> None:
    """A forgotten transpose names the layout; shared_expert_gate needs shared experts; a low-latency layer made by
    for_buffer keeps the shared experts' gate (its output equals the normal layer's to the bf16 roundings of the
    low-latency path)."""
    from largeep import ArgumentError, layers

    h, f, e, k = 32, 24, 8, 2
    buf = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=8)
    ll = largeep.Buffer(None, hidden=h, num_experts=e, num_topk=k, max_tokens_per_rank=8, low_latency=True)
    try:
        layer = layers.MoELayer(buf, ffn_hidden=f, shared_ffn_hidden=16, shared_expert_gate=True)
        lin = torch.randn(e, f, h)  # stacked nn.Linear(h, f) weights, [out, in]
        for bad in ((lin, lin.transpose(1, 2), torch.randn(e, f, h)), (lin.transpose(1, 2), lin, lin.transpose(1, 2))):
            try:
                layer.load_global_experts(*bad)
            except ArgumentError as exc:
                assert "nn.Linear's [out, in] layout" in str(exc) and "experts_from_linear" in str(exc), exc
            else:
                raise AssertionError("a load in nn.Linear's layout was accepted")
        try:
            layer.load_global_experts(torch.randn(e, h + 1, f), torch.randn(e, h, f), torch.randn(e, f, h))
        except ArgumentError as exc:
            assert "layout" not in str(exc), exc  # (no hint where the shape is not a transpose)
        try:
            layers.MoELayer(buf, ffn_hidden=f, shared_expert_gate=True)
        except ArgumentError as exc:
            assert "'shared_expert_gate'" in str(exc) and "shared_ffn_hidden" in str(exc), exc
        else:
            raise AssertionError("shared_expert_gate without shared experts was accepted")
        try:
            layers.MoELayer(buf, ffn_hidden=f, shared_ffn_hidden=16, shared_expert_gate=1)  # type: ignore[arg-type]
        except ArgumentError as exc:
            assert "'shared_expert_gate'" in str(exc), exc
        else:
            raise AssertionError("shared_expert_gate=1 was accepted")
        assert layer.shared_experts is not None and layer.shared_experts.wg is not None
        with torch.no_grad():
            layer.shared_experts.wg.mul_(4.0)  # gate values spread over (0, 1)
        decode = layer.for_buffer(ll)
        assert decode.shared_experts is layer.shared_experts
        x = torch.randn(6, h, generator=torch.Generator().manual_seed(7 + rank)).to(torch.bfloat16).float()
        with torch.no_grad():
            want = layer(x)
            got = decode(x)
            shared = layer.shared_experts(x)
        # (the shared experts without their gate: the gate must change the output)
        plain = (F.silu(x @ layer.shared_experts.w1) * (x @ layer.shared_experts.w3)) @ layer.shared_experts.w2
        assert (shared - plain).abs().max() > 0.1 * plain.abs().max(), "the gate changed nothing"
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    finally:
        ll.destroy()
        buf.destroy()


def _rounded_reference(name: str, seed: int) -> nn.Module:
    """The block of ``_block(name, seed)`` with its parameters rounded to bf16 and kept in float32 (buffers -- the
    DeepSeek-V3 bias -- unrounded, as the ported gate keeps expert_bias float32; GPT-OSS's router and expert biases
    are parameters, rounded as the cast rounds the gate's router_bias and the experts' b13, b2): the function a bf16
    port computes, without its roundings."""
    block = _block(name, seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(p.bfloat16().float())
    return block


def ported_blocks_serve(rank: int, world: int, tokens: list[int], plans: list[list[int]], seed: int) -> list[float]:
    """Serving the ported blocks (docs/usage.md, "Serving: prefill and decode"): each port on a normal-mode Buffer
    cast to bf16 and in eval mode, its decode twin from ``for_buffer`` on a low-latency Buffer, bf16 tokens under
    inference_mode. Prefill (chunks from the group's longest prompt; a rank with 0 tokens), decode steps of the
    ``plans``' sizes (0 included) and two-micro-batch decode against the block with the same bf16-rounded weights
    computed in float32, to bf16 tolerance (2^-6 of the output's largest value); decode against the prefill layer
    on the same tokens likewise (with bf16 x both modes round, at other steps); TwoBatchOverlap equal to two plain
    calls; a checkpoint of another block loaded into the prefill layer is what the twin computes. Returns the
    largest decode errors against the reference (the caller checks they are not 0: the roundings are real)."""
    from largeep import layers

    ports = doc_ports()
    chunk, m = 16, max(max(p) for p in plans)
    pbuf = largeep.Buffer(None, hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=chunk)
    dbuf = largeep.Buffer(None, hidden=H, num_experts=E, num_topk=K, max_tokens_per_rank=m, low_latency=True)
    worst = []

    def close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 2.0**-6) -> float:
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, (what, got.dtype, got.shape)
        scale = float(want.abs().max()) if want.numel() else 1.0
        err = float((got.float() - want.float()).abs().max()) / scale if want.numel() else 0.0
        assert err <= tol, f"{what}: max error {err:.3g} of the largest value, tolerance {tol:.3g}"
        return err

    try:
        for i, name in enumerate(("mixtral", "qwen2", "deepseek_v3", "gpt_oss")):
            prefill = ports[CASES[name][1]](_block(name, seed + i), pbuf).to(torch.bfloat16).eval()
            decode = prefill.for_buffer(dbuf)
            assert decode.low_latency and decode.experts is prefill.experts and decode.gate is prefill.gate
            assert decode.shared_experts is prefill.shared_experts, name
            if name == "qwen2":  # the twin keeps the shared expert's sigmoid gate
                assert decode.shared_experts is not None and decode.shared_experts.wg is not None
            assert prefill.gate.expert_bias.dtype == torch.float32, "the cast rounded the DeepSeek-V3 bias"
            ref = _rounded_reference(name, seed + i)
            gen = torch.Generator().manual_seed(1000 * seed + 10 * i + rank)

            def tok(n: int, g: torch.Generator = gen) -> torch.Tensor:
                return torch.randn(n, H, generator=g).bfloat16()

            far = 0.0
            with torch.inference_mode():
                x = tok(tokens[rank])
                longest = torch.tensor(x.shape[0])
                if world > 1:
                    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
                prefill.num_chunks = max(1, -(-int(longest) // chunk))
                close(prefill(x), ref(x.float()), f"{name} prefill")
                for step, plan in enumerate(plans):  # a generation loop: other sizes each step
                    xs = tok(plan[rank])
                    got = decode(xs)
                    far = max(far, close(got, ref(xs.float()), f"{name} decode step {step}"))
                    close(got, prefill(xs), f"{name} decode step {step} against prefill")
                xa, xb = tok(plans[0][rank]), tok(plans[-1][rank])
                ya, yb = layers.TwoBatchOverlap(decode)(xa, xb)
                assert torch.equal(ya, decode(xa)) and torch.equal(yb, decode(xb)), f"{name} two-batch overlap"
                far = max(far, close(yb, ref(xb.float()), f"{name} two-batch decode"))
            worst.append(far)
            # a new checkpoint (another block's port) loaded into the prefill layer: the twin computes it
            other = ports[CASES[name][1]](_block(name, seed + 50 + i), pbuf)
            prefill.load_state_dict(other.state_dict())
            ref = _rounded_reference(name, seed + 50 + i)
            with torch.inference_mode():
                xs = tok(plans[0][rank])
                close(decode(xs), ref(xs.float()), f"{name} decode after a load into the prefill layer")
    finally:
        dbuf.destroy()
        pbuf.destroy()
    return worst
