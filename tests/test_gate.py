"""Tests of largeep.gate against plain-Python references on small sizes, plus the balancing claims."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from largeep.errors import ArgumentError
from largeep.gate import (
    GateConfig,
    GateOutput,
    LoadMonitor,
    TopKGate,
    apply_capacity,
    balance_loss,
    capacity_for,
    contiguous_groups,
    select_topk,
)
from largeep.placement import Topology, greedy_placement

pytestmark = pytest.mark.usefixtures("one_thread")


def _ref_select(scores, bias, group_of_expert, topk_groups, topk, group_score, norm, scale):
    """Brute force, one token at a time: try every set of topk_groups groups, keep the best by summed group score,
    then the top-k experts inside it."""
    t_num, e_num = scores.shape
    choice = scores + (bias if bias is not None else 0.0)
    groups = sorted(set(group_of_expert.tolist()))
    idx_out, w_out = [], []
    for t in range(t_num):
        row = choice[t].tolist()
        gscore = {}
        for g in groups:
            members = sorted((row[e] for e in range(e_num) if group_of_expert[e] == g), reverse=True)
            gscore[g] = members[0] if group_score == "max" or len(members) == 1 else members[0] + members[1]
        best = max(itertools.combinations(groups, topk_groups), key=lambda c: sum(gscore[g] for g in c))
        allowed = [e for e in range(e_num) if int(group_of_expert[e]) in best]
        chosen = sorted(allowed, key=lambda e: -row[e])[:topk]
        w = [float(scores[t, e]) for e in chosen]
        if norm:
            total = sum(w)
            w = [x / total for x in w]
        idx_out.append(chosen)
        w_out.append([x * scale for x in w])
    return torch.tensor(idx_out, dtype=torch.int64), torch.tensor(w_out, dtype=torch.float32)


@pytest.mark.parametrize(
    "e_num,n_groups,topk_groups,topk,group_score,use_bias,norm",
    [
        (8, 4, 2, 3, "top2", True, True),
        (12, 3, 1, 2, "max", False, True),
        (12, 4, 3, 5, "top2", True, False),
        (6, 6, 2, 2, "top2", True, True),  # groups of one expert
        (16, 1, 1, 4, "top2", True, True),  # no group limit
    ],
)
def test_select_topk_matches_bruteforce(e_num, n_groups, topk_groups, topk, group_score, use_bias, norm):
    gen = torch.Generator().manual_seed(e_num * 100 + topk)
    for t_num in (0, 1, 37):
        scores = torch.rand(t_num, e_num, generator=gen)
        bias = (torch.rand(e_num, generator=gen) - 0.5) * 0.3 if use_bias else None
        groups = contiguous_groups(e_num, n_groups)
        idx, w = select_topk(
            scores,
            topk,
            bias=bias,
            group_of_expert=groups,
            topk_groups=topk_groups,
            group_score=group_score,
            norm_topk_prob=norm,
            routed_scaling_factor=2.5,
        )
        ref_idx, ref_w = _ref_select(scores, bias, groups, topk_groups, topk, group_score, norm, 2.5)
        assert idx.dtype == torch.int64 and w.dtype == torch.float32
        assert idx.shape == (t_num, topk)
        if t_num:
            assert torch.equal(idx, ref_idx)
            torch.testing.assert_close(w, ref_w)


def test_select_topk_uneven_groups_bruteforce():
    """Groups given as an arbitrary partition (e.g. the nodes of a placement), of unequal sizes."""
    gen = torch.Generator().manual_seed(3)
    groups = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 2, 3], dtype=torch.int64)
    scores = torch.rand(50, groups.numel(), generator=gen)
    bias = torch.rand(groups.numel(), generator=gen) * 0.1
    idx, w = select_topk(scores, 3, bias=bias, group_of_expert=groups, topk_groups=2, group_score="top2")
    ref_idx, ref_w = _ref_select(scores, bias, groups, 2, 3, "top2", True, 1.0)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w)


@pytest.mark.parametrize("group_score", ["top2", "max"])
def test_select_topk_uneven_groups_negative_selection_scores(group_score):
    """Uneven groups (the table pads the smaller ones) with a bias that makes selection scores negative: a group's
    score is taken over its own members only (the padding never counts, and a group of one expert scores that
    expert's score, however low), against the brute force over every set of groups."""
    gen = torch.Generator().manual_seed(17)
    groups = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 2, 3, 4, 4], dtype=torch.int64)  # sizes 3, 3, 4, 1, 2
    e_num = groups.numel()
    for topk_groups, topk in ((2, 3), (3, 2), (1, 1)):
        scores = torch.rand(80, e_num, generator=gen)
        bias = -0.5 - torch.rand(e_num, generator=gen)  # every selection score is < 0.5 and most are < 0
        idx, w = select_topk(scores, topk, bias=bias, group_of_expert=groups, topk_groups=topk_groups,
                             group_score=group_score, norm_topk_prob=False)
        ref_idx, ref_w = _ref_select(scores, bias, groups, topk_groups, topk, group_score, False, 1.0)
        assert torch.equal(idx, ref_idx), (topk_groups, topk)
        torch.testing.assert_close(w, ref_w)


@pytest.mark.parametrize(
    "e_num,nodes,max_nodes,topk,score_func",
    [(64, 8, 4, 8, "sigmoid"), (256, 8, 4, 8, "softmax"), (32, 4, 1, 4, "sigmoid"), (48, 6, 2, 6, "softmax")],
)
def test_node_limited_routing_reaches_at_most_m_nodes(e_num, nodes, max_nodes, topk, score_func):
    cfg = GateConfig(
        hidden=32,
        num_experts=e_num,
        topk=topk,
        score_func=score_func,
        num_groups=nodes,
        topk_groups=max_nodes,
    )
    gate = TopKGate(cfg)
    gate.expert_bias.copy_(torch.randn(e_num) * 0.05)  # the bias takes part in the choice of groups too
    x = torch.randn(500, 32)
    out = gate(x)
    node = out.topk_idx // (e_num // nodes)
    for row in node.tolist():
        assert len(set(row)) <= max_nodes
    assert len(set(out.topk_idx[0].tolist())) == topk


def test_node_limited_routing_with_placement_nodes():
    """Groups = nodes of a placement (non-contiguous): every token's experts live on at most M nodes."""
    topo = Topology(num_nodes=4, gpus_per_node=2, slots_per_gpu=4)
    load = torch.rand(32, generator=torch.Generator().manual_seed(1)) + 0.1
    placement = greedy_placement(load, topo)
    home = placement.home_node()
    gate = TopKGate(GateConfig(hidden=16, num_experts=32, topk=4, topk_groups=2), group_of_expert=home)
    out = gate(torch.randn(300, 16))
    phys = placement.route(out.topk_idx, torch.randint(0, 8, (300,)))
    node = phys // topo.slots_per_gpu // topo.gpus_per_node
    assert max(len(set(r)) for r in node.tolist()) <= 2


def _skewed_logits(gen: torch.Generator, log_p: torch.Tensor, cluster_of: torch.Tensor, t_num: int) -> torch.Tensor:
    """A skewed synthetic router: log Zipf popularity + co-activation cluster bonus + Gumbel noise, so that the
    unbiased top-k is a draw without replacement from the Zipf mix."""
    token_cluster = torch.randint(int(cluster_of.max()) + 1, (t_num,), generator=gen)
    u = torch.rand(t_num, log_p.numel(), generator=gen).clamp(1e-12, 1 - 1e-7)
    return log_p[None, :] + 3.0 * (cluster_of[None, :] == token_cluster[:, None]).float() - torch.log(-torch.log(u))


@pytest.mark.parametrize("zipf_s", [0.8, 1.2])
def test_bias_balancing_flattens_a_skewed_router(zipf_s):
    """Aux-loss-free balancing takes max/mean expert load from >= 2 to <= 1.1 within 200 steps.

    Loads are measured over the last 40 steps (81920 tokens): one step of 2048 tokens holds 64 choices per expert,
    whose sampling noise alone puts max/mean near 1.4 even for perfectly balanced expected loads. Sigmoid scores as
    in DeepSeek-V3; the rate is 0.01 because 200 steps is short (DeepSeek-V3 uses 1e-3 over far more steps)."""
    e_num, topk, t_num = 256, 8, 2048
    gen = torch.Generator().manual_seed(int(zipf_s * 10))
    log_p = -zipf_s * torch.log(torch.randperm(e_num, generator=gen).float() + 1.0)
    cluster_of = torch.randperm(e_num, generator=gen) % 16
    cfg = GateConfig(hidden=8, num_experts=e_num, topk=topk, score_func="sigmoid", bias_update_rate=0.01)
    gate = TopKGate(cfg)
    window = []
    for step in range(200):
        logits = _skewed_logits(gen, log_p, cluster_of, t_num)
        out = gate.route_logits(logits)
        load = torch.bincount(out.topk_idx.flatten(), minlength=e_num).float()
        if step == 0:
            assert float(load.max() / load.mean()) >= 2.0
        window = (window + [load])[-40:]
        # The bias never enters the combine weights: they are the raw sigmoid scores of the chosen experts, normed.
        raw = logits.sigmoid().gather(1, out.topk_idx)
        torch.testing.assert_close(out.topk_weights, raw / raw.sum(-1, keepdim=True))
        gate.update_bias()
    total = torch.stack(window).sum(0)
    assert float(total.max() / total.mean()) <= 1.1
    assert float(gate.expert_bias.abs().max()) > 0.1  # the bias did move and changed the selection


def test_bias_changes_selection_but_not_weights():
    cfg = GateConfig(hidden=16, num_experts=8, topk=2, score_func="softmax", norm_topk_prob=False)
    gate = TopKGate(cfg)
    x = torch.randn(64, 16)
    before = gate(x)
    gate.expert_bias.copy_(torch.tensor([5.0, 0, 0, 0, 0, 0, 0, -5.0]))
    after = gate(x)
    assert (after.topk_idx == 0).any(dim=1).all() and not (after.topk_idx == 7).any()
    assert not torch.equal(before.topk_idx, after.topk_idx)
    torch.testing.assert_close(after.topk_weights, after.scores.gather(1, after.topk_idx))


def test_update_bias_rule_and_counts():
    cfg = GateConfig(hidden=4, num_experts=6, topk=2, bias_update_rate=0.25)
    gate = TopKGate(cfg)
    x = torch.randn(40, 4)
    out1, out2 = gate(x), gate(x[:13])
    counts = torch.bincount(torch.cat([out1.topk_idx, out2.topk_idx]).flatten(), minlength=6).float()
    torch.testing.assert_close(gate.expert_load, counts)
    used = gate.update_bias()
    torch.testing.assert_close(used, counts)
    expect = 0.25 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(gate.expert_bias, expect)
    assert float(gate.expert_load.abs().sum()) == 0.0  # counts reset
    load = torch.tensor([1.0, 2, 3, 4, 5, 6])
    used = gate.update_bias(load=load, rate=0.5)
    torch.testing.assert_close(gate.expert_bias, expect + 0.5 * torch.sign(load.mean() - load))
    used.add_(1)  # (the returned load is the gate's own: the caller's tensor is neither returned nor changed)
    assert torch.equal(load, torch.tensor([1.0, 2, 3, 4, 5, 6]))
    gate.eval()
    gate(x)
    assert float(gate.expert_load.sum()) == 0.0  # eval mode does not count
    off = TopKGate(GateConfig(hidden=4, num_experts=6, topk=2, bias_balancing=False))
    off(x)
    off.update_bias(load=load)
    assert float(off.expert_bias.abs().sum()) == 0.0


def test_update_bias_per_replica_uses_the_gates_replica_counts():
    """per_replica divides the load by set_replicas' counts before the sign step: an expert with 3 replicas and 3x
    the mean load per replica is left alone, where the plain step pushes it down."""
    gate = TopKGate(GateConfig(hidden=4, num_experts=4, topk=2, bias_update_rate=0.5))
    gate.set_replicas(torch.tensor([3, 1, 1, 1]))
    load = torch.tensor([9.0, 3, 2, 4])
    used = gate.update_bias(load=load, per_replica=True)
    want = load / torch.tensor([3.0, 1, 1, 1])
    assert torch.equal(used, want)
    torch.testing.assert_close(gate.expert_bias, 0.5 * torch.sign(want.mean() - want))
    assert float(gate.expert_bias[0]) == 0.0  # (3 per replica is the mean per replica: no push)
    plain = TopKGate(GateConfig(hidden=4, num_experts=4, topk=2, bias_update_rate=0.5))
    plain.set_replicas(torch.tensor([3, 1, 1, 1]))
    plain.update_bias(load=load)
    assert float(plain.expert_bias[0]) == -0.5  # (the plain step pushes the replicated expert down)
    assert torch.equal(load, torch.tensor([9.0, 3, 2, 4]))
    with pytest.raises(ArgumentError, match="'per_replica'"):
        gate.update_bias(load=load, per_replica=1)  # type: ignore[arg-type]


def _bias_worker(rank: int, world: int, path: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    gate = TopKGate(GateConfig(hidden=4, num_experts=5, topk=1, bias_update_rate=0.1))
    load = torch.tensor([[5.0, 0, 0, 1, 0], [0.0, 0, 4, 1, 1]])[rank]
    orig = load.clone()
    used = gate.update_bias(dist.group.WORLD, load=load)
    assert torch.equal(load, orig), f"rank {rank}: the group's sum was written into the caller's load: {load}"
    # the counts gathered by forward, summed too (a second step, from each rank's own batch)
    gate.expert_load.copy_(torch.tensor([[1.0, 2, 0, 0, 3], [2.0, 0, 0, 7, 0]])[rank])
    used2 = gate.update_bias(dist.group.WORLD)
    torch.save((gate.expert_bias, used, used2, gate.expert_load.clone()), os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_update_bias_sums_loads_over_the_group():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_bias_worker, args=(2, os.path.join(tmp, "store"), tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    # the returned load is the group's sum, not the mean over ranks (the sign step alone cannot tell them apart)
    total, total2 = torch.tensor([5.0, 0, 4, 2, 1]), torch.tensor([3.0, 2, 0, 7, 3])
    expect = 0.1 * torch.sign(total.mean() - total) + 0.1 * torch.sign(total2.mean() - total2)
    for bias, used, used2, counts in results:
        torch.testing.assert_close(bias, expect)
        assert torch.equal(used, total) and torch.equal(used2, total2), (used, used2)
        assert not counts.any()  # the counts are reset after the step


def test_aux_loss_matches_formula_and_has_grad():
    gen = torch.Generator().manual_seed(5)
    cfg = GateConfig(hidden=8, num_experts=6, topk=2, aux_loss_coef=0.01, bias_balancing=False)
    gate = TopKGate(cfg)
    x = torch.randn(30, 8, generator=gen)
    out = gate(x)
    assert out.aux_loss is not None
    probs = (x @ gate.weight.detach().T).softmax(-1)
    f = [0.0] * 6
    for row in out.topk_idx.tolist():
        for e in row:
            f[e] += 1.0 / (30 * 2)
    p = probs.mean(0).tolist()
    ref = 0.01 * 6 * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    assert abs(out.aux_loss.item() - ref) < 1e-6
    out.aux_loss.backward()
    assert gate.weight.grad is not None and float(gate.weight.grad.abs().sum()) > 0
    uniform = balance_loss(torch.full((4, 4), 0.25), torch.tensor([[0], [1], [2], [3]]), 4)
    assert abs(float(uniform) - 1.0) < 1e-6
    assert TopKGate(GateConfig(hidden=8, num_experts=6, topk=2))(x).aux_loss is None


def _ref_capacity(idx: torch.Tensor, w: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx, w = idx.clone(), w.clone()
    used: dict[int, int] = {}
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e < 0:
                continue
            if used.get(e, 0) >= cap:
                idx[t, k], w[t, k] = -1, 0.0
            else:
                used[e] = used.get(e, 0) + 1
    return idx, w


@pytest.mark.parametrize("cap", [0, 1, 3, 100])
def test_capacity_keeps_earlier_tokens(cap):
    gen = torch.Generator().manual_seed(cap)
    scores = torch.rand(60, 5, generator=gen)
    idx, w = select_topk(scores, 2)
    idx[7] = -1  # a token with all -1
    idx[9, 1] = -1
    got_idx, got_w = apply_capacity(idx, w, 5, cap)
    ref_idx, ref_w = _ref_capacity(idx, w, cap)
    assert torch.equal(got_idx, ref_idx)
    torch.testing.assert_close(got_w, ref_w)


def test_gate_capacity_factor():
    cfg = GateConfig(hidden=8, num_experts=4, topk=2, capacity_factor=0.5)
    gate = TopKGate(cfg)
    gate.expert_bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))  # everyone wants experts 0 and 1
    out = gate(torch.randn(40, 8))
    cap = capacity_for(40, 2, 4, 0.5)
    assert cap == 10
    assert out.tokens_per_expert.tolist() == [10, 10, 0, 0]
    assert (out.topk_idx[:10] >= 0).all() and (out.topk_idx[10:] == -1).all()
    assert float(out.topk_weights[10:].detach().abs().sum()) == 0.0


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.* is deprecated:DeprecationWarning")  # (torch's own)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_gate_compiles_fullgraph(backend: str):
    """torch.compile(fullgraph=True) of the gate gives eager's choices and weights (to float32 rounding), with the
    capacity factor (its exact fraction is made outside the trace), group limits and the aux loss; a capacity factor
    changed after a compiled call applies at the retrace."""
    torch.manual_seed(3)
    x = torch.randn(40, 32)
    for kw in (dict(capacity_factor=1.1, aux_loss_coef=0.01), dict(score_func="sigmoid", num_groups=4, topk_groups=2)):
        gate = TopKGate(GateConfig(hidden=32, num_experts=16, topk=4, **kw))
        torch._dynamo.reset()
        want, got = gate(x), torch.compile(gate, backend=backend, fullgraph=True)(x)
        assert torch.equal(got.topk_idx, want.topk_idx)
        torch.testing.assert_close(got.topk_weights, want.topk_weights, rtol=1e-6, atol=1e-7)
        assert torch.equal(got.tokens_per_expert, want.tokens_per_expert)
    # a factor changed after a compiled call: the retrace reads the new exact fraction (made when it was set)
    gate = TopKGate(GateConfig(hidden=32, num_experts=16, topk=4, capacity_factor=1.1))
    torch._dynamo.reset()
    compiled = torch.compile(gate, backend=backend, fullgraph=True)
    compiled(x)
    gate.config.capacity_factor = 0.5
    got = compiled(x)
    assert int(got.tokens_per_expert.max()) <= capacity_for(40, 4, 16, 0.5) == 5
    assert torch.equal(got.topk_idx, gate(x).topk_idx)
    torch._dynamo.reset()


def test_gate_compiled_with_capacity_over_many_batch_sizes():
    """A compiled gate with a capacity factor takes 12 batch sizes without hitting the recompile limit (the capacity
    check formatted the traced size into its message, which made every size a graph of its own; fullgraph=True then
    failed at the ninth) and routes each as eager does."""
    gate = TopKGate(GateConfig(hidden=32, num_experts=16, topk=4, capacity_factor=1.1))
    torch._dynamo.reset()
    compiled = torch.compile(gate, backend="eager", fullgraph=True)
    torch.manual_seed(4)
    for t in range(40, 160, 10):
        x = torch.randn(t, 32)
        assert torch.equal(compiled(x).topk_idx, gate(x).topk_idx), t
    torch._dynamo.reset()


def test_zero_tokens_and_single_expert():
    gate = TopKGate(GateConfig(hidden=8, num_experts=1, topk=1))
    out = gate(torch.randn(0, 8))
    assert out.topk_idx.shape == (0, 1) and out.tokens_per_expert.tolist() == [0]
    out = gate(torch.randn(3, 8))
    assert out.topk_idx.flatten().tolist() == [0, 0, 0]
    torch.testing.assert_close(out.topk_weights, torch.ones(3, 1))


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(topk=9), "topk"),
        (dict(topk=0), "topk"),
        (dict(score_func="relu"), "score_func"),
        (dict(group_score="sum"), "group_score"),
        (dict(num_groups=3), "num_groups"),
        (dict(num_groups=4, topk_groups=1, topk=3), "topk_groups"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(bias_update_rate=-1.0), "bias_update_rate"),
        (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
        (dict(hidden=0), "hidden"),
        (dict(bias_update_rate=math.inf), "bias_update_rate"),
        (dict(aux_loss_coef=math.nan), "aux_loss_coef"),
        (dict(routed_scaling_factor=math.nan), "routed_scaling_factor"),
        (dict(routed_scaling_factor=-1.0), "routed_scaling_factor"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(hidden=8.5), "hidden"),
        (dict(topk=True), "topk"),
        (dict(num_groups=2.0), "num_groups"),
        (dict(num_groups=4, topk_groups=1.0), "topk_groups"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, arg):
    base = dict(hidden=8, num_experts=8, topk=2)
    base.update(kwargs)
    with pytest.raises(ValueError, match=f"'{arg}'"):
        TopKGate(GateConfig(**base))


def test_invalid_inputs_name_the_argument():
    gate = TopKGate(GateConfig(hidden=8, num_experts=8, topk=2))
    with pytest.raises(ValueError, match="'x'"):
        gate(torch.randn(4, 7))
    with pytest.raises(ValueError, match="'logits'"):
        gate.route_logits(torch.randn(4, 7))
    with pytest.raises(ValueError, match="'load'"):
        gate.update_bias(load=torch.ones(3))
    with pytest.raises(ValueError, match="'group_of_expert'"):
        TopKGate(GateConfig(hidden=8, num_experts=8, topk=2), group_of_expert=torch.zeros(7, dtype=torch.int64))
    with pytest.raises(ValueError, match="'capacity'"):
        apply_capacity(torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1), 2, -1)
    with pytest.raises(ValueError, match="'bias'"):
        select_topk(torch.randn(4, 8), 2, bias=torch.zeros(1))
    with pytest.raises(ValueError, match="'topk_idx'"):
        LoadMonitor(8, experts_per_gpu=2).update(torch.zeros(4, 2, dtype=torch.int32))


def test_capacity_beyond_every_choice():
    """A capacity factor or capacity above every choice keeps every choice (a huge factor, as for "no cap", failed
    with OverflowError in the comparison); capacity_for is at most T * K."""
    x = torch.randn(12, 8)
    plain = TopKGate(GateConfig(hidden=8, num_experts=8, topk=2))
    for factor in (1e20, 1e300, 8.0):
        gate = TopKGate(GateConfig(hidden=8, num_experts=8, topk=2, capacity_factor=factor))
        gate.load_state_dict(plain.state_dict())
        assert torch.equal(gate(x).topk_idx, plain(x).topk_idx), factor
        assert capacity_for(12, 2, 8, factor) == 24
    idx = torch.tensor([[0, 1], [1, 0]])
    got, _ = apply_capacity(idx, torch.ones(2, 2), 2, 10**30)
    assert torch.equal(got, idx)


def test_monitor_and_config_refusals():
    """Wrong types are refused naming the argument (they raised TypeError or AttributeError), and topk_groups < 1 when
    the config is made (it was refused only when a gate was built from it)."""
    with pytest.raises(ArgumentError, match="'experts_per_gpu' must be an int, got 2.0"):
        LoadMonitor(4, experts_per_gpu=2.0)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="'expert_counts' must be a tensor"):
        LoadMonitor(4).update(expert_counts=[1, 2, 3, 4])  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="'load' must be None or a tensor"):
        TopKGate(GateConfig(hidden=8, num_experts=4, topk=2)).update_bias(load=[1.0, 2.0, 3.0, 4.0])  # type: ignore
    with pytest.raises(ArgumentError, match="'topk_groups' must be None or >= 1, got 0"):
        GateConfig(hidden=8, num_experts=8, topk=2, num_groups=4, topk_groups=0)


def test_update_bias_refusals_leave_the_gate_as_it_was():
    """update_bias refuses a rate that is not a finite number >= 0 before anything (no collective joined, counts
    kept), and a given load holding a NaN or an infinity (its mean would move no expert)."""
    gate = TopKGate(GateConfig(hidden=8, num_experts=4, topk=2))
    gate.train()
    gate(torch.randn(16, 8))
    counts = gate.expert_load.clone()
    for rate in (math.inf, math.nan, -1.0):
        with pytest.raises(ArgumentError, match="'rate'"):
            gate.update_bias(rate=rate, group=object())  # (refused before the group is used)
    for bad in (math.nan, math.inf):
        with pytest.raises(ArgumentError, match="'load'"):
            gate.update_bias(load=torch.tensor([1.0, bad, 2.0, 3.0]))
    assert torch.equal(gate.expert_load, counts) and not gate.expert_bias.any()


def test_a_gate_keeps_its_fixed_fields_across_a_new_config():
    """A gate's config may be replaced by one that differs in the fields that may change; one that changes the
    sizes or the grouping the gate was built for is refused, the gate's config as it was."""
    cfg = GateConfig(hidden=8, num_experts=8, topk=2, num_groups=4, topk_groups=1)
    gate = TopKGate(cfg)
    gate.config = dataclasses.replace(cfg, capacity_factor=2.0, routed_scaling_factor=2.5)
    assert gate.config.capacity_factor == 2.0
    for change in (dict(topk_groups=None), dict(topk=4), dict(num_groups=2, topk_groups=1)):
        with pytest.raises(ArgumentError, match="'config' cannot change"):
            gate.config = dataclasses.replace(cfg, **change)
        assert gate.config.topk == 2 and gate.config.topk_groups == 1
    with pytest.raises(ArgumentError, match="'config'"):
        gate.config = dict(hidden=8)  # type: ignore[assignment]


def test_gate_buffers_are_float32_under_another_default_dtype():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        gate = TopKGate(GateConfig(hidden=8, num_experts=4, topk=2))
    finally:
        torch.set_default_dtype(before)
    assert gate.expert_bias.dtype == torch.float32 and gate.expert_load.dtype == torch.float32


def test_load_monitor_against_reference():
    gen = torch.Generator().manual_seed(11)
    mon = LoadMonitor(12, experts_per_gpu=3, ema_decay=0.5)
    ema_e = None
    for step in range(4):
        idx = torch.randint(-1, 12, (50, 4), generator=gen)
        snap = mon.update(idx)
        ref_e = torch.zeros(12)
        for e in idx.flatten().tolist():
            if e >= 0:
                ref_e[e] += 1
        ref_g = ref_e.view(4, 3).sum(1)
        ema_e = ref_e.clone() if step == 0 else 0.5 * ema_e + 0.5 * ref_e
        torch.testing.assert_close(snap.expert_load, ref_e)
        torch.testing.assert_close(snap.gpu_load, ref_g)
        torch.testing.assert_close(snap.ema_expert_load, ema_e)
        torch.testing.assert_close(snap.ema_gpu_load, ema_e.view(4, 3).sum(1))
        assert abs(float(snap.expert_imbalance) - float(ref_e.max() / ref_e.mean())) < 1e-6
        assert abs(float(snap.ema_gpu_imbalance) - float(ema_e.view(4, 3).sum(1).max() / ema_e.sum() * 4)) < 1e-5


def test_load_monitor_with_placement_splits_over_replicas():
    topo = Topology(num_nodes=1, gpus_per_node=3, slots_per_gpu=2)
    from largeep.placement import Placement

    placement = Placement(topo, 4, torch.tensor([0, 1, 0, 2, 3, 0]))  # expert 0 on all three GPUs
    mon = LoadMonitor(4, placement=placement)
    snap = mon.update(expert_counts=torch.tensor([9.0, 2.0, 4.0, 1.0]))
    torch.testing.assert_close(snap.gpu_load, torch.tensor([3.0 + 2.0, 3.0 + 4.0, 1.0 + 3.0]))
    empty = LoadMonitor(4, placement=placement).update(torch.full((0, 2), -1, dtype=torch.int64))
    assert float(empty.gpu_imbalance) == 1.0
    with pytest.raises(ValueError, match="'placement'"):
        LoadMonitor(5, placement=placement)
    with pytest.raises(ValueError, match="'experts_per_gpu'"):
        LoadMonitor(10, experts_per_gpu=3)
    with pytest.raises(ValueError, match="'ema_decay'"):
        LoadMonitor(10, ema_decay=1.0)


def test_softmax_weights_normalised_and_scaled():
    gate = TopKGate(GateConfig(hidden=8, num_experts=16, topk=4, routed_scaling_factor=2.0))
    out = gate(torch.randn(20, 8))
    torch.testing.assert_close(out.topk_weights.sum(-1), torch.full((20,), 2.0))
    assert math.isclose(out.scores.detach().sum(-1).mean().item(), 1.0, rel_tol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    n_groups=st.integers(1, 4),
    per_group=st.integers(1, 4),
    data=st.data(),
)
def test_select_topk_property(n_groups, per_group, data):
    e_num = n_groups * per_group
    topk_groups = data.draw(st.integers(1, n_groups))
    topk = data.draw(st.integers(1, topk_groups * per_group))
    group_score = data.draw(st.sampled_from(["top2", "max"]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    scores = torch.rand(data.draw(st.integers(0, 12)), e_num, generator=gen)
    bias = torch.randn(e_num, generator=gen) * 0.2
    groups = contiguous_groups(e_num, n_groups)
    idx, w = select_topk(
        scores, topk, bias=bias, group_of_expert=groups, topk_groups=topk_groups, group_score=group_score
    )
    ref_idx, ref_w = _ref_select(scores, bias, groups, topk_groups, topk, group_score, True, 1.0)
    if scores.shape[0]:
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(w, ref_w)


def test_gate_audit_edges():
    from largeep.errors import ArgumentError
    from largeep.gate import GateConfig, TopKGate, capacity_for, contiguous_groups, select_topk

    # capacity in exact decimal: 1.1 * 100 * 8 / 8 = 110 (float rounding gave 111)
    assert capacity_for(100, 8, 8, 1.1) == 110 and capacity_for(100, 8, 8, 1.0) == 100
    # select_topk refuses group arguments that cannot hold top-k, or fewer than one group (more groups than there
    # are is no limit: test_a_limit_of_every_group_or_more_is_no_limit)
    scores = torch.rand(4, 8)
    groups = contiguous_groups(8, 4)
    for k, kg in ((3, 1), (2, 0)):
        with pytest.raises(ArgumentError):
            select_topk(scores, k, group_of_expert=groups, topk_groups=kg)
    cfg = GateConfig(hidden=16, num_experts=8, topk=2, num_groups=4, topk_groups=2)
    torch.manual_seed(0)
    gate = TopKGate(cfg)
    x = torch.randn(64, 16)
    # a state dict's groups take effect (the group table was built at construction only)
    other = TopKGate(cfg, group_of_expert=torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    other.load_state_dict(gate.state_dict())
    assert torch.equal(other(x).topk_idx, gate(x).topk_idx)
    other.set_groups(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    assert other.group_table.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # a module-wide cast keeps the routing in float32 and the balancing state in float32
    half = TopKGate(cfg)
    half.load_state_dict(gate.state_dict())
    half.to(torch.bfloat16)
    assert half.expert_bias.dtype == torch.float32 and half.expert_load.dtype == torch.float32
    xb = x.to(torch.bfloat16)
    logits = torch.nn.functional.linear(xb.float(), gate.weight.to(torch.bfloat16).float())
    assert torch.equal(half(xb).topk_idx, gate.route_logits(logits).topk_idx)
    # an autocast region does not make the logits bf16: the same routing inside as outside
    want = gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gate(x)
    assert torch.equal(got.topk_idx, want.topk_idx) and torch.equal(got.topk_weights, want.topk_weights)


def test_gate_review_edges() -> None:
    """A module-wide cast keeps the balancing state's values (not rounded through bf16 on the way back to float32);
    a numpy float capacity factor is a capacity factor (it used to turn the capacity off), nan / inf / bool are
    refused naming it; a state dict whose groups are refused leaves the gate as it was."""
    import numpy as np

    g = TopKGate(GateConfig(hidden=8, num_experts=4, topk=2))
    bias, load = torch.tensor([0.501, 0.123456, 1e-3, -0.3333]), torch.tensor([257.0, 1001.0, 3.0, 65537.0])
    g.expert_bias.copy_(bias)
    g.expert_load.copy_(load)
    g.to(torch.bfloat16)
    assert g.expert_bias.dtype == torch.float32 and torch.equal(g.expert_bias, bias), g.expert_bias
    assert g.expert_load.dtype == torch.float32 and torch.equal(g.expert_load, load), g.expert_load
    assert g.weight.dtype == torch.bfloat16

    np_cfg = GateConfig(hidden=8, num_experts=4, topk=2, capacity_factor=np.float32(0.5))
    out = TopKGate(np_cfg)(torch.randn(64, 8, generator=torch.Generator().manual_seed(3)))
    assert max(out.tokens_per_expert.tolist()) <= 16, out.tokens_per_expert  # ceil(0.5 * 64 * 2 / 4)
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ArgumentError, match="capacity_factor"):
            GateConfig(hidden=8, num_experts=4, topk=2, capacity_factor=bad)

    g2 = TopKGate(GateConfig(hidden=8, num_experts=8, topk=2, num_groups=4, topk_groups=2))
    groups, table = g2.group_of_expert.clone(), g2.group_table.clone()
    sd = g2.state_dict()
    sd["group_of_expert"] = torch.tensor([0, 0, 0, 0, 0, 0, 0, 2])  # group 1 empty
    with pytest.raises(ArgumentError):
        g2.load_state_dict(sd)
    assert torch.equal(g2.group_of_expert, groups) and torch.equal(g2.group_table, table)


def test_config_fields_after_construction():
    """The sizes and the grouping are fixed once a GateConfig exists (a gate checked its groups against them);
    the other fields are checked again when set, and a refused value leaves the config as it was."""
    cfg = GateConfig(hidden=8, num_experts=8, topk=2, num_groups=4, topk_groups=2)
    gate = TopKGate(cfg)
    for name, value in (("topk", 5), ("topk_groups", 1), ("num_groups", 2), ("hidden", 16), ("num_experts", 4)):
        with pytest.raises(ArgumentError, match=f"'{name}' cannot change"):
            setattr(cfg, name, value)
    assert (cfg.topk, cfg.topk_groups, cfg.num_groups) == (2, 2, 4)
    with pytest.raises(ArgumentError, match="score_func"):
        cfg.score_func = "relu"  # type: ignore[assignment]
    assert cfg.score_func == "softmax"
    cfg.score_func = "sigmoid"
    cfg.routed_scaling_factor = 2.5
    out = gate(torch.randn(5, 8))
    groups = gate.group_of_expert[out.topk_idx]
    assert all(len(set(g.tolist())) <= 2 for g in groups), "the node limit holds"
    torch.testing.assert_close(out.topk_weights.sum(1), torch.full((5,), 2.5))
    # capacity_factor too: a refused value leaves the field and the ratio the gate uses as they were
    cfg.capacity_factor = 0.5
    ratio = cfg._capacity_ratio
    for bad in (-1.0, float("nan"), "2", True, 10**400):
        with pytest.raises(ArgumentError, match="capacity_factor"):
            cfg.capacity_factor = bad  # type: ignore[assignment]
        assert cfg.capacity_factor == 0.5 and cfg._capacity_ratio == ratio
    assert dataclasses.replace(cfg).capacity_factor == 0.5


def test_aux_loss_of_no_tokens_has_grad():
    """A rank with no tokens gets an aux loss of 0 that still backpropagates (to zero gradients), as SPEC allows
    0 tokens on a rank and its training step calls backward like any other."""
    gate = TopKGate(GateConfig(hidden=8, num_experts=4, topk=2, aux_loss_coef=0.01))
    out = gate(torch.randn(0, 8))
    assert out.aux_loss is not None and out.aux_loss.requires_grad and float(out.aux_loss.detach()) == 0.0
    (grad,) = torch.autograd.grad(out.aux_loss, gate.weight)
    assert torch.equal(grad, torch.zeros_like(gate.weight))


def test_linear_router_in_autocast():
    """LinearTopKRouter's logits are float32 inside an autocast region too: the same choices and float32
    weights as outside it."""
    from largeep.layers import LinearTopKRouter

    torch.manual_seed(0)
    router = LinearTopKRouter(64, 32, 4)
    x = torch.randn(512, 64)
    want_idx, want_w = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, w = router(x)
    assert w.dtype == torch.float32 and torch.equal(idx, want_idx)
    torch.testing.assert_close(w, want_w)


def test_top1_with_normalised_weights_warns():
    """topk=1 with norm_topk_prob makes every weight 1 (no gradient reaches the router): the config warns."""
    import warnings

    with pytest.warns(UserWarning, match="no gradient"):
        GateConfig(hidden=8, num_experts=4, topk=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GateConfig(hidden=8, num_experts=4, topk=1, norm_topk_prob=False)
        GateConfig(hidden=8, num_experts=1, topk=1)  # (one expert: nothing to learn)


def test_top1_warning_once_per_config():
    """The top-1 warning comes once, from the construction or from the assignment that turns norm_topk_prob on; a
    later change of another field does not repeat it (every assignment re-ran the checks, warning each time)."""
    import warnings

    with pytest.warns(UserWarning, match="no gradient") as caught:
        cfg = GateConfig(hidden=8, num_experts=4, topk=1)
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg.routed_scaling_factor = 2.0
        cfg.score_func = "sigmoid"
        cfg.capacity_factor = 1.5
        cfg.norm_topk_prob = True  # (already on)
        cfg.norm_topk_prob = False
    with pytest.warns(UserWarning, match="no gradient") as caught:
        cfg.norm_topk_prob = True  # (turned on again)
    assert len(caught) == 1 and caught[0].filename == __file__


@pytest.mark.parametrize("groups", [None, [0, 1, 2, 3, 0, 1, 2, 3]])
def test_gate_made_on_meta_then_to_empty(groups):
    """A gate made under torch.device("meta") (FSDP2's meta init) builds, and after to_empty either
    reset_parameters or a state dict makes it equal a gate made on the CPU (the group tables included; to_empty
    leaves them whatever memory they got)."""
    cfg = GateConfig(hidden=16, num_experts=8, topk=2, num_groups=4, topk_groups=2)
    given = None if groups is None else torch.tensor(groups)
    torch.manual_seed(7)
    ref = TopKGate(cfg, group_of_expert=given)
    with torch.device("meta"):
        meta = TopKGate(cfg, group_of_expert=given)
    assert meta.weight.is_meta and meta.group_table.is_meta and meta.group_of_expert.is_meta
    x = torch.randn(33, 16)
    for how in ("reset", "state_dict"):
        gate = copy.deepcopy(meta).to_empty(device="cpu")
        for name in ("group_of_expert", "group_table", "group_sizes"):
            getattr(gate, name).fill_(-5)  # (poisoned: to_empty gives no values)
        if how == "reset":
            torch.manual_seed(7)
            gate.reset_parameters()
        else:
            gate.load_state_dict(ref.state_dict())
        for name, want in ref.state_dict().items():
            assert torch.equal(gate.state_dict()[name], want), (how, name)
        assert torch.equal(gate.group_table, ref.group_table) and torch.equal(gate.group_sizes, ref.group_sizes), how
        got, want = gate(x), ref(x)
        assert torch.equal(got.topk_idx, want.topk_idx) and torch.equal(got.topk_weights, want.topk_weights), how
    # reset_parameters writes back the groups last given, e.g. by set_groups
    gate = TopKGate(cfg)
    other = torch.tensor([3, 2, 1, 0, 3, 2, 1, 0])
    gate.set_groups(other)
    gate.group_of_expert.fill_(-5)
    gate.reset_parameters()
    assert torch.equal(gate.group_of_expert, other) and gate.group_table.tolist() == [[3, 7], [2, 6], [1, 5], [0, 4]]
    with pytest.raises(ArgumentError, match="group_of_expert"):
        TopKGate(cfg, group_of_expert=torch.empty(8, dtype=torch.int64, device="meta"))


def test_a_limit_of_every_group_or_more_is_no_limit():
    """Found by review: a node limit equal to the node count was refused where some node is no expert's home
    (groups = Placement.home_node() number only the home nodes). A limit >= the groups is no limit: the gate picks
    the plain top-k, as with topk_groups=None."""
    p = greedy_placement(torch.tensor([10.0, 1.0, 1.0]), Topology(4, 1))  # 3 experts on 4 nodes: one no home
    home = p.home_node()
    assert int(home.max()) + 1 == 3
    torch.manual_seed(0)
    logits = torch.randn(50, 3)
    plain = TopKGate(GateConfig(hidden=4, num_experts=3, topk=2, bias_balancing=False), group_of_expert=home)
    for limit in (3, 4, 9):
        gate = TopKGate(GateConfig(hidden=4, num_experts=3, topk=2, topk_groups=limit, bias_balancing=False),
                        group_of_expert=home)
        assert gate.topk_groups == 3
        assert torch.equal(gate.route_logits(logits).topk_idx, plain.route_logits(logits).topk_idx), limit
        assert torch.equal(gate.route_logits(logits).topk_idx, logits.topk(2, dim=-1).indices), limit
    # contiguous groups and select_topk alike; a limit below 1 or one whose groups cannot hold top-k still raises
    gate = TopKGate(GateConfig(hidden=8, num_experts=8, topk=2, num_groups=4, topk_groups=5))
    assert gate.topk_groups == 4
    scores = torch.rand(20, 8)
    idx, _ = select_topk(scores, 2, group_of_expert=contiguous_groups(8, 4), topk_groups=7)
    assert torch.equal(idx, scores.topk(2, dim=-1).indices)
    with pytest.raises(ArgumentError, match="'topk_groups'"):
        select_topk(scores, 2, group_of_expert=contiguous_groups(8, 4), topk_groups=0)
    with pytest.raises(ArgumentError, match="'topk_groups'"):
        TopKGate(GateConfig(hidden=8, num_experts=8, topk=3, num_groups=4, topk_groups=1))


def _ref_capacity_keep(idx: torch.Tensor, caps: list[int]) -> torch.Tensor:
    """Keeps choice (t, k) while its expert has kept fewer than caps[e], token by token, then k (-1 elsewhere)."""
    out = idx.clone()
    seen = [0] * len(caps)
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e < 0:
                continue
            if seen[e] < caps[e]:
                seen[e] += 1
            else:
                out[t, k] = -1
    return out


@pytest.mark.parametrize("factor", [1.25, 0.3, 1.1, 1e20])
@pytest.mark.parametrize("t_num", [0, 1, 37, 256])
def test_capacity_counts_replicas(factor, t_num):
    """Found by review: the capacity was per logical expert whatever its replicas, so a hot expert with 7 of 16
    slots kept as few choices as one with 1 (31.5% of the choices dropped at factor 1.25). With set_replicas the
    capacity of expert e is ceil(factor * T * K * r_e / S), S = the slots in use (independent reference: Fraction
    arithmetic, choice by choice); equal counts keep today's ceil(factor * T * K / E) exactly; the counts survive a
    state dict round trip, and a state saved without them keeps the gate's own."""
    from fractions import Fraction

    e_num, k = 8, 3
    reps = [7, 1, 2, 1, 3, 1, 1, 1]
    cfg = dict(hidden=16, num_experts=e_num, topk=k, bias_balancing=False, capacity_factor=factor)
    torch.manual_seed(t_num)
    gate = TopKGate(GateConfig(**cfg)).eval()
    logits = torch.randn(t_num, e_num)
    logits[:, 0] += 2.0  # (expert 0 is hot)
    free = TopKGate(GateConfig(**{**cfg, "capacity_factor": None})).eval()
    chosen = free.route_logits(logits).topk_idx
    plain = gate.route_logits(logits)
    even = -(-Fraction(str(factor)) * t_num * k // e_num)
    assert torch.equal(plain.topk_idx, _ref_capacity_keep(chosen, [min(even, t_num * k)] * e_num))
    gate.set_replicas(torch.tensor(reps, dtype=torch.int32))
    assert gate.expert_replicas.tolist() == reps and gate.expert_replicas.dtype == torch.int64
    caps = [min(-(-Fraction(str(factor)) * t_num * k * r // sum(reps)), t_num * k) for r in reps]
    got = gate.route_logits(logits)
    want = _ref_capacity_keep(chosen, caps)
    assert torch.equal(got.topk_idx, want)
    assert torch.equal(got.topk_weights == 0, want < 0)
    assert got.tokens_per_expert.tolist() == torch.bincount(want[want >= 0], minlength=e_num).tolist()
    # equal counts (2 each: S = 2E) keep the default's capacity
    gate.set_replicas(torch.full((e_num,), 2))
    assert torch.equal(gate.route_logits(logits).topk_idx, plain.topk_idx)
    # state dict round trip; reset_parameters writes back the counts last given
    gate.set_replicas(torch.tensor(reps))
    other = TopKGate(GateConfig(**cfg)).eval()
    other.load_state_dict(gate.state_dict())
    assert other.expert_replicas.tolist() == reps and torch.equal(other.route_logits(logits).topk_idx, want)
    other.expert_replicas.fill_(-5)
    other.reset_parameters()
    assert other.expert_replicas.tolist() == reps
    old = {name: v for name, v in gate.state_dict().items() if name != "expert_replicas"}
    kept = TopKGate(GateConfig(**cfg)).eval()
    kept.set_replicas(torch.tensor(reps))
    kept.load_state_dict(old)  # (strict: an earlier state without the counts)
    assert kept.expert_replicas.tolist() == reps and torch.equal(kept.route_logits(logits).topk_idx, want)


def test_set_replicas_refusals_and_compile():
    """set_replicas refuses anything but integer counts [E] >= 1 (the gate unchanged), a state dict with such counts
    is refused before anything loads; the per-replica capacity traces (torch.compile, fullgraph)."""
    gate = TopKGate(GateConfig(hidden=8, num_experts=4, topk=2, capacity_factor=1.0, bias_balancing=False)).eval()
    gate.set_replicas(torch.tensor([3, 1, 1, 1]))
    for bad in (torch.tensor([1, 1, 1]), torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0, 1, 1, 1]),
                torch.tensor([True] * 4), [1, 1, 1, 1]):
        with pytest.raises(ArgumentError, match="'replica_count'"):
            gate.set_replicas(bad)  # type: ignore[arg-type]
        assert gate.expert_replicas.tolist() == [3, 1, 1, 1]
    sd = gate.state_dict()
    sd["expert_replicas"] = torch.tensor([0, 1, 1, 1])
    before = gate.weight.clone()
    sd["weight"] = torch.zeros_like(sd["weight"])
    with pytest.raises(ArgumentError, match="'replica_count'"):
        gate.load_state_dict(sd)
    assert torch.equal(gate.weight, before) and gate.expert_replicas.tolist() == [3, 1, 1, 1]
    logits = torch.randn(30, 4)
    want = gate.route_logits(logits).topk_idx
    compiled = torch.compile(lambda x: gate.route_logits(x).topk_idx, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(logits), want)
    with pytest.raises(ArgumentError, match="'capacity'"):
        apply_capacity(torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1), 2, torch.ones(3, dtype=torch.int64))


@pytest.mark.parametrize("capacity", [torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.complex64), True,
                                      1.5, "2"], ids=["bool-tensor", "complex-tensor", "bool", "float", "str"])
def test_apply_capacity_refuses_non_integers(capacity: object) -> None:
    """A capacity that is not an integer (a bool tensor would read as 0/1 per expert) is refused by name."""
    idx = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ArgumentError, match="'capacity'"):
        apply_capacity(idx, torch.ones(2, 2), 2, capacity)  # type: ignore[arg-type]


def test_apply_capacity_takes_a_traced_size() -> None:
    """A capacity computed from a traced batch size (a SymInt under make_fx's symbolic tracing, outside
    torch.compile) is taken, as TopKGate's capacity_factor makes it: one graph that keeps, for every batch size,
    what the eager call keeps."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gate = TopKGate(GateConfig(hidden=4, num_experts=4, topk=2, capacity_factor=1.0)).eval()
    state = {**dict(gate.named_parameters()), **dict(gate.named_buffers())}

    def routed(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(gate, state, (x,)).topk_idx

    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(3))
    traced = make_fx(routed, tracing_mode="symbolic")(state, x)
    for t in (9, 6, 3):
        want = gate(x[:t]).topk_idx
        assert (want < 0).any() or t == 3  # (the capacity drops choices)
        assert torch.equal(traced(state, x[:t]), want)
    traced = make_fx(lambda i, w: apply_capacity(i, w, 4, i.shape[0] // 2), tracing_mode="symbolic")(
        torch.zeros(6, 2, dtype=torch.int64), torch.ones(6, 2))
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 2]])
    assert torch.equal(traced(idx, torch.ones(4, 2))[0], apply_capacity(idx, torch.ones(4, 2), 4, 2)[0])


# ---- a trainable bias on the router's logits (GateConfig.router_bias, LinearTopKRouter(bias=True)) ----

# the state dict keys of a gate without a router bias (unchanged by the option's existence)
_GATE_KEYS = {"weight", "expert_bias", "expert_load", "group_of_expert", "expert_replicas"}


def _biased_router(kind: str, hidden: int, num_experts: int, topk: int) -> tuple[torch.nn.Module, str]:
    """A TopKGate with router_bias, or a LinearTopKRouter with bias, routing softmax top-k with normalised weights
    (GPT-OSS's router); returns it and the name of its bias parameter."""
    from largeep.layers import LinearTopKRouter

    if kind == "gate":
        cfg = GateConfig(hidden=hidden, num_experts=num_experts, topk=topk, score_func="softmax",
                         norm_topk_prob=True, bias_balancing=False, router_bias=True)
        return TopKGate(cfg), "router_bias"
    return LinearTopKRouter(hidden, num_experts, topk, score_func="softmax", norm_topk_prob=True, bias=True), "bias"


def _route(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = module(x)
    return (out.topk_idx, out.topk_weights) if isinstance(out, GateOutput) else out


def _ref_biased_route(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, topk: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference of an nn.Linear(H, E, bias=True) router: logits = x @ W.T + b, the top-k logits, a softmax
    over the k chosen."""
    logits = x.double() @ w.double().T + b.double()
    top, idx = logits.topk(topk, dim=-1)
    return idx, top.softmax(dim=-1)


@pytest.mark.parametrize("kind", ["gate", "linear"])
def test_router_bias_matches_a_biased_linear_router(kind: str) -> None:
    """Indices, weights and the gradients of the weight, the bias and x equal a float64 biased-Linear router's
    (top-k of the logits, softmax over the chosen), to float32 rounding; the bias does change the choices."""
    gen = torch.Generator().manual_seed(11)
    t_num, hidden, e_num, topk = 96, 24, 12, 4
    module, bias_name = _biased_router(kind, hidden, e_num, topk)
    bias = getattr(module, bias_name)
    assert isinstance(bias, torch.nn.Parameter) and bias.dtype == torch.float32 and bias.shape == (e_num,)
    with torch.no_grad():
        module.weight.copy_(torch.randn(e_num, hidden, generator=gen) * hidden**-0.5)
        bias.copy_(torch.randn(e_num, generator=gen))
    x = torch.randn(t_num, hidden, generator=gen)
    c = torch.randn(t_num, topk, generator=gen)  # a loss sum(c * weights) of the weights

    x32 = x.clone().requires_grad_(True)
    idx, w = _route(module, x32)
    (w * c).sum().backward()

    w64 = module.weight.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    ref_idx, ref_w = _ref_biased_route(x64, w64, b64, topk)
    (ref_w * c.double()).sum().backward()

    # the choices are clear of near-ties (so float32 and float64 must pick alike), and the bias moves them
    logits = x.double() @ module.weight.detach().double().T + bias.detach().double()
    sorted_logits = logits.sort(dim=-1, descending=True).values
    assert float((sorted_logits[:, topk - 1] - sorted_logits[:, topk]).min()) > 1e-4
    unbiased = (x.double() @ module.weight.detach().double().T).topk(topk, dim=-1).indices
    assert not torch.equal(unbiased.sort(dim=-1).values, ref_idx.sort(dim=-1).values)

    assert idx.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w.double(), ref_w.detach(), rtol=1e-6, atol=1e-7)
    for got, want in ((module.weight.grad, w64.grad), (bias.grad, b64.grad), (x32.grad, x64.grad)):
        assert got is not None and want is not None and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert float(bias.grad.abs().max()) > 1e-3  # (the bias does get a gradient)

    # float32 logits inside an autocast region too: the same choices and weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a_idx, a_w = _route(module, x)
    assert torch.equal(a_idx, idx) and a_w.dtype == torch.float32
    torch.testing.assert_close(a_w, w.detach())


def test_router_bias_is_not_the_balancing_bias() -> None:
    """router_bias enters the logits: TopKGate's scores are the softmax of x @ W.T + b; route_logits takes its
    logits as given (no router bias added); expert_bias still moves the choice alone."""
    gen = torch.Generator().manual_seed(5)
    cfg = GateConfig(hidden=8, num_experts=6, topk=2, norm_topk_prob=False, router_bias=True)
    gate = TopKGate(cfg)
    with torch.no_grad():
        gate.router_bias.copy_(torch.randn(6, generator=gen))  # type: ignore[union-attr]
    x = torch.randn(20, 8, generator=gen)
    out = gate(x)
    want = (x.double() @ gate.weight.detach().double().T + gate.router_bias.detach().double()).softmax(-1)
    torch.testing.assert_close(out.scores.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.topk_weights, out.scores.gather(1, out.topk_idx))
    logits = torch.randn(20, 6, generator=gen)
    plain = TopKGate(dataclasses.replace(cfg, router_bias=False))
    got, ref = gate.route_logits(logits), plain.route_logits(logits)
    assert torch.equal(got.topk_idx, ref.topk_idx) and torch.equal(got.scores, ref.scores)


def test_router_bias_off_by_default_and_reset() -> None:
    """Without the option a gate or router has no bias (None) and the state dict keys it always had; with it the
    bias is a zero float32 parameter [E] in the state dict, and reset_parameters zeroes it again."""
    from largeep.layers import LinearTopKRouter

    assert GateConfig(hidden=8, num_experts=4, topk=2).router_bias is False
    gate = TopKGate(GateConfig(hidden=8, num_experts=4, topk=2))
    assert gate.router_bias is None and set(gate.state_dict()) == _GATE_KEYS
    assert [n for n, _ in gate.named_parameters()] == ["weight"]
    router = LinearTopKRouter(8, 4, 2)
    assert router.bias is None and set(router.state_dict()) == {"weight"}

    for module, name, keys in ((TopKGate(GateConfig(hidden=8, num_experts=4, topk=2, router_bias=True)),
                                "router_bias", _GATE_KEYS | {"router_bias"}),
                               (LinearTopKRouter(8, 4, 2, bias=True), "bias", {"weight", "bias"})):
        bias = getattr(module, name)
        assert set(module.state_dict()) == keys
        assert torch.equal(bias, torch.zeros(4)) and bias.dtype == torch.float32 and bias.requires_grad
        with torch.no_grad():
            bias.fill_(3.0)
        module.reset_parameters()
        assert torch.equal(getattr(module, name), torch.zeros(4))


@pytest.mark.parametrize("kind", ["gate", "linear"])
def test_router_bias_made_on_meta_then_to_empty(kind: str) -> None:
    """Made under torch.device("meta") with a bias, then to_empty and reset_parameters: the bias is zero, the
    module routes as one made on the CPU from the same seed."""
    torch.manual_seed(3)
    ref, name = _biased_router(kind, 16, 8, 2)
    with torch.device("meta"):
        meta, _ = _biased_router(kind, 16, 8, 2)
    assert getattr(meta, name).is_meta
    module = meta.to_empty(device="cpu")
    with torch.no_grad():
        getattr(module, name).fill_(math.nan)  # (poisoned: to_empty gives no values)
    torch.manual_seed(3)
    module.reset_parameters()
    assert torch.equal(getattr(module, name), torch.zeros(8))
    for key, want in ref.state_dict().items():
        assert torch.equal(module.state_dict()[key], want), key
    x = torch.randn(10, 16)
    (idx, w), (ref_idx, ref_w) = _route(module, x), _route(ref, x)
    assert torch.equal(idx, ref_idx) and torch.equal(w, ref_w)


def test_router_bias_refusals() -> None:
    """A router_bias / bias that is not a bool is refused by name; router_bias is fixed once the config exists
    (the gate made its parameters for it), on the config and through a gate's new config alike."""
    from largeep.layers import LinearTopKRouter

    for bad in ("yes", 1, None):
        with pytest.raises(ArgumentError, match="'router_bias' must be a bool"):
            GateConfig(hidden=8, num_experts=4, topk=2, router_bias=bad)  # type: ignore[arg-type]
        with pytest.raises(ArgumentError, match="'bias'"):
            LinearTopKRouter(8, 4, 2, bias=bad)  # type: ignore[arg-type]
    cfg = GateConfig(hidden=8, num_experts=4, topk=2)
    gate = TopKGate(cfg)
    with pytest.raises(ArgumentError, match="'router_bias' cannot change"):
        cfg.router_bias = True
    assert cfg.router_bias is False
    with pytest.raises(ArgumentError, match="'config' cannot change router_bias"):
        gate.config = dataclasses.replace(cfg, router_bias=True)
    assert gate.config is cfg and gate.router_bias is None
