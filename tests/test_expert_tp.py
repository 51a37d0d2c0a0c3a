"""largeep.expert_tp: expert tensor parallelism in MoELayer on 2 and 4 ranks over gloo (TP groups of 2) against the
dense single-process float64 reference; compiled equals eager; a TP group of 1 equals the plain layer; the
differentiable collectives; wrong configurations."""

from __future__ import annotations

import expert_tp_bodies
import pytest


def _tokens(world: int, base: int = 13) -> list[int]:
    # uneven counts, and a rank without tokens
    return [0 if r == 1 else base + 5 * r for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("rows", [0, 3])
def test_collectives(pools, world: int, rows: int) -> None:
    pools(world).run(expert_tp_bodies.collectives, rows)


def test_layer_tp_fp8(pools) -> None:
    """Expert TP with FP8 dispatch (4 ranks, TP 2): the layer against the dense reference with FP8 round-tripped
    expert inputs, chunked too (test_bad_configs: members that disagree on use_fp8 are refused)."""
    variants = [{"use_fp8": True}, {"use_fp8": True, "num_chunks": 2}]
    pools(4).run(expert_tp_bodies.layer_tp_vs_reference, 2, [9, 0, 14, 6], 128, 24, 0, 8, 3, 65, variants, 0, True)


@pytest.mark.parametrize("world", [2, 4])
def test_layer_tp_vs_reference(pools, world: int) -> None:
    # EP group of world/2 ranks; F = 24 split 12 + 12; every variant of the plain layer's test
    worst = 2 * 13 * world + 40
    variants = [
        {},
        {"num_chunks": 3},
        {"num_worst_tokens": worst},
        {"use_custom_ops": True},
        {"use_custom_ops": True, "num_worst_tokens": worst, "num_chunks": 2},
    ]
    pools(world).run(
        expert_tp_bodies.layer_tp_vs_reference, 2, _tokens(world), 32, 24, 12, 4 * world, 3, 50 + world, variants
    )


@pytest.mark.parametrize("world,replicas", [(2, 0), (4, 2)])
def test_layer_tp_gpt_oss_experts(pools, world: int, replicas: int) -> None:
    """Expert TP with biases and the clamped activation: b1/b3 shard with w1/w3; b2 is added by the first member
    only, and every member's b2 takes the whole (equal) grad."""
    variants = [{}, {"num_chunks": 2}, {"use_custom_ops": True}]
    pools(world).run(expert_tp_bodies.layer_tp_vs_reference, 2, _tokens(world), 32, 24, 12, 4 * world, 3, 80 + world,
                     variants, replicas, False, True)


def test_layer_tp_padded_bmm_replicas(pools) -> None:
    # strides that are not multiples of 16 bytes (padded-bmm grouped GEMM: H 30, F/T 9), and two replicated
    # logical experts whose shard grads are summed over the EP group
    pools(4).run(expert_tp_bodies.layer_tp_vs_reference, 2, [9, 0, 14, 6], 30, 18, 0, 8, 2, 61, [{}], 2)


def test_layer_tp_4(pools) -> None:
    # one EP rank: the whole world is one TP group of 4
    pools(4).run(expert_tp_bodies.layer_tp_vs_reference, 4, _tokens(4), 32, 16, 0, 8, 3, 71, [{}, {"num_chunks": 2}])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("num_worst", [0, 48])
def test_compiled_tp_layer(pools, num_worst: int, backend: str) -> None:
    pools(2).run(expert_tp_bodies.compiled_tp_layer, 2, [12, 7], num_worst, 9, backend)


def test_weight_grad_penalty(pools) -> None:
    """A second derivative through the expert weights' gradients (the grouped GEMM's weight gradient) through a
    TP layer equals the whole-expert layer's."""
    pools(2).run(expert_tp_bodies.weight_grad_penalty)


@pytest.mark.parametrize(("custom", "keep_comm"), [(False, False), (False, True), (True, True)])
def test_checkpointed_tp_layer(pools, custom: bool, keep_comm: bool) -> None:
    """An expert-TP layer under activation checkpointing (plain, or with ops.checkpoint_context_fn) over two
    steps: the recomputation's early stop leaves the TP group usable; equal to the layer without checkpointing."""
    pools(2).run(expert_tp_bodies.checkpointed_tp_layer, custom, keep_comm)


@pytest.mark.parametrize("world", [2, 4])
def test_tp1_equals_plain(pools, world: int) -> None:
    pools(world).run(expert_tp_bodies.tp1_equals_plain, _tokens(world), 80 + world, [{}, {"num_chunks": 2}])


@pytest.mark.parametrize("world", [2, 4])
def test_bad_configs(pools, world: int) -> None:
    pools(world).run(expert_tp_bodies.bad_configs)


def test_gloo_groups_are_bounded(pools) -> None:
    pools(2).run(expert_tp_bodies.gloo_bounds)


@pytest.mark.parametrize(
    ("backend", "cpu", "cuda"),
    [("gloo", True, True), ("nccl", False, False), ("cpu:gloo,cuda:nccl", True, False),
     ("cuda:nccl,cpu:gloo", True, False), ("cpu:gloo,cuda:gloo", True, True), ("ucc", False, False),
     ("cpu:gloo", True, False)],
)
def test_bound_follows_the_backend(monkeypatch, backend: str, cpu: bool, cuda: bool) -> None:
    # LARGEEP_TIMEOUT_S bounds the waits where gloo moves the tensors: by the group's backend for the tensors'
    # device type, not by the device alone (a gloo group with CUDA tensors is bounded; a mixed group's CUDA
    # tensors go through NCCL, whose waits are not)
    import torch
    import torch.distributed as dist
    from largeep import _collective

    # (the backend's config: a group made without naming a backend is "undefined" by name, "cpu:gloo" or
    # "cpu:gloo,cuda:nccl" by config)
    seen = []
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: seen.append(group) or backend)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "undefined")
    group = object()
    assert _collective.on_gloo(group, torch.device("cpu")) is cpu  # type: ignore[arg-type]
    assert _collective.on_gloo(group, torch.device("cuda", 1)) is cuda  # type: ignore[arg-type]
    assert seen == [group, group]


def test_wrong_group_everywhere_then_retry(pools) -> None:
    # every rank passes TP group {0, 1}'s object: all raise at once (through their Buffers' groups), and the retry
    # with the right groups works on every rank
    pools(4).run(expert_tp_bodies.wrong_group_then_retry, 30.0)


@pytest.mark.parametrize("world", [2, 4])
def test_one_sided_refusals(pools, world: int) -> None:
    pools(world).run(expert_tp_bodies.one_sided_refusals)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(
    ("kw", "pipeline"),
    [({}, False), ({"num_chunks": 2}, False), ({"num_worst_tokens": 64}, False), ({"use_custom_ops": True}, False),
     ({}, True)],
    ids=["plain", "chunks", "worst", "custom_ops", "pipeline"],
)
def test_refusal_keeps_tp_in_step(pools, world: int, kw: dict, pipeline: bool) -> None:
    # a dispatch refused in one EP group raises on every rank at once, and the next call is right everywhere
    pools(world).run(expert_tp_bodies.refusal_keeps_tp_in_step, kw, pipeline)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kw", [{}, {"num_worst_tokens": 64}], ids=["plain", "worst"])
def test_dtype_mismatch_refused(pools, world: int, kw: dict) -> None:
    pools(world).run(expert_tp_bodies.dtype_mismatch_refused, kw)


def test_shifted_exchanges_raise(pools) -> None:
    pools(2).run(expert_tp_bodies.shifted_exchanges)


def test_failed_dispatch_joins(pools) -> None:
    pools(2).run(expert_tp_bodies.failed_dispatch_joins)


def test_worst_refusal_without_exchange() -> None:
    # a pool of its own: rank 1's abandoned gather stays pending in its process, which is killed afterwards
    from dist_pool import run_in_own_pool

    took = run_in_own_pool(2, "gloo", expert_tp_bodies.worst_refusal_without_exchange, 2.0)
    assert took[0][0] < 2.0 and 2.0 <= took[1][0] < 30.0, took  # rank 0 at once, rank 1 after its bound
    assert took[0][1] < 2.0 and took[1][1] < 2.0, took  # the next call: refused at once on both


def test_tp_top1_with_an_empty_rank(pools) -> None:
    pools(2).run(expert_tp_bodies.tp_top1_empty_rank)


def test_deepcopy_of_a_tp_layer(pools) -> None:
    pools(2).run(expert_tp_bodies.deepcopy_of_a_tp_layer)


@pytest.mark.parametrize("world", [2, 4])
def test_tp_state_names_its_shard(pools, world: int) -> None:
    pools(world).run(expert_tp_bodies.tp_state_names_its_shard)


def test_missing_tp_member_is_bounded() -> None:
    # a pool of its own: the abandoned gather stays pending in its processes, which are killed afterwards
    from dist_pool import run_in_own_pool

    r0 = run_in_own_pool(2, "gloo", expert_tp_bodies.missing_tp_member, 2.0)[0]
    assert r0["raised"] is not None and "expert TP" in r0["raised"] and "LARGEEP_TIMEOUT_S=2" in r0["raised"], r0
    assert 2.0 <= r0["took"] < 30.0, r0
