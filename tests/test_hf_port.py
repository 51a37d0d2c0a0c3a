"""Porting Hugging-Face-style MoE blocks (Mixtral, Qwen2-MoE / Qwen3-MoE, DeepSeek-V3, GPT-OSS) to MoELayer with the
functions of docs/usage.md ("Porting a Hugging Face MoE block"), on 1 and 4 ranks over gloo; the conversion helpers
(layers.experts_from_linear, SwiGLU.load_linear and its sigmoid gate) on their own."""

from __future__ import annotations

import hf_port_bodies as hp
import pytest
import torch
import torch.nn.functional as F
from largeep import ArgumentError, layers
from torch import nn


@pytest.mark.parametrize("world", [1, 4])
def test_ported_blocks_match(pools, world: int) -> None:
    tokens = [13] if world == 1 else [13, 0, 21, 8]
    pools(world).run(hp.ported_blocks_match, tokens, 5 + world)


def test_layer_layout_checks(pools) -> None:
    pools(1).run(hp.layer_layout_checks)


def test_deepseek_case_uses_bias_and_groups() -> None:
    """The DeepSeek-V3 case is not vacuous: its bias and its group limit each change some tokens' experts."""
    block = hp._block("deepseek_v3", 7)
    r = block.gate
    x = torch.randn(64, hp.H, generator=torch.Generator().manual_seed(3))
    idx = set(map(tuple, r(x)[0].sort(-1).values.tolist()))
    saved = r.e_score_correction_bias.clone()
    r.e_score_correction_bias.zero_()
    assert idx != set(map(tuple, r(x)[0].sort(-1).values.tolist())), "the bias changed no choice"
    r.e_score_correction_bias.copy_(saved)
    r.topk_group = r.n_group
    assert idx != set(map(tuple, r(x)[0].sort(-1).values.tolist())), "the group limit changed no choice"


def test_gpt_oss_case_uses_biases_and_clamps() -> None:
    """The GPT-OSS case is not vacuous: its router bias changes some tokens' experts, both clamps change some of the
    routed values (gate above the limit; up above it and below -limit), and each expert bias changes the output."""
    block = hp._block("gpt_oss", 7)
    r, ex = block.router, block.experts
    x = torch.randn(64, hp.H, generator=torch.Generator().manual_seed(3))
    top = r(x).topk(hp.K, dim=-1).indices
    idx = set(map(tuple, top.sort(-1).values.tolist()))
    assert idx != set(map(tuple, (x @ r.weight.t()).topk(hp.K, dim=-1).indices.sort(-1).values.tolist())), \
        "the router bias changed no choice"
    with torch.no_grad():
        gu = [ex.gate_up(x[t : t + 1], int(e)) for t in range(x.shape[0]) for e in top[t]]
        gate, up = torch.cat([g for g, _ in gu]), torch.cat([u for _, u in gu])
        for what, share in (("gate > limit", (gate > ex.limit).float().mean()),
                            ("up > limit", (up > ex.limit).float().mean()),
                            ("up < -limit", (up < -ex.limit).float().mean())):
            assert 0.01 < float(share) < 0.5, f"{what}: share {float(share):.3f} of the routed values"
        want = block(x)
        for arg in ("limit", "gate_up_proj_bias", "down_proj_bias"):
            saved = getattr(ex, arg)
            if arg == "limit":
                ex.limit = float("inf")
            else:
                setattr(ex, arg, nn.Parameter(torch.zeros_like(saved)))
            assert (block(x) - want).abs().max() > 0.05 * want.abs().max(), f"{arg} changed the output too little"
            setattr(ex, arg, saved)
        assert torch.equal(block(x), want)


def test_experts_from_linear_values() -> None:
    """x @ w1[e] is the e-th gate_proj's nn.Linear output (likewise up, down), for modules and for bare weights."""
    torch.manual_seed(0)
    h, f, n = 12, 20, 3
    gate = [nn.Linear(h, f, bias=False) for _ in range(n)]
    up = [nn.Linear(h, f, bias=False) for _ in range(n)]
    down = [nn.Linear(f, h, bias=False) for _ in range(n)]
    w1, w3, w2 = layers.experts_from_linear(nn.ModuleList(gate), up, [m.weight for m in down])
    assert w1.shape == w3.shape == (n, h, f) and w2.shape == (n, f, h)
    assert not (w1.requires_grad or w2.requires_grad)
    x, y = torch.randn(5, h), torch.randn(5, f)
    for e in range(n):
        torch.testing.assert_close(x @ w1[e], gate[e](x))
        torch.testing.assert_close(x @ w3[e], up[e](x))
        torch.testing.assert_close(y @ w2[e], down[e](y))
    with torch.no_grad():
        gate[0].weight.add_(1.0)
    assert not torch.equal(x @ w1[0], gate[0](x)), "the result must be a copy, not a view"


@pytest.mark.parametrize("case,arg", [
    ("bias", "gate_proj[1]"), ("lengths", "down_proj"), ("shape", "up_proj[2]"), ("down_shape", "down_proj[0]"),
    ("single", "gate_proj"), ("empty", "gate_proj"), ("type", "up_proj[0]"), ("generator", "up_proj"),
])
def test_experts_from_linear_refusals(case: str, arg: str) -> None:
    h, f, n = 6, 10, 3
    gate: list = [nn.Linear(h, f, bias=False) for _ in range(n)]
    up: list = [nn.Linear(h, f, bias=False) for _ in range(n)]
    down: list = [nn.Linear(f, h, bias=False) for _ in range(n)]
    args: list = [gate, up, down]
    if case == "bias":
        gate[1] = nn.Linear(h, f)
    elif case == "lengths":
        args[2] = down[:2]
    elif case == "shape":
        up[2] = nn.Linear(h, f + 1, bias=False)
    elif case == "down_shape":
        args[2] = [nn.Linear(h, f, bias=False) for _ in range(n)]  # down given as another gate_proj
    elif case == "single":
        args[0] = gate[0]
    elif case == "empty":
        args = [[], [], []]
    elif case == "type":
        up[0] = "w3"
    elif case == "generator":
        args[1] = (m for m in up)
    with pytest.raises(ArgumentError, match=rf"argument '{arg}'".replace("[", r"\[").replace("]", r"\]")):
        layers.experts_from_linear(*args)


def test_swiglu_load_linear_and_sigmoid_gate() -> None:
    """SwiGLU(sigmoid_gate=True) loaded from nn.Linear modules computes sigmoid(g(x)) * down(silu(gate(x)) *
    up(x)); without the gate, the plain MLP; its state holds wg; the wrong modules are refused."""
    torch.manual_seed(1)
    h, f = 16, 40
    gp, upp, dp, g = (nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False), nn.Linear(f, h, bias=False),
                      nn.Linear(h, 1, bias=False))
    x = torch.randn(9, h)
    mlp = dp(F.silu(gp(x)) * upp(x))
    s = layers.SwiGLU(h, f, sigmoid_gate=True)
    assert "wg" in s.state_dict() and s.wg is not None and s.wg.shape == (h, 1)
    s.load_linear(gp, upp, dp, g)
    torch.testing.assert_close(s(x), torch.sigmoid(g(x)) * mlp)
    plain = layers.SwiGLU(h, f)
    assert plain.wg is None and "wg" not in plain.state_dict()
    plain.load_linear(gp.weight, upp.weight, dp.weight)
    torch.testing.assert_close(plain(x), mlp)
    with pytest.raises(ArgumentError, match="'sigmoid_gate' is missing"):
        s.load_linear(gp, upp, dp)
    with pytest.raises(ArgumentError, match="'sigmoid_gate' given"):
        plain.load_linear(gp, upp, dp, g)
    with pytest.raises(ArgumentError, match="'gate_proj' has shape"):
        plain.load_linear(nn.Linear(h, f + 2, bias=False), nn.Linear(h, f + 2, bias=False),
                          nn.Linear(f + 2, h, bias=False))
    with pytest.raises(ArgumentError, match="'sigmoid_gate' has shape"):
        s.load_linear(gp, upp, dp, nn.Linear(h, 2, bias=False))
    with pytest.raises(ArgumentError, match="'up_proj\\[0\\]' is an nn.Linear with a bias"):
        plain.load_linear(gp, nn.Linear(h, f), dp)
    with pytest.raises(ArgumentError, match="'sigmoid_gate' must be a bool"):
        layers.SwiGLU(h, f, sigmoid_gate="yes")  # type: ignore[arg-type]
    with torch.device("meta"):
        m = layers.SwiGLU(h, f, sigmoid_gate=True)
    m = m.to_empty(device="cpu")
    m.reset_parameters()
    assert m.wg is not None and torch.isfinite(m.wg).all() and 0.05 < float(m.wg.detach().std()) < 1.0


@pytest.mark.parametrize("world", [1, 4])
def test_ported_blocks_serve(pools, world: int) -> None:
    """The ported Mixtral, Qwen2-MoE (shared expert with its sigmoid gate), DeepSeek-V3 and GPT-OSS (biases, clamped
    SwiGLU) blocks served in bf16: prefill in normal mode, decode through for_buffer twins (plain and two
    micro-batches), steps of other sizes with ranks of 0 tokens, a load into the prefill layer seen by the twin."""
    if world == 1:
        tokens, plans = [21], [[3], [0], [6]]
    else:
        tokens, plans = [21, 0, 30, 5], [[3, 0, 6, 1], [0, 0, 2, 6], [6, 4, 0, 0]]
    worst = pools(world).run(hp.ported_blocks_serve, tokens, plans, 11 + world)
    assert max(max(w) for w in worst) > 0, "the decode outputs carried no bf16 rounding"
