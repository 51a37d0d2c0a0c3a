"""SPEC.md's rules on the torch backend over gloo (CPU), on 1 to 4 ranks."""

from __future__ import annotations

import bodies
import pytest
import torch

WORLDS = [1, 2, 3, 4]


def _tokens(world: int, base: int) -> list[int]:
    # uneven counts, and a rank with no tokens at all when there are several ranks
    return [0 if (r == 1 and world > 1) else base + 3 * r for r in range(world)]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(
    "dtype,use_fp8,alignment,worst",
    [("bfloat16", False, 1, 0), ("float32", False, 4, 0), ("bfloat16", True, 1, 0), ("float32", False, 1, 200)],
)
def test_normal(pools, world: int, dtype: str, use_fp8: bool, alignment: int, worst: int) -> None:
    hidden = 256
    experts = 12 * world if world != 3 else 24
    pools(world).run(
        bodies.normal_roundtrip, "torch", _tokens(world, 17), hidden, experts, 4, dtype, use_fp8, alignment,
        world * 10 + alignment, None, worst,
    )


@pytest.mark.parametrize("world", [2, 4])
def test_normal_emulated_nodes(pools, world: int) -> None:
    pools(world).run(
        bodies.normal_roundtrip, "torch", _tokens(world, 9), 128, 8 * world, 8, "bfloat16", False, 1, 5, 1
    )


def test_normal_topk1_all_minus_one(pools) -> None:
    # top-1 routing, and a token batch where every entry of rank 0 is -1
    pools(2).run(bodies.normal_roundtrip, "torch", [5, 7], 128, 4, 1, "bfloat16", False, 2, 99, None, 0, None, 0)


@pytest.mark.parametrize("weighted", ["all", "some"])
def test_low_latency_weighted(pools, weighted: str) -> None:
    """low_latency_dispatch given topk_weights (some ranks or all), under torch.inference_mode: the same results."""
    pools(2).run(bodies.low_latency_roundtrip_inference, "torch", [8, 5], 8, 256, 12, 4, True, False, True, 17,
                 None, weighted)


def test_low_latency_ops_weighted(pools) -> None:
    """The custom-op path (and torch.compile) of a low-latency dispatch given topk_weights."""
    pools(2).run(bodies.low_latency_ops_weighted, "torch", [8, 5], 8, 256, 12, 4, 19)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("modes,distinct", [("bf16", True), ("mixed", False)])
def test_low_latency_bf16_partial_sums(pools, world: int, modes: str, distinct: bool) -> None:
    """bf16_partial_sums: a token's sum over its experts on one rank rounded to bf16 where it has two or more there,
    bit for bit against a float64 reference on exact values; ranks asking for it, for two-row sums and for no
    weights mixed in one call; repeated experts."""
    m = ["bf16"] * world if modes == "bf16" else ["bf16", "split", "none"][:world]
    pools(world).run(bodies.low_latency_partial_sums, "torch", [12, 9, 0][:world], 12, 256, 4 * world, 6, 3, m,
                     modes == "mixed", None, distinct)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("use_fp8,round_scale,hook", [(False, False, False), (True, False, False), (True, True, True)])
def test_low_latency(pools, world: int, use_fp8: bool, round_scale: bool, hook: bool) -> None:
    experts = 6 * world
    tokens = [min(8, 3 + 2 * r) for r in range(world)]
    if world > 1:
        tokens[-1] = 0
    pools(world).run(
        bodies.low_latency_roundtrip, "torch", tokens, 8, 256, experts, 3, use_fp8, round_scale, hook, world + 3
    )


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dtype,use_fp8,alignment,per_round", [("bfloat16", False, 1, 7), ("float32", False, 4, 1),
                                                               ("bfloat16", True, 1, 10)])
def test_normal_rounds(pools, world: int, dtype: str, use_fp8: bool, alignment: int, per_round: int) -> None:
    """A Buffer with tokens_per_round (calls in rounds) against the reference: every check of a plain Buffer's."""
    hidden = 256
    experts = 12 * world if world != 3 else 24
    pools(world).run(
        bodies.normal_roundtrip, "torch", _tokens(world, 17), hidden, experts, 4, dtype, use_fp8, alignment,
        world * 10 + alignment + 3, None, 0, per_round,
    )


@pytest.mark.parametrize("world,ranks_per_node,per_round", [(1, None, 4), (2, None, 3), (3, None, 16), (4, 2, 5)])
@pytest.mark.parametrize("use_fp8", [False, True])
def test_rounds_match_one_round(pools, world: int, ranks_per_node: int | None, per_round: int, use_fp8: bool) -> None:
    """Rounds against one round, bit for bit (dispatch fresh and cached, counts, combine), and rounds' refusals."""
    pools(world).run(
        bodies.rounds_match_one_round, "torch", _tokens(world, 17), 256, 8 * world, 4, "bfloat16", use_fp8, per_round,
        world + 40, ranks_per_node,
    )


@pytest.mark.parametrize("seed", range(6))
def test_merge_positions(seed: int) -> None:
    """rounds.merge_positions against a row-by-row listing of SPEC's order (source, then round, then position)."""
    import torch
    from largeep.backends.rounds import merge_positions, round_bounds

    g = torch.Generator().manual_seed(seed)
    n, r = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    counts = [torch.randint(0, 4, (n,), generator=g) * (torch.rand(n, generator=g) > 0.2) for _ in range(r)]
    rows = [int(c.sum()) for c in counts]
    order = [(s, i, j) for s in range(n) for i in range(r) for j in range(int(counts[i][s]))]
    where = {key: pos for pos, key in enumerate(order)}
    offsets = torch.stack([torch.cat([torch.zeros(1, dtype=torch.int64), c.cumsum(0)]) for c in counts])
    got = merge_positions(offsets.to(torch.int32 if seed % 2 else torch.int64), sum(rows)).tolist()
    want = [where[(s, i, j)] for i in range(r) for s in range(n) for j in range(int(counts[i][s]))]
    assert got == want
    assert round_bounds(10, 3) == [0, 3, 6, 10] and round_bounds(2, 4) == [0, 0, 1, 1, 2]


def test_stack_offsets() -> None:
    """rounds.stack_offsets: the rounds' receive offsets as device tensors (stacked as they are) or as host lists
    (one int64 tensor), the same values either way."""
    import torch
    from largeep.backends.rounds import stack_offsets

    host = [[0, 2, 2, 5], [0, 0, 1, 1]]
    got = stack_offsets(host, torch.device("cpu"))
    assert got.dtype == torch.int64 and got.tolist() == host
    dev = [torch.tensor(h, dtype=torch.int32) for h in host]
    got = stack_offsets(dev, torch.device("cpu"))
    assert got.dtype == torch.int32 and got.tolist() == host


@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_quantize_matches_spec(round_scale: bool) -> None:
    """fp8.quantize (what the torch backend's low-latency dispatch sends, and the usual way to make a normal FP8
    dispatch's input) against reference.fp8_check: amax / 448 scales, round to nearest, zero and huge groups."""
    from largeep import fp8
    from reference import fp8_check

    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 512, generator=g) * torch.logspace(-6, 4, 9).unsqueeze(1)
    x[0, :128] = 0.0  # an all-zero group
    x[1, 5] = 60000.0  # a group with one huge value
    for dt in (torch.float32, torch.bfloat16):
        q, s = fp8.quantize(x.to(dt), round_scale=round_scale)
        assert fp8_check(q, s, x.to(dt), round_scale) is None
    q, s = fp8.quantize(x, round_scale=round_scale)
    assert fp8_check(q, s * 1.01, x, round_scale) is not None  # the check sees a wrong scale
    # the right scale, values rounded toward zero: one e4m3 step down (its magnitude bits) where nearest went up
    v = x / s.repeat_interleave(128, dim=1)
    bits = q.view(torch.uint8)
    up = (q.float().abs() > v.abs()) & ((bits & 0x7F) > 0)
    toward_zero = torch.where(up, bits - 1, bits).view(torch.float8_e4m3fn)
    assert fp8_check(toward_zero, s, x, round_scale) is not None
