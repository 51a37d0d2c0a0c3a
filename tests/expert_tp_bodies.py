"""Bodies for test_expert_tp.py, run on every rank of a pool: ``fn(rank, world, *args)``.

The layer with expert tensor parallelism is held to the same dense single-process float64 reference as the plain
layer (``layer_bodies.dense_reference``): every rank draws every rank's inputs and the global weights from shared
seeds, so the reference does not depend on how the ranks are grouped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import largeep
import torch
import torch._dynamo
import torch.distributed as dist
from largeep import ArgumentError, layers, ops
from largeep.expert_tp import all_gather_rows, make_expert_tp_groups, reduce_scatter_rows
from layer_bodies import (
    RoundRobinReplicas,
    _allsum,
    _build_layer,
    _gen,
    close,
    compare_variants,
    compiled_equals_eager,
    dense_reference,
    expert_grad,
    finish_variant,
    local_logical_experts,
    make_global,
    random_placement,
)


def _gather_shards(t: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def collectives(rank: int, world: int, rows: int) -> None:
    """all_gather_rows / reduce_scatter_rows over the world against plain sums, forward and grads; an unused
    gathered output gives a zero grad (every member still takes part in the backward's collectives)."""
    group = dist.group.WORLD
    assert group is not None
    xs = [torch.randn(rows, 5, generator=_gen(1, r), dtype=torch.float64) for r in range(world)]
    ws = [torch.randn(rows, 2, generator=_gen(2, r), dtype=torch.float64) for r in range(world)]
    ids = [torch.randint(-1, 9, (rows, 2), generator=_gen(3, r)) for r in range(world)]
    gs = [torch.randn(world * rows, 5, generator=_gen(4, r), dtype=torch.float64) for r in range(world)]
    x = xs[rank].clone().requires_grad_()
    w = ws[rank].clone().requires_grad_()
    xa, wa, ia = all_gather_rows(group, x, w, ids[rank])
    assert torch.equal(xa.detach(), torch.cat(xs)) and torch.equal(wa.detach(), torch.cat(ws))
    assert torch.equal(ia, torch.cat(ids)) and not ia.requires_grad
    (xa * gs[rank]).sum().backward()  # wa unused: its input's grad must be zero
    close(x.grad, torch.stack([g[rank * rows : (rank + 1) * rows] for g in gs]).sum(0), "all_gather_rows: grad")
    assert w.grad is not None and (w.grad == 0).all()
    ys = [torch.randn(world * rows, 3, generator=_gen(5, r), dtype=torch.float64) for r in range(world)]
    cs = [torch.randn(rows, 3, generator=_gen(6, r), dtype=torch.float64) for r in range(world)]
    y = ys[rank].clone().requires_grad_()
    (out,) = reduce_scatter_rows(group, y)
    close(out, torch.stack([t[rank * rows : (rank + 1) * rows] for t in ys]).sum(0), "reduce_scatter_rows")
    (out * cs[rank]).sum().backward()
    close(y.grad, torch.cat(cs), "reduce_scatter_rows: grad")


def layer_tp_vs_reference(
    rank: int, world: int, tp: int, tokens: list[int], hidden: int, ffn: int, shared_ffn: int, num_experts: int,
    topk: int, seed: int, variants: list[dict[str, Any]], replicas: int = 0,
) -> dict[str, Any]:
    """The layer with TP groups of ``tp`` ranks (Buffer on the EP group of world/tp ranks): output and grads of x,
    the gate, the shared experts and the expert shards (all-gathered over the TP group to full [E_l, H, F] and
    [E_l, F, H] matrices) against the dense reference; the variants agree with each other to float32 rounding."""
    groups = make_expert_tp_groups(tp)
    num_logical, phys_to_log = random_placement(num_experts, replicas, seed)
    m = make_global(seed, tokens, hidden, ffn, shared_ffn, num_logical)
    ref = dense_reference(m, topk)
    epr = num_experts // (world // tp)
    buf = largeep.Buffer(
        groups.ep_group, hidden=hidden, num_experts=num_experts, num_topk=topk,
        max_tokens_per_rank=max(max(tokens), 1), backend="torch",
    )
    results = []
    try:
        for kw in variants:
            placement = RoundRobinReplicas(phys_to_log, num_logical) if phys_to_log is not None else None
            layer = _build_layer(buf, m, ffn, shared_ffn, placement=placement, expert_tp_group=groups.tp_group, **kw)
            ex = layer.experts
            assert ex.w1.shape == (epr, hidden, ffn // tp) and ex.w2.shape == (epr, ffn // tp, hidden)
            x = m.xs[rank].clone().requires_grad_()
            out = layer(x)
            what = f"rank {rank} tp {tp} {kw}"
            close(out, ref["outs"][rank], f"{what}: output")
            (out * m.gs[rank]).sum().backward()
            want_gx = ref["x_grads"][rank]  # None where the reference never used x (no tokens, no shared experts)
            close(x.grad, want_gx if want_gx is not None else torch.zeros_like(x), f"{what}: grad of x")
            close(_allsum(layer.gate.weight.grad), ref["grads"]["gate"], f"{what}: grad of the gate")
            if phys_to_log is not None:
                assert layers.allreduce_replica_grads(
                    [ex.w13, ex.w2], phys_to_log, group=groups.ep_group
                ) == replicas
            logical = local_logical_experts(phys_to_log, groups.ep_rank, epr)
            for name, dim in (("w1", 2), ("w3", 2), ("w2", 1)):
                full = _gather_shards(expert_grad(ex, name), dim, groups.tp_group)
                close(full, ref["grads"][name][logical], f"{what}: grad of {name} (gathered)")
            finish_variant(results, layer, out, x, ref, what)
        compare_variants(variants, results)
        return {"variants": len(results)}
    finally:
        buf.destroy()


def tp1_equals_plain(rank: int, world: int, tokens: list[int], seed: int, variants: list[dict[str, Any]]) -> None:
    """A TP group of one rank gives the plain layer's output and grads bit for bit."""
    hidden, ffn, shared_ffn, experts, topk = 32, 24, 8, 4 * world, 3
    groups = make_expert_tp_groups(1)
    m = make_global(seed, tokens, hidden, ffn, shared_ffn, experts)
    buf = largeep.Buffer(
        None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=max(max(tokens), 1),
        backend="torch",
    )
    try:
        for kw in variants:
            got = []
            for tp_group in (None, groups.tp_group):
                layer = _build_layer(buf, m, ffn, shared_ffn, expert_tp_group=tp_group, **kw)
                x = m.xs[rank].clone().requires_grad_()
                out = layer(x)
                (out * m.gs[rank]).sum().backward()
                got.append([out.detach(), x.grad] + [p.grad for p in layer.parameters()])
            for i, (a, b) in enumerate(zip(*got, strict=True)):
                assert torch.equal(a, b), f"rank {rank} {kw}: TP group of 1 differs from the plain layer (tensor {i})"
    finally:
        buf.destroy()


def compiled_tp_layer(rank: int, world: int, tp: int, tokens: list[int], num_worst: int, seed: int,
                      backend: str = "aot_eager") -> None:
    """torch.compile(fullgraph=True, backend) of the TP layer equals eager in the output and every grad (the count
    exchange becomes unbacked ints, whose bounds Inductor must be told; with num_worst_tokens there is none)."""
    hidden, ffn, experts, topk = 32, 16, 4 * world // tp, 2
    groups = make_expert_tp_groups(tp)
    torch._dynamo.reset()
    buf = largeep.Buffer(groups.ep_group, hidden=hidden, num_experts=experts, num_topk=topk,
                         max_tokens_per_rank=max(max(tokens), 1), backend="torch")
    try:
        torch.manual_seed(seed)  # the same gate and shared experts on every rank
        layer = layers.MoELayer(buf, ffn_hidden=ffn, shared_ffn_hidden=8, num_worst_tokens=num_worst,
                                expert_tp_group=groups.tp_group)
        x = torch.randn(tokens[rank], hidden, generator=_gen(seed, rank)).requires_grad_()
        compiled_equals_eager(layer, x, f"rank {rank}: ", backend)
        ops.release_handles(layer.buffer_id)
    finally:
        torch._dynamo.reset()
        buf.destroy()


def _raises(words: tuple[str, ...], fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except ArgumentError as exc:
        msg = str(exc)
        assert all(w in msg for w in words), f"message {msg!r} lacks {words}"
    else:
        raise AssertionError(f"no ArgumentError (expected one saying {words})")


@contextlib.contextmanager
def _timeout(seconds: float) -> Iterator[None]:
    """LARGEEP_TIMEOUT_S for the body: a rank left waiting in a collective raises soon, and the body reports it."""
    before = os.environ.get("LARGEEP_TIMEOUT_S")
    os.environ["LARGEEP_TIMEOUT_S"] = str(seconds)
    try:
        yield
    finally:
        if before is None:
            del os.environ["LARGEEP_TIMEOUT_S"]
        else:
            os.environ["LARGEEP_TIMEOUT_S"] = before


def _expect(failures: list[str], what: str, error: type[BaseException], words: tuple[str, ...], fn: Any,
            *args: Any, **kwargs: Any) -> None:
    """Calls ``fn``; a missing ``error``, another exception, or a message without ``words`` is added to
    ``failures`` (asserted by the caller after every call, so that one rank's failure does not hide behind the
    others' timeouts)."""
    try:
        fn(*args, **kwargs)
    except error as exc:
        msg = str(exc)
        if type(exc) is not error or not all(w in msg for w in words):
            failures.append(f"{what}: {type(exc).__name__} {msg!r} (expected {error.__name__} saying {words})")
    except Exception as exc:  # noqa: BLE001 - reported with the others
        failures.append(f"{what}: {type(exc).__name__}: {exc} (expected {error.__name__} saying {words})")
    else:
        failures.append(f"{what}: no {error.__name__} (expected one saying {words})")


def bad_configs(rank: int, world: int) -> None:
    """Wrong expert-TP configurations raise ArgumentError on every rank that makes them (no rank is left waiting
    in a collective: each case is followed by a good layer on the same groups)."""
    hidden, experts, topk = 32, 4 * world, 2

    def buffer(group: dist.ProcessGroup | None, **kw: Any) -> largeep.Buffer:
        return largeep.Buffer(
            group, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=8, backend="torch", **kw
        )

    _raises(("tp_size", "does not divide"), make_expert_tp_groups, 3)
    _raises(("tp_size", "positive"), make_expert_tp_groups, 0)
    _raises(("tp_size", "positive"), make_expert_tp_groups, True)  # a bool is no size (True == 1)
    groups = make_expert_tp_groups(2)
    # a group smaller than the world: its new_group calls would leave the other ranks' group counters behind
    _raises(("'group' has", "of the world's"), make_expert_tp_groups, 1, groups.ep_group)
    ep_buf, world_buf = buffer(groups.ep_group), buffer(None)
    ll_buf = buffer(groups.ep_group, low_latency=True)
    try:
        tp = groups.tp_group
        _raises(("expert_tp_group", "ProcessGroup"), layers.MoELayer, ep_buf, ffn_hidden=16, expert_tp_group=2)
        _raises(("ffn_hidden", "not divisible", "expert_tp_group"), layers.MoELayer, ep_buf, ffn_hidden=15,
                expert_tp_group=tp)
        # ffn_hidden differs between the members: every member raises
        _raises(("disagree", "ffn_hidden"), layers.MoELayer, ep_buf, ffn_hidden=16 + 8 * groups.tp_rank,
                expert_tp_group=tp)
        _raises(("disagree", "num_chunks"), layers.MoELayer, ep_buf, ffn_hidden=16, num_chunks=1 + groups.tp_rank,
                expert_tp_group=tp)
        # the Buffer on the whole world holds both members of the TP group
        _raises(("holds 2 of its ranks", "make_expert_tp_groups"), layers.MoELayer, world_buf, ffn_hidden=16,
                expert_tp_group=tp)
        _raises(("normal mode only",), layers.MoELayer, ll_buf, ffn_hidden=16, expert_tp_group=tp)
        # a group without this rank: only the ranks outside it make the call (it raises before any collective)
        first = dist.new_group([0])
        if rank != 0:
            _raises(("expert_tp_group", "does not contain this rank"), layers.MoELayer, ep_buf, ffn_hidden=16,
                    expert_tp_group=first)
        if world == 4:
            # TP groups {0, 3}, {1, 2} with EP groups {0, 1}, {2, 3}: the members of a TP group sit at slots 0 and 1
            tp_bad = [dist.new_group(r) for r in ([0, 3], [1, 2])][0 if rank in (0, 3) else 1]
            ep_bad = [dist.new_group(r) for r in ([0, 1], [2, 3])][rank // 2]
            bad_buf = buffer(ep_bad)
            try:
                _raises(("same expert slot",), layers.MoELayer, bad_buf, ffn_hidden=16,
                        expert_tp_group=tp_bad)
            finally:
                bad_buf.destroy()
            # TP groups {0, 1}, {2, 3} with EP groups {0, 3}, {1, 2}: the members of each TP group sit at one slot,
            # but each EP group mixes shard 0 of one TP group with shard 1 of another (its replica grads would sum
            # the two)
            tp_mix = [dist.new_group(r) for r in ([0, 1], [2, 3])][rank // 2]
            ep_mix = [dist.new_group(r) for r in ([0, 3], [1, 2])][0 if rank in (0, 3) else 1]
            mix_buf = buffer(ep_mix)
            try:
                _raises(("members [", "same shard", "allreduce_replica_grads"), layers.MoELayer, mix_buf,
                        ffn_hidden=16, expert_tp_group=tp_mix)
            finally:
                mix_buf.destroy()
        layer = layers.MoELayer(ep_buf, ffn_hidden=16, expert_tp_group=tp)  # the good configuration still works
        with torch.no_grad():
            out = layer(torch.randn(5 + rank, hidden, generator=_gen(9, rank)))
        assert out.shape == (5 + rank, hidden) and torch.isfinite(out).all()
    finally:
        for b in (ep_buf, world_buf, ll_buf):
            b.destroy()


def one_sided_refusals(rank: int, world: int) -> None:
    """An argument that only rank 0 gets wrong, refused before the collective check (overlap_sm_carveout,
    num_chunks, ffn_hidden, ll_use_fp8, num_worst_tokens with a Buffer in rounds): rank 0 raises its own
    ArgumentError and every other rank ArgumentError saying it was refused elsewhere -- rank 0's TP partners
    through the TP group, the others through their Buffers' groups -- at once, none left waiting; then a good
    layer works on every rank."""
    hidden, experts, topk = 32, 4 * world, 2
    groups = make_expert_tp_groups(2)

    def buffer(**kw: Any) -> largeep.Buffer:
        return largeep.Buffer(groups.ep_group, hidden=hidden, num_experts=experts, num_topk=topk,
                              max_tokens_per_rank=8, backend="torch", **kw)

    bufs = {"plain": buffer(), "rounds": buffer(tokens_per_round=4)}
    cases = [
        ("plain", {"overlap_sm_carveout": -1}, ("overlap_sm_carveout", ">= 0")),
        ("plain", {"num_chunks": 0}, ("num_chunks", "int >= 1")),
        ("plain", {"ffn_hidden": "16"}, ("ffn_hidden", "int >= 1")),
        ("plain", {"ll_use_fp8": True}, ("ll_use_fp8", "hidden % 128")),
        ("rounds", {"num_worst_tokens": 8}, ("num_worst_tokens", "tokens_per_round")),
    ]
    failures: list[str] = []
    try:
        with _timeout(20):
            for name, bad, words in cases:
                kw: dict[str, Any] = {"ffn_hidden": 16, **(bad if rank == 0 else {})}
                if rank == 0:
                    _expect(failures, f"rank 0 {bad}", ArgumentError, words, layers.MoELayer, bufs[name],
                            expert_tp_group=groups.tp_group, **kw)
                else:
                    _expect(failures, f"rank {rank} (rank 0: {bad})", ArgumentError, ("refused", "makes the layer"),
                            layers.MoELayer, bufs[name], expert_tp_group=groups.tp_group, **kw)
            layer = layers.MoELayer(bufs["plain"], ffn_hidden=16, expert_tp_group=groups.tp_group)
            with torch.no_grad():
                out = layer(torch.randn(5 + rank, hidden, generator=_gen(9, rank)))
            if not (out.shape == (5 + rank, hidden) and bool(torch.isfinite(out).all())):
                failures.append(f"rank {rank}: the good layer after the refusals gave {out.shape}")
    finally:
        for b in bufs.values():
            b.destroy()
    assert not failures, "\n".join(failures)


def tp_top1_empty_rank(rank: int, world: int) -> None:
    """Expert TP 2 with top-1 routing and a rank without tokens: its backward hands the backend empty gradients
    whose strides are 0 (a where over [0, 1]), which the torch backend's byte views refused."""
    g = make_expert_tp_groups(2)
    buf = largeep.Buffer(g.ep_group, hidden=32, num_experts=2, num_topk=1, max_tokens_per_rank=8, backend="torch")
    try:
        torch.manual_seed(0)
        layer = layers.MoELayer(buf, ffn_hidden=16, expert_tp_group=g.tp_group)
        x = torch.randn(5 if rank == 0 else 0, 32, requires_grad=True)
        y = layer(x)
        (y * y).sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape and bool(torch.isfinite(x.grad).all())
    finally:
        buf.destroy()


def missing_tp_member(rank: int, world: int, timeout_s: float) -> dict[str, Any]:
    """Rank 0 gathers rows over a TP group whose other members never call (as when their EP group refused a
    dispatch): it must raise PeerTimeoutError after about LARGEEP_TIMEOUT_S (gloo), not wait for the group's own
    timeout. Returns {"raised": message or None, "took": seconds} on rank 0."""
    import os
    import time

    from largeep import expert_tp

    group = dist.new_group(list(range(world)))
    if rank != 0:
        return {"raised": None, "took": 0.0}
    os.environ["LARGEEP_TIMEOUT_S"] = str(timeout_s)
    start = time.monotonic()
    try:
        expert_tp.all_gather_rows(group, torch.ones(3, 4))
    except largeep.PeerTimeoutError as exc:
        return {"raised": str(exc), "took": time.monotonic() - start}
    finally:
        del os.environ["LARGEEP_TIMEOUT_S"]
    return {"raised": None, "took": time.monotonic() - start}
