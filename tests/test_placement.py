"""Tests of largeep.placement against plain-Python references on small sizes, plus the planner's claims."""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from largeep.placement import (
    Placement,
    RoutingTrace,
    Topology,
    contiguous_placement,
    greedy_placement,
    migration_plan,
    plan_placement,
    replica_counts,
    simulate_links,
    synthetic_trace,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# References


def _ref_replica_counts(load: list[float], total: int, cap: int) -> list[int]:
    counts = [1] * len(load)
    for _ in range(total - len(load)):
        cands = [e for e in range(len(load)) if counts[e] < cap]
        if not cands:
            break
        e = max(cands, key=lambda i: (load[i] / counts[i], -i))
        counts[e] += 1
    return counts


def _ref_greedy(load: list[float], topo: Topology) -> list[list[int]]:
    """Experts held by each GPU under the EPLB-style greedy."""
    counts = _ref_replica_counts(load, topo.num_slots, topo.num_gpus)
    units = [(load[e] / counts[e], e) for e in range(len(load)) for _ in range(counts[e])]
    order = sorted(range(len(units)), key=lambda u: -units[u][0])  # stable: ties keep expert order
    gpu_load = [0.0] * topo.num_gpus
    held: list[list[int]] = [[] for _ in range(topo.num_gpus)]
    for u in order:
        w, e = units[u]
        free = [g for g in range(topo.num_gpus) if len(held[g]) < topo.slots_per_gpu]
        ok = [g for g in free if e not in held[g]] or free
        g = min(ok, key=lambda i: (gpu_load[i], i))
        held[g].append(e)
        gpu_load[g] += w
    return [sorted(h) for h in held]


def _ref_route(p: Placement, idx: torch.Tensor, src: torch.Tensor, local_cap: float | None = 1.0):
    """Per-choice Python version of Placement.route, one source GPU at a time (the fill by bisection for the water
    level). Returns (slots [T, K] with -2 where the choice went to the least-loaded fill, per-slot counts)."""
    topo = p.topology
    spg, gpn = topo.slots_per_gpu, topo.gpus_per_node
    reps = p.replicas
    t_num, k_num = idx.shape
    out = [[-1] * k_num for _ in range(t_num)]
    total = [0] * topo.num_slots
    for s in sorted(set(src.tolist())):
        rows = [t for t in range(t_num) if int(src[t]) == s]
        multi_count: dict[int, int] = {}
        for t in rows:
            for e in idx[t].tolist():
                if e >= 0 and len(reps[e]) > 1:
                    multi_count[e] = multi_count.get(e, 0) + 1
        turn: dict[int, int] = {}
        near_used: dict[int, int] = {}
        far = []
        for t in rows:
            for k in range(k_num):
                e = int(idx[t, k])
                if e < 0:
                    continue
                if len(reps[e]) == 1:
                    out[t][k] = reps[e][0]
                    continue
                same_gpu = [r for r in reps[e] if r // spg == s]
                same_node = [r for r in reps[e] if r // spg // gpn == s // gpn]
                pick = -1
                if same_gpu:
                    pick = same_gpu[0]
                elif same_node:
                    pick = same_node[(turn.get(e, 0) + s) % len(same_node)]
                    turn[e] = turn.get(e, 0) + 1
                if pick >= 0 and local_cap is not None:
                    # the node's replicas together take their fair share of this source's choices of e
                    cap = math.ceil(local_cap * topo.num_nodes * len(same_node) * multi_count[e] / len(reps[e]))
                    over = near_used.get(e, 0) >= cap
                    near_used[e] = near_used.get(e, 0) + 1
                    if over:
                        pick = -1
                out[t][k] = pick if pick >= 0 else -2
                if pick < 0:
                    far.append(e)
        load = [0] * topo.num_slots  # what this source has put on each slot
        for t in rows:
            for x in out[t]:
                if x >= 0:
                    load[x] += 1
        fills = [0] * topo.num_slots
        for e in sorted(set(far)):
            n = far.count(e)
            r_num = len(reps[e])
            share = []
            for x in reps[e]:
                on_node = sum(1 for y in reps[e] if y // spg // gpn == x // spg // gpn)
                sh = 1.0 / (topo.num_nodes * on_node)
                share.append(min(sh, local_cap / r_num) if local_cap is not None else sh)
            remote = max(1.0 - sum(share), 1.0 / r_num)
            a = [load[x] + n * sh / remote for x, sh in zip(reps[e], share, strict=True)]
            lo, hi = min(a), max(a) + n  # bisection for the water level
            for _ in range(200):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if sum(max(0.0, mid - v) for v in a) < n else (lo, mid)
            q = [max(0.0, hi - v) for v in a]
            fl = [math.floor(v + 1e-9) for v in q]
            rem = round(n - sum(fl))
            order = sorted(range(r_num), key=lambda j: (q[j] - fl[j] <= 1e-9, (j - s) % r_num))
            for j in order[:rem]:
                fl[j] += 1
            for j, x in enumerate(reps[e]):
                fills[x] += fl[j]
        for slot in range(topo.num_slots):
            load[slot] += fills[slot]
        for slot in range(topo.num_slots):
            total[slot] += load[slot]
    return out, total


def _ref_links(trace: RoutingTrace, phys: torch.Tensor, topo: Topology, hierarchical: bool, tok_bytes: int):
    g_num, gpn, spg = topo.num_gpus, topo.gpus_per_node, topo.slots_per_gpu
    nic_out, nic_in, nvl_out, nvl_in, comp = ([0] * g_num for _ in range(5))
    for t in range(phys.shape[0]):
        s = int(trace.src_gpu[t])
        dsts = [int(x) // spg for x in phys[t].tolist() if x >= 0]
        for d in dsts:
            comp[d] += 1
        gpus = sorted(set(dsts))
        if hierarchical:
            for n in sorted({d // gpn for d in gpus}):
                if n == s // gpn:
                    continue
                relay = n * gpn + s % gpn
                nic_out[s] += 1
                nic_in[relay] += 1
                for d in gpus:
                    if d // gpn == n and d != relay:
                        nvl_out[relay] += 1
                        nvl_in[d] += 1
            for d in gpus:
                if d // gpn == s // gpn and d != s:
                    nvl_out[s] += 1
                    nvl_in[d] += 1
        else:
            for d in gpus:
                if d == s:
                    continue
                if d // gpn == s // gpn:
                    nvl_out[s] += 1
                    nvl_in[d] += 1
                else:
                    nic_out[s] += 1
                    nic_in[d] += 1
    return [torch.tensor(v, dtype=torch.float64) * tok_bytes for v in (nic_out, nic_in, nvl_out, nvl_in)], comp


# ---------------------------------------------------------------------------------------------------------------
# Topology, Placement, baselines


def test_replica_counts_match_reference():
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        load = torch.rand(n, generator=gen) * 10
        total = n + int(torch.randint(0, 20, (1,), generator=gen))
        cap = int(torch.randint(1, 6, (1,), generator=gen))
        got = replica_counts(load, total, cap).tolist()
        assert got == _ref_replica_counts(load.double().tolist(), total, cap)


@pytest.mark.parametrize(
    "num_experts,nodes,gpn,spg",
    [
        (6, 2, 4, 1),  # experts < GPUs: spare GPUs hold replicas of the hottest
        (8, 2, 4, 1),  # experts == GPUs
        (10, 2, 2, 3),  # experts not divisible by GPUs, 2 replicas
        (16, 2, 2, 4),  # no spare slot
        (5, 1, 1, 5),  # one GPU
    ],
)
def test_greedy_matches_reference(num_experts, nodes, gpn, spg):
    topo = Topology(nodes, gpn, slots_per_gpu=spg)
    load = torch.rand(num_experts, generator=torch.Generator().manual_seed(num_experts)) * 100 + 1
    p = greedy_placement(load, topo)
    held = [sorted(p.phys_to_log[g * spg : (g + 1) * spg].tolist()) for g in range(topo.num_gpus)]
    assert held == _ref_greedy(load.double().tolist(), topo)
    assert sorted(p.replica_count.tolist(), reverse=True)[0] >= 1 and (p.replica_count >= 1).all()
    if num_experts < topo.num_gpus and spg == 1:
        hot = int(load.argmax())
        assert int(p.replica_count[hot]) >= 2


def _ref_greedy_partial(load: list[float], topo: Topology, num_replicas: int) -> list[list[int]]:
    """Experts held by each GPU under the documented greedy with ``num_replicas`` extra replicas: replicas by load
    per replica (at most one per GPU), then the largest replica first onto the least-loaded GPU that has a free slot
    and no copy of that expert (among equally loaded ones the most free slots, then the lowest GPU)."""
    spg = topo.slots_per_gpu
    counts = _ref_replica_counts(load, len(load) + num_replicas, topo.num_gpus)
    units = [(load[e] / counts[e], e) for e in range(len(load)) for _ in range(counts[e])]
    order = sorted(range(len(units)), key=lambda u: -units[u][0])
    gpu_load = [0.0] * topo.num_gpus
    held: list[list[int]] = [[] for _ in range(topo.num_gpus)]
    for u in order:
        w, e = units[u]
        free = [g for g in range(topo.num_gpus) if len(held[g]) < spg]
        ok = [g for g in free if e not in held[g]]
        g = (min(ok, key=lambda i: (gpu_load[i], len(held[i]), i)) if ok
             else min(free, key=lambda i: (gpu_load[i], i)))
        held[g].append(e)
        gpu_load[g] += w
    assert all(len(h) <= spg for h in held)
    return [sorted(h) for h in held]


@pytest.mark.parametrize(
    "nodes,gpn,spg,num_experts,num_replicas",
    [(1, 2, 4, 8, 0), (2, 2, 3, 9, 1), (2, 3, 2, 10, 0), (1, 3, 4, 9, 2), (2, 2, 4, 12, 3)],
)
def test_greedy_with_a_dominant_expert_keeps_every_gpu_within_its_slots(nodes, gpn, spg, num_experts, num_replicas):
    """A hot expert makes its GPU the most loaded while the others fill up with small experts: the next small
    expert must go to a GPU that still has a free slot (the least loaded one may be full), as the reference
    packing with slots says; the slots left over stay empty."""
    topo = Topology(nodes, gpn, slots_per_gpu=spg)
    gen = torch.Generator().manual_seed(num_experts * 10 + num_replicas)
    for trial in range(4):
        load = torch.rand(num_experts, generator=gen) + 0.05
        load[int(torch.randint(num_experts, (1,), generator=gen))] = 50.0 + 50.0 * trial  # one dominant expert
        p = greedy_placement(load, topo, num_replicas=num_replicas)
        held = [sorted(e for e in p.phys_to_log[g * spg : (g + 1) * spg].tolist() if e >= 0)
                for g in range(topo.num_gpus)]
        assert held == _ref_greedy_partial(load.double().tolist(), topo, num_replicas), (trial, held)
        assert int((p.phys_to_log >= 0).sum()) == num_experts + num_replicas


def test_contiguous_placement_is_spec_layout():
    topo = Topology(2, 2, slots_per_gpu=3)
    p = contiguous_placement(12, topo)
    assert p.phys_to_log.tolist() == list(range(12))
    p = contiguous_placement(10, topo)
    assert p.phys_to_log.tolist() == list(range(10)) + [-1, -1]
    idx = torch.tensor([[0, 9, -1]])
    assert p.route(idx, torch.tensor([3])).tolist() == [[0, 9, -1]]


def test_placement_tables_and_share():
    topo = Topology(2, 2, slots_per_gpu=2)
    p = Placement(topo, 5, torch.tensor([0, 1, 2, 0, 3, 4, 0, -1]))
    assert p.replicas == [[0, 3, 6], [1], [2], [4], [5]]
    assert p.replica_count.tolist() == [3, 1, 1, 1, 1]
    share = p.gpu_share()
    torch.testing.assert_close(share.sum(1), torch.ones(5))
    torch.testing.assert_close(share[0], torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]))
    assert p.home_node().tolist() == [0, 0, 0, 1, 1]


# ---------------------------------------------------------------------------------------------------------------
# Routing


@pytest.mark.parametrize("local_cap", [1.0, None, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_route_matches_reference(seed, local_cap):
    gen = torch.Generator().manual_seed(seed)
    topo = Topology(3, 2, slots_per_gpu=3)
    # 10 experts over 18 slots, random replica layout with at most one copy per GPU
    p2l = torch.full((18,), -1, dtype=torch.int64)
    perm = torch.randperm(18, generator=gen)
    p2l[perm[:10]] = torch.arange(10)
    for s in perm[10:16].tolist():
        g = s // 3
        e = int(torch.randint(0, 4, (1,), generator=gen))  # extra replicas of experts 0..3
        if e not in p2l[g * 3 : g * 3 + 3].tolist():
            p2l[s] = e
    p = Placement(topo, 10, p2l)
    t_num = 60
    idx = torch.stack([torch.randperm(10, generator=gen)[:4] for _ in range(t_num)])
    idx[5] = -1  # a token with no expert
    idx[6, 2] = -1
    src = torch.randint(0, topo.num_gpus, (t_num,), generator=gen)
    got = p.route(idx, src, local_cap=local_cap)
    ref, ref_load = _ref_route(p, idx, src, local_cap)
    for t in range(t_num):
        for k in range(4):
            e = int(idx[t, k])
            if e < 0:
                assert int(got[t, k]) == -1
                continue
            assert int(p.phys_to_log[got[t, k]]) == e
            if ref[t][k] >= 0:
                assert int(got[t, k]) == ref[t][k]
    assert torch.bincount(got[got >= 0], minlength=18).tolist() == ref_load


@pytest.mark.parametrize("local_cap", [1.0, None])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_route_matches_reference_with_replicas_shared_on_a_node(seed, local_cap):
    """Nodes of 4 GPUs, where a node often holds two or three replicas of an expert and some of its GPUs none:
    those GPUs use their node's replicas in turn, starting at a replica that depends on the GPU (the reference:
    the node's replicas ascending, index (turn + src) mod their count), choice by choice as the reference routes."""
    gen = torch.Generator().manual_seed(seed)
    topo = Topology(2, 4, slots_per_gpu=2)
    n_log = 6
    p2l = torch.full((16,), -1, dtype=torch.int64)
    perm = torch.randperm(16, generator=gen)
    p2l[perm[:n_log]] = torch.arange(n_log)
    for s in perm[n_log:].tolist():
        g = s // 2
        e = int(torch.randint(0, 2, (1,), generator=gen))  # extra replicas of experts 0 and 1
        if e not in p2l[g * 2 : g * 2 + 2].tolist():
            p2l[s] = e
    p = Placement(topo, n_log, p2l)
    t_num = 96
    idx = torch.stack([torch.randperm(n_log, generator=gen)[:3] for _ in range(t_num)])
    src = torch.randint(0, topo.num_gpus, (t_num,), generator=gen)
    got = p.route(idx, src, local_cap=local_cap)
    ref, ref_load = _ref_route(p, idx, src, local_cap)
    checked = 0
    for t in range(t_num):
        for k in range(3):
            assert int(p.phys_to_log[got[t, k]]) == int(idx[t, k])
            if ref[t][k] >= 0:
                assert int(got[t, k]) == ref[t][k], (t, k, int(src[t]), p.replicas[int(idx[t, k])])
                checked += 1
    assert checked > t_num  # (most choices have a reference slot)
    assert torch.bincount(got.flatten(), minlength=16).tolist() == ref_load
    # the documented property on its own: two GPUs of a node without a replica, each sending one choice of an
    # expert with two replicas on that node, start at different replicas
    q = Placement(Topology(1, 4), 3, torch.tensor([0, 0, 1, 2]))
    one = torch.zeros(1, 1, dtype=torch.int64)
    assert {int(q.route(one, 2)), int(q.route(one, 3))} == {0, 1}
    assert {int(q.route(one, 2, local_cap=None)), int(q.route(one, 3, local_cap=None))} == {0, 1}


def test_route_prefers_local_and_balances_remote():
    topo = Topology(2, 2, slots_per_gpu=1)
    p = Placement(topo, 2, torch.tensor([0, 1, 0, 0]))  # expert 0 on GPUs 0, 2, 3
    idx = torch.zeros(30, 1, dtype=torch.int64)
    assert (p.route(idx, torch.full((30,), 2, dtype=torch.int64), local_cap=None) == 2).all()
    # from GPU 1 (node 0, where GPU 0 holds expert 0): node 0 owes the replica on GPU 0 its fair share,
    # nodes * 30 / replicas = 20 choices; the rest are water-filled over the other replicas
    out = p.route(idx, 1)
    assert torch.bincount(out.flatten(), minlength=4).tolist() == [20, 0, 5, 5]
    assert (out[:20] == 0).all()
    # a known load on slot 2 steers the fill to slot 3 (cap ceil(2 * 4 / 3) = 3 local)
    out = p.route(idx[:4], 1, slot_load=torch.tensor([0.0, 0.0, 5.0, 0.0]))
    assert torch.bincount(out.flatten(), minlength=4).tolist() == [3, 0, 0, 1]


def test_route_edge_cases():
    topo = Topology(1, 1, slots_per_gpu=3)
    p = Placement(topo, 3, torch.tensor([2, 0, 1]))
    assert p.route(torch.tensor([[0, 1, 2], [-1, -1, -1]]), 0).tolist() == [[1, 2, 0], [-1, -1, -1]]
    assert p.route(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)).shape == (0, 2)
    with pytest.raises(ValueError, match="'topk_idx'"):
        p.route(torch.tensor([[3]]), 0)
    with pytest.raises(ValueError, match="'src_gpu'"):
        p.route(torch.tensor([[0]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="'src_gpu'"):
        p.route(torch.tensor([[0]]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="'local_cap'"):
        p.route(torch.tensor([[0]]), 0, local_cap=0.0)


def _ref_table_route(p: Placement, idx: torch.Tensor, src: int) -> list[list[int]]:
    """Per-choice Python version of Placement.table_route, its remote cycle from exact fractions: choice (t, k) stays
    on its node iff u = (t * 40503 + k * 27146 + src * 47976) mod 2**16 < 2**16 * min(1, N * c / R) (rounded down);
    the remote replicas' weights are N / R - 1 / c (per replica of a node with N * c > R) in smallest whole numbers,
    entry j of a replica of weight w sorted at (j + 1/2) / w; the source starts its cycle at floor(frac(src *
    40503 / 2**16) * W)."""
    from fractions import Fraction

    topo = p.topology
    spg, gpn, n_nodes = topo.slots_per_gpu, topo.gpus_per_node, topo.num_nodes
    node_of = [s // spg // gpn for s in range(topo.num_slots)]
    out = []
    for t, row in enumerate(idx.tolist()):
        out.append([])
        for k, e in enumerate(row):
            if e < 0:
                out[-1].append(-1)
                continue
            reps = p.replicas[e]
            per_node = [[r for r in reps if node_of[r] == n] for n in range(n_nodes)]
            near = per_node[src // gpn]
            share = min(Fraction(1), Fraction(n_nodes * len(near), len(reps)))
            u = (t * 40503 + k * 27146 + src * 47976) % 65536
            if u < math.floor(65536 * share):
                mine = [r for r in near if r // spg == src]
                out[-1].append(mine[0] if mine else near[(t + k + src) % len(near)])
                continue
            weight = {r: Fraction(n_nodes, len(reps)) - Fraction(1, len(per_node[node_of[r]])) for r in reps
                      if n_nodes * len(per_node[node_of[r]]) > len(reps)}
            scale = math.lcm(*(w.denominator for w in weight.values()))
            whole = {r: int(w * scale) for r, w in weight.items()}
            g = math.gcd(*whole.values())
            cycle = [r for _, r in sorted((Fraction(2 * j + 1, 2 * (w // g)), r) for r, w in whole.items()
                                          for j in range(w // g))]
            start = (src * 40503 % 65536) * len(cycle) // 65536
            out[-1].append(cycle[(t + k + start) % len(cycle)])
    return out


def test_table_route():
    """The traceable route: own GPU's replica, else the node's in turn, else a remote cycle; -1 passes; with one
    replica per expert it equals route; where each node holds replicas in proportion to its share of the sources,
    every choice stays on its node; it compiles with fullgraph."""
    topo = Topology(2, 2, slots_per_gpu=2)
    # expert 0 on GPUs 0 and 3 (one per node); expert 1 on GPUs 0 and 1 (node 0) only; experts 2..4 once each
    p = Placement(topo, 5, torch.tensor([0, 1, 1, 2, 3, 4, 0, -1]))
    idx = torch.tensor([[0, 1], [1, -1], [2, 0], [3, 4]])
    # from GPU 0: expert 0 and 1 are there
    assert p.table_route(idx, 0).tolist() == [[0, 1], [1, -1], [3, 0], [4, 5]]
    # from GPU 1 (node 0): expert 0's node-0 replica is slot 0; expert 1 is on GPU 1 (slot 2)
    assert p.table_route(idx, 1).tolist() == [[0, 2], [2, -1], [3, 0], [4, 5]]
    # from GPU 2 (node 1): expert 0 on node 1 is slot 6; expert 1 is not on node 1: its replicas 1, 2 in turn by t + k
    out = p.table_route(idx, 2)
    assert out.tolist() == [[6, 2], [2, -1], [3, 6], [4, 5]]
    assert (p.phys_to_log[out.clamp(min=0)] == idx.clamp(min=0)).all()
    # GPU 3 (node 1 too) starts expert 1's turn one replica later than GPU 2: the two sources spread their tokens
    assert p.table_route(idx, 3)[:2, :].tolist() == [[6, 1], [1, -1]]
    many = torch.ones(40, 1, dtype=torch.int64)
    assert torch.bincount(torch.cat([p.table_route(many, 2), p.table_route(many, 3)]).flatten()).tolist() == [
        0, 40, 40]
    zeros = torch.zeros(64, 3, dtype=torch.int64)
    for g in range(4):  # (expert 0 has one replica per node: every choice stays on the node)
        assert (p.table_route(zeros, g) == (0 if g < 2 else 6)).all()
    one = Placement(topo, 8, torch.arange(8))
    rnd = torch.randint(-1, 8, (50, 3))
    assert torch.equal(one.table_route(rnd, 3), one.route(rnd, 3))
    assert p.prepare("cpu") is p  # (the tables, built ahead of a trace)
    compiled = torch.compile(lambda i: p.table_route(i, 2), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(idx), out)
    with pytest.raises(ValueError, match="'src_gpu'"):
        p.table_route(idx, 4)
    with pytest.raises(ValueError, match="'src_gpu'"):
        p.table_route(idx, True)


@pytest.mark.parametrize("seed", range(4))
def test_table_route_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    topo = Topology(3, 2, slots_per_gpu=2)
    p2l = torch.cat([torch.arange(7), torch.randint(0, 3, (5,), generator=gen)])  # replicas of experts 0..2
    p = Placement(topo, 7, p2l[torch.randperm(12, generator=gen)])
    idx = torch.randint(-1, 7, (90, 3), generator=gen)
    for src in range(topo.num_gpus):
        assert p.table_route(idx, src).tolist() == _ref_table_route(p, idx, src), src
    compiled = torch.compile(lambda i: p.table_route(i, seed), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(idx), p.table_route(idx, seed))


def test_table_route_caps_local_choices():
    """Found by review: table_route kept every choice on its node when the node had a replica, so the one replica
    of a node holding 1 of 8 got all of its node's choices (2.67x its fair share). Its static cap keeps that node's
    fair share (N * c / R of its choices) local and spreads the rest over the replicas that have room: every GPU
    sending 60 choices of expert 0, each replica now serves about 90 (3 nodes x 4 GPUs, replicas on GPUs 0 | 4, 5,
    6 | 8..11)."""
    topo = Topology(3, 4)
    p2l = torch.tensor([0, 1, 2, 3, 0, 0, 0, 4, 0, 0, 0, 0])
    p = Placement(topo, 5, p2l)
    zeros = torch.zeros(60, 1, dtype=torch.int64)
    routed = [p.table_route(zeros, g) for g in range(12)]
    served = torch.bincount(torch.cat(routed).flatten(), minlength=12)
    reps = p.replicas[0]
    assert served.sum() == 720 and served[reps].min() >= 85 and served[reps].max() <= 95, served.tolist()
    # node 0 keeps 3/8 of each of its GPU's choices (to a choice or two), and GPU 0 (its replica) only its own
    for g in range(4):
        kept = int((routed[g] == 0).sum())
        assert abs(kept - 60 * 3 / 8) <= 2, (g, kept)
    # on random placements, the replicas of an expert that every GPU sends alike serve even totals
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(60):
        nodes, gpn, spg = (int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(3))
        topo = Topology(nodes, gpn, slots_per_gpu=spg)
        n_log = int(torch.randint(1, topo.num_slots + 1, (1,), generator=gen))
        p2l = torch.cat([torch.arange(n_log), torch.randint(0, n_log, (topo.num_slots - n_log,), generator=gen)])
        p2l = p2l[torch.randperm(topo.num_slots, generator=gen)]
        gpus = torch.nonzero(p2l == 0).flatten() // spg
        if gpus.numel() < 2 or gpus.unique().numel() < gpus.numel():  # (one replica of expert 0 per GPU)
            continue
        q = Placement(topo, n_log, p2l)
        served = torch.bincount(torch.cat([q.table_route(zeros, g) for g in range(topo.num_gpus)]).flatten(),
                                minlength=topo.num_slots)[q.replicas[0]].double()
        worst = max(worst, float(served.max() / served.mean()))
    assert worst <= 1.1, worst  # (route's own is about 1.05 here; the old table_route up to 2.67)


def test_table_route_remote_cycle():
    """The remote cycle weighs each replica by what it lacks of the fair share after its node's own choices
    (N / R - 1 / c): 1 of node 1's 3 replicas, 3 of node 2's 4 in a cycle of 15, interleaved; a cycle whose
    exact weights need more than 1024 entries is rounded to 1024, every replica kept."""
    p = Placement(Topology(3, 4), 5, torch.tensor([0, 1, 2, 3, 0, 0, 0, 4, 0, 0, 0, 0]))
    keep, cycles, start, length, _ = p._spread(torch.device("cpu"))
    assert keep.tolist() == [[3 * 65536 // 8, 65536, 65536]] + [[65536, 0, 0]] * 3 + [[0, 65536, 0]]
    assert length.tolist() == [15, 1, 1, 1, 1] and start.tolist() == [0, 15, 16, 17, 18]
    assert cycles[15:].tolist() == [1, 2, 3, 7]
    cycle = cycles[:15].tolist()
    assert len(cycle) == 15 and [cycle.count(s) for s in (4, 5, 6, 8, 9, 10, 11)] == [1, 1, 1, 3, 3, 3, 3]
    assert all(a != b for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)), cycle
    # c = 11 and 13 of 24 replicas on 3 nodes: weights 9/11 and 15/13, 39 and 55 in whole numbers (1144 entries)
    topo = Topology(3, 13)
    p2l = torch.tensor([0] * 11 + [1, 2] + [0] * 13 + [3] * 1 + list(range(4, 16)))
    q = Placement(topo, 16, p2l)
    _, cycles, start, length, _ = q._spread(torch.device("cpu"))
    assert int(start[0]) == 0 and int(length[0]) == 1024 and length[1:].tolist() == [1] * 15
    cycle = cycles[:1024]
    counts = torch.bincount(cycle, minlength=39)[q.replicas[0]].double()
    want = torch.tensor([39.0] * 11 + [55.0] * 13) * 1024 / 1144
    assert (counts - want).abs().max() < 1.0 and counts.min() >= 1, counts


# ---------------------------------------------------------------------------------------------------------------
# Link model


@pytest.mark.parametrize("hierarchical", [True, False])
def test_simulate_links_matches_reference(hierarchical):
    topo = Topology(3, 2, slots_per_gpu=2, nvlink_bw=400.0, nic_bw=50.0)
    trace = synthetic_trace(40, 9, 3, topo, seed=4)
    trace.topk_idx[3] = -1
    load = trace.expert_load()
    p = greedy_placement(load, topo)
    res = simulate_links(trace, p, hidden=16, bytes_per_elem=2, hierarchical=hierarchical)
    phys = p.route(trace.topk_idx, trace.src_gpu)
    (nic_out, nic_in, nvl_out, nvl_in), comp = _ref_links(trace, phys, topo, hierarchical, 32)
    torch.testing.assert_close(res.nic_out, nic_out)
    torch.testing.assert_close(res.nic_in, nic_in)
    torch.testing.assert_close(res.nvlink_out, nvl_out)
    torch.testing.assert_close(res.nvlink_in, nvl_in)
    assert res.compute.tolist() == comp
    links = {"nic_out": nic_out, "nic_in": nic_in, "nvlink_out": nvl_out, "nvlink_in": nvl_in}
    assert res.max_link_bytes == max(float(v.max()) for v in links.values())
    t = max(float(v.max()) / (50.0 if k.startswith("nic") else 400.0) for k, v in links.items())
    assert math.isclose(res.max_link_time_s, t)
    assert math.isclose(res.compute_imbalance, max(comp) / (sum(comp) / len(comp)))


def test_simulate_links_hierarchical_sends_once_per_node():
    topo = Topology(2, 4, slots_per_gpu=1)
    p = contiguous_placement(8, topo)
    trace = RoutingTrace(torch.tensor([[4, 5, 6, 7]]), torch.tensor([1]), 8)  # one token, all of node 1
    hier = simulate_links(trace, p, hidden=1, bytes_per_elem=1, hierarchical=True)
    flat = simulate_links(trace, p, hidden=1, bytes_per_elem=1, hierarchical=False)
    assert hier.nic_out.tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert hier.nic_in.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]  # relay: node 1's GPU of local index 1
    assert hier.nvlink_out.tolist() == [0, 0, 0, 0, 0, 3, 0, 0]
    assert flat.nic_out.tolist() == [0, 4, 0, 0, 0, 0, 0, 0]
    assert flat.nic_in.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------------------------
# Migration


def test_migration_plan_reaches_the_new_layout():
    topo = Topology(2, 2, slots_per_gpu=3)
    gen = torch.Generator().manual_seed(9)
    old = greedy_placement(torch.rand(9, generator=gen), topo)
    new = greedy_placement(torch.rand(9, generator=gen), topo)
    assert migration_plan(old, old) == []
    moves = migration_plan(old, new)
    held_old = [set(old.phys_to_log[g * 3 : g * 3 + 3].tolist()) for g in range(4)]
    held = [set(h) for h in held_old]
    for m in moves:
        assert m.expert in held_old[m.src_gpu] and m.src_gpu != m.dst_gpu
        assert int(new.phys_to_log[m.dst_slot]) == m.expert and m.dst_slot // 3 == m.dst_gpu
        held[m.dst_gpu].add(m.expert)
    for g in range(4):
        assert set(new.phys_to_log[g * 3 : g * 3 + 3].tolist()) - {-1} <= held[g]
    assert len(moves) == sum(1 for s, e in enumerate(new.phys_to_log.tolist()) if e >= 0 and e not in held_old[s // 3])
    with pytest.raises(ValueError, match="'new'"):
        migration_plan(old, greedy_placement(torch.rand(8), topo))


# ---------------------------------------------------------------------------------------------------------------
# Planner


def test_planner_without_trace_is_greedy_and_respects_slots():
    topo = Topology(2, 4, slots_per_gpu=3)
    load = torch.rand(20, generator=torch.Generator().manual_seed(2)) + 0.1
    p = plan_placement(load, topo)
    assert torch.equal(p.phys_to_log, greedy_placement(load, topo).phys_to_log)
    assert (p.replica_count >= 1).all() and int(p.replica_count.sum()) == topo.num_slots


@pytest.mark.parametrize("nodes,gpn,spg,num_experts", [(2, 4, 1, 6), (2, 4, 1, 8), (2, 2, 3, 10), (1, 1, 4, 4)])
def test_planner_edge_shapes(nodes, gpn, spg, num_experts):
    topo = Topology(nodes, gpn, slots_per_gpu=spg)
    trace = synthetic_trace(400, num_experts, 2, topo, seed=1)
    p = plan_placement(None, topo, trace=trace)
    assert p.phys_to_log.shape == (topo.num_slots,)
    assert (p.replica_count >= 1).all()
    for g in range(topo.num_gpus):  # never two copies of an expert on one GPU
        row = [e for e in p.phys_to_log[g * spg : (g + 1) * spg].tolist() if e >= 0]
        assert len(row) == len(set(row))
    greedy = greedy_placement(trace.expert_load(), topo)
    a, b = simulate_links(trace, greedy), simulate_links(trace, p)
    assert b.max_link_time_s <= a.max_link_time_s
    assert b.compute_imbalance <= a.compute_imbalance * 1.05 + 1e-9


@pytest.mark.parametrize("nodes,gpn,spg,num_experts,topk", [(2, 2, 2, 6, 2), (2, 2, 3, 10, 2), (3, 2, 1, 5, 2),
                                                          (2, 2, 2, 8, 3)])
def test_planner_returns_the_search_only_where_it_wins(nodes, gpn, spg, num_experts, topk):
    """What plan_placement returns: the plan with the lower bottleneck link time on the trace, the greedy plan when
    the search does not win, and never a plan whose compute imbalance on the trace exceeds greedy's * (1 +
    tolerance). Checked on small traces where the search sometimes loses (greedy must then come back as it is)."""
    topo = Topology(nodes, gpn, slots_per_gpu=spg)
    for seed in range(3):
        trace = synthetic_trace(300, num_experts, topk, topo, seed=seed)
        greedy = greedy_placement(trace.expert_load(), topo)
        p = plan_placement(None, topo, trace=trace, imbalance_tolerance=0.05)
        a, b = simulate_links(trace, greedy), simulate_links(trace, p)
        if not torch.equal(p.phys_to_log, greedy.phys_to_log):
            assert b.max_link_time_s < a.max_link_time_s, (seed, a.max_link_time_s, b.max_link_time_s)
        assert b.compute_imbalance <= a.compute_imbalance * 1.05 + 1e-12, seed


@pytest.mark.parametrize(
    "nodes,spg,zipf_s,seed",
    [(8, 5, 1.2, 0), (32, 2, 1.2, 0)],  # 256 experts, 8 GPUs per node, 64 resp. 256 spare slots
)
def test_topology_aware_plan_cuts_the_bottleneck_link(nodes, spg, zipf_s, seed):
    """One seed per topology (scripts/placement_report.py reports every zipf exponent and seed: the cut there
    ranges from about 1.26x to 1.65x on the planning trace)."""
    topo = Topology(nodes, 8, slots_per_gpu=spg)
    trace = synthetic_trace(128 * topo.num_gpus, 256, 8, topo, zipf_s=zipf_s, seed=seed)
    greedy = greedy_placement(trace.expert_load(), topo)
    plan = plan_placement(None, topo, trace=trace)
    a, b = simulate_links(trace, greedy), simulate_links(trace, plan)
    assert a.max_link_time_s / b.max_link_time_s >= 1.3
    assert b.compute_imbalance <= a.compute_imbalance * 1.05


def test_planner_speed_256_experts_256_gpus():
    """The planner takes under a second of one core for 256 experts on 256 GPUs. Timed as this thread's CPU time
    with torch on one thread: wall time on a busy 2-core machine (other tests' processes) measured the machine."""
    plan_placement(None, Topology(2, 2, slots_per_gpu=2), trace=synthetic_trace(64, 8, 2, Topology(2, 2)))  # warm-up
    topo = Topology(32, 8, slots_per_gpu=1)
    trace = synthetic_trace(128 * 256, 256, 8, topo, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(3):  # the best of three
            t0 = time.thread_time()
            plan_placement(None, topo, trace=trace)
            times.append(time.thread_time() - t0)
            if times[-1] < 1.0:
                break
    finally:
        torch.set_num_threads(threads)
    assert min(times) < 1.0, times


# ---------------------------------------------------------------------------------------------------------------
# Synthetic traces


def test_synthetic_trace_properties():
    topo = Topology(4, 2)
    a = synthetic_trace(3000, 64, 4, topo, zipf_s=1.2, num_clusters=8, seed=5)
    b = synthetic_trace(3000, 64, 4, topo, zipf_s=1.2, num_clusters=8, seed=5)
    c = synthetic_trace(3000, 64, 4, topo, zipf_s=1.2, num_clusters=8, seed=5, sample_seed=6)
    assert torch.equal(a.topk_idx, b.topk_idx) and not torch.equal(a.topk_idx, c.topk_idx)
    assert all(len(set(r)) == 4 for r in a.topk_idx.tolist())
    assert a.src_gpu.tolist() == sorted(a.src_gpu.tolist()) and int(a.src_gpu.max()) == 7
    assert torch.bincount(a.src_gpu).tolist() == [375] * 8
    load = a.expert_load()
    assert float(load.max()) >= 5 * float(load.median())  # skewed
    # co-activation: pairs of experts drawn together far more often than independent draws would give
    one_hot = torch.zeros(3000, 64)
    one_hot.scatter_(1, a.topk_idx, 1.0)
    co = one_hot.T @ one_hot
    p = load / 3000
    expected = torch.outer(p, p) * 3000
    mask = ~torch.eye(64, dtype=torch.bool) & (expected > 5)
    ratio = (co[mask] / expected[mask]).sort().values
    assert float(ratio[-len(ratio) // 10 :].mean()) > 2.0


# ---------------------------------------------------------------------------------------------------------------
# Argument checks


def test_invalid_arguments_name_the_argument():
    with pytest.raises(ValueError, match="'num_nodes'"):
        Topology(0, 8)
    with pytest.raises(ValueError, match="'slots_per_gpu'"):
        Topology(1, 8, slots_per_gpu=0)
    with pytest.raises(ValueError, match="'nic_bw'"):
        Topology(1, 8, nic_bw=0)
    topo = Topology(1, 2, slots_per_gpu=2)
    with pytest.raises(ValueError, match="'phys_to_log'"):
        Placement(topo, 3, torch.tensor([0, 1, 1, -1]))  # expert 2 has no slot
    with pytest.raises(ValueError, match="'phys_to_log'"):
        Placement(topo, 3, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="'topology'"):
        greedy_placement(torch.ones(5), topo)
    with pytest.raises(ValueError, match="'num_replicas'"):
        greedy_placement(torch.ones(3), topo, num_replicas=2)
    with pytest.raises(ValueError, match="'load'"):
        plan_placement(torch.tensor([1.0, -1.0]), topo)
    with pytest.raises(ValueError, match="'load'"):
        plan_placement(None, topo)
    with pytest.raises(ValueError, match="'trace'"):
        plan_placement(torch.ones(3), topo, trace=synthetic_trace(10, 4, 1, topo))
    with pytest.raises(ValueError, match="'imbalance_tolerance'"):
        plan_placement(torch.ones(3), topo, imbalance_tolerance=-1)
    with pytest.raises(ValueError, match="'topk_idx'"):
        RoutingTrace(torch.tensor([[4]]), torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="'src_gpu'"):
        RoutingTrace(torch.tensor([[0]]), torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="'zipf_s'"):
        synthetic_trace(10, 4, 1, topo, zipf_s=-1)
    with pytest.raises(ValueError, match="'topk'"):
        synthetic_trace(10, 4, 5, topo)
    trace = synthetic_trace(10, 3, 1, topo)
    with pytest.raises(ValueError, match="'hidden'"):
        simulate_links(trace, greedy_placement(trace.expert_load(), topo), hidden=0)
    with pytest.raises(ValueError, match="'num_physical'"):
        replica_counts(torch.ones(3), 2)
    plan = greedy_placement(torch.ones(3), topo)
    for ids in (torch.zeros(4, 2, dtype=torch.int32), torch.zeros(4, dtype=torch.int64)):
        with pytest.raises(ValueError, match="'topk_idx'"):
            plan.table_route(ids, 0)
    # a one-GPU plan holds everything and sends nothing
    one = Topology(1, 1, slots_per_gpu=3)
    trace = synthetic_trace(10, 3, 1, one)
    p = plan_placement(None, one, trace=trace)
    res = simulate_links(trace, p)
    assert res.max_link_bytes == 0 and res.compute_imbalance == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Property tests on fresh random layouts


@settings(max_examples=30, deadline=None)
@given(
    nodes=st.integers(1, 3),
    gpn=st.integers(1, 3),
    spg=st.integers(1, 3),
    data=st.data(),
)
def test_route_properties(nodes, gpn, spg, data):
    topo = Topology(nodes, gpn, slots_per_gpu=spg)
    n_slots = topo.num_slots
    num_logical = data.draw(st.integers(1, n_slots))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    p2l = torch.full((n_slots,), -1, dtype=torch.int64)
    p2l[torch.randperm(n_slots, generator=gen)[:num_logical]] = torch.arange(num_logical)
    for s in (p2l < 0).nonzero().flatten().tolist():  # fill some free slots with replicas
        if torch.rand(1, generator=gen).item() < 0.7:
            p2l[s] = int(torch.randint(0, num_logical, (1,), generator=gen))
    p = Placement(topo, num_logical, p2l)
    k = data.draw(st.integers(1, num_logical))
    t_num = data.draw(st.integers(0, 40))
    rows = [torch.randperm(num_logical, generator=gen)[:k] for _ in range(t_num)]
    idx = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.int64)
    idx = torch.where(torch.rand(t_num, k, generator=gen) < 0.1, -1, idx)
    src = torch.randint(0, topo.num_gpus, (t_num,), generator=gen)
    got = p.route(idx, src)
    assert torch.equal(got < 0, idx < 0)
    assert torch.equal(p.phys_to_log[got[got >= 0]], idx[idx >= 0])
    _, ref_load = _ref_route(p, idx, src)
    assert torch.bincount(got[got >= 0], minlength=n_slots).tolist() == ref_load


def test_route_keeps_local_when_every_gpu_holds_a_replica():
    # expert 0 on every GPU (2 nodes x 4 GPUs): each GPU's choices stay on its own GPU, no traffic at all
    topo = Topology(2, 4, slots_per_gpu=2)
    p2l = torch.tensor([v for g in range(8) for v in (0, 1 + g)])
    p = Placement(topo, 9, p2l)
    src = torch.arange(8).repeat_interleave(64)
    out = p.route(torch.zeros(512, 1, dtype=torch.int64), src)
    assert (out.flatten() // topo.slots_per_gpu == src).all()


def test_route_totals_even_with_two_replicas_on_one_node():
    # expert 0: two replicas on node 0 (GPUs 0, 1), one on node 1 (GPU 4); every GPU sends 64 choices of it:
    # the three replicas end up with even totals (512 / 3), each node's own replicas used first
    topo = Topology(2, 4, slots_per_gpu=1)
    p = Placement(topo, 6, torch.tensor([0, 0, 1, 2, 0, 3, 4, 5]))
    src = torch.arange(8).repeat_interleave(64)
    out = p.route(torch.zeros(512, 1, dtype=torch.int64), src)
    totals = torch.bincount(out.flatten(), minlength=8)[[0, 1, 4]].tolist()
    assert sum(totals) == 512 and max(totals) - min(totals) <= 2, totals


def test_audit_edges():
    # zero load spreads spare replicas evenly (it piled them all on expert 0)
    assert replica_counts(torch.zeros(5), 16).tolist() == [4, 3, 3, 3, 3]
    # home_node numbers only the nodes that are some expert's home (the gate refuses empty groups)
    p = greedy_placement(torch.tensor([10.0, 1.0]), Topology(3, 1))
    home = p.home_node()
    assert sorted(set(home.tolist())) == list(range(len(set(home.tolist())))), home
    # slot_load must be finite and >= 0
    q = Placement(Topology(1, 2, slots_per_gpu=1), 1, torch.tensor([0, 0]))
    for bad in ([float("nan"), 0.0], [-1.0, 0.0], [float("inf"), 0.0]):
        with pytest.raises(ValueError, match="'slot_load'"):
            q.route(torch.zeros(2, 1, dtype=torch.int64), 0, slot_load=torch.tensor(bad))
    # a GPU receiving one expert into two slots gets it sent once
    topo = Topology(1, 2, slots_per_gpu=2)
    old = Placement(topo, 3, torch.tensor([0, 1, 2, 0]))
    new = Placement(topo, 3, torch.tensor([2, 2, 0, 1]))
    moves = migration_plan(old, new)
    assert [(m.expert, m.dst_gpu) for m in moves] == [(2, 0), (1, 1)], moves


def test_host_work_ignores_default_device():
    """Placement, its planners and the link simulator build their host tables on the CPU whatever default device
    the caller has set (a model built under ``with torch.device("cuda")``): here the meta device, whose tensors
    would refuse to mix with the CPU ones. Results equal those made without a default device."""
    topo = Topology(2, 2, slots_per_gpu=3)
    load = torch.tensor([9.0, 4, 2, 1, 1, 1, 1, 1])
    idx = torch.tensor([[0, 1], [1, -1], [2, 0], [7, 4]])
    src = torch.tensor([0, 1, 2, 3])

    def work() -> list:
        trace = synthetic_trace(64, 8, 2, topo, seed=3)
        p = greedy_placement(load, topo)
        q = plan_placement(load, topo, trace=trace, max_rounds=5, time_budget_s=60.0)
        c = contiguous_placement(8, topo)
        links = simulate_links(trace, p)
        return [trace.topk_idx, p.phys_to_log, p.replica_table, p.gpu_share(), p.table_route(idx, 2),
                p.route(idx, src), q.phys_to_log, c.replica_table, links.compute, replica_counts(load, 12),
                torch.tensor([len(migration_plan(c, p))], device="cpu")]

    want = work()
    with torch.device("meta"):
        got = work()
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.device.type == "cpu", i
        assert torch.equal(a, b), i


def test_review_edges():
    """Found by review: a plan that left a GPU without an expert while there were more experts than GPUs; an
    infinite local_cap that kept nothing local; prepare("cpu:0") filling a cache entry route never reads; sizes
    given as floats failing later with a TypeError; a Placement sharing the caller's phys_to_log."""
    topo = Topology(4, 4, slots_per_gpu=4)  # 48 experts, 64 slots, no replicas: 16 empty slots
    trace = synthetic_trace(2048, 48, 8, topo, zipf_s=1.2, seed=1)
    p = plan_placement(None, topo, trace=trace, num_replicas=0, time_budget_s=60.0)
    per_gpu = (p.phys_to_log.view(16, 4) >= 0).sum(1)
    assert (per_gpu >= 1).all(), per_gpu  # (it left GPU 14 empty)
    q = Placement(Topology(1, 4), 1, torch.zeros(4, dtype=torch.int64))  # a replica on every GPU
    idx = torch.zeros(2, 4, dtype=torch.int64)
    assert (q.route(idx, 1, local_cap=None) == 1).all()
    assert (q.route(idx, 1, local_cap=1e19) == 1).all()  # (ceil(cap).long() overflowed: nothing stayed local)
    for bad in (math.inf, math.nan, 0.0, True, "1"):
        with pytest.raises(ValueError, match="'local_cap' must be a finite number > 0, or None"):
            q.route(idx, 1, local_cap=bad)
    q.prepare("cpu:0")
    assert list(q._table_cache) == [idx.device] and list(q._spread_cache) == [idx.device]
    for make, arg in ((lambda: Topology(2.0, 2), "num_nodes"), (lambda: Topology(2, 2, slots_per_gpu=1.5),
                                                                   "slots_per_gpu"),
                      (lambda: Placement(Topology(1, 2), 2.0, torch.tensor([0, 1])), "num_logical"),
                      (lambda: replica_counts(torch.ones(2), 3.5), "num_physical"),
                      (lambda: plan_placement(torch.ones(4), Topology(2, 2), max_rounds=2.5), "max_rounds"),
                      (lambda: greedy_placement(torch.ones(2), Topology(2, 2), num_replicas=1.0), "num_replicas")):
        with pytest.raises(ValueError, match=f"'{arg}' must be an int"):
            make()
    p2l = torch.tensor([0, 1])
    r = Placement(Topology(1, 2), 2, p2l)
    p2l[0] = 1
    assert r.phys_to_log.tolist() == [0, 1]
    with pytest.raises(ValueError, match="'src_gpu' must be >= 0"):
        RoutingTrace(torch.zeros(2, 1, dtype=torch.int64), torch.tensor([0, -1]), 1)
    t2 = RoutingTrace(torch.zeros(2, 1, dtype=torch.int64), torch.tensor([0, 7]), 1)
    one = Placement(Topology(2, 2), 1, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="'trace' has a src_gpu outside"):
        simulate_links(t2, one, physical_idx=torch.zeros(2, 1, dtype=torch.int64))


def test_greedy_packing_spreads_units_without_load():
    """Units of no load go to the GPU with the most free slots among equally loaded ones: no expert twice on a GPU
    and no GPU left empty where a layout without either exists (the lowest-numbered GPU used to fill up first)."""
    def per_gpu(p: Placement) -> list[list[int]]:
        s = p.topology.slots_per_gpu
        return [p.phys_to_log[g * s:(g + 1) * s].tolist() for g in range(p.topology.num_gpus)]

    for load, topo in ((torch.zeros(5), Topology(1, 3, slots_per_gpu=3)),
                       (torch.tensor([0.0, 0, 20, 0]), Topology(1, 4, slots_per_gpu=3))):
        for slots in per_gpu(greedy_placement(load, topo)):
            held = [e for e in slots if e >= 0]
            assert len(held) == len(set(held)), per_gpu(greedy_placement(load, topo))
    p = greedy_placement(torch.tensor([59.0, 7, 0, 33, 0, 18, 2, 4, 0]), Topology(3, 3, slots_per_gpu=2),
                         num_replicas=0)
    assert all(any(e >= 0 for e in slots) for slots in per_gpu(p)), per_gpu(p)


def test_route_refuses_a_bool_source_gpu():
    """src_gpu=True is refused naming the argument (it was taken as GPU 1)."""
    p = greedy_placement(torch.ones(4), Topology(1, 2, slots_per_gpu=2))
    with pytest.raises(ValueError, match="src_gpu"):  # (ArgumentError)
        p.route(torch.tensor([[0, 1], [2, 3]]), True)


def test_route_takes_any_integer_source_gpu():
    """route takes one source GPU as a numpy integer or a 0-dim integer tensor, as table_route does (it took only a
    Python int); other scalars are refused naming the argument."""
    import numpy as np

    topo = Topology(2, 2, slots_per_gpu=2)
    p = greedy_placement(torch.tensor([9.0, 4, 2, 1, 1, 1]), topo)
    idx = torch.randint(-1, 6, (37, 2), generator=torch.Generator().manual_seed(5))
    want = p.route(idx, 3)
    assert torch.equal(want, p.route(idx, torch.full((37,), 3)))
    for src in (np.int64(3), np.int32(3), np.uint8(3), torch.tensor(3), torch.tensor(3, dtype=torch.int32)):
        assert torch.equal(p.route(idx, src), want), type(src)
        assert torch.equal(p.table_route(idx, src), p.table_route(idx, 3)), type(src)
    for bad in (torch.tensor(3.0), torch.tensor(True), np.float64(3.0), 3.0, torch.tensor([3])):
        with pytest.raises(ValueError, match="'src_gpu'"):
            p.route(idx, bad)
    with pytest.raises(ValueError, match="'src_gpu'"):
        p.route(idx, np.int64(4))
    # table_route takes one source GPU only: other scalars and per-token tensors are refused naming the argument
    # (they raised IndexError or "Boolean value of Tensor ... is ambiguous")
    for bad in (torch.tensor(3.0), np.float64(3.0), 3.0, torch.tensor([3]), torch.full((37,), 3)):
        with pytest.raises(ValueError, match="argument 'src_gpu' must be an int or a 0-dim integer tensor"):
            p.table_route(idx, bad)


def test_placement_pickles_without_its_tables():
    """A pickled Placement (broadcast_object_list sharing one plan over ranks) leaves its per-device lookup tables
    behind (they may be CUDA tensors of the sender); the copy equals the original and routes the same."""
    import copy
    import pickle

    topo = Topology(3, 2, slots_per_gpu=2)
    p = greedy_placement(torch.tensor([30.0, 9, 4, 2, 1, 1, 1, 1]), topo).prepare("cpu")
    assert p._table_cache
    gen = torch.Generator().manual_seed(8)
    idx = torch.randint(-1, 8, (64, 3), generator=gen)
    src = torch.randint(0, 6, (64,), generator=gen)
    for q in (pickle.loads(pickle.dumps(p)), copy.deepcopy(p)):
        assert q._table_cache == q._spread_cache == {}
        assert p._table_cache and p._spread_cache  # (the original keeps its own)
        assert q.topology == p.topology and q.num_logical == p.num_logical
        for name in ("phys_to_log", "replica_table", "replica_count"):
            assert torch.equal(getattr(q, name), getattr(p, name)), name
        assert torch.equal(q.route(idx, src), p.route(idx, src))
        assert torch.equal(q.table_route(idx, 4), p.table_route(idx, 4))


def test_planner_rounds_replicas_to_node_multiples():
    """What plan_placement's docstring says of num_replicas: the search rounds an expert's replicas up in steps of
    the node count, so it may use fewer than asked (here 4 of 5, slots left empty) where greedy uses them all; and
    without a time budget the plan depends on its inputs only (every rank planning alike gets the same plan)."""
    topo = Topology(3, 2, slots_per_gpu=2)
    trace = synthetic_trace(2000, 2, 1, topo, seed=0)
    p = plan_placement(None, topo, trace=trace, num_replicas=5)
    assert p.replica_count.tolist() == [3, 3] and int((p.phys_to_log < 0).sum()) == 6
    assert int(greedy_placement(trace.expert_load(), topo, num_replicas=5).replica_count.sum()) == 7
    assert torch.equal(plan_placement(None, topo, trace=trace, num_replicas=5).phys_to_log, p.phys_to_log)


# ---------------------------------------------------------------------------------------------------------------
# Node-limited routing with replicas


def _home_nodes_bruteforce(p: Placement) -> list[int]:
    """The node of each logical expert's lowest slot, from phys_to_log alone."""
    per_node = p.topology.gpus_per_node * p.topology.slots_per_gpu
    slots = p.phys_to_log.tolist()
    return [min(s for s, e in enumerate(slots) if e == want) // per_node for want in range(p.num_logical)]


def _check_node_limit(p: Placement, logical: torch.Tensor, src: torch.Tensor, phys: torch.Tensor, limit: int) -> None:
    """The gate's contract, token by token: its experts' home nodes are at most ``limit`` (the gate's groups), and
    the nodes it reaches are its own and those home nodes only, so at most ``limit`` besides its own (and each
    choice lands on a slot holding its expert)."""
    home = _home_nodes_bruteforce(p)
    per_node = p.topology.gpus_per_node * p.topology.slots_per_gpu
    slots = p.phys_to_log.tolist()
    for row, lrow, s in zip(phys.tolist(), logical.tolist(), src.tolist(), strict=True):
        own = s // p.topology.gpus_per_node
        homes = {home[e] for e in lrow if e >= 0}
        assert len(homes) <= limit, (lrow, homes)
        reached = {slot // per_node for slot in row if slot >= 0}
        assert reached <= homes | {own}, (s, lrow, row)
        assert len(reached - {own}) <= limit
        assert [slots[x] if x >= 0 else -1 for x in row] == lrow


@pytest.mark.parametrize("local_cap", [1.0, None, 0.5])
@pytest.mark.parametrize("kind", ["greedy", "plan"])
@pytest.mark.parametrize(
    "nodes,gpn,spg,num_logical,topk,limit",
    [(4, 8, 2, 48, 8, 2), (4, 2, 1, 4, 2, 1), (4, 4, 4, 40, 4, 2), (3, 2, 3, 12, 3, 1), (5, 2, 2, 11, 4, 3)],
)
def test_node_limited_route_keeps_the_gate_limit(nodes, gpn, spg, num_logical, topk, limit, kind, local_cap):
    """Found by review: with replicas, route and table_route served choices from replicas on nodes the gate had not
    counted (a token of a gate limited to M home nodes reached up to M + 1 other nodes: 12.7% of tokens over the
    limit with greedy placements, 49.7% with planned ones). With node_limited every token keeps the contract
    (_check_node_limit), on zipf traces, greedy and planned placements, with and without a local cap; without it
    some tokens break it (the case stays covered)."""
    from largeep.gate import GateConfig, TopKGate

    topo = Topology(nodes, gpn, slots_per_gpu=spg)
    trace = synthetic_trace(1024, num_logical, topk, topo, seed=3, zipf_s=1.2)
    p = greedy_placement(trace.expert_load(), topo) if kind == "greedy" else plan_placement(None, topo, trace=trace)
    assert int((p.replica_count > 1).sum()) > 0
    home = p.home_node()
    sizes = sorted(torch.bincount(home).tolist())
    while sum(sizes[:limit]) < topk:  # (the smallest limit from the given one whose groups hold top-k)
        limit += 1
    gate = TopKGate(GateConfig(hidden=16, num_experts=num_logical, topk=topk, topk_groups=limit),
                    group_of_expert=home).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        gate.expert_bias.copy_(torch.randn(num_logical) * 0.05)
        logical = gate(torch.randn(1024, 16)).topk_idx
    logical[7] = -1  # (tokens without some choices)
    logical[9, 0] = -1
    src = torch.randint(0, topo.num_gpus, (1024,), generator=torch.Generator().manual_seed(1))
    routed = p.route(logical, src, local_cap=local_cap, node_limited=True)
    _check_node_limit(p, logical, src, routed, limit)
    # the load on each slot matches the unlimited route's within the allowed nodes' freedom: the totals per
    # expert are the same
    plain = p.route(logical, src, local_cap=local_cap)
    assert torch.equal(torch.bincount(p.phys_to_log[routed[routed >= 0]], minlength=num_logical),
                       torch.bincount(p.phys_to_log[plain[plain >= 0]], minlength=num_logical))
    if local_cap == 1.0:  # (table_route's static cap is route's default one)
        tabled = torch.empty_like(logical)
        for g in range(topo.num_gpus):
            mine = src == g
            tabled[mine] = p.table_route(logical[mine], g, node_limited=True)
        _check_node_limit(p, logical, src, tabled, limit)
        if (nodes, kind) == (4, "plan"):  # (the reviewer's case: the plain routes break the limit)
            per_node = topo.gpus_per_node * topo.slots_per_gpu
            far = [len({x // per_node for x in row if x >= 0} - {int(s) // gpn}) for row, s in
                   zip(plain.tolist(), src.tolist(), strict=True)]
            assert max(far) > limit


def test_plan_placement_node_limited_judges_node_limited_routes():
    """plan_placement(node_limited=True) judges plans on the trace as a node-limited layer routes it: its plan's
    node-limited bottleneck is at most the greedy plan's, and simulate_links(node_limited=True) is
    simulate_links of route(node_limited=True)'s slots."""
    topo = Topology(4, 4, slots_per_gpu=2)
    trace = synthetic_trace(2048, 24, 4, topo, seed=5, zipf_s=1.2)
    greedy = plan_placement(trace.expert_load(), topo)  # (no trace: the greedy plan)
    plan = plan_placement(None, topo, trace=trace, node_limited=True)
    assert torch.equal(plan.replica_table, plan_placement(None, topo, trace=trace, node_limited=True).replica_table)
    for p in (greedy, plan):
        routed = p.route(trace.topk_idx, trace.src_gpu, node_limited=True)
        got = simulate_links(trace, p, node_limited=True)
        want = simulate_links(trace, p, physical_idx=routed)
        assert torch.equal(got.nic_in, want.nic_in) and torch.equal(got.compute, want.compute)
        assert got.max_link_time_s == want.max_link_time_s
    # (here the search wins, and beats the plan judged on unlimited routes when both are routed node-limited)
    unlimited = plan_placement(None, topo, trace=trace)
    times = [simulate_links(trace, p, node_limited=True).max_link_time_s for p in (plan, unlimited, greedy)]
    assert times[0] < times[1] < times[2], times
    with pytest.raises(ValueError, match="'node_limited'"):  # (ArgumentError)
        simulate_links(trace, plan, physical_idx=routed, node_limited=True)


@pytest.mark.parametrize("experts,topk,zipf_s,seed",
                         [(24, 4, 1.2, 0), (24, 4, 1.0, 1), (16, 2, 1.5, 1), (24, 4, 1.5, 0)])
def test_plan_placement_node_limited_keeps_the_unlimited_plan_where_it_wins(experts, topk, zipf_s, seed):
    """Judged on node-limited routes, plan_placement(node_limited=True) is within its compute limit (greedy's
    imbalance on those routes * 1.05) and no slower than the greedy plan, nor than the plan searched on unlimited
    routes wherever that plan is within the same limit (in the first three cases it is, and the search on
    node-limited routes alone ended at the slower greedy plan or a slower one of its own)."""
    topo = Topology(4, 4, slots_per_gpu=2)
    trace = synthetic_trace(1024, experts, topk, topo, seed=seed, zipf_s=zipf_s)

    def judged(p: Placement) -> tuple[float, float]:
        links = simulate_links(trace, p, node_limited=True)
        return links.max_link_time_s, links.compute_imbalance

    greedy_time, greedy_imbalance = judged(plan_placement(trace.expert_load(), topo))  # (no trace: greedy)
    limit = greedy_imbalance * 1.05 + 1e-12
    plan_time, plan_imbalance = judged(plan_placement(None, topo, trace=trace, node_limited=True))
    plain_time, plain_imbalance = judged(plan_placement(None, topo, trace=trace))
    assert plan_imbalance <= limit and plan_time <= greedy_time
    if plain_imbalance <= limit:
        assert plan_time <= plain_time, (plan_time, plain_time)
    assert (plain_imbalance <= limit) == (zipf_s != 1.5 or experts == 16)


def test_node_limited_route_balances_within_the_allowed_nodes():
    """Expert 0 has one replica on each of nodes 1, 2 and 3 (home: node 1). From node 0, tokens whose other expert
    lives on node 1 may use only node 1's replica; those whose other expert lives on node 2 may use nodes 1 and 2.
    The more constrained set is filled first, the other around it: 10 + 30 choices end 20 / 20 on nodes 1 and 2,
    none on node 3 (the unlimited route spreads them over all three)."""
    topo = Topology(4, 1, slots_per_gpu=2)
    p = Placement(topo, 4, torch.tensor([1, -1, 0, 2, 0, 3, 0, -1]))  # expert 0 on slots 2, 4, 6
    idx = torch.tensor([[0, 2]] * 10 + [[0, 3]] * 30)
    out = p.route(idx, 0, node_limited=True)
    assert (out[:10, 0] == 2).all() and torch.bincount(out[:, 0], minlength=8)[[2, 4, 6]].tolist() == [20, 20, 0]
    assert torch.bincount(p.route(idx, 0)[:, 0], minlength=8)[[2, 4, 6]].tolist() == [14, 13, 13]
    # table_route: its cycle entries on node 3 go to the allowed replicas instead, the home one always allowed
    tab = p.table_route(idx, 0, node_limited=True)
    assert (tab[:10, 0] == 2).all() and set(tab[10:, 0].tolist()) == {2, 4}
    # with one replica per expert, or every node holding its share, the limit changes nothing and the two agree
    one = contiguous_placement(8, topo)
    rnd = torch.stack([torch.randperm(8)[:3] for _ in range(50)])
    for g in range(4):
        assert torch.equal(one.table_route(rnd, g, node_limited=True), one.route(rnd, g, node_limited=True))
        assert torch.equal(one.route(rnd, g, node_limited=True), one.route(rnd, g))
    even = Placement(Topology(2, 2), 3, torch.tensor([0, 1, 0, 2]))  # expert 0 on both nodes
    ids = torch.tensor([[0, 1], [0, 2], [2, 0]] * 5)
    for g in range(4):
        assert torch.equal(even.table_route(ids, g, node_limited=True), even.route(ids, g, node_limited=True))
        assert torch.equal(even.route(ids, g, node_limited=True), even.route(ids, g))
    compiled = torch.compile(lambda i: p.table_route(i, 0, node_limited=True), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(idx), tab)


def test_layer_limits_nodes_only_under_home_node_groups():
    """MoELayer routes with node_limited only where its gate's groups are the placement's home nodes: groups of
    another kind (contiguous blocks of experts) limit no node, and routing stays free to balance (review: with
    contiguous groups the limit raised the busiest GPU's load 1.24 -> 1.72 times the mean for nothing). Decided
    again when set_groups gives the gate new groups."""
    from largeep.gate import GateConfig, TopKGate
    from largeep.layers import _node_limited

    topo = Topology(4, 1, slots_per_gpu=2)
    p = Placement(topo, 4, torch.tensor([1, -1, 0, 2, 0, 3, 0, -1]))  # home nodes: expert 0 -> 1, 1 -> 0, ...
    home = p.home_node()
    homed = TopKGate(GateConfig(hidden=8, num_experts=4, topk=2, topk_groups=2), group_of_expert=home)
    assert _node_limited(homed, p)
    blocks = TopKGate(GateConfig(hidden=8, num_experts=4, topk=2, num_groups=4, topk_groups=2))
    assert not torch.equal(blocks._host_groups, home) and not _node_limited(blocks, p)
    blocks.set_groups(home.clone())
    assert _node_limited(blocks, p)
    unlimited = TopKGate(GateConfig(hidden=8, num_experts=4, topk=2), group_of_expert=home)  # (all groups kept)
    assert not _node_limited(unlimited, p) and not _node_limited(homed, None)


def test_flags_must_be_bools():
    """node_limited and hierarchical are refused by name when not a bool (a string such as "no" is true)."""
    topo = Topology(2, 2)
    trace = synthetic_trace(64, 4, 2, topo, seed=0)
    p = plan_placement(trace.expert_load(), topo)
    calls = [
        ("Placement.route", "node_limited", lambda: p.route(trace.topk_idx, trace.src_gpu, node_limited="no")),
        ("Placement.table_route", "node_limited", lambda: p.table_route(trace.topk_idx, 0, node_limited=1)),
        ("plan_placement", "hierarchical", lambda: plan_placement(None, topo, trace=trace, hierarchical="no")),
        ("plan_placement", "node_limited", lambda: plan_placement(None, topo, trace=trace, node_limited=None)),
        ("simulate_links", "hierarchical", lambda: simulate_links(trace, p, hierarchical=0)),
        ("simulate_links", "node_limited", lambda: simulate_links(trace, p, node_limited="yes")),
    ]
    for op, arg, call in calls:
        with pytest.raises(ValueError, match=f"{op}: argument '{arg}' must be a bool"):  # (ArgumentError)
            call()
