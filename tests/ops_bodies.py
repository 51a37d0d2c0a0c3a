"""Bodies for test_ops.py about the handles of largeep.ops and the derivatives of dispatch and combine, run on
every rank of a pool: ``fn(rank, world, *args)``.

Each body makes the same collective calls on every rank whatever it finds, records what is wrong in a list and
returns it, so that a rank that finds something wrong does not leave its peers waiting in a collective (which would
end the test in a timeout instead of the message); the test asserts that every rank's list is empty.
"""

from __future__ import annotations

from typing import Any

import largeep
import torch
from largeep import ops

HIDDEN, TOPK = 8, 2


def _buffer(world: int, max_tokens: int = 8, hidden: int = HIDDEN, backend: str = "torch") -> largeep.Buffer:
    return largeep.Buffer(None, hidden=hidden, num_experts=2 * world, num_topk=TOPK, max_tokens_per_rank=max_tokens,
                          backend=backend)


def _inputs(rank: int, world: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float32 [T, H], topk_idx [T, K] (distinct experts, one entry -1), topk_weights float32 [T, K] of ``rank``
    (any rank's inputs can be drawn on any rank)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    idx = torch.stack([torch.randperm(2 * world, generator=g)[:TOPK] for _ in range(tokens)]).to(torch.int64)
    if tokens > 1:
        idx[1, 0] = -1
    return torch.randn(tokens, HIDDEN, generator=g), idx, torch.rand(tokens, TOPK, generator=g) + 0.1


def _ranks_reached(idx: torch.Tensor, world: int) -> torch.Tensor:
    """float32 [T, 1]: how many ranks each token is sent to (experts 2r and 2r + 1 are on rank r)."""
    return torch.tensor([[len({v // 2 for v in row.tolist() if v >= 0})] for row in idx], dtype=torch.float32)


def _check(fails: list[str], ok: bool, what: str) -> None:
    if not ok:
        fails.append(what)


def _attempt(fails: list[str], what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), or None with the failure recorded."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - recorded, asserted by the test
        fails.append(f"{what}: {type(exc).__name__}: {exc}")
        return None


def _refused(fails: list[str], what: str, fn: Any, *args: Any) -> None:
    """fn(*args) must raise largeep.ArgumentError."""
    try:
        fn(*args)
        fails.append(f"{what}: not refused")
    except largeep.ArgumentError:
        pass
    except Exception as exc:  # noqa: BLE001
        fails.append(f"{what}: {type(exc).__name__} instead of ArgumentError: {exc}")


def _close(fails: list[str], got: Any, want: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    """|got - want| <= rtol * (|want| + max|want|), recorded instead of raised."""
    if not isinstance(got, torch.Tensor):
        fails.append(f"{what}: got {type(got).__name__}")
        return
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    if got64.shape != want64.shape:
        fails.append(f"{what}: shape {tuple(got64.shape)}, want {tuple(want64.shape)}")
        return
    if want64.numel() == 0:
        return
    err = (got64 - want64).abs()
    bound = rtol * (want64.abs() + want64.abs().max()) + 1e-12
    if not torch.isfinite(got64).all() or (err > bound).any():
        fails.append(f"{what}: max error {err.max().item():.3g} (scale {want64.abs().max().item():.3g})")


def _draw(seed: int, rank: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed * 7919 + rank))


def ops_refused_call_keeps_handle(rank: int, world: int) -> list[str]:
    """On the custom-op path a combine, or a combine's backward (dispatch_cached), refused for its arguments leaves
    the handle's count as it was: a corrected inference combine still finds the handle (and frees it), and a
    training step whose combine, or whose cached dispatch, was first refused ends with a backward that gives the
    right grad and releases the handle. A second dispatch_recv of one ticket raises without adding to its count.
    A combine through another Buffer than the dispatch's, or with something
    else than a dispatch's handle, is refused naming the argument on both paths (the eager path combined through
    the handle's own Buffer; the custom-op path said the handle was released)."""
    fails: list[str] = []
    buf, other = _buffer(world), _buffer(world)
    try:
        bid, other_id = ops.register_buffer(buf), ops.register_buffer(other)
        x, idx, w = _inputs(rank, world, 5, seed=1)
        want = x * _ranks_reached(idx, world)
        with torch.no_grad():
            d = ops.dispatch(buf, x, idx, w)
            _refused(fails, "eager combine through another Buffer", ops.combine, other, d.x, d.handle)
            for bad in (None, d.handle.handle):
                _refused(fails, f"eager combine with a {type(bad).__name__} handle", ops.combine, buf, d.x, bad)
            c = _attempt(fails, "eager combine after the refusals", ops.combine, buf, d.x, d.handle)
            _check(fails, c is None or torch.allclose(c.x, want, rtol=1e-6), "eager combine's value")
            d = ops.dispatch(bid, x, idx, w, use_custom_ops=True)
            _refused(fails, "custom-op combine through another Buffer", ops.combine, other_id, d.x, d.handle)
            _refused(fails, "custom-op combine with the bare ticket", ops.combine, bid, d.x, d.handle.ticket)
            _refused(fails, "inference combine of float64 rows", ops.combine, bid, d.x.double(), d.handle)
            c = _attempt(fails, "corrected inference combine", ops.combine, bid, d.x, d.handle)
            _check(fails, c is None or torch.allclose(c.x, want, rtol=1e-6), "corrected inference combine's value")
            _check(fails, ops.live_handles(bid) == 0, f"inference: {ops.live_handles(bid)} live handles, want 0")
        # a second dispatch_recv of a ticket (its outputs are given out once) raises without adding a hold: the
        # inference combine that follows still frees the handle
        t = torch.ops.largeep.dispatch_send(bid, x, idx, w, 0)
        rx, _, _ = torch.ops.largeep.dispatch_recv(bid, t, x, w, 0, False)
        try:
            torch.ops.largeep.dispatch_recv(bid, t, x, w, 0, True)
            fails.append("a second dispatch_recv of one ticket: not refused")
        except RuntimeError as exc:
            _check(fails, "already taken" in str(exc), f"a second dispatch_recv: {exc}")
        c = _attempt(fails, "combine after a second dispatch_recv", ops.combine, bid, rx,
                     ops.TicketHandle(t, x.shape[0]))
        _check(fails, c is None or torch.allclose(c.x, want, rtol=1e-6), "combine after a second dispatch_recv")
        _check(fails, ops.live_handles(bid) == 0,
               f"after a second dispatch_recv and the combine: {ops.live_handles(bid)} live handles, want 0")
        for refused in ("combine", "dispatch_cached"):  # (one at a time: the two miscounts would cancel out)
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            d = ops.dispatch(bid, xg, idx, wg, use_custom_ops=True)
            y = d.x * 2
            if refused == "combine":
                _refused(fails, "training combine of float64 rows", ops.combine, bid, y.double(), d.handle)
            c = ops.combine(bid, y, d.handle)
            if refused == "dispatch_cached":
                _refused(fails, "cached dispatch of float64 rows", torch.ops.largeep.dispatch_cached, bid,
                         torch.ones(5, HIDDEN, dtype=torch.float64), d.handle.ticket, d.x.shape[0])
            _attempt(fails, f"backward after a refused {refused}", c.x.sum().backward)
            want_gx = 2 * _ranks_reached(idx, world).expand(5, HIDDEN)
            _check(fails, xg.grad is not None and torch.allclose(xg.grad, want_gx),
                   f"grad of x after a refused {refused}")
            _check(fails, ops.live_handles(bid) == 0,
                   f"after a refused {refused} and the backward: {ops.live_handles(bid)} live handles, want 0")
    finally:
        buf.destroy()
        other.destroy()
    return fails


def ops_second_derivative(rank: int, world: int, tokens: list[int], num_worst: int, custom: bool,
                          backend: str = "torch") -> list[str]:
    """A gradient penalty through dispatch and combine: f = sum(a * rx^3) + sum(b * rw^3) + sum(e * c^2) +
    sum(rw * rowsum(rx * m)) on each rank, with rx, rw the received rows and weights and c = combine(rx^2 * q), plus
    a local term sum(x^3 / 2 + w^3) (so that a second derivative losing largeep's part would still have a graph).
    The last term takes the received weights as they come, also where the received topk_idx is -1 (dispatch gives 0
    there): their cotangent there depends on rx, so a second derivative that carried the weights' gradient of
    another rank's expert into those places would show in x's; the first derivatives
    (g_x, g_w) = grad(f, (x, w), create_graph=True), then the grads of P = sum(u * g_x^2) + sum(v * g_w^2). Against
    the same functions of every rank's inputs in one process (float64, index ops, torch's autograd), where the
    distributed gradients are those of the sums over ranks of f and of P. The eager path gives both derivatives;
    the custom-op path gives the first and raises, naming what is not supported, for the second. float32, on the
    device of a Buffer of ``backend`` (H 8 on the CPU, 128 on CUDA)."""
    from bodies import device_for
    from reference import make_inputs, ref_dispatch

    fails: list[str] = []
    dev = device_for(backend)
    h = HIDDEN if dev.type == "cpu" else 128
    experts = 2 * world
    inputs = [make_inputs(41, r, tokens[r], h, experts, TOPK, torch.float32) for r in range(world)]
    refs = [ref_dispatch(inputs, r, experts) for r in range(world)]
    rows = [len(d.src) for d in refs]
    a = [_draw(1, r, rows[r], h) for r in range(world)]
    b = [_draw(2, r, rows[r], TOPK) for r in range(world)]
    q = [_draw(3, r, rows[r], h) for r in range(world)]
    m = [_draw(9, r, rows[r], h) for r in range(world)]
    e = [_draw(4, r, tokens[r], h) for r in range(world)]
    u = [_draw(5, r, tokens[r], h) for r in range(world)]
    v = [_draw(6, r, tokens[r], TOPK) for r in range(world)]

    # the reference: every rank's tokens in one process
    xs = [inp.x.double().requires_grad_() for inp in inputs]
    ws = [inp.topk_weights.double().requires_grad_() for inp in inputs]
    f_all = torch.zeros((), dtype=torch.float64)
    cs = [torch.zeros(tokens[s], h, dtype=torch.float64) for s in range(world)]
    for r, d in enumerate(refs):
        rx = torch.stack([xs[s][t] for s, t in d.src]) if d.src else torch.zeros(0, h, dtype=torch.float64)
        rw = torch.stack([ws[s][t] for s, t in d.src]) if d.src else torch.zeros(0, TOPK, dtype=torch.float64)
        rw = torch.where(d.topk_idx >= 0, rw, 0.0)
        f_all = f_all + (a[r] * rx**3).sum() + (b[r] * rw**3).sum() + (rw * (rx * m[r]).sum(1, keepdim=True)).sum()
        y = rx * rx * q[r]
        for s in range(world):
            mine = [(row, t) for row, (src, t) in enumerate(d.src) if src == s]
            if mine:
                cs[s] = cs[s].index_add(0, torch.tensor([t for _, t in mine]), y[[row for row, _ in mine]])
    f_all = f_all + sum((e[s] * cs[s] ** 2).sum() + (xs[s] ** 3 / 2).sum() + (ws[s] ** 3).sum() for s in range(world))
    first = torch.autograd.grad(f_all, xs + ws, create_graph=True, allow_unused=True)
    first = [g if g is not None else torch.zeros_like(p) for g, p in zip(first, xs + ws, strict=True)]
    p_all = sum((u[s] * first[s] ** 2).sum() + (v[s] * first[world + s] ** 2).sum() for s in range(world))
    second = torch.autograd.grad(p_all, xs + ws, allow_unused=True)
    second = [g if g is not None else torch.zeros_like(p) for g, p in zip(second, xs + ws, strict=True)]

    buf = _buffer(world, max_tokens=max(max(tokens), 1), hidden=h, backend=backend)
    try:
        mine = inputs[rank]
        x = mine.x.to(dev, copy=True).requires_grad_()
        w = mine.topk_weights.to(dev, copy=True).requires_grad_()
        d = ops.dispatch(buf, x, mine.topk_idx.to(dev), w, num_worst_tokens=num_worst, use_custom_ops=custom)
        tail = d.x.shape[0] - rows[rank]

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(tail, t.shape[1])]).to(dev)

        # rows past the received count (num_worst_tokens) are unspecified: masked out, as a caller would
        rx = torch.where((d.topk_idx >= 0).any(dim=1, keepdim=True), d.x, 0.0)
        rw = torch.where(d.topk_idx >= 0, d.topk_weights, 0.0)
        rw_all = torch.where((d.topk_idx >= 0).any(dim=1, keepdim=True), d.topk_weights, 0.0)  # (tail rows only)
        c = ops.combine(buf, rx * rx * pad(q[rank]), d.handle).x
        f = (pad(a[rank]) * rx**3).sum() + (pad(b[rank]) * rw**3).sum() + (e[rank].to(dev) * c * c).sum()
        f = f + (rw_all * (rx * pad(m[rank])).sum(1, keepdim=True)).sum()
        f = f + (x**3 / 2).sum() + (w**3).sum()
        gx, gw = torch.autograd.grad(f, (x, w), create_graph=True)
        _close(fails, gx, first[rank], "first derivative, x")
        _close(fails, gw, first[world + rank], "first derivative, topk_weights")
        p = (u[rank].to(dev) * gx * gx).sum() + (v[rank].to(dev) * gw * gw).sum()
        try:
            g2x, g2w = torch.autograd.grad(p, (x, w))
            if custom:
                fails.append("custom-op path: a second derivative did not raise")
            else:
                _close(fails, g2x, second[rank], "second derivative, x")
                _close(fails, g2w, second[world + rank], "second derivative, topk_weights")
        except RuntimeError as exc:
            if not custom or "second derivative" not in str(exc) or "not supported" not in str(exc):
                fails.append(f"second derivative: {type(exc).__name__}: {exc}")
        if custom:
            bid = ops.register_buffer(buf)
            _check(fails, ops.live_handles(bid) == 0, f"{ops.live_handles(bid)} live handles after, want 0")
    finally:
        buf.destroy()
    return fails


def ops_checkpointed(rank: int, world: int, backend: str, num_chunks: int, buffer_backend: str = "torch") -> list[str]:
    """A block under non-reentrant activation checkpointing with ``context_fn=ops.checkpoint_context_fn``: an MoE
    layer (gate, grouped-GEMM experts, shared experts; ``num_chunks`` chunks; ``num_chunks`` 0: a plain
    dispatch, an elementwise expert and a combine, which Inductor compiles in a fraction of the time) followed by a
    local op. ``backend`` "eager" runs it eagerly on both paths (autograd Functions, custom ops) and with plain
    checkpointing; "aot_eager" and "inductor" compile it (fullgraph), which plain checkpointing cannot. The output
    and the grads of x, of the gate weights and of every parameter equal those without checkpointing, eagerly, and
    no handle is left alive. float32, on the device of a Buffer of ``buffer_backend``."""
    import functools

    import torch._dynamo
    from bodies import device_for
    from largeep import layers
    from torch.utils.checkpoint import checkpoint

    fails: list[str] = []
    dev = device_for(buffer_backend)
    hidden = 32 if dev.type == "cpu" else 128
    buf = largeep.Buffer(None, hidden=hidden, num_experts=2 * world, num_topk=TOPK, max_tokens_per_rank=16,
                         backend=buffer_backend)
    try:
        torch.manual_seed(17)  # the same weights on every rank
        with torch.device(dev):
            layer = layers.MoELayer(buf, ffn_hidden=16, shared_ffn_hidden=8, num_chunks=max(num_chunks, 1))
        bid = layer.buffer_id
        g = torch.Generator().manual_seed(rank)
        tokens = 11 + 3 * rank
        x0 = torch.randn(tokens, hidden, generator=g).to(dev)
        idx = torch.stack([torch.randperm(2 * world, generator=g)[:TOPK] for _ in range(tokens)]).to(dev)
        w0 = torch.rand(tokens, TOPK, generator=g).to(dev)
        scale = torch.linspace(0.5, 1.5, hidden).to(dev)

        def moe(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            if num_chunks:
                return layer(x)
            d = ops.dispatch(bid, x, idx, w, use_custom_ops=layer.use_custom_ops)
            return ops.combine(bid, torch.sin(d.x) * scale * d.topk_weights.sum(1, keepdim=True), d.handle).x

        def block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.tanh(moe(x, w)) * x

        def run(fn: Any) -> list[torch.Tensor]:
            layer.zero_grad()
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            y = fn(x, w)
            (y * y).sum().backward()
            return [y.detach(), x.grad, w.grad if w.grad is not None else torch.zeros_like(w)] + [
                p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()]

        want = run(block)
        keep = functools.partial(checkpoint, block, use_reentrant=False, context_fn=ops.checkpoint_context_fn)
        if backend == "eager":
            cases: list[tuple[str, Any]] = [
                ("eager path", keep),
                ("eager path, plain checkpoint", functools.partial(checkpoint, block, use_reentrant=False)),
                ("custom-op path", keep),
                ("custom-op path, plain checkpoint", functools.partial(checkpoint, block, use_reentrant=False)),
            ]
        else:
            cases = [(backend, torch.compile(keep, backend=backend, fullgraph=True))]
        for what, fn in cases:
            layer.use_custom_ops = what.startswith("custom-op path")
            for step in range(2 if backend != "eager" else 1):  # (compiled: the second call reuses the graphs)
                got = _attempt(fails, f"{what}: step {step}", run, fn)
                if got is None:
                    continue
                for i, (a, b) in enumerate(zip(got, want, strict=True)):
                    _close(fails, a, b, f"{what}: step {step}: tensor {i}", rtol=1e-5)
                live = ops.live_handles(bid)
                _check(fails, live == 0, f"{what}: step {step}: {live} live handles, want 0")
    finally:
        torch._dynamo.reset()
        buf.destroy()
    return fails


def ops_partial_backward(rank: int, world: int) -> list[str]:
    """Custom-op path, eagerly: a handle goes with the autograd graph that could still use it. A backward that
    reaches only the expert's parameter (torch.autograd.grad of it alone: dispatch_recv's backward never runs)
    leaves at most the live step's handle, and none once its tensors are dropped, so that a low max_live_handles
    evicts nothing of a long run; so does a graph dropped without any backward. A second backward through the
    same combine (retain_graph) raises saying so, before anything is sent, and leaves nothing behind either. An
    evicted handle's error names the limit and how to raise it."""
    import gc

    fails: list[str] = []
    buf = _buffer(world)
    try:
        bid = ops.register_buffer(buf, max_live_handles=3)
        x0, idx, w0 = _inputs(rank, world, 5, seed=3)
        # grad of p on this rank: each received row's x times the sum of its weights for experts here
        want_gp = torch.zeros(HIDDEN)
        for s in range(world):
            xs, idxs, ws = _inputs(s, world, 5, seed=3)
            here = ((idxs >= 0) & (idxs // 2 == rank)).float()
            want_gp += (xs * (ws * here).sum(1, keepdim=True)).sum(0)

        def forward() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x = x0.clone().requires_grad_()
            p = torch.linspace(0.5, 1.5, HIDDEN).requires_grad_()
            d = ops.dispatch(bid, x, idx, w0.clone().requires_grad_(), use_custom_ops=True)
            c = ops.combine(bid, d.x * p * d.topk_weights.sum(1, keepdim=True), d.handle)
            return c.x.sum(), x, p

        for step in range(8):  # past max_live_handles: a leak would evict, and raise
            loss, x, p = forward()
            (gp,) = _attempt(fails, f"step {step}: grad of p alone", torch.autograd.grad, loss, [p]) or (None,)
            _check(fails, gp is not None and torch.allclose(gp, want_gp, rtol=1e-5), f"step {step}: grad of p")
            _check(fails, ops.live_handles(bid) <= 1, f"step {step}: {ops.live_handles(bid)} live handles, want <= 1")
        del loss, x, p
        gc.collect()
        _check(fails, ops.live_handles(bid) == 0, f"parameter-only backward: {ops.live_handles(bid)} live, want 0")

        forward()  # a graph dropped without a backward
        gc.collect()
        _check(fails, ops.live_handles(bid) == 0, f"dropped graph: {ops.live_handles(bid)} live handles, want 0")

        loss, x, p = forward()
        _attempt(fails, "grad of p, retain_graph", torch.autograd.grad, loss, [p], retain_graph=True)
        try:
            torch.autograd.grad(loss, [x])
            fails.append("a second backward through the same combine did not raise")
        except RuntimeError as exc:
            _check(fails, "second backward through the same graph" in str(exc), f"second backward: {exc}")
        del loss, x, p
        gc.collect()
        _check(fails, ops.live_handles(bid) == 0, f"second backward: {ops.live_handles(bid)} live handles, want 0")

        # an evicted handle (more dispatches in flight than the limit) names the limit and how to raise it
        handles = [ops.dispatch(bid, x0, idx, w0, use_custom_ops=True).handle for _ in range(4)]
        try:
            ops.combine(bid, torch.zeros(5, HIDDEN), handles[0])  # (refused on every rank alike, before sending)
            fails.append("an evicted handle was combined")
        except RuntimeError as exc:
            msg = str(exc)
            _check(fails, "evicted" in msg and "max_live_handles = 3" in msg and "register_buffer(buf, "
                   "max_live_handles=" in msg, f"eviction error: {msg}")
        ops.release_handles(bid)
    finally:
        buf.destroy()
    return fails


def ops_zero_copy_training(rank: int, world: int) -> list[str]:
    """Eager ops under autograd on the nvshmem backend: four dispatches, each followed by its combine, whose graph
    stays alive to one backward at the end (as the MoE layers of a training step). The backward keeps a mask of its
    own, not the received topk_idx, so each dispatch's zero-copy slot is free once the caller drops the outputs:
    every dispatch is zero-copy (with two slots, the third and fourth were copied while the backward held the ids).
    Without and with ``async_finish`` (the mask made on the Buffer's stream, the event returned covering it); the
    gradients equal those of the same step with every dispatch's outputs kept alive (copied outputs from the third
    on), and x's gradient equals its closed form (every path of a token is scaled by its rank's factor)."""
    import gc

    fails: list[str] = []
    hidden, tokens = 256, 40
    buf = _buffer(world, max_tokens=64, hidden=hidden, backend="nvshmem")
    try:
        k, lo = buf._impl.kernels, buf._impl.zc_region[0]  # type: ignore[attr-defined]
        hi = buf._impl.zc_region[1]  # type: ignore[attr-defined]
        inputs = []
        for i in range(4):
            g = torch.Generator().manual_seed(100 * i + rank)
            idx = torch.stack([torch.randperm(2 * world, generator=g)[:TOPK] for _ in range(tokens)])
            idx[3, 1] = -1
            x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
            inputs.append((x.cuda(), idx.cuda(), (torch.rand(tokens, TOPK, generator=g) + 0.1).cuda()))
        scale = torch.linspace(0.5, 1.5, hidden, device="cuda")
        for async_finish in (False, True):
            grads = []
            for keep in (False, True):
                held, loss, leaves = [], torch.zeros((), device="cuda"), []
                for i, (x0, idx, w0) in enumerate(inputs):
                    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
                    leaves.append((x, w))
                    if async_finish:  # the Buffer's stream late: a mask not ordered after the dispatch reads stale ids
                        with torch.cuda.stream(buf._stream):
                            torch.cuda._sleep(20_000_000)
                    d = ops.dispatch(buf, x, idx, w, async_finish=async_finish)
                    ops.wait(d.event)
                    zc = lo <= d.x.data_ptr() < hi and lo <= d.topk_idx.data_ptr() < hi
                    _check(fails, zc == (not keep or i < 2),
                           f"async={async_finish} keep={keep}: dispatch {i} zero-copy {zc}")
                    y = (d.x.float() * scale * (rank + 1)).to(d.x.dtype)  # (the float copy is what mul saves)
                    c = ops.combine(buf, y, d.handle, async_finish=async_finish)
                    ops.wait(c.event)
                    loss = loss + c.x.float().sum() + (d.topk_weights * (i + 1)).sum()
                    if keep:
                        held.append((d.x, d.topk_idx, d.topk_weights))
                    del d, y, c
                    gc.collect()
                    if not keep:
                        _check(fails, int(k.zc_busy()) == 0,
                               f"async={async_finish}: {int(k.zc_busy())} slot(s) taken after dispatch {i}")
                loss.backward()
                grads.append([t.grad for pair in leaves for t in pair])
                del held
                gc.collect()
            for j, (a, b) in enumerate(zip(*grads, strict=True)):
                _check(fails, a is not None and b is not None and torch.equal(a, b),
                       f"async={async_finish}: gradient {j} differs between zero-copy and copied outputs")
            # x's gradient: each token's rows come back scaled by the factor (rank + 1) of every rank they reach
            # (ones of the loss, through bf16 rows: the scale's products are exact in bf16 only roughly)
            for i, (_, idx, _) in enumerate(inputs):
                gx = grads[0][2 * i]
                f = torch.zeros(tokens, device="cuda")
                for r in range(world):
                    f += (idx.div(2, rounding_mode="floor") == r).any(dim=1).float() * (r + 1)
                want = (f.unsqueeze(1) * scale).to(torch.bfloat16).float()
                _close(fails, gx.float(), want, f"async={async_finish}: dispatch {i}'s x gradient", rtol=1e-2)
        # two MoE layers of three chunks each, trained: every one of the six dispatches zero-copy
        from largeep import layers

        seen: list[bool] = []
        plain = ops.dispatch

        def watched(*args: Any, **kwargs: Any) -> ops.DispatchOutput:
            d = plain(*args, **kwargs)
            seen.append(lo <= d.x.data_ptr() < hi)
            return d

        torch.manual_seed(7)
        model = torch.nn.Sequential(*(layers.MoELayer(buf, ffn_hidden=64, dtype=torch.bfloat16, num_chunks=3)
                                      for _ in range(2))).cuda()
        ops.dispatch = watched  # type: ignore[assignment]
        try:
            out = model(inputs[0][0].clone().requires_grad_())
        finally:
            ops.dispatch = plain  # type: ignore[assignment]
        out.float().square().sum().backward()
        _check(fails, seen == [True] * 6, f"MoE layers' dispatches zero-copy: {seen}")
        torch.distributed.barrier()
    finally:
        buf.destroy()
    return fails


def ops_fp8_gpu(rank: int, world: int, backend: str) -> list[str]:
    """On CUDA: ``ops.dispatch(use_fp8=True)`` receives each row's FP8 round trip (the plain-torch reference, on the
    CPU) bit for bit, for bf16 and float32 x: in order; with ``async_finish`` (the dequantisation must come before
    the returned event), with and without grad mode; after a ``previous_event`` whose x the caller's stream writes
    late (a quantisation not ordered after that event reads stale rows); with the caller's stream busy after that
    event, with and without ``async_finish`` (a quantisation queued on the caller's stream, which the dispatch does
    not wait for, would not have run when the dispatch reads its output); and with ``num_worst_tokens``. Under grad
    mode the gradients of x and topk_weights equal those of the same dispatch without FP8 under the same
    cotangents, bit for bit (the quantisation is passed through)."""
    from reference import RankInputs, fp8_round_trip, ref_dispatch

    fails: list[str] = []
    hidden, max_tokens = 512, 48
    tokens = [40 if r != 1 else 0 for r in range(world)]
    buf = _buffer(world, max_tokens=max_tokens, hidden=hidden, backend=backend)
    # name: (x dtype, async_finish, how x is made ready, num_worst_tokens, grad mode)
    variants = {
        "in_order": (torch.bfloat16, False, None, 0, True),
        "async": (torch.bfloat16, True, None, 0, True),
        "async_no_grad": (torch.bfloat16, True, None, 0, False),
        "late_x": (torch.bfloat16, True, "late_x", 0, True),
        "busy_after": (torch.bfloat16, True, "busy_after", 0, True),
        "busy_after_in_order": (torch.bfloat16, False, "busy_after", 0, False),
        "worst": (torch.bfloat16, False, None, world * max_tokens, True),
        "float32": (torch.float32, True, "busy_after", 0, True),
    }
    try:
        for variant, (dtype, async_finish, ready, worst, grad) in variants.items():
            ins = []
            for r in range(world):
                g = torch.Generator().manual_seed(500 + r)
                idx = torch.zeros(tokens[r], TOPK, dtype=torch.int64)
                for t in range(tokens[r]):
                    idx[t] = torch.randperm(2 * world, generator=g)[:TOPK]
                if tokens[r] > 1:
                    idx[1, 0] = -1
                x = (torch.randn(tokens[r], hidden, generator=g) * 3).to(dtype)
                ins.append(RankInputs(x, idx, torch.rand(tokens[r], TOPK, generator=g) + 0.1))
            ref = ref_dispatch([RankInputs(fp8_round_trip(i.x), i.topk_idx, i.topk_weights) for i in ins], rank,
                               2 * world)
            rows = len(ref.src)
            mine = ins[rank]
            g = torch.Generator().manual_seed(900 + rank)
            cot_x = torch.randn(worst or rows, hidden, generator=g).cuda()
            cot_w = torch.randn(worst or rows, TOPK, generator=g).cuda()
            grads = []
            for use_fp8 in (True, False) if grad else (True,):
                ev = None
                if ready == "late_x":
                    x = torch.zeros(tokens[rank], hidden, dtype=dtype, device="cuda")
                    torch.cuda._sleep(50_000_000)  # the caller's stream late: x written only after this
                    x.copy_(mine.x.cuda())
                    ev = ops.capture_event(x.device)
                else:
                    x = mine.x.cuda()
                    if ready == "busy_after":
                        ev = ops.capture_event(x.device)
                        torch.cuda._sleep(50_000_000)  # the caller's stream busy after the event (experts i)
                w = mine.topk_weights.cuda()
                with torch.set_grad_enabled(grad):
                    if grad:
                        x.requires_grad_()
                        w.requires_grad_()
                    d = _attempt(fails, f"{variant} fp8={use_fp8}: dispatch", ops.dispatch, buf, x,
                                 mine.topk_idx.cuda(), w, num_worst_tokens=worst, previous_event=ev,
                                 async_finish=async_finish, use_fp8=use_fp8)
                if d is None:
                    return fails
                ops.wait(d.event)
                if use_fp8:
                    _check(fails, d.x.dtype == dtype and d.x.shape == (worst or rows, hidden),
                           f"{variant}: received x {d.x.dtype} {tuple(d.x.shape)}")
                    got = d.x[:rows].detach().cpu()
                    _check(fails, torch.equal(got, ref.x),
                           f"{variant}: {int((got != ref.x).sum())} received values are not the FP8 round trip's")
                if grad:
                    ((d.x.float() * cot_x).sum() + (d.topk_weights * cot_w).sum()).backward()
                    grads.append((x.grad, w.grad))
                else:
                    with torch.no_grad():
                        ops.combine(buf, d.x, d.handle)
            if grad:
                for name, a, b in zip(("x", "topk_weights"), grads[0], grads[1], strict=True):
                    _check(fails, a is not None and b is not None and torch.equal(a, b),
                           f"{variant}: the gradient of {name} differs from the dispatch's without FP8")
        return fails
    finally:
        buf.destroy()


def ops_fp8_strided(rank: int, world: int) -> list[str]:
    """ops.dispatch(use_fp8=True) of a transposed x (strides (1, T)) and of a view that does not start its storage:
    the same received rows as a contiguous copy's, on the eager and the custom-op path (a plain dispatch copies
    such an x; the FP8 one once sent the quantiser's strided output, which the Buffer refused naming 'x[0]')."""
    fails: list[str] = []
    hidden, tokens = 256, 6
    buf = _buffer(world, max_tokens=tokens + 2, hidden=hidden)
    try:
        g = torch.Generator().manual_seed(40 + rank)
        idx = torch.stack([torch.randperm(2 * world, generator=g)[:TOPK] for _ in range(tokens)]).to(torch.int64)
        w = torch.rand(tokens, TOPK, generator=g) + 0.1
        base = torch.randn(hidden, tokens, generator=g)
        views = {"transposed": base.t(), "offset": torch.randn(tokens + 1, hidden, generator=g)[1:]}
        for name, x in views.items():
            for custom in (False, True):
                with torch.no_grad():
                    want = ops.dispatch(buf, x.contiguous(), idx, w, use_fp8=True, use_custom_ops=custom)
                    ops.combine(buf, want.x, want.handle)
                    got = _attempt(fails, f"{name} custom={custom}", ops.dispatch, buf, x, idx, w, use_fp8=True,
                                   use_custom_ops=custom)
                    if got is None:
                        return fails
                    ops.combine(buf, got.x, got.handle)
                _check(fails, torch.equal(got.x, want.x), f"{name} custom={custom}: received rows differ")
        return fails
    finally:
        buf.destroy()


def node_partials_reference(buf: largeep.Buffer, handle: Any, rows: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain, partials): what a combine of bf16 ``rows`` [R, H] through the Buffer handle ``handle`` gives without
    and with ``bf16_partial_sums``, bf16 [T, H] on the CPU. Each node's float32 partial sum of a token's rows is a
    float32 combine of the rows with those of the other nodes' ranks zeroed (every rank calls one per node); plain
    rounds the sum of the partials to bf16 once, partials first rounds the partial of every node but this rank's to
    bf16 (the sums in float64)."""
    c = buf.ctx
    p, me = c.ranks_per_node, c.rank // c.ranks_per_node
    plain = part = None
    for node in range(c.num_ranks // p):
        keep = float(node == me)
        out = buf.combine(rows.float() * keep, handle).x.double().cpu()
        plain = out if plain is None else plain + out
        out = out if node == me else out.to(torch.bfloat16).double()
        part = out if part is None else part + out
    assert plain is not None and part is not None
    return plain.to(torch.bfloat16), part.to(torch.bfloat16)


def _bits_equal(fails: list[str], got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = got.detach().cpu()
    if got.dtype != want.dtype or got.shape != want.shape:
        fails.append(f"{what}: {got.dtype} {tuple(got.shape)}, want {want.dtype} {tuple(want.shape)}")
        return
    bad = (got.view(torch.int16) != want.view(torch.int16)).nonzero()[:4].tolist()
    if bad:
        fails.append(f"{what}: differs at {bad}: got {[got[i, j].item() for i, j in bad]}, want "
                     f"{[want[i, j].item() for i, j in bad]}")


def _differ_anywhere(differs: bool) -> bool:
    """Whether ``differs`` holds on some rank (collective)."""
    t = torch.tensor([int(differs)])
    torch.distributed.all_reduce(t)
    return int(t.item()) > 0


def ops_bf16_partial_sums(rank: int, world: int, ranks_per_node: int | None, custom: bool,
                          backend: str = "torch") -> list[str]:
    """ops.combine(bf16_partial_sums=) and ops.dispatch(bf16_partial_sums=) (whose backward is that combine of the
    received rows' gradient), bit for bit against node_partials_reference, on the eager or the custom-op path.
    The rows (and gradients) are integers of at most 7 significant bits times 1, 2 or 4, of mixed signs: every
    float32 sum here is exact, and a node's partial of two rows needs more bits than bf16 has. The two roundings
    must differ somewhere in nodes of several ranks, and nowhere with one node; the summed weights' gradient is the
    same with the flag as without. ``backend`` nvshmem: ranks sharing GPUs (gloo-cuda)."""
    from bodies import device_for

    fails: list[str] = []
    dev = device_for(backend)
    hidden, e = 16, 2 * world
    k = min(3, e)
    tokens = [6, 0, 9, 4][rank % 4]
    buf = largeep.Buffer(None, hidden=hidden, num_experts=e, num_topk=k, max_tokens_per_rank=9, backend=backend,
                         ranks_per_node=ranks_per_node)
    b: Any = ops.register_buffer(buf) if custom else buf
    try:
        g = torch.Generator().manual_seed(70 + rank)
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)] or [torch.empty(0, k)])
        idx = idx.to(torch.int64).reshape(-1, k)
        if tokens > 1:
            idx[1, 0] = -1
        x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
        w = torch.rand(tokens, k, generator=g) + 0.1
        x, idx, w = x.to(dev), idx.to(dev), w.to(dev)
        ref = buf.dispatch(x, idx, w)  # (the same routing: the same received rows, in the same order)
        r = ref.x.shape[0]

        def ints(*shape: int) -> torch.Tensor:
            v = torch.randint(-127, 128, shape, generator=g) * 2 ** torch.randint(0, 3, shape, generator=g)
            return v.to(torch.bfloat16)

        rows, grad_rows, grad_w = (t.to(dev) for t in (ints(r, hidden), ints(r, hidden), torch.rand(r, k, generator=g)))
        want = node_partials_reference(buf, ref.handle, rows)
        want_g = node_partials_reference(buf, ref.handle, grad_rows)
        wgrads = []
        for flag in (False, True):
            with torch.no_grad():
                d = ops.dispatch(b, x, idx, w, use_custom_ops=custom)
                got = _attempt(fails, f"combine, flag {flag}", ops.combine, b, rows, d.handle, bf16_partial_sums=flag)
                if got is not None:
                    _bits_equal(fails, got.x, want[flag], f"combine, bf16_partial_sums={flag}")
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            d = ops.dispatch(b, xg, idx, wg, use_custom_ops=custom, bf16_partial_sums=flag)
            ((d.x * grad_rows).sum() + (d.topk_weights * grad_w).sum()).backward()
            _bits_equal(fails, xg.grad, want_g[flag], f"dispatch backward, bf16_partial_sums={flag}")
            wgrads.append(wg.grad)
        _check(fails, all(wgr is not None for wgr in wgrads) and torch.equal(wgrads[0], wgrads[1]),
               "the weights' gradient changed with bf16_partial_sums")
        p = ranks_per_node or world
        for what, (plain, part) in (("combine", want), ("gradient", want_g)):
            differs = _differ_anywhere(not torch.equal(plain, part))
            _check(fails, differs == (1 < p < world), f"{what}: the two roundings differ: {differs}, with "
                   f"{world // p} nodes of {p} ranks")
        if custom:
            _check(fails, ops.live_handles(b) == 0, f"{ops.live_handles(b)} live handles after, want 0")
    finally:
        buf.destroy()
    return fails


def ops_strided_inputs(rank: int, world: int) -> list[str]:
    """The custom-op dispatch (eager with use_custom_ops, and compiled with fullgraph, where it is always taken) of
    a strided x (transposed, or every other row of a larger tensor), topk_idx (columns of a wider tensor) or
    topk_weights (every other column): the received x, ids and weights equal those of contiguous copies, and a
    combine of the received rows gives each token's x times the ranks it reached. The op copies them before the
    Buffer, which refuses strided tensors; a compiled caller's layer chunks are not copied before the op."""
    fails: list[str] = []
    tokens = 6
    buf = _buffer(world, max_tokens=tokens)
    try:
        bid = ops.register_buffer(buf)
        x, idx, w = _inputs(rank, world, tokens, 77)
        reached = _ranks_reached(idx, world)
        cases = {
            "x transposed": (x.t().contiguous().t(), idx, w),
            "x every other row": (torch.stack([x, torch.zeros_like(x)], 1).flatten(0, 1)[::2], idx, w),
            "topk_idx columns": (x, torch.cat([idx, torch.zeros_like(idx)], 1)[:, :TOPK], w),
            "topk_weights strided": (x, idx, torch.stack([w, torch.zeros_like(w)], 2).flatten(1)[:, ::2]),
        }

        def call(xa: torch.Tensor, ia: torch.Tensor, wa: torch.Tensor) -> tuple[torch.Tensor, ...]:
            d = ops.dispatch(bid, xa, ia, wa, use_custom_ops=True)
            return d.x, d.topk_idx, d.topk_weights, ops.combine(bid, d.x, d.handle).x

        compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
        torch._dynamo.reset()
        with torch.no_grad():
            want = call(x, idx, w)
            _check(fails, torch.allclose(want[3], x * reached, rtol=1e-6), "contiguous inputs: combine != x * ranks")
            for name, args in cases.items():
                ok = args[0].is_contiguous() and args[1].is_contiguous() and args[2].is_contiguous()
                _check(fails, not ok, f"{name}: the case's inputs are all contiguous")
                for how, fn in (("eager custom-op", call), ("compiled", compiled)):
                    got = _attempt(fails, f"{name}, {how}", fn, *args)
                    if got is None:
                        continue
                    for part, a, b in zip(("x", "topk_idx", "topk_weights", "combine"), got, want, strict=True):
                        _check(fails, torch.equal(a, b), f"{name}, {how}: received {part} differs")
        torch._dynamo.reset()
        _check(fails, ops.live_handles(bid) == 0, f"{ops.live_handles(bid)} live handles after, want 0")
    finally:
        buf.destroy()
    return fails


def ops_strided_eager(rank: int, world: int, backend: str, device: str) -> list[str]:
    """The plain eager ``ops.dispatch`` (no custom ops) of a strided x (transposed, every other row of a larger
    tensor, or on CUDA a contiguous one that starts 4 bytes into its storage), topk_idx (columns of a wider tensor),
    topk_weights (every other column), or all three: the received x, ids and weights, the combine of the received
    rows, and the gradients of x's and the weights' storage equal those of contiguous copies, bit for bit; the
    caller's tensors are unchanged. On CUDA also with ``previous_event`` (the Buffer's stream copies them after it):
    x written on the caller's stream only just before the event, then the caller's stream kept busy after it (a
    copy queued there, which the dispatch does not wait for, would not have run), with and without
    ``async_finish``. The Buffer itself refuses strided tensors; the copies are ops.dispatch's."""
    fails: list[str] = []
    tokens = 6
    dev = torch.device(device)
    buf = _buffer(world, max_tokens=tokens, backend=backend)
    try:
        x0, idx0, w0 = (t.to(dev) for t in _inputs(rank, world, tokens, 91))
        g = torch.Generator().manual_seed(300 + rank)
        cot = torch.randn(world * tokens, HIDDEN, generator=g).to(dev)
        cot_w = torch.randn(world * tokens, TOPK, generator=g).to(dev)

        def strided(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(the storage's leaf, the view of it holding t's values)"""
            if name == "transposed":
                base = t.t().contiguous().detach().requires_grad_(t.is_floating_point())
                return base, base.t()
            if name == "rows":
                base = torch.stack([t, torch.zeros_like(t)], 1).flatten(0, 1).detach()
                return base.requires_grad_(t.is_floating_point()), base[::2]
            if name == "columns":
                base = torch.stack([t, torch.zeros_like(t)], 2).flatten(1).detach()
                return base.requires_grad_(t.is_floating_point()), base[:, ::2]
            assert name == "offset"
            base = torch.cat([t.new_zeros(1), t.flatten()]).detach().requires_grad_(t.is_floating_point())
            return base, base[1:].view(t.shape)

        cases = {
            "x transposed": ("transposed", None, None),
            "x every other row": ("rows", None, None),
            "topk_idx columns": (None, "columns", None),
            "topk_weights every other column": (None, None, "columns"),
            "all three": ("rows", "columns", "columns"),
        }
        if dev.type == "cuda":
            cases["x 4 bytes into its storage"] = ("offset", None, None)

        def run(args: list[tuple[torch.Tensor, torch.Tensor]], ready: str | None, async_finish: bool) -> Any:
            (xb, xa), (_, ia), (wb, wa) = args
            ev = None
            if ready is not None:
                torch.cuda._sleep(20_000_000)  # x's values written late on the caller's stream
                with torch.no_grad():
                    keep = xa.detach().clone()
                    xb.detach().zero_()
                    torch.cuda._sleep(20_000_000)
                    xa.detach().copy_(keep)
                ev = ops.capture_event(dev)
                if ready == "busy_after":
                    torch.cuda._sleep(50_000_000)
            d = ops.dispatch(buf, xa, ia, wa, previous_event=ev, async_finish=async_finish)
            ops.wait(d.event)
            rows = d.x.shape[0]
            with torch.no_grad():
                back = ops.combine(buf, d.x, d.handle).x
            ((d.x * cot[:rows]).sum() + (d.topk_weights * cot_w[:rows]).sum()).backward()
            return (d.x.detach(), d.topk_idx, d.topk_weights.detach(), back, xb.grad, wb.grad)

        def plain() -> list[tuple[torch.Tensor, torch.Tensor]]:
            out = []
            for t in (x0, idx0, w0):
                leaf = t.clone().requires_grad_(t.is_floating_point())
                out.append((leaf, leaf))
            return out

        want = run(plain(), None, False)
        names = ("x", "topk_idx", "topk_weights", "combine", "x's gradient", "topk_weights' gradient")
        readies: list[tuple[str | None, bool]] = [(None, False)]
        if dev.type == "cuda":
            readies += [("late", True), ("busy_after", True), ("busy_after", False)]
        for case, kinds in cases.items():
            for ready, async_finish in readies:
                what = f"{case}, previous_event {ready}, async_finish={async_finish}"
                args = [strided(k, t) if k else (t.clone().requires_grad_(t.is_floating_point()),) * 2
                        for k, t in zip(kinds, (x0, idx0, w0), strict=True)]
                views = [a[1].detach().clone() for a in args]
                _check(fails, any(not a[1].is_contiguous() or a[1].data_ptr() % 16 for a in args),
                       f"{what}: the case's inputs are all contiguous and aligned")
                got = _attempt(fails, what, run, args, ready, async_finish)
                if got is None:
                    continue
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                for part, a, b, kind in zip(names, got, want, (*kinds, None, kinds[0], kinds[2]), strict=True):
                    if part.endswith("gradient") and kind is not None:
                        if kind == "transposed":
                            a = a.t()
                        elif kind == "offset":
                            a = a[1:].view(b.shape)
                        elif kind == "rows":
                            a = a[::2]
                        else:
                            a = a[:, ::2]
                    _check(fails, a is not None and b is not None and torch.equal(a, b),
                           f"{what}: {part} differs from the contiguous inputs'")
                for (_, v), before in zip(args, views, strict=True):
                    _check(fails, torch.equal(v.detach(), before), f"{what}: an input changed")
    finally:
        buf.destroy()
    return fails


def ops_eager_cotangents(rank: int, world: int, num_worst: int) -> list[str]:
    """The plain eager ``ops.dispatch`` / ``ops.combine`` (CPU, torch backend, H 128) against the loop reference:
    - num_tokens_per_expert: each local expert's received rows without ``num_worst_tokens``, None with it;
    - cotangents the Buffer would refuse as they come, which the backward must copy: the gradient of a plain sum
      of the received rows, weights and combined rows (expanded, strides (0, 0)) and a transposed one (the
      received x's gradient checked strided by a hook, so that the case is one); the grads of x, the weights and y;
    - a backward through the received weights alone (autograd hands the received x's backward zero rows in x's
      dtype), bf16 x with and without ``bf16_partial_sums`` (which combines bf16 rows only): x's grad zero in bf16,
      the weights' that of each token's expert's row;
    - ``use_fp8`` with x on another device (meta): refused naming x before anything is quantised or sent."""
    from reference import make_inputs, ref_dispatch

    fails: list[str] = []
    hidden, experts = 128, 2 * world
    tokens = [7, 4, 5, 0][:world]
    inputs = [make_inputs(17, r, tokens[r], hidden, experts, TOPK, torch.float32) for r in range(world)]
    refs = [ref_dispatch(inputs, r, experts) for r in range(world)]
    rows = [len(d.src) for d in refs]
    out_rows = [num_worst or n for n in rows]
    mine = inputs[rank]
    buf = _buffer(world, max_tokens=max(tokens), hidden=hidden)

    def each_row_of_mine() -> list[tuple[int, int, int]]:
        """(rank r, row on r, token t here) of every row that a token of this rank reaches"""
        return [(r, row, t) for r in range(world) for row, (s, t) in enumerate(refs[r].src) if s == rank]

    try:
        # the counts, and cotangents of plain sums (expanded)
        x = mine.x.clone().requires_grad_()
        w = mine.topk_weights.clone().requires_grad_()
        d = ops.dispatch(buf, x, mine.topk_idx, w, num_worst_tokens=num_worst)
        want_counts = None if num_worst else refs[rank].per_expert
        _check(fails, d.num_tokens_per_expert == want_counts,
               f"num_tokens_per_expert {d.num_tokens_per_expert}, want {want_counts}")
        seen: list[bool] = []
        d.x.register_hook(lambda g: seen.append(g.is_contiguous()))
        y = torch.randn(out_rows[rank], hidden).requires_grad_()
        c = ops.combine(buf, y, d.handle)
        _attempt(fails, "backward of plain sums", (d.x.sum() + d.topk_weights.sum() + c.x.sum()).backward)
        _check(fails, seen == [False], f"a plain sum's cotangent of the received x: contiguous {seen}")
        _close(fails, x.grad, _ranks_reached(mine.topk_idx, world).expand(-1, hidden), "plain sums: grad of x")
        _close(fails, w.grad, (mine.topk_idx >= 0).float(), "plain sums: grad of topk_weights")
        want_gy = torch.zeros(out_rows[rank], hidden)
        want_gy[:rows[rank]] = 1.0
        _close(fails, y.grad, want_gy, "plain sums: grad of y")

        # a transposed cotangent of the received x
        cots = [_draw(7, r, hidden, out_rows[r]).t() for r in range(world)]
        x = mine.x.clone().requires_grad_()
        d = ops.dispatch(buf, x, mine.topk_idx, mine.topk_weights, num_worst_tokens=num_worst)
        seen.clear()
        d.x.register_hook(lambda g: seen.append(g.is_contiguous()))
        _attempt(fails, "backward of a transposed cotangent", (d.x * cots[rank]).sum().backward)
        _check(fails, seen == [False], f"the transposed cotangent: contiguous {seen}")
        want_gx = torch.zeros(tokens[rank], hidden, dtype=torch.float64)
        for r, row, t in each_row_of_mine():
            want_gx[t] += cots[r][row].double()
        _close(fails, x.grad, want_gx, "transposed cotangent: grad of x")

        # through the received weights alone (bf16 x)
        cw = [_draw(8, r, out_rows[r], TOPK) for r in range(world)]
        want_gw = torch.zeros(tokens[rank], TOPK)
        for r, row, t in each_row_of_mine():
            for k in range(TOPK):
                if refs[r].topk_idx[row, k] >= 0:
                    want_gw[t, k] = cw[r][row, k]
        for partials in (False, True):
            what = f"weights alone, bf16 x, bf16_partial_sums={partials}"
            x = mine.x.to(torch.bfloat16).requires_grad_()
            w = mine.topk_weights.clone().requires_grad_()
            d = ops.dispatch(buf, x, mine.topk_idx, w, num_worst_tokens=num_worst, bf16_partial_sums=partials)
            _attempt(fails, what, (d.topk_weights * cw[rank]).sum().backward)
            _check(fails, x.grad is not None and x.grad.dtype == torch.bfloat16 and not x.grad.any(),
                   f"{what}: grad of x {None if x.grad is None else (x.grad.dtype, x.grad.abs().max().item())}")
            _close(fails, w.grad, want_gw, f"{what}: grad of topk_weights", rtol=0.0)

        # use_fp8 with x elsewhere: refused naming x (the same call on every rank: nothing is sent)
        try:
            ops.dispatch(buf, mine.x.to("meta"), mine.topk_idx, mine.topk_weights, use_fp8=True)
            fails.append("use_fp8 with x on the meta device: not refused")
        except largeep.ArgumentError as exc:
            _check(fails, "argument 'x'" in str(exc) and "meta" in str(exc), f"use_fp8, x on meta: {exc}")
        except Exception as exc:  # noqa: BLE001
            fails.append(f"use_fp8 with x on the meta device: {type(exc).__name__} instead of ArgumentError: {exc}")
    finally:
        buf.destroy()
    return fails


def ops_low_latency_eager_fp8(rank: int, world: int) -> list[str]:
    """The eager ``ops.low_latency_dispatch`` (no custom ops) with ``use_fp8``, with and without ``round_scale``:
    the counts and rows per local expert those of the reference, each row SPEC's FP8 quantisation of the token
    sent (``reference.fp8_check``: scales amax / 448, or with ``round_scale`` the power of two at or above it);
    then an ``ops.low_latency_combine`` of zero rows (zero output)."""
    from bodies import _ll_case
    from reference import fp8_check, ref_low_latency

    fails: list[str] = []
    experts, hidden = 2 * world, 256
    tokens = [5, 3, 4, 6][:world]
    inputs, buf = _ll_case(world, "torch", tokens, max(tokens), hidden, experts, TOPK, 23)
    try:
        mine = inputs[rank]
        ref = ref_low_latency(inputs, rank, experts)
        for round_scale in (False, True):
            what = f"round_scale={round_scale}"
            o = ops.low_latency_dispatch(buf, mine.x, mine.topk_idx, use_fp8=True, round_scale=round_scale)
            counts = o.num_tokens_per_expert.tolist()
            _check(fails, counts == [len(ref[e]) for e in range(len(ref))], f"{what}: counts {counts}")
            _check(fails, o.scales is not None, f"{what}: no scales")
            for e in range(min(len(counts), len(ref))):
                keys = [tuple(v) for v in o.src_info[e, :counts[e]].tolist()]
                if sorted(keys) != sorted(ref[e]):
                    fails.append(f"{what}: expert {e} received {sorted(keys)}, want {sorted(ref[e])}")
                    continue
                for j, key in enumerate(keys):
                    why = fp8_check(o.x[e, j], o.scales[e, j], ref[e][key], round_scale) if o.scales is not None \
                        else "no scales"
                    if why is not None:
                        fails.append(f"{what}: expert {e} row {j}: {why}")
                        break
            y = torch.zeros(o.x.shape, dtype=torch.bfloat16)
            out, hook = ops.low_latency_combine(buf, y, mine.topk_idx, mine.topk_weights, o.handle)
            _check(fails, hook is None and out.shape == mine.x.shape and not out.any(), f"{what}: combine of zeros")
    finally:
        buf.destroy()
    return fails


# ---------------------------------------------------------------------------------------------------------------
# docs/usage.md, "Your own MoE layer on largeep.ops": its recipe, run as the docs write it
# ---------------------------------------------------------------------------------------------------------------

OWN_H, OWN_F, OWN_E, OWN_K, OWN_T = 128, 32, 8, 3, 12  # H: a multiple of 128 (FP8)
OWN_CAPACITY = 5  # choices an expert keeps per rank: with T*K/E = 4.5 on average, some are dropped (-1)


def own_layer_recipe() -> dict[str, Any]:
    """The namespace of the usage.md section's code block (the first ```python block after its heading)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    section = text.split("\n# Your own MoE layer on largeep.ops\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("\n```", 1)[0]
    import sys
    import types

    # a module of its own, importable by name (torch 2.11's Dynamo imports the module of a function it inlines)
    mod = sys.modules.get("usage_recipe") or types.ModuleType("usage_recipe")
    sys.modules["usage_recipe"] = mod
    exec(compile(code, "docs/usage.md (Your own MoE layer)", "exec"), mod.__dict__)  # noqa: S102 - the docs' code
    return mod.__dict__


class _OwnRouter(torch.nn.Module):
    """A user's router: softmax top-k over a linear map, each expert keeping its first OWN_CAPACITY choices on this
    rank (the rest -1, weights left as they are)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = (x.float() @ self.w).softmax(-1)
        weights, idx = probs.topk(OWN_K, dim=-1)
        return _own_capacity(idx), weights


def _own_capacity(idx: torch.Tensor) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(idx, OWN_E).reshape(-1, OWN_E)  # entries in token order
    seen = onehot.cumsum(0).reshape(*idx.shape, OWN_E).gather(2, idx.unsqueeze(-1)).squeeze(-1)
    return torch.where(seen > OWN_CAPACITY, -1, idx)


def _own_dense(x: torch.Tensor, xe: torch.Tensor, idx: torch.Tensor, wr: torch.Tensor, w1: torch.Tensor,
               w2: torch.Tensor) -> torch.Tensor:
    """The layer over every rank's tokens in one process: sum_k p[t, idx[t, k]] * mlp_{idx[t, k]}(xe[t]) over the
    kept choices (xe: the experts' input, x or its FP8 round trip with x's gradient)."""
    probs = (x @ wr).softmax(-1)
    kept = idx >= 0
    sel = idx.clamp(min=0)
    wts = probs.gather(1, sel) * kept
    out = torch.zeros_like(xe)
    for k in range(OWN_K):
        h = torch.nn.functional.gelu(torch.einsum("th,thf->tf", xe, w1[sel[:, k]]))
        out = out + wts[:, k : k + 1] * torch.einsum("tf,tfh->th", h, w2[sel[:, k]])
    return out


def ops_own_layer(rank: int, world: int, case: str, backend: str = "torch") -> list[str]:
    """The usage.md recipe (router, dispatch, MyExperts, combine) in one of its variants: its output and the
    gradients of the input, the router and the experts against _own_dense in float64 over all ranks' tokens (on
    the CPU; the layer on ``backend``'s device)."""
    from bodies import device_for
    from largeep import fp8

    dev = device_for(backend)

    fails: list[str] = []
    ns = own_layer_recipe()
    g = torch.Generator().manual_seed(7)  # the same weights on every rank
    wr = torch.randn(OWN_H, OWN_E, generator=g) * 0.1
    w1 = torch.randn(OWN_E, OWN_H, OWN_F, generator=g) * 0.1
    w2 = torch.randn(OWN_E, OWN_F, OWN_H, generator=g) * 0.1
    per = OWN_E // world
    align = 4 if case in ("aligned", "compiled") else 1
    router = _OwnRouter(wr.clone()).to(dev)
    experts = ns["MyExperts"](w1[rank * per : (rank + 1) * per].clone(), w2[rank * per : (rank + 1) * per].clone(),
                              align=align).to(dev)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    tokens = OWN_T if rank != 1 else OWN_T - 5  # ranks with different token counts (as `counts` below)
    gx = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, OWN_H, generator=gx).to(dev, dtype).requires_grad_()
    cot = torch.randn(tokens, OWN_H, generator=gx).to(dev, dtype)
    buf = largeep.Buffer(None, hidden=OWN_H, num_experts=OWN_E, num_topk=OWN_K, max_tokens_per_rank=OWN_T,
                         backend=backend)
    kwargs: dict[str, Any] = {}
    if case == "fp8":
        kwargs["use_fp8"] = True
    if case == "worst":
        kwargs["num_worst_tokens"] = world * OWN_T
    if case == "compiled":
        fn = torch.compile(ns["my_moe"], fullgraph=True, backend="aot_eager")
        out = fn(ops.register_buffer(buf), router, experts, x)
    elif case == "async":  # the overlap pattern of the docs (on CPU the calls return finished)
        idx, w = router(x)
        d = ops.dispatch(buf, x, idx, w, async_finish=True)
        ops.wait(d.event)
        y = experts(d.x, d.topk_idx, d.topk_weights)
        c = ops.combine(buf, y, d.handle, async_finish=True)
        ops.wait(c.event)
        out = c.x
    else:
        out = ns["my_moe"](buf, router, experts, x, **kwargs)
    _check(fails, out.dtype == dtype and out.shape == x.shape, f"{case}: output {out.dtype} {tuple(out.shape)}")
    (out.float() * cot.float()).sum().backward()

    if case == "aligned":
        # the host counts of ops.dispatch(expert_alignment=...) are the aligned groups' sizes of the recipe
        idx, w = router(x.detach())
        d = ops.dispatch(buf, x.detach(), idx, w, expert_alignment=align)
        offs, _, pos, _ = ops.expert_order(d.topk_idx, per)
        ends, _ = ns["aligned"](offs, pos, align)
        sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
        _check(fails, d.num_tokens_per_expert == sizes and all(s % align == 0 for s in sizes),
               f"aligned counts {d.num_tokens_per_expert} != the recipe's groups {sizes}")
        ops.combine(buf, d.x, d.handle)
        for custom in (False, True):  # refused on every rank alike, naming the argument, on either path
            try:
                ops.dispatch(buf, x.detach(), idx, w, expert_alignment=0, use_custom_ops=custom)
                fails.append(f"expert_alignment=0 (use_custom_ops={custom}) not refused")
            except largeep.ArgumentError as exc:
                _check(fails, "expert_alignment" in str(exc), f"expert_alignment=0 refused with: {exc}")

    counts = [OWN_T if r != 1 else OWN_T - 5 for r in range(world)]

    def gather(t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of t, in rank order (each rank's count is known: counts)."""
        full = [t.new_zeros(OWN_T, *t.shape[1:]) for _ in range(world)]
        torch.distributed.all_gather(full, torch.cat([t, t.new_zeros(OWN_T - t.shape[0], *t.shape[1:])]))
        return torch.cat([f[:c] for f, c in zip(full, counts, strict=True)]).cpu()

    xs = gather(x.detach().float()).double().requires_grad_()
    idx_all = gather(router(x.detach())[0])  # each rank's choices, its capacity drops included
    ref_w = [t.double().requires_grad_() for t in (wr, w1, w2)]
    xe = xs
    if case == "fp8":
        q, s = fp8.quantize(xs.detach().float())
        xe = xs + (fp8.dequantize(q, s).double() - xs).detach()  # straight through, as the dispatch
    ref = _own_dense(xs, xe, idx_all, *ref_w)
    start = sum(counts[:rank])
    (ref * gather(cot.float()).double()).sum().backward()
    grad_router = router.w.grad.clone()
    torch.distributed.all_reduce(grad_router)  # the replicated router: its grads summed over the ranks
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4

    def close(what: str, got: torch.Tensor | None, want: torch.Tensor) -> None:
        if got is None:
            fails.append(f"{case}: {what}: no gradient")
            return
        err = float((got.double().cpu() - want).abs().max() / want.abs().max().clamp(min=1e-12))
        _check(fails, err <= tol, f"{case}: {what} rel err {err:.2e} > {tol}")

    close("output", out.detach(), ref.detach()[start : start + tokens])
    close("grad x", x.grad, xs.grad[start : start + tokens])
    close("grad router", grad_router, ref_w[0].grad)
    close("grad w1", experts.w1.grad, ref_w[1].grad[rank * per : (rank + 1) * per])
    close("grad w2", experts.w2.grad, ref_w[2].grad[rank * per : (rank + 1) * per])
    _check(fails, int((router(x.detach())[0] < 0).sum()) > 0 or rank == 1, f"{case}: the router dropped nothing")
    buf.destroy()
    return fails
