"""largeep.layers.MoELayer on 1, 2 and 4 ranks over gloo against a dense single-process float64 reference:
forward and grads, chunked overlap, replicas, low-latency mode, two-micro-batch overlap, torch.compile."""

from __future__ import annotations

import importlib.util

import layer_bodies
import pytest


def _tokens(world: int, base: int = 13) -> list[int]:
    # uneven counts, and a rank without tokens when there are several ranks
    return [0 if (r == 1 and world > 1) else base + 5 * r for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_layer_forward_backward(pools, world: int) -> None:
    variants = [
        {},
        {"num_chunks": 3},
        {"num_worst_tokens": 2 * 13 * world + 40},
        {"use_custom_ops": True},
        {"use_custom_ops": True, "num_worst_tokens": 2 * 13 * world + 40, "num_chunks": 2},
    ]
    pools(world).run(layer_bodies.layer_vs_reference, _tokens(world), 32, 24, 12, 4 * world, 3, 10 + world, variants)


def test_layer_padded_bmm_sizes(pools) -> None:
    # hidden and ffn sizes whose strides are not multiples of 16 bytes: the padded-bmm grouped GEMM
    pools(2).run(layer_bodies.layer_vs_reference, [9, 14], 30, 18, 0, 6, 2, 5, [{}, {"num_chunks": 2}])


@pytest.mark.parametrize("world", [2, 4])
def test_layer_replicas(pools, world: int) -> None:
    # E physical slots, E - 2 logical experts: two of them have two replicas whose grads are summed
    pools(world).run(
        layer_bodies.layer_vs_reference, _tokens(world), 32, 16, 8, 4 * world, 2, 20 + world, [{}], 2
    )


@pytest.mark.parametrize("world", [1, 2, 4])
def test_low_latency_vs_normal(pools, world: int) -> None:
    tokens = [min(8, 4 + 2 * r) for r in range(world)]
    pools(world).run(layer_bodies.low_latency_vs_normal, tokens, 32, 16, 8, 4 * world, 3, 30 + world, False)


def test_low_latency_fp8(pools) -> None:
    pools(2).run(layer_bodies.low_latency_vs_normal, [6, 5], 128, 32, 0, 8, 2, 41, True)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("num_worst,num_chunks", [(0, 1), (64, 2)])
def test_compile_two_layers(pools, world: int, num_worst: int, num_chunks: int) -> None:
    pools(world).run(layer_bodies.compiled_two_layers, [12 + 3 * r for r in range(world)], num_worst, num_chunks, 7)


@pytest.mark.skipif(importlib.util.find_spec("largeep.gate") is None, reason="largeep.gate is not there")
def test_layer_with_topk_gate(pools) -> None:
    pools(2).run(layer_bodies.layer_with_topk_gate, [10, 7], 3)
