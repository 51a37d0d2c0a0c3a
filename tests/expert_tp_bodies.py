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
from largeep import ArgumentError, PeerRefusedError, layers, ops
from largeep.expert_tp import all_gather_rows, make_expert_tp_groups, reduce_scatter_rows
from largeep.placement import Topology, contiguous_placement
from layer_bodies import (
    RoundRobinReplicas,
    _allsum,
    _build_layer,
    _gen,
    _raises,
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
    # second derivatives (a gradient penalty, create_graph=True) against the same maps on one process: the
    # backwards are recorded (each the other collective), not constants
    rx = [t.clone().requires_grad_() for t in xs]
    loss = sum(((torch.cat(rx) ** 3) * g).sum() for g in gs)
    grads = torch.autograd.grad(loss, rx, create_graph=True)
    want = torch.autograd.grad(sum((g ** 2).sum() for g in grads), rx)[rank]
    x = xs[rank].clone().requires_grad_()
    (xa,) = all_gather_rows(group, x)
    (gx,) = torch.autograd.grad(((xa ** 3) * gs[rank]).sum(), x, create_graph=True)
    close(gx, grads[rank], "all_gather_rows: grad with create_graph")
    close(torch.autograd.grad((gx ** 2).sum(), x)[0], want, "all_gather_rows: second derivative")
    ry = [t.clone().requires_grad_() for t in ys]
    outs = [torch.stack([t[r * rows : (r + 1) * rows] for t in ry]).sum(0) for r in range(world)]
    grads = torch.autograd.grad(sum(((o ** 3) * c).sum() for o, c in zip(outs, cs, strict=True)), ry,
                                create_graph=True)
    want = torch.autograd.grad(sum((g ** 2).sum() for g in grads), ry)[rank]
    y = ys[rank].clone().requires_grad_()
    (out,) = reduce_scatter_rows(group, y)
    (gy,) = torch.autograd.grad(((out ** 3) * cs[rank]).sum(), y, create_graph=True)
    close(torch.autograd.grad((gy ** 2).sum(), y)[0], want, "reduce_scatter_rows: second derivative")
    # rows that are not a multiple of the group's size: refused before any collective, the group still usable
    try:
        reduce_scatter_rows(group, torch.zeros(world * rows + 1, 2))
    except ArgumentError as exc:
        assert "needs tensors of T * n rows" in str(exc), str(exc)
    else:
        raise AssertionError("reduce_scatter_rows took rows that are not a multiple of the group's size")
    (out,) = reduce_scatter_rows(group, torch.ones(world * rows, 2))
    assert torch.equal(out, torch.full((rows, 2), float(world)))
    # a 0-d tensor (no rows to move), or no tensor at all: refused naming it, before any collective, either way
    for fn in (all_gather_rows, reduce_scatter_rows):
        for args, says in (((torch.ones(world), torch.tensor(1.0)), "tensor argument 1 must have a dim 0 of rows"),
                           ((), "needs at least one tensor")):
            try:
                fn(group, *args)
            except ArgumentError as exc:
                assert says in str(exc), str(exc)
            else:
                raise AssertionError(f"{fn.__name__} took {args}")
    (out,) = all_gather_rows(group, torch.ones(rows, 2))
    assert torch.equal(out, torch.ones(world * rows, 2))


def layer_tp_vs_reference(
    rank: int, world: int, tp: int, tokens: list[int], hidden: int, ffn: int, shared_ffn: int, num_experts: int,
    topk: int, seed: int, variants: list[dict[str, Any]], replicas: int = 0, fp8: bool = False,
    gpt_oss: bool = False,
) -> dict[str, Any]:
    """The layer with TP groups of ``tp`` ranks (Buffer on the EP group of world/tp ranks): output and grads of x,
    the gate, the shared experts and the expert shards (all-gathered over the TP group to full [E_l, H, F] and
    [E_l, F, H] matrices) against the dense reference; the variants agree with each other to float32 rounding.
    ``fp8``: the variants dispatch FP8, the reference's routed experts see FP8 round trips. ``gpt_oss``: experts
    with biases and the clamped activation: b1/b3 gathered like w1/w3, and every member's whole b2 (added by the
    first member only) takes the reference's whole grad, so the members' copies stay equal."""
    groups = make_expert_tp_groups(tp)
    num_logical, phys_to_log = random_placement(num_experts, replicas, seed)
    m = make_global(seed, tokens, hidden, ffn, shared_ffn, num_logical, gpt_oss)
    ref = dense_reference(m, topk, fp8)
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
                    list(ex.parameters()), phys_to_log, group=groups.ep_group
                ) == replicas
            logical = local_logical_experts(phys_to_log, groups.ep_rank, epr)
            for name, dim in (("w1", 2), ("w3", 2), ("w2", 1)) + ((("b1", 1), ("b3", 1)) if gpt_oss else ()):
                full = _gather_shards(expert_grad(ex, name), dim, groups.tp_group)
                close(full, ref["grads"][name][logical], f"{what}: grad of {name} (gathered)")
            if gpt_oss:
                assert ex.b2_added_elsewhere == (groups.tp_rank > 0)
                close(ex.b2.grad, ref["grads"]["b2"][logical], f"{what}: grad of b2 (every member's whole)")
                every = _gather_shards(ex.b2.grad.unsqueeze(0), 0, groups.tp_group)
                assert all(torch.equal(g, every[0]) for g in every), f"{what}: the members' b2 grads differ"
            finish_variant(results, layer, out, x, ref, what)
        compare_variants(variants, results)
        return {"variants": len(results)}
    finally:
        buf.destroy()


def weight_grad_penalty(rank: int, world: int) -> None:
    """A penalty on the expert weights' gradients (create_graph=True, then its gradient in x): with the experts
    split over TP groups of ``world`` ranks as with whole experts (TP = 1), from the same global weights and gate.
    Summed over the ranks the penalty is the same (the shards partition the weights), and so is each rank's part of
    its gradient in x."""
    hidden, ffn, experts, topk = 16, 8, 4, 2
    got = []
    for tp in (1, world):
        groups = make_expert_tp_groups(tp)
        buf = largeep.Buffer(groups.ep_group, hidden=hidden, num_experts=experts, num_topk=topk,
                             max_tokens_per_rank=6, backend="torch")
        try:
            layer = layers.MoELayer(buf, ffn_hidden=ffn, expert_tp_group=groups.tp_group if tp > 1 else None)
            g = _gen(1, 0)
            w1, w3 = torch.randn(experts, hidden, ffn, generator=g), torch.randn(experts, hidden, ffn, generator=g)
            layer.load_global_experts(w1, w3, torch.randn(experts, ffn, hidden, generator=g) / 3)
            with torch.no_grad():
                layer.gate.weight.copy_(torch.randn(layer.gate.weight.shape, generator=g))
            x = torch.randn(5, hidden, generator=_gen(2, rank)).requires_grad_()
            y = layer(x)
            grads = torch.autograd.grad((y**2).sum(), [layer.experts.w13, layer.experts.w2], create_graph=True)
            (gx,) = torch.autograd.grad(sum((t**2).sum() for t in grads), [x])
            got.append(gx)
        finally:
            buf.destroy()
    close(got[1], got[0], f"rank {rank}: grad in x of the weight-gradient penalty, TP {world} vs TP 1")


def checkpointed_tp_layer(rank: int, world: int, use_custom_ops: bool, keep_comm: bool) -> None:
    """``torch.utils.checkpoint.checkpoint(layer, x)`` of an expert-TP layer (TP group of ``world``, EP groups of
    one rank), plainly or with ``context_fn=ops.checkpoint_context_fn``, over two steps: the recomputation in the
    backward ends once it has the tensors asked for -- torch raises to stop it, here inside the experts (the eager
    path's last saved tensor) -- and that is not a failure of the TP group, which takes the next step; output and
    grads equal the same layer without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    groups = make_expert_tp_groups(world)
    buf = largeep.Buffer(groups.ep_group, hidden=32, num_experts=2, num_topk=2, max_tokens_per_rank=16,
                         backend="torch")
    try:
        torch.manual_seed(15)
        layer = layers.MoELayer(buf, ffn_hidden=16, shared_ffn_hidden=8, num_chunks=2, use_custom_ops=use_custom_ops,
                                expert_tp_group=groups.tp_group)
        kw = {"context_fn": ops.checkpoint_context_fn} if keep_comm else {}

        def run(x0: torch.Tensor, keep: bool) -> list[torch.Tensor]:
            layer.zero_grad()
            x = x0.clone().requires_grad_()
            out = checkpoint(layer, x, use_reentrant=False, **kw) if keep else layer(x)
            out.square().sum().backward()
            assert ops.live_handles(layer.buffer_id) == 0
            return [out.detach(), x.grad] + [p.grad for p in layer.parameters()]

        for step in range(2):
            x0 = torch.randn(9 + rank + step, 32, generator=_gen(16, rank, step))
            want = run(x0, False)
            got = run(x0, True)
            for i, (a, b) in enumerate(zip(got, want, strict=True)):
                close(a, b, f"rank {rank} step {step}: checkpointed vs plain, tensor {i}")
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
        # the experts' form: biases on one member only; another activation (its constants) on one member
        _raises(("disagree", "expert_mlp_bias"), layers.MoELayer, ep_buf, ffn_hidden=16,
                expert_mlp_bias=groups.tp_rank == 0, expert_tp_group=tp)
        for other in ("silu", layers.ClampedSwiGLU(limit=6.0)):
            _raises(("disagree", "expert_activation", '0: "silu"', "ClampedSwiGLU"), layers.MoELayer, ep_buf,
                    ffn_hidden=16, expert_activation=layers.ClampedSwiGLU() if groups.tp_rank == 0 else other,
                    expert_tp_group=tp)
        # one member dispatches FP8, the other bf16 (on a Buffer of a hidden size FP8 takes)
        fp8_buf = largeep.Buffer(groups.ep_group, hidden=128, num_experts=experts, num_topk=topk,
                                 max_tokens_per_rank=8, backend="torch")
        try:
            _raises(("disagree", "use_fp8"), layers.MoELayer, fp8_buf, ffn_hidden=16, use_fp8=groups.tp_rank == 1,
                    expert_tp_group=tp)
        finally:
            fp8_buf.destroy()
        # the Buffer on the whole world holds both members of the TP group
        _raises(("holds 2 of its ranks", "make_expert_tp_groups"), layers.MoELayer, world_buf, ffn_hidden=16,
                expert_tp_group=tp)
        _raises(("normal mode only",), layers.MoELayer, ll_buf, ffn_hidden=16, expert_tp_group=tp)
        # a group without this rank: the ranks outside it tell their Buffers' groups, where rank 0 (a TP group of
        # itself, alone in its Buffer's group at 2 ranks: a good layer there) learns of it
        first = dist.new_group([0])
        if rank != 0:
            _raises(("expert_tp_group", "does not contain this rank"), layers.MoELayer, ep_buf, ffn_hidden=16,
                    expert_tp_group=first)
        elif world > 2:
            _raises(("refused on rank(s) [1] of the Buffer's group",), layers.MoELayer, ep_buf, ffn_hidden=16,
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


class _FailingGate(torch.nn.Module):
    """A gate whose config cannot be read (MoELayer asks it how many experts it chooses among)."""

    @property
    def config(self) -> Any:
        raise RuntimeError("the gate's config failed")

    def forward(self, x: torch.Tensor) -> Any:
        raise AssertionError("not called")


def one_sided_refusals(rank: int, world: int) -> None:
    """An argument that only rank 0 gets wrong, refused before the collective check (overlap_sm_carveout,
    num_chunks, ffn_hidden, ll_use_fp8, num_worst_tokens with a Buffer in rounds, ll_bf16_partial_sums, the gate's
    expert count, the placement's sizes or type, num_logical_experts against the placement, router_score): rank 0
    raises its own
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
        ("plain", {"ll_use_fp8": True}, ("ll_use_fp8", "applies to low-latency mode")),
        ("rounds", {"num_worst_tokens": 8}, ("num_worst_tokens", "tokens_per_round")),
        ("plain", {"ll_bf16_partial_sums": True}, ("ll_bf16_partial_sums", "applies to low-latency mode")),
        ("plain", {"ll_bf16_partial_sums": 1}, ("ll_bf16_partial_sums", "bool")),
        ("plain", {"gate": layers.LinearTopKRouter(hidden, experts + 1, topk)}, ("gate", f"{experts + 1} experts")),
        ("plain", {"placement": contiguous_placement(experts, Topology(1, world // 2 + 1, slots_per_gpu=8))},
         ("placement", "ranks")),
        ("plain", {"placement": contiguous_placement(experts, Topology(1, world // 2, slots_per_gpu=8)),
                   "num_logical_experts": 3},
         ("num_logical_experts", "differs")),
        ("plain", {"placement": "round robin"}, ("placement", "callable")),
        ("plain", {"router_score": "tanh"}, ("score_func", "softmax|sigmoid")),
        ("plain", {"overlap_sm_carveout": "4"}, ("overlap_sm_carveout", "int >= 0")),
        ("plain", {"gate": 5}, ("gate", "module")),
        ("plain", {"use_custom_ops": 1}, ("use_custom_ops", "bool")),
        # an error that is no ArgumentError (here the gate's own) reaches the others all the same
        ("plain", {"gate": _FailingGate()}, ("the gate's config failed",)),
    ]
    failures: list[str] = []
    try:
        with _timeout(20):
            for name, bad, words in cases:
                kw: dict[str, Any] = {"ffn_hidden": 16, **(bad if rank == 0 else {})}
                if rank == 0:
                    error = RuntimeError if isinstance(bad.get("gate"), _FailingGate) else ArgumentError
                    _expect(failures, f"rank 0 {bad}", error, words, layers.MoELayer, bufs[name],
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


def wrong_group_then_retry(rank: int, world: int, timeout_s: float) -> None:
    """Every rank passes the group object of TP group {0, 1} (TP groups {0, 1}, {2, 3}; EP groups {0, 2},
    {1, 3}): ranks 2 and 3, outside it, raise ArgumentError and tell their Buffers' groups, so ranks 0 and 1 raise
    ArgumentError too, every rank well before LARGEEP_TIMEOUT_S, none left waiting; then the right groups make the
    layer on every rank (no exchange of the refused check is left for the retry's to pair with), and its output
    equals the dense reference's."""
    import time

    hidden, ffn, experts, topk, seed = 32, 16, 2 * world, 2, 37
    tokens = [0 if r == 1 else 6 + 3 * r for r in range(world)]
    groups = make_expert_tp_groups(2)
    first_tp = dist.new_group([0, 1])  # (NON_GROUP_MEMBER on ranks 2 and 3)
    m = make_global(seed, tokens, hidden, ffn, 0, experts)
    ref = dense_reference(m, topk)
    buf = largeep.Buffer(groups.ep_group, hidden=hidden, num_experts=experts, num_topk=topk,
                         max_tokens_per_rank=max(tokens), backend="torch")
    failures: list[str] = []
    try:
        with _timeout(timeout_s):
            start = time.monotonic()
            words = ("does not contain this rank",) if rank >= 2 else ("refused on rank(s) [1] of the Buffer's group",)
            _expect(failures, f"rank {rank}, the wrong group", ArgumentError, words, layers.MoELayer, buf,
                    ffn_hidden=ffn, expert_tp_group=first_tp)
            took = time.monotonic() - start
            if took > timeout_s / 3:
                failures.append(f"rank {rank}: the refusal took {took:.1f} s (LARGEEP_TIMEOUT_S={timeout_s:g})")
            layer = _build_layer(buf, m, ffn, 0, expert_tp_group=groups.tp_group)
            with torch.no_grad():
                out = layer(m.xs[rank].clone())
            close(out, ref["outs"][rank], f"rank {rank}: the retry's output")
    finally:
        buf.destroy()
    assert not failures, "\n".join(failures)


def gloo_bounds(rank: int, world: int) -> None:
    """On a gloo group every collective's wait is bounded by LARGEEP_TIMEOUT_S, whatever the tensors' device
    (the nvshmem backend runs on gloo groups with CUDA tensors): _collective.on_gloo says so for the default group
    (None or its object), a new group and a TP group, for CPU and CUDA devices alike (no GPU needed: it only
    decides)."""
    from largeep import _collective

    tp = make_expert_tp_groups(2 if world % 2 == 0 else 1).tp_group
    for group in (None, dist.group.WORLD, dist.new_group(list(range(world))), tp):
        for device in (torch.device("cpu"), torch.device("cuda", 0)):
            assert _collective.on_gloo(group, device), f"rank {rank}: {group} {device}: not bounded on gloo"


class _SpreadGate(torch.nn.Module):
    """Token t of a call -> experts (t + k) % E for k < K (distinct), weights softmax(x W^T) over them (W [K, H]:
    the gate has a gradient). ``bad_call``: the gate's call (counted from ``calls`` = 0) whose rows from
    ``bad_from`` on name expert E instead of their first expert (out of range: the dispatch refuses it)."""

    distinct_experts = True

    def __init__(self, hidden: int, experts: int, topk: int, seed: int) -> None:
        super().__init__()
        self.experts, self.topk = experts, topk
        self.weight = torch.nn.Parameter(torch.randn(topk, hidden, generator=_gen(seed, 7)) * hidden**-0.5)
        self.calls, self.bad_call, self.bad_from = 0, -1, 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        idx = (torch.arange(t).unsqueeze(1) + torch.arange(self.topk)) % self.experts
        if self.calls == self.bad_call:
            idx[self.bad_from :, 0] = self.experts
        self.calls += 1
        return idx, torch.softmax(x.float() @ self.weight.T, dim=-1)


def _round(run: Any, params: list[torch.nn.Parameter], x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """Forward and backward of ``run`` (zeroed grads first) -> [output, grad of x, grads of ``params``]."""
    for p in params:
        p.grad = None
    xg = x.clone().requires_grad_()
    out = run(xg)
    (out * g[: out.shape[0]]).sum().backward()
    return [out.detach(), xg.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def refusal_keeps_tp_in_step(rank: int, world: int, kw: dict[str, Any], pipeline: bool) -> None:
    """TP groups of 2; two layers (different weights) on one Buffer and TP group, run one after the other (or as
    a MoEPipeline of 2 chunks), forward and backward. Round 1: rank 0's second layer names an out-of-range expert
    (in its second chunk where there are two); round 2: rank 0 has more tokens than max_tokens_per_rank. Each is
    refused in rank 0's EP group (ArgumentError on rank 0, PeerRefusedError on its EP peers) and, through the void
    row rank 0 sends in the TP exchange, on its TP partners (PeerRefusedError naming member 0), at once. Round 3
    equals round 0 bit for bit on every rank (output, grads of x and of every parameter): the TP collectives
    stayed in step. Failures are collected and asserted after every round."""
    hidden, experts, topk, ffn = 32, 2 * world, 2, 16
    groups = make_expert_tp_groups(2)
    buf = largeep.Buffer(groups.ep_group, hidden=hidden, num_experts=experts, num_topk=topk,
                         max_tokens_per_rank=16, backend="torch")
    failures: list[str] = []
    try:
        torch.manual_seed(100 + groups.tp_rank)  # (each member its own shard; the same shard in every EP group)
        gates = [_SpreadGate(hidden, experts, topk, seed) for seed in (1, 2)]
        stack = [layers.MoELayer(buf, ffn_hidden=ffn, shared_ffn_hidden=8, gate=gate,
                                 expert_tp_group=groups.tp_group, **kw) for gate in gates]
        model: Any = layers.MoEPipeline(stack, num_chunks=2) if pipeline else torch.nn.Sequential(*stack)
        params = list(model.parameters())
        tokens = [12, 0, 9, 7][rank % 4]
        x = torch.randn(tokens, hidden, generator=_gen(31, rank))
        g = torch.randn(40, hidden, generator=_gen(32, rank))
        ep_peer = groups.ep_rank > 0 and groups.tp_rank == 0  # (rank 0's EP group: member 0 of every TP group)
        with _timeout(20):
            want = _round(model, params, x, g)
            # where the second layer's refused chunk lies: its gate's call 1 (the pipeline calls it per chunk), else
            # call 0's second half (num_chunks 2) or all of it
            split = kw.get("num_chunks", 1) > 1
            gates[1].bad_call, gates[1].bad_from = (1, 0) if pipeline else (0, tokens // 2 if split else 0)
            big = torch.randn(40, hidden, generator=_gen(33, rank))  # 20 tokens per chunk of 2 > 16
            for what, xi, words in (("a bad expert id", x, "topk_idx"), ("too many tokens", big,
                                                                          "max_tokens_per_rank")):
                for gate in gates:
                    gate.calls = 0
                if rank != 0:
                    gates[1].bad_call = -1
                    xi = x
                name = f"rank {rank} {kw} pipeline={pipeline}, {what} on rank 0"
                if rank == 0:
                    _expect(failures, name, ArgumentError, (words,), _round, model, params, xi, g)
                elif ep_peer:
                    _expect(failures, name, PeerRefusedError, ("refused this dispatch",), _round, model, params,
                            xi, g)
                else:
                    _expect(failures, name, PeerRefusedError, ("member(s) [0]", "stays in step"), _round, model,
                            params, xi, g)
                gates[1].bad_call = -1
            for gate in gates:
                gate.calls = 0
            try:
                got = _round(model, params, x, g)
                for i, (a, b) in enumerate(zip(got, want, strict=True)):
                    if not torch.equal(a, b):
                        failures.append(f"rank {rank} {kw} pipeline={pipeline}: round 3 differs from round 0 "
                                        f"(tensor {i}, max diff {(a - b).abs().max().item():.3g})")
            except Exception as exc:  # noqa: BLE001 - reported with the others
                failures.append(f"rank {rank} {kw} pipeline={pipeline}: round 3 raised {type(exc).__name__}: {exc}")
    finally:
        if kw.get("use_custom_ops"):
            ops.release_handles(stack[0].buffer_id)
        buf.destroy()
    assert not failures, "\n".join(failures)


def dtype_mismatch_refused(rank: int, world: int, kw: dict[str, Any]) -> None:
    """TP groups of 2 whose member 0 passes x in bfloat16 and member 1 in float32 (each EP group one dtype, so the
    dispatches go through): ArgumentError on every rank naming both dtypes, before any row moves over the TP group
    (the rows' all-gather of different byte counts aborted the process on gloo); then a float32 call on every
    rank equals the one made before, bit for bit."""
    hidden = 32
    groups = make_expert_tp_groups(2)
    buf = largeep.Buffer(groups.ep_group, hidden=hidden, num_experts=2 * world, num_topk=2, max_tokens_per_rank=16,
                         backend="torch")
    failures: list[str] = []
    try:
        torch.manual_seed(200 + groups.tp_rank)
        layer = layers.MoELayer(buf, ffn_hidden=16, gate=_SpreadGate(hidden, 2 * world, 2, 3),
                                expert_tp_group=groups.tp_group, **kw)
        x = torch.randn(5 + 3 * rank, hidden, generator=_gen(41, rank))
        with _timeout(20), torch.no_grad():
            want = layer(x)
            mixed = x.bfloat16() if groups.tp_rank == 0 else x
            _expect(failures, f"rank {rank} {kw}", ArgumentError, ("different dtypes", "bfloat16", "float32"), layer,
                    mixed)
            _same_again(failures, f"rank {rank} {kw}: the call after the refusal", layer, x, want)
    finally:
        buf.destroy()
    assert not failures, "\n".join(failures)


def _same_again(failures: list[str], what: str, layer: Any, x: torch.Tensor, want: torch.Tensor) -> None:
    """``layer(x)`` gives ``want`` again, bit for bit (failures noted, not raised: the peers' calls must go on)."""
    try:
        if not torch.equal(layer(x), want):
            failures.append(f"{what} differs from the one before")
    except Exception as exc:  # noqa: BLE001 - reported with the others
        failures.append(f"{what} raised {type(exc).__name__}: {exc}")


class _FailOnce(torch.nn.Module):
    """Wraps a module; its first call raises RuntimeError (as an out-of-memory error would)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.failed = inner, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.failed:
            self.failed = True
            raise RuntimeError("planted failure")
        return self.inner(x)  # type: ignore[no-any-return]


def shifted_exchanges(rank: int, world: int) -> None:
    """Members whose count exchanges belong to different calls raise RuntimeError on every member (they paired
    silently before), and the TP group then refuses every later call at once on every member: (1) member 0 calls
    two layers in the other order; (2) member 0 fails between its dispatch and the exchange (its shared experts
    raise once), so its next call's exchange meets member 1's pending one. 2 ranks: TP group of 2, EP groups of 1."""
    hidden = 32
    failures: list[str] = []
    with _timeout(20):
        for part in ("order", "between"):
            groups = make_expert_tp_groups(2)
            buf = largeep.Buffer(groups.ep_group, hidden=hidden, num_experts=2, num_topk=1, max_tokens_per_rank=8,
                                 backend="torch")
            try:
                torch.manual_seed(rank)
                stack = [layers.MoELayer(buf, ffn_hidden=16, shared_ffn_hidden=8, expert_tp_group=groups.tp_group)
                         for _ in range(2)]
                x = torch.randn(6, hidden, generator=_gen(51, rank))
                name = f"rank {rank} {part}"
                with torch.no_grad():
                    if part == "order":
                        first = stack[1] if rank == 0 else stack[0]
                        words: tuple[str, ...] = ("different calls", "layers [1, 0]")
                    else:
                        first = stack[0]
                        words = ("different calls", "chunks [2, 1]")
                        if rank == 0:
                            assert stack[0].shared_experts is not None
                            stack[0].shared_experts = _FailOnce(stack[0].shared_experts)
                            _expect(failures, f"{name} (planted)", RuntimeError, ("planted failure",), stack[0], x)
                    _expect(failures, name, RuntimeError, words, first, x)
                    for layer in stack:
                        _expect(failures, f"{name}, later", RuntimeError, ("failed earlier", "different calls"),
                                layer, x)
            finally:
                buf.destroy()
    assert not failures, "\n".join(failures)


def failed_dispatch_joins(rank: int, world: int) -> None:
    """A dispatch that fails on member 0 for another reason than a refusal (x not a tensor: AttributeError) still
    sends its void row: member 1 raises PeerRefusedError saying member 0 failed, and the next call equals the one
    before on both. 2 ranks: TP group of 2, EP groups of 1."""
    hidden = 32
    groups = make_expert_tp_groups(2)
    buf = largeep.Buffer(groups.ep_group, hidden=hidden, num_experts=2, num_topk=1, max_tokens_per_rank=8,
                         backend="torch")
    failures: list[str] = []
    try:
        torch.manual_seed(rank)
        layer = layers.MoELayer(buf, ffn_hidden=16, expert_tp_group=groups.tp_group)
        x = torch.randn(6, hidden, generator=_gen(71, rank))
        with _timeout(20), torch.no_grad():
            want = layer(x)
            if rank == 0:
                idx, w = layer.route(x)
                _expect(failures, "rank 0", AttributeError, ("contiguous",), layer.send_chunk, x.tolist(), idx, w)
            else:
                _expect(failures, "rank 1", PeerRefusedError, ("member(s) [0]", "failed there"), layer, x)
            _same_again(failures, f"rank {rank}: the call after the failure", layer, x, want)
    finally:
        buf.destroy()
    assert not failures, "\n".join(failures)


def worst_refusal_without_exchange(rank: int, world: int, timeout_s: float) -> list[float]:
    """num_worst_tokens where chunks exchange no counts (as on CUDA; forced here on CPU): rank 0's refused dispatch
    (a bad expert id) cannot tell its TP partner, so rank 0 raises ArgumentError and marks the TP group failed, and
    rank 1 waits for its rows until LARGEEP_TIMEOUT_S (PeerTimeoutError); the next call raises RuntimeError on both
    at once: no value computed from rows out of step. Returns the seconds each call took."""
    import time

    from largeep import expert_tp

    hidden = 32
    groups = make_expert_tp_groups(2)
    buf = largeep.Buffer(groups.ep_group, hidden=hidden, num_experts=2, num_topk=1, max_tokens_per_rank=8,
                         backend="torch")
    failures: list[str] = []
    took = []
    plain = expert_tp._exchanges_counts
    expert_tp._exchanges_counts = lambda fixed_rows, device: not fixed_rows  # type: ignore[assignment]
    try:
        gate = _SpreadGate(hidden, 2, 1, 4)
        layer = layers.MoELayer(buf, ffn_hidden=16, gate=gate, num_worst_tokens=16, expert_tp_group=groups.tp_group)
        x = torch.randn(6, hidden, generator=_gen(61, rank))
        with _timeout(timeout_s), torch.no_grad():
            gate.calls, gate.bad_call = 0, 0 if rank == 0 else -1
            start = time.monotonic()
            if rank == 0:
                _expect(failures, "rank 0", ArgumentError, ("topk_idx",), layer, x)
            else:
                _expect(failures, "rank 1", largeep.PeerTimeoutError, ("expert TP", "LARGEEP_TIMEOUT_S"), layer, x)
            took.append(time.monotonic() - start)
            gate.bad_call = -1
            start = time.monotonic()
            sent = [0]
            dispatch = buf.dispatch

            def counted(*args: Any, **kwargs: Any) -> Any:
                sent[0] += 1
                return dispatch(*args, **kwargs)

            buf.dispatch = counted  # type: ignore[method-assign]
            _expect(failures, f"rank {rank}, next call", RuntimeError, ("failed earlier", "num_worst_tokens"
                                                                        if rank == 0 else "collective"), layer, x)
            buf.dispatch = dispatch  # type: ignore[method-assign]
            if sent[0]:
                failures.append(f"rank {rank}, next call: {sent[0]} dispatch(es) went out before the refusal")
            took.append(time.monotonic() - start)
    finally:
        expert_tp._exchanges_counts = plain  # type: ignore[assignment]
        buf.destroy()
    assert not failures, "\n".join(failures)
    return took


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


def deepcopy_of_a_tp_layer(rank: int, world: int) -> None:
    """A deep copy of a model holding a layer with expert TP (an EMA copy, a frozen reference) shares the TP
    state, as it shares the Buffer (a process group cannot be copied), and computes what the original does; the
    copy's experts are its own."""
    import copy

    g = make_expert_tp_groups(2)
    buf = largeep.Buffer(g.ep_group, hidden=32, num_experts=2 * (world // 2), num_topk=1, max_tokens_per_rank=8,
                         backend="torch")
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(layers.MoELayer(buf, ffn_hidden=16, expert_tp_group=g.tp_group))
        twin = copy.deepcopy(model)
        assert twin[0].expert_tp is model[0].expert_tp and twin[0].buffer is buf
        assert twin[0].experts.w13.data_ptr() != model[0].experts.w13.data_ptr()
        x = torch.randn(5 + rank, 32, generator=_gen(3, rank))
        with torch.no_grad():
            want, got = model(x), twin(x)
        assert torch.equal(want, got), (want - got).abs().max()
    finally:
        buf.destroy()


def tp_state_names_its_shard(rank: int, world: int) -> None:
    """A TP member's state dict says which shard of each expert it holds: it loads into the layer of the same
    member, and is refused by the layer of the other member (same shapes, other columns). Such a layer has no
    for_buffer twin (refused, naming the TP group)."""
    g = make_expert_tp_groups(2)
    buf = largeep.Buffer(g.ep_group, hidden=32, num_experts=2 * (world // 2), num_topk=1, max_tokens_per_rank=8,
                         backend="torch")
    try:
        layer = layers.MoELayer(buf, ffn_hidden=16, expert_tp_group=g.tp_group)
        state = layer.state_dict()
        member = dist.get_rank(g.tp_group)
        assert state["expert_shard"].tolist() == [member, 2], state["expert_shard"]
        states: list[Any] = [None, None]
        dist.all_gather_object(states, state, group=g.tp_group)
        layers.MoELayer(buf, ffn_hidden=16, expert_tp_group=g.tp_group).load_state_dict(states[member])
        other = layers.MoELayer(buf, ffn_hidden=16, expert_tp_group=g.tp_group)
        try:
            other.load_state_dict(states[1 - member])
        except RuntimeError as exc:
            assert "expert_shard" in str(exc) and f"shard {1 - member} of 2" in str(exc), exc
        else:
            raise AssertionError(f"rank {rank}: the other member's shard was loaded")
        # a state saved before expert_shard was: its shard is not checked (the same member's loads)
        layers.MoELayer(buf, ffn_hidden=16, expert_tp_group=g.tp_group).load_state_dict(
            {k: v for k, v in states[member].items() if k != "expert_shard"}
        )
        # no twin on another Buffer for a layer whose slots hold shards (MoELayer.for_buffer)
        try:
            layer.for_buffer(buf)
        except largeep.ArgumentError as exc:
            assert "expert-TP group of 2 ranks" in str(exc), exc
        else:
            raise AssertionError(f"rank {rank}: for_buffer made a twin of an expert-TP layer")
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
