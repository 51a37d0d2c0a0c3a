"""Bodies for the GPU-only tests (NVSHMEM runtime, buffer lifetime)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import largeep
import torch
import torch.distributed as dist
from largeep import native


def _ranks_reached(idx: torch.Tensor, experts: int, world: int) -> torch.Tensor:
    """How many ranks each token goes to (float32 [T, 1]), from its expert ids alone (E/N experts per rank)."""
    epr = experts // world
    return torch.stack([((idx >= 0) & (idx // epr == r)).any(1) for r in range(world)], 1).sum(1, keepdim=True).float()


def _check_identity_combine(got: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, experts: int, world: int,
                            what: str) -> None:
    """A normal combine of the dispatched rows themselves: x[t] times the ranks t reached, one BF16 rounding of an
    exact sum, element by element."""
    want = x.float() * _ranks_reached(idx, experts, world)
    err = (got.float() - want).abs()
    assert bool((err <= 2.0**-8 * want.abs()).all()), f"{what}: combine off by up to {float(err.max()):.3g}"


def _roundtrip_small(buf: largeep.Buffer, seed: int) -> None:
    c = buf.ctx
    g = torch.Generator(device="cuda").manual_seed(seed + c.rank)
    t = 33
    x = torch.randn(t, c.hidden, device="cuda", generator=g).to(torch.bfloat16)
    idx = torch.randint(0, c.num_experts, (t, c.num_topk), device="cuda", generator=g)
    w = torch.rand(t, c.num_topk, device="cuda", generator=g)
    d = buf.dispatch(x, idx, w)
    out = buf.combine(d.x, d.handle)
    _check_identity_combine(out.x, x, idx, c.num_experts, c.num_ranks, "a small round trip")


def runtime_and_cycles(rank: int, world: int, cycles: int) -> dict[str, float]:
    torch.cuda.synchronize()
    C = native.module()
    free0 = None
    for i in range(cycles):
        buf = largeep.Buffer(None, hidden=256, num_experts=4 * world, num_topk=2, max_tokens_per_rank=64,
                             backend="nvshmem")
        assert C.initialized() and C.rank() == rank and C.num_ranks() == world
        impl = buf._impl
        peers = [C.peer_ptr(impl.base, r) for r in range(world)]
        assert all(p != 0 for p in peers), f"peer pointers {peers}"
        assert peers[rank] == impl.base
        _roundtrip_small(buf, i)
        buf.destroy()
        torch.cuda.synchronize()
        # Free memory read with every rank past its destroy (ranks sharing a GPU see each other's memory) and
        # torch's cached blocks given back: each Buffer takes its stream from torch's pool of 32, and blocks freed
        # on one stream stay cached for that stream (a 2 MiB segment per Buffer until the pool comes round; session
        # 26, r3/r4), which is torch's cache, not memory the Buffers kept.
        torch.cuda.empty_cache()
        dist.barrier()
        if i == 0:
            free0 = torch.cuda.mem_get_info()[0]
        dist.barrier()
    free1 = torch.cuda.mem_get_info()[0]
    assert free0 is not None
    leak = free0 - free1
    assert leak < 8 << 20, f"device memory fell by {leak} bytes over {cycles - 1} create/destroy cycles"
    # after destroy every call is refused
    try:
        buf.dispatch(torch.zeros(1, 256, device="cuda", dtype=torch.bfloat16), handle=None)
    except largeep.BufferDestroyedError:
        pass
    else:
        raise AssertionError("a destroyed Buffer accepted a call")
    return {"leak_bytes": float(leak)}


def second_group_refused(rank: int, world: int) -> None:
    sub = dist.new_group([0])
    if rank == 0:
        try:
            largeep.Buffer(sub, hidden=128, num_experts=4, num_topk=2, max_tokens_per_rank=8, backend="nvshmem")
        except RuntimeError as exc:
            assert "already serves" in str(exc), str(exc)
        else:
            raise AssertionError("a second NVSHMEM group was accepted")
    dist.barrier()


def _fill_static(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, experts: int, seed: int, drop: float) -> None:
    """Fresh inputs into a captured graph's static tensors: x [T, H] random, idx [T, K] K distinct random experts
    with a fraction ``drop`` of entries -1, w [T, K] random."""
    tokens, topk = idx.shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    x.copy_(torch.randn(x.shape, device="cuda", generator=g))
    chosen = torch.rand(tokens, experts, device="cuda", generator=g).topk(topk, dim=1).indices
    dropped = torch.rand(tokens, topk, device="cuda", generator=g) < drop
    idx.copy_(torch.where(dropped, -1, chosen))
    w.copy_(torch.rand(tokens, topk, device="cuda", generator=g))


def _scaled_experts(rows: torch.Tensor, rank: int) -> torch.Tensor:
    """Low-latency expert outputs that are not the identity: local expert e of ``rank`` returns its rows ``rows``
    [E/N, N*M, H] times 2 ** (global id % 3) (exact in BF16), so a row summed from the wrong expert shows."""
    epr = rows.shape[0]
    ids = rank * epr + torch.arange(epr, device=rows.device)
    return rows * torch.exp2((ids % 3).float()).to(rows.dtype).view(-1, 1, 1)


def _check_scaled_combine(got: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, what: str,
                          bf16_sums: bool = False, scaled: bool = True) -> None:
    """A low-latency combine of ``_scaled_experts``' rows against x[t] * sum over valid k of w[t, k] * 2 ** (id %
    3) (``scaled`` False: of the dispatched rows themselves, without the 2 ** (id % 3)), element by element: one
    BF16 rounding of a float32 sum (with ``bf16_sums``, also one per rank's partial sum, bounded by the terms'
    magnitudes)."""
    s = torch.where(idx >= 0, w * torch.exp2((idx.clamp_min(0) % 3).float()) if scaled else w, 0.0)
    want = x.float() * s.sum(1, keepdim=True)
    mag = x.float().abs() * s.abs().sum(1, keepdim=True)
    bound = 2.0**-8 * want.abs() + (2.0**-8 if bf16_sums else 2.0**-18) * mag
    err = (got.float() - want).abs()
    bad = err > bound
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} values off, worst {float((err - bound).max()):.3g} past the bound"
    )


def low_latency_graph(rank: int, world: int, reps: int, tokens: int, hidden: int, experts: int, topk: int,
                      weighted: bool = False, bf16_sums: bool = False) -> None:
    """Captures one low-latency dispatch + combine in a CUDA graph and replays it on fresh data (weighted: the
    dispatch carries the weights, which the replays change in place; bf16_sums: with bf16_partial_sums)."""
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=tokens,
                         backend="nvshmem", low_latency=True)
    try:
        x = torch.empty(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        idx = torch.empty(tokens, topk, device="cuda", dtype=torch.int64)
        w = torch.empty(tokens, topk, device="cuda", dtype=torch.float32)

        def fill(rep: int) -> None:
            _fill_static(x, idx, w, experts, rep * 1009 + rank, 0.1)

        fill(0)
        # one call outside the graph, then capture
        sent = w if weighted else None
        d = buf.low_latency_dispatch(x, idx, use_fp8=False, topk_weights=sent, bf16_partial_sums=bf16_sums)
        buf.low_latency_combine(d.x, idx, w, d.handle)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            d = buf.low_latency_dispatch(x, idx, use_fp8=False, topk_weights=sent, bf16_partial_sums=bf16_sums)
            assert isinstance(d.x, torch.Tensor)
            c = buf.low_latency_combine(_scaled_experts(d.x, rank), idx, w, d.handle)
        epr = experts // world
        for rep in range(1, reps + 1):
            fill(rep)
            dist.barrier()
            graph.replay()
            torch.cuda.synchronize()
            _check_scaled_combine(c.x, x, idx, w, f"replay {rep}", bf16_sums)
            every = [torch.empty_like(idx) for _ in range(world)]
            dist.all_gather(every, idx)
            allidx = torch.cat(every)
            want_counts = [int(((allidx == rank * epr + e).sum()).item()) for e in range(epr)]
            got_counts = d.num_tokens_per_expert.cpu().tolist()
            assert got_counts == want_counts, f"replay {rep}: counts {got_counts} != {want_counts}"
    finally:
        buf.destroy()


def low_latency_hook_capture(rank: int, world: int) -> None:
    """A receive hook runs where its send was made: an eager call's hook called inside a CUDA graph capture, and a
    captured call's hook called after the capture, raise ArgumentError naming the op (nothing runs or is captured);
    the eager hook then works where it belongs, its results right."""
    from largeep.errors import ArgumentError

    tokens, hidden, experts, topk = 8, 256, 8 * world, 2
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=tokens,
                         backend="nvshmem", low_latency=True)
    try:
        x = torch.empty(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        idx = torch.empty(tokens, topk, device="cuda", dtype=torch.int64)
        w = torch.empty(tokens, topk, device="cuda", dtype=torch.float32)
        _fill_static(x, idx, w, experts, 7 + rank, 0.1)
        want = buf.low_latency_dispatch(x, idx, use_fp8=False)
        want_counts = want.num_tokens_per_expert.clone()
        d = buf.low_latency_dispatch(x, idx, use_fp8=False, return_recv_hook=True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            try:
                d.hook()
                raise AssertionError("an eager call's hook ran inside a capture")
            except ArgumentError as exc:
                assert "low_latency_dispatch" in str(exc) and "made outside a CUDA graph capture" in str(exc), exc
            y = x.mul(2)  # (something to capture)
        del y
        d.hook()  # where it belongs: the receive runs now
        torch.cuda.synchronize()
        assert torch.equal(d.num_tokens_per_expert, want_counts), "the eager hook's counts differ"
        graph2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph2):
            d2 = buf.low_latency_dispatch(x, idx, use_fp8=False, return_recv_hook=True)
        try:
            d2.hook()
            raise AssertionError("a captured call's hook ran eagerly")
        except ArgumentError as exc:
            assert "made inside a CUDA graph capture" in str(exc), exc
        torch.cuda.synchronize()
        del graph2, d2  # never replayed
    finally:
        buf.destroy()


def normal_worst_graph(rank: int, world: int, reps: int, tokens: int, hidden: int, experts: int, topk: int,
                       backend: str = "nvshmem") -> None:
    """A normal-mode dispatch with ``num_worst_tokens`` (no host wait) and its combine, captured in one CUDA graph
    and replayed on fresh routing: every replay gives the reference's rows, ids and weights (and the eager call's
    outputs on the same inputs, the combine bit for bit), and the combine is each token times the number of ranks
    it went to (an expert that returns its input), element by element."""
    from reference import RankInputs, ref_dispatch

    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=tokens,
                         backend=backend)
    try:
        worst = tokens * world
        x = torch.empty(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        idx = torch.empty(tokens, topk, device="cuda", dtype=torch.int64)
        w = torch.empty(tokens, topk, device="cuda", dtype=torch.float32)
        epr = experts // world

        def fill(rep: int) -> None:
            _fill_static(x, idx, w, experts, rep * 1013 + rank, 0.2)

        def step() -> tuple[torch.Tensor, ...]:
            d = buf.dispatch(x, idx, w, num_worst_tokens=worst)
            c = buf.combine(d.x, d.handle, topk_weights=d.topk_weights)
            assert d.topk_idx is not None and d.topk_weights is not None and c.topk_weights is not None
            return d.x, d.topk_idx, d.topk_weights, c.x, c.topk_weights

        fill(0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph wants
            step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step()
        for rep in range(1, reps + 1):
            fill(rep)
            dist.barrier()
            graph.replay()
            torch.cuda.synchronize()
            got = [t.clone() for t in outs]
            dist.barrier()
            want = step()
            torch.cuda.synchronize()
            every = [torch.empty_like(idx) for _ in range(world)]
            dist.all_gather(every, idx)
            n_rows = sum(int(((e >= rank * epr) & (e < (rank + 1) * epr)).any(1).sum()) for e in every)
            assert n_rows <= worst and got[0].shape[0] == worst
            xs, ws = [torch.empty_like(x) for _ in range(world)], [torch.empty_like(w) for _ in range(world)]
            dist.all_gather(xs, x)
            dist.all_gather(ws, w)
            ref = ref_dispatch([RankInputs(xs[r].cpu(), every[r].cpu(), ws[r].cpu()) for r in range(world)], rank,
                               experts)
            assert len(ref.src) == n_rows
            assert torch.equal(got[0][:n_rows].cpu(), ref.x), f"replay {rep}: rows differ from the reference"
            assert torch.equal(got[1][:n_rows].cpu(), ref.topk_idx), f"replay {rep}: ids differ from the reference"
            assert torch.equal(got[2][:n_rows].cpu(), ref.topk_weights), f"replay {rep}: weights differ"
            assert (got[1][n_rows:] == -1).all(), f"replay {rep}: rows past the {n_rows} received name an expert"
            assert torch.equal(got[1], want[1]), f"replay {rep}: received ids differ from the eager call's"
            assert torch.equal(got[0][:n_rows], want[0][:n_rows]), f"replay {rep}: received rows differ"
            assert torch.equal(got[2][:n_rows], want[2][:n_rows]), f"replay {rep}: received weights differ"
            assert torch.equal(got[3], want[3]) and torch.equal(got[4], want[4]), f"replay {rep}: combine differs"
            # independent reference: each token comes back once from every rank it went to
            valid = idx >= 0
            ranks = torch.stack([(valid & (idx // epr == r)).any(1) for r in range(world)], dim=1)
            _check_identity_combine(got[3], x, idx, experts, world, f"replay {rep}")
            ref_w = torch.zeros(tokens, topk, device="cuda")
            for r in range(world):  # the weights come back summed over the ranks holding each token
                ref_w += torch.where(ranks[:, r:r + 1], torch.where(valid & (idx // epr == r), w, 0.0), 0.0)
            assert (got[4] - ref_w).abs().max() <= 1e-6, (
                f"replay {rep}: combined weights off by {(got[4] - ref_w).abs().max().item()}"
            )
    finally:
        buf.destroy()


def low_latency_two_in_flight(rank: int, world: int, tokens: int, hidden: int, experts: int, topk: int) -> None:
    """Two dispatches with receive hooks in flight, completed in order; then two combines likewise."""
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=tokens,
                         backend="nvshmem", low_latency=True)
    try:
        outs = []
        ins = []
        for b in range(2):
            g = torch.Generator(device="cuda").manual_seed(77 + 13 * b + rank)
            x = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
            idx = torch.rand(tokens, experts, device="cuda", generator=g).topk(topk, dim=1).indices
            w = torch.rand(tokens, topk, device="cuda", generator=g)
            ins.append((x, idx, w))
            outs.append(buf.low_latency_dispatch(x, idx, use_fp8=False, return_recv_hook=True))
        for d in outs:
            d.hook()
        combs = [
            buf.low_latency_combine(_scaled_experts(d.x, rank), i[1], i[2], d.handle, return_recv_hook=True)
            for d, i in zip(outs, ins, strict=True)
        ]
        for c in combs:
            c.hook()
        for b, (c, (x, idx, w)) in enumerate(zip(combs, ins, strict=True)):
            _check_scaled_combine(c.x, x, idx, w, f"micro-batch {b}")
    finally:
        buf.destroy()


def worst_too_small(rank: int, world: int) -> None:
    """A num_worst_tokens dispatch that receives more rows than num_worst_tokens on every rank: the copy-out copies
    nothing (its loops are bounded by the output's rows in any case) and the next call on the Buffer raises, naming
    num_worst_tokens, before launching anything. Written for 2 ranks (every rank must overflow, or the others would
    wait in combine for the ranks that refuse it)."""
    assert world == 2, world
    buf = largeep.Buffer(None, hidden=256, num_experts=2 * world, num_topk=2, max_tokens_per_rank=16,
                         backend="nvshmem")
    try:
        t = 16
        x = torch.randn(t, 256, device="cuda").to(torch.bfloat16)
        # every token names expert 0 (rank 0) and expert 2 (rank 1): on 2 ranks each receives 16 rows per source
        idx = torch.tensor([[0, 2]] * t, dtype=torch.int64, device="cuda")
        w = torch.rand(t, 2, device="cuda")
        d = buf.dispatch(x, idx, w, num_worst_tokens=4)
        torch.cuda.synchronize()
        assert d.x.shape[0] == 4
        try:
            buf.combine(d.x, d.handle)
        except RuntimeError as exc:
            assert "num_worst_tokens" in str(exc), str(exc)
        else:
            raise AssertionError("combine after an overflowing num_worst_tokens dispatch did not raise")
    finally:
        buf.destroy()


def _bounded_buffer(world: int, timeout_s: float, **kwargs: Any) -> largeep.Buffer:
    """A small nvshmem Buffer (hidden 1024, 4 experts per rank, top-2, 64 tokens) whose waits give up after
    ``timeout_s`` (LARGEEP_TIMEOUT_S is read when a Buffer is made)."""
    import os

    os.environ["LARGEEP_TIMEOUT_S"] = str(timeout_s)
    try:
        return largeep.Buffer(None, hidden=1024, num_experts=4 * world, num_topk=2, max_tokens_per_rank=64,
                              backend="nvshmem", **kwargs)
    finally:
        del os.environ["LARGEEP_TIMEOUT_S"]


def _bounded_dispatch(buf: largeep.Buffer, world: int, low_latency: bool) -> Callable[[], None]:
    """A dispatch of 64 tokens on a ``_bounded_buffer`` (low-latency: BF16, without weights)."""
    x = torch.randn(64, 1024, device="cuda").to(torch.bfloat16)
    idx = torch.arange(64 * 2, device="cuda").view(64, 2) % (4 * world)
    w = torch.rand(64, 2, device="cuda")
    if low_latency:
        return lambda: buf.low_latency_dispatch(x, idx, use_fp8=False)
    return lambda: buf.dispatch(x, idx, w)


def missing_peer(rank: int, world: int, timeout_s: float, low_latency: bool = False) -> dict[str, float]:
    """Rank 1 never calls dispatch: every other rank must raise PeerTimeoutError naming rank 1 within the bound.
    low_latency: low_latency_dispatch, which has no host wait: the others' receive kernels give up after the bound,
    and their next call raises PeerTimeoutError naming rank 1 at once."""
    import time

    buf = _bounded_buffer(world, timeout_s, low_latency=low_latency)
    op = "low_latency_dispatch" if low_latency else "dispatch"
    elapsed = 0.0
    try:
        if rank != 1:
            call = _bounded_dispatch(buf, world, low_latency)
            start = time.monotonic()
            if low_latency:
                call()
                torch.cuda.synchronize()  # (the receive kernel waits for rank 1's rows until it gives up)
                elapsed = time.monotonic() - start
                assert elapsed > timeout_s - 1.0, f"gave up after {elapsed:.1f} s, bound {timeout_s} s"
            else:
                try:
                    call()
                except largeep.PeerTimeoutError as exc:
                    elapsed = time.monotonic() - start
                    assert "rank 1" in str(exc) and op in str(exc), str(exc)
                else:
                    raise AssertionError(f"{op} returned although rank 1 never called it")
            assert elapsed < timeout_s + 10, f"gave up after {elapsed:.1f} s, bound {timeout_s} s"
            # the Buffer refuses further work at once instead of waiting again
            start = time.monotonic()
            try:
                call()
            except largeep.PeerTimeoutError as exc:
                assert time.monotonic() - start < 1.0
                if low_latency:
                    assert "rank 1" in str(exc) and op in str(exc), str(exc)
            else:
                raise AssertionError(f"a failed Buffer accepted another {op}")
    finally:
        # Teardown is collective: rank 1 waits (outside NVSHMEM) until the others have seen their call fail, else
        # its bounded destroy could give up on them while they are still inside it.
        _progress(rank, "before the teardown barrier")
        dist.barrier()
        _progress(rank, "destroying")
        buf.destroy()
        _progress(rank, "destroyed")
    return {"elapsed_s": elapsed}


def parts_on_buffer_stream(rank: int, world: int, low_latency: bool) -> None:
    """The tensors a Buffer's kernels keep using (peer_base, seq, counters, error_word, layout_scratch, and
    prep_scratch in normal mode) are allocated on the Buffer's stream, not the caller's: a Buffer dropped without
    destroy() gives their blocks back to the pool of the stream its kernels run on. Read from torch's allocator
    snapshot (each segment's stream)."""
    buf = largeep.Buffer(None, hidden=256, num_experts=4 * world, num_topk=2, max_tokens_per_rank=64,
                         backend="nvshmem", low_latency=low_latency)
    try:
        assert buf.stream is not None
        want = int(buf.stream.cuda_stream)
        assert want != int(torch.cuda.current_stream().cuda_stream)
        impl = buf._impl  # type: ignore[attr-defined]
        names = ["peer_base", "seq", "counters", "error_word", "layout_scratch"] + ([] if low_latency else
                                                                                    ["prep_scratch"])
        segments = torch.cuda.memory_snapshot()
        for name in names:
            ptr = getattr(impl, name).data_ptr()
            seg = next((g for g in segments if g["address"] <= ptr < g["address"] + g["total_size"]), None)
            assert seg is not None, f"{name}: no allocator segment holds it"
            assert int(seg["stream"]) == want, f"{name} was allocated on stream {seg['stream']}, not the Buffer's"
        dist.barrier()
    finally:
        buf.destroy()


def failed_count_wait_frees_memory(rank: int, world: int, timeout_s: float) -> dict[str, float]:
    """Rank 1 never calls dispatch: rank 0's fresh dispatch, which took a zero-copy slot, fails at its count wait
    (PeerTimeoutError). It gives the slot back (no outputs hold it: zc_busy and zc_held 0), so destroy frees the
    symmetric memory on every rank (no rank votes to keep it; the heap accounting drops by the Buffer's bytes)
    instead of keeping it with a warning that outputs are alive."""
    from largeep.backends import nvshmem_backend as nb

    buf = _bounded_buffer(world, timeout_s)
    impl = buf._impl  # type: ignore[attr-defined]
    assert impl.zc_slots > 0, "needs zero-copy slots (LARGEEP_ZERO_COPY_SLOTS)"
    live = nb._heap["live"]
    try:
        if rank == 0:
            try:
                _bounded_dispatch(buf, world, False)()
            except largeep.PeerTimeoutError as exc:
                assert "rank 1" in str(exc), str(exc)
            else:
                raise AssertionError("dispatch returned although rank 1 never called it")
            busy, held = int(impl.kernels.zc_busy()), int(impl.kernels.zc_held())
            assert busy == 0 and held == 0, f"after the failed count wait: {busy} slot(s) taken, {held} held"
    finally:
        _progress(rank, "before the teardown barrier")
        dist.barrier()
        buf.destroy()
    after = nb._heap["live"]
    assert after == live - impl.heap_bytes, f"destroy kept the memory: heap live {live} -> {after}"
    return {"freed": float(live - after)}


def host_wait_sees_cuda_fault(rank: int, world: int, timeout_s: float) -> dict[str, float]:
    """A kernel queued before a fresh dispatch's count exchange faults (a device-side assert on the caller's stream,
    after ~50 ms of sleep, so the dispatch is queued behind it and its host already waits): the host wait sees the
    CUDA error (it asks the stream once a millisecond) and raises RuntimeError naming it, within about a second, not
    PeerTimeoutError blaming a peer after LARGEEP_TIMEOUT_S and the grace. One rank; the process's CUDA context is
    unusable afterwards (a pool of its own; no destroy)."""
    import time

    buf = _bounded_buffer(world, timeout_s)
    x = torch.randn(64, 1024, device="cuda").to(torch.bfloat16)
    idx = torch.arange(64 * 2, device="cuda").view(64, 2) % (4 * world)
    w = torch.rand(64, 2, device="cuda")
    small = torch.zeros(4, device="cuda")
    outside = torch.full((1,), 1000, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # ~50 ms
    _ = small[outside]  # (torch's index kernel asserts on the device: cudaErrorAssert, sticky)
    start = time.monotonic()
    try:
        buf.dispatch(x, idx, w)
    except largeep.PeerTimeoutError as exc:
        raise AssertionError(f"a CUDA fault was reported as a peer timeout: {exc}") from None
    except RuntimeError as exc:
        elapsed = time.monotonic() - start
        msg = str(exc)
        assert "host waited for the count exchange" in msg and "cudaErrorAssert" in msg, msg
    else:
        raise AssertionError("dispatch returned although a kernel before it faulted")
    assert elapsed < 2.0, f"the fault was reported after {elapsed:.2f} s"
    return {"elapsed_s": elapsed}


def outputs_out_of_memory(rank: int, world: int, where: str) -> None:
    """Rank 1's dispatch runs out of memory after its sends are queued and before its copy-out (an error injected
    where its outputs are made): ``planes``, the zero-copy slot's planes (the slot taken and its planes made);
    ``state``, the handle's arrays while a zero-copy slot is taken and has no planes yet (the slot must be given
    back); ``worst``, the copy slot's outputs of a num_worst_tokens dispatch. Rank 1 raises that error and drains
    the round, holding no zero-copy slot afterwards; the other ranks' call returns rank 1's rows (which they do not
    combine: rank 1 has no handle), and every rank's next two dispatches (rank 1's with its memory back) receive
    exactly the rows routed to them, into zero-copy slots where they may, and their combines are right: the
    Buffers stay in step."""
    import gc

    buf = largeep.Buffer(None, hidden=1024, num_experts=4 * world, num_topk=2, max_tokens_per_rank=64,
                         backend="nvshmem")
    worst = where == "worst"
    rows_worst = world * 64 + 9  # a row count no other allocation of the call has
    t = 64
    # row t of rank r: channel 0 holds t, channel 1 holds r (exact in bf16), so each received row names its source
    x = torch.zeros(t, 1024, device="cuda")
    x[:, 0] = torch.arange(t, device="cuda")
    x[:, 1] = rank
    x = x.to(torch.bfloat16)
    idx = torch.arange(t * 2, device="cuda").view(t, 2) % (4 * world)  # (every rank routes alike)
    w = torch.rand(t, 2, device="cuda")
    kw = {"num_worst_tokens": rows_worst} if worst else {}
    mine = [tok for tok in range(t) if bool((idx[tok] // 4 == rank).any())]
    want = sorted((s, tok) for s in range(world) for tok in mine)
    kernels = buf._impl.kernels

    def check(d: Any) -> None:
        rows = len(want)
        assert d.x.shape[0] == (rows_worst if worst else rows), (d.x.shape, rows)
        got = sorted((int(r[1]), int(r[0])) for r in d.x[:rows, :2].float().tolist())
        assert got == want, f"rank {rank} received {got[:6]}..., expected {want[:6]}..."
        if worst:
            assert bool((d.topk_idx[rows:] == -1).all()), "the num_worst_tokens tail names no expert"

    try:
        if rank == 1:
            name = "from_dlpack" if where == "planes" else "empty"
            real = getattr(torch, name)
            shape = {"planes": None, "state": (len(want), 2), "worst": (rows_worst, 1024)}[where]

            def failing(*args: object, **kwargs: object) -> object:
                if shape is None or args == shape:
                    raise torch.OutOfMemoryError("injected: no memory for the dispatch outputs")
                return real(*args, **kwargs)

            setattr(torch, name, failing)
            try:
                buf.dispatch(x, idx, w, **kw)
            except torch.OutOfMemoryError as exc:
                assert "injected" in str(exc), str(exc)
            else:
                raise AssertionError("the injected error did not reach the caller")
            finally:
                setattr(torch, name, real)
            gc.collect()
            assert kernels.zc_busy() == 0, f"{kernels.zc_busy()} zero-copy slot(s) still taken after the error"
        else:
            check(buf.dispatch(x, idx, w, **kw))
        torch.cuda.synchronize()
        held = []
        for _ in range(2):  # (both held: the second receives into the other slot, if not worst)
            d = buf.dispatch(x, idx, w, **kw)
            check(d)
            out = buf.combine(d.x, d.handle)
            torch.cuda.synchronize()
            reached = (idx // 4).unsqueeze(2) == torch.arange(world, device="cuda")  # [t, 2, world]
            n_ranks = reached.any(1).sum(1).float()
            assert torch.equal(out.x[:, 0].float(), n_ranks * torch.arange(t, device="cuda").float()), \
                f"rank {rank}: the combine after the drained round is wrong"
            held.append(d)
        assert kernels.zc_busy() == (0 if worst else 2), f"{kernels.zc_busy()} zero-copy slots taken"
        del held, d, out
    finally:
        dist.barrier()
        buf.destroy()


def _raises_injected(buf: largeep.Buffer, method: str, what: str, call: Any) -> None:
    """Runs ``call()`` with the nvshmem Buffer's native ``method`` failing as a failed launch would (RuntimeError
    "injected: WHAT"), and asserts that error reaches the caller; the Buffer's kernels are restored after."""
    impl = buf._impl  # type: ignore[attr-defined]
    real = impl.kernels

    class Failing:
        def __getattr__(self, name: str) -> Any:
            if name != method:
                return getattr(real, name)

            def fail(*args: object) -> None:
                raise RuntimeError(f"injected: {what}")

            return fail

    impl.kernels = Failing()
    try:
        call()
    except RuntimeError as exc:
        assert "injected" in str(exc), str(exc)
    else:
        raise AssertionError("the injected error did not reach the caller")
    finally:
        impl.kernels = real


def failed_copyout_launch(rank: int, world: int, timeout_s: float) -> dict[str, float]:
    """Rank 1's dispatch raises between queuing its sends and queuing its copy-out, in a way it cannot drain (the
    copy-out's launch itself fails: injected). Rank 1 raises that error, and its next call RuntimeError at once
    naming it (the Buffer unusable: its round is open); the other ranks' call returns (rank 1's rows were sent)
    and their next one raises PeerTimeoutError naming rank 1 within the bound instead of reading a stale round."""
    import time

    buf = _bounded_buffer(world, timeout_s)
    x = torch.randn(64, 1024, device="cuda").to(torch.bfloat16)
    idx = torch.arange(64 * 2, device="cuda").view(64, 2) % (4 * world)
    w = torch.rand(64, 2, device="cuda")
    elapsed = 0.0
    try:
        if rank == 1:
            _raises_injected(buf, "copyout", "the copy-out's launch failed", lambda: buf.dispatch(x, idx, w))
            start = time.monotonic()
            try:
                buf.dispatch(x, idx, w)
            except RuntimeError as exc:
                assert time.monotonic() - start < 1.0
                assert "unusable" in str(exc) and "the copy-out's launch failed" in str(exc), str(exc)
            else:
                raise AssertionError("a Buffer with an open round accepted another dispatch")
        else:
            d = buf.dispatch(x, idx, w)
            torch.cuda.synchronize()
            rows = world * int((idx // 4 == rank).any(1).sum())  # (every rank routes alike: 4 experts per rank)
            assert rows > 0 and d.x.shape[0] == rows, (d.x.shape, rows)
            start = time.monotonic()
            try:
                buf.dispatch(x, idx, w)
            except largeep.PeerTimeoutError as exc:
                elapsed = time.monotonic() - start
                assert "rank 1" in str(exc), str(exc)
            else:
                raise AssertionError("dispatch returned although rank 1's round is open")
            assert elapsed < timeout_s + 10, f"gave up after {elapsed:.1f} s, bound {timeout_s} s"
    finally:
        _progress(rank, "before the teardown barrier")
        dist.barrier()
        buf.destroy()
    return {"elapsed_s": elapsed}


def failed_reduce_launch(rank: int, world: int, timeout_s: float) -> None:
    """With the combine in push + reduce (run under LARGEEP_TUNE comb=0), rank 1's combine raises between queuing its
    push and its reduce (the reduce's launch fails: injected). Rank 1 raises that error, and its next call (a
    dispatch) RuntimeError at once naming it (the Buffer unusable: its round is open; before, its next combine
    summed the peers' rows of the round before, silently); the other ranks' combine returns the right sums (rank
    1's push was queued)."""
    buf = _bounded_buffer(world, timeout_s)
    x = torch.randn(64, 1024, device="cuda").to(torch.bfloat16)
    idx = torch.arange(64 * 2, device="cuda").view(64, 2) % (4 * world)
    w = torch.rand(64, 2, device="cuda")
    try:
        assert buf._impl.fused_combine == 0  # type: ignore[attr-defined]
        d = buf.dispatch(x, idx, w)
        if rank == 1:
            _raises_injected(buf, "combine_reduce", "the reduce's launch failed", lambda: buf.combine(d.x, d.handle))
            try:
                buf.dispatch(x, idx, w)
            except RuntimeError as exc:
                msg = str(exc)
                assert "unusable" in msg and "before its reduce" in msg and "the reduce's launch" in msg, msg
            else:
                raise AssertionError("a Buffer with an open combine round accepted another call")
        else:
            out = buf.combine(d.x, d.handle).x
            ranks = torch.zeros(64, world, device="cuda").scatter_(1, idx // 4, 1.0).sum(1, keepdim=True)
            torch.cuda.synchronize()
            assert torch.allclose(out.float(), x.float() * ranks, rtol=2e-2, atol=2e-2)
    finally:
        _progress(rank, "before the teardown barrier")
        dist.barrier()
        buf.destroy()


def kinds_disagree(rank: int, world: int, variant: str) -> None:
    """Ranks whose fresh dispatches send different kinds of rows: the round is void on every rank.
    ``dtype``: rank 0 float32, the others bfloat16; ``fp8``: rank 1 the FP8 pair, the others bfloat16; every rank
    raises ArgumentError naming each rank's kind, and the next good dispatch receives exactly the rows routed to
    it. ``no_wait``: rank 1 float32 with num_worst_tokens (no host wait): the waiting ranks raise ArgumentError
    naming each rank's kind and rank 1 as unable to raise; rank 1's call returns outputs of no rows (ids -1) and its
    next call raises RuntimeError naming the rank whose kind differed, its Buffer unusable."""
    from largeep import fp8

    buf = largeep.Buffer(None, hidden=1024, num_experts=4 * world, num_topk=2, max_tokens_per_rank=64,
                         backend="nvshmem")
    try:
        x = torch.randn(64, 1024, device="cuda").to(torch.bfloat16)
        idx = torch.arange(64 * 2, device="cuda").view(64, 2) % (4 * world)
        w = torch.rand(64, 2, device="cuda")
        kinds = ["x torch.bfloat16"] * world
        if variant == "no_wait" and rank == 1:
            d = buf.dispatch(x.float(), idx, w, num_worst_tokens=world * 64)
            torch.cuda.synchronize()
            assert bool((d.topk_idx == -1).all()), "the void round's outputs name no expert"
            try:
                buf.dispatch(x, idx, w)
            except RuntimeError as exc:
                assert "rank 0 sent another kind of rows" in str(exc) and "unusable" in str(exc), str(exc)
            else:
                raise AssertionError("the Buffer of a rank that could not raise took another call")
            return
        mine: Any = x
        if variant in ("dtype", "no_wait"):
            who = 0 if variant == "dtype" else 1
            kinds[who] = "x torch.float32"
            mine = x.float() if rank == who else x
        elif variant == "fp8":
            kinds[1] = "x torch.float8_e4m3fn, FP8 scales"
            mine = fp8.quantize(x.float()) if rank == 1 else x
        try:
            buf.dispatch(mine, idx, w)
        except largeep.ArgumentError as exc:
            msg = str(exc)
            assert "disagree" in msg and all(f"rank {r}: {k}" in msg for r, k in enumerate(kinds)), msg
            if variant == "no_wait":
                assert "rank(s) [1] ran the call with num_worst_tokens" in msg, msg
            else:
                assert "stays usable" in msg, msg
        else:
            raise AssertionError(f"ranks that disagree on the kind of rows were not refused ({variant})")
        if variant != "no_wait":
            d = buf.dispatch(x, idx, w)
            rows = world * int((idx // 4 == rank).any(1).sum())
            assert d.x.shape[0] == rows, (d.x.shape, rows)
            out = buf.combine(d.x, d.handle)
            reached = ((idx // 4).unsqueeze(2) == torch.arange(world, device="cuda")).any(1).sum(1, keepdim=True)
            torch.testing.assert_close(out.x.float(), (x.float() * reached).to(torch.bfloat16).float())
    finally:
        dist.barrier()
        buf.destroy()


def late_peer(rank: int, world: int, timeout_s: float, ranks_per_node: int | None) -> dict[str, float]:
    """Rank 1 comes more than LARGEEP_TIMEOUT_S late to a cached dispatch and its combine, which rank 0 queues
    back to back (no host wait between them). Rank 0's dispatch times out waiting for rank 1's rows and its combine
    then skips its work: it must not tell rank 1 that its partial sums are in place, or rank 1 would sum what its
    slots held from the round before. Rank 1's dispatch gets rank 0's rows (sent before rank 0 gave up); its
    combine must time out naming rank 0 (its next call raises PeerTimeoutError), not return the earlier round's
    sums. Each round's x differs, so stale sums would show."""
    import time

    buf = _bounded_buffer(world, timeout_s, ranks_per_node=ranks_per_node)
    t = 64
    idx = torch.arange(t * 2, device="cuda").view(t, 2) % (4 * world)
    w = torch.rand(t, 2, device="cuda")
    reached = ((idx // 4).unsqueeze(2) == torch.arange(world, device="cuda")).any(1).sum(1).float()
    times: dict[str, float] = {}
    try:
        x1 = torch.full((t, 1024), 1.0, device="cuda").to(torch.bfloat16)
        d = buf.dispatch(x1, idx, w)
        out = buf.combine(d.x, d.handle)
        torch.cuda.synchronize()
        assert torch.equal(out.x[:, 0].float(), reached), "the first round's combine is wrong"
        x2 = torch.full((t, 1024), 2.0, device="cuda").to(torch.bfloat16)
        if rank == 1:
            time.sleep(timeout_s + 3.0)
        start = time.monotonic()
        d2 = buf.dispatch(x2, handle=d.handle)
        out2 = buf.combine(d2.x, d.handle)
        torch.cuda.synchronize()
        times["elapsed_s"] = time.monotonic() - start
        other = 1 - rank if world == 2 else None
        try:
            buf.dispatch(x2, handle=d.handle)
        except largeep.PeerTimeoutError as exc:
            assert other is None or f"rank {other}" in str(exc), str(exc)
        else:
            same = torch.equal(out2.x[:, 0].float(), 2 * reached)
            raise AssertionError(f"rank {rank}: the round after a peer timed out returned ("
                                 f"{'right' if same else 'stale'} sums) and the next call did not raise")
    finally:
        dist.barrier()
        buf.destroy()
    return times


def _raised_not_timeout(call: Callable[[], Any], rank: int, after: str) -> str:
    """The message of the RuntimeError that ``call`` (the call after ``after``) must raise: not a timeout (the
    kernels found what differs), and not nothing."""
    try:
        call()
    except largeep.PeerTimeoutError as exc:
        raise AssertionError(f"rank {rank}: the call after {after} timed out instead: {exc}") from None
    except RuntimeError as exc:
        return str(exc)
    raise AssertionError(f"rank {rank}: the call after {after} did not raise")


def calls_kinds_disagree(rank: int, world: int, variant: str, ranks_per_node: int | None) -> None:
    """Ranks that pass different calls where no count exchange compares them, on the nvshmem backend: a cached
    dispatch (``fp8``: rank 0 the FP8 pair, the others bf16; ``dtype``: rank 0 float32) or a combine (``y_dtype``:
    rank 0's y float32, the others bf16; ``weights``: topk_weights on rank 0 only; ``partials``: bf16_partial_sums
    on rank 0 only, in groups of several nodes), or either with the handle of an
    earlier dispatch of the same routing on rank 0 (``handle_dispatch``, ``handle_combine``), on a routing where
    every rank gets rows from every rank. Each sender's data flag carries its kind of rows and its handle's tag,
    which the receivers compare with theirs: every rank's next call raises RuntimeError naming what differs and a
    rank that sent it, or a forwarder that found it (before, the rows were read as the receiver's: wrong rows,
    silently). First, a round of one kind on every rank must pass unreported, rank 1 with no tokens (its FP8 scales
    and weights empty tensors, whose pointers may be 0: the kind comes from the call): the FP8 rows are
    fp8.quantize's of the bf16 rows bit for bit, and the float32 combine's sums and weights exact."""
    from largeep import fp8

    buf = _bounded_buffer(world, 10.0, ranks_per_node=ranks_per_node)
    t, e = 64, 4 * world
    try:
        g = torch.Generator(device="cuda").manual_seed(70 + rank)
        x = torch.randn(t, 1024, device="cuda", generator=g).to(torch.bfloat16)
        idx = torch.arange(t * 2, device="cuda").view(t, 2) % e
        w = torch.rand(t, 2, device="cuda", generator=g)
        n = 0 if rank == 1 else t
        d = buf.dispatch(x[:n], idx[:n], w[:n])
        d8 = buf.dispatch(fp8.quantize(x[:n]), handle=d.handle)
        want_q, want_s = fp8.quantize(d.x)
        assert torch.equal(d8.x[0].view(torch.uint8), want_q.view(torch.uint8)), "cached FP8 rows"
        assert torch.equal(d8.x[1], want_s), "cached FP8 scales"
        c = buf.combine(d.x.float(), d.handle, topk_weights=d.topk_weights)
        reached = ((idx[:n] // 4).unsqueeze(2) == torch.arange(world, device="cuda")).any(1).sum(1, keepdim=True)
        assert torch.equal(c.x, x[:n].float() * reached), "float32 combine with weights"
        assert torch.equal(c.topk_weights, w[:n]), "combined weights"
        torch.cuda.synchronize()
        # the mixed call, on a routing where every rank gets rows from every rank (the fused combine reads, and so
        # checks, only the peers that send it rows)
        both = (torch.arange(t, device="cuda").unsqueeze(1) + 4 * torch.arange(2, device="cuda")) % e
        old = buf.dispatch(x, both, w)  # (the same routing, an earlier round: only the handles' tags tell them apart)
        d = buf.dispatch(x, both, w)
        if variant == "handle_dispatch":
            buf.dispatch(x, handle=old.handle if rank == 0 else d.handle)
            what = "dispatch"
        elif variant == "handle_combine":
            buf.combine(old.x if rank == 0 else d.x, old.handle if rank == 0 else d.handle)
            what = "combine"
        elif variant == "fp8":
            buf.dispatch(fp8.quantize(x) if rank == 0 else x, handle=d.handle)
            what = "dispatch"
        elif variant == "dtype":
            buf.dispatch(x.float() if rank == 0 else x, handle=d.handle)
            what = "dispatch"
        elif variant == "y_dtype":
            buf.combine(d.x.float() if rank == 0 else d.x, d.handle)
            what = "combine"
        elif variant == "partials":
            assert ranks_per_node is not None and ranks_per_node < world, "bf16 partial sums need several nodes"
            buf.combine(d.x, d.handle, bf16_partial_sums=rank == 0)
            what = "combine"
        else:
            buf.combine(d.x, d.handle, topk_weights=d.topk_weights if rank == 0 else None)
            what = "combine"
        torch.cuda.synchronize()
        msg = _raised_not_timeout(lambda: buf.dispatch(x, both, w), rank, f"a {variant} mismatch")
        assert f"in an earlier {what} on rank {rank}, " in msg, msg
        assert "No row of it was read" in msg and "unusable" in msg, msg
        own = ("received rows of another kind from rank " if not variant.startswith("handle")
               else "sent rows with the handle of another dispatch")
        if own in msg:  # (from the sender's own flag)
            sender = int(msg.split(", rank ")[1].split()[0] if variant.startswith("handle")
                         else msg.split("from rank ")[1].split()[0])
            assert (sender == 0) if rank != 0 else (sender != 0), msg
        else:  # (a forwarder's poisoned flag: only in groups of several nodes of several ranks)
            assert ranks_per_node is not None and 1 < ranks_per_node < world, msg
    finally:
        dist.barrier()
        buf.destroy()


def low_latency_handles_disagree(rank: int, world: int, mode: str, ranks_per_node: int | None) -> None:
    """Two low-latency dispatches in flight, then a combine where rank 0 passes the first's handle and the others
    the second's (two micro-batches combined in another order on one rank), on the nvshmem backend: each rank's
    done flags carry its handle's tag, so every rank leaves the others' rows unread and its next call raises
    RuntimeError naming a sender (before, each summed the other dispatch's rows as its own, silently). ``mode``:
    "plain", "hook" (return_recv_hook=True) or "fused" (run under LARGEEP_TUNE ll_fuse=1). First, the same two
    dispatches combined in one order on every rank must pass unreported and be right."""
    buf = _bounded_buffer(world, 10.0, low_latency=True, ranks_per_node=ranks_per_node)
    t, e = 64, 4 * world
    try:
        g = torch.Generator(device="cuda").manual_seed(90 + rank)
        xs = [torch.randn(t, 1024, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2)]
        idx = torch.arange(t * 2, device="cuda").view(t, 2) % e  # (every rank gets rows from every rank)
        w = torch.rand(t, 2, device="cuda", generator=g)

        def combine(d: Any) -> torch.Tensor:
            c = buf.low_latency_combine(d.x, idx, w, d.handle, return_recv_hook=mode == "hook")
            if mode == "hook":
                c.hook()
            return c.x

        ds = [buf.low_latency_dispatch(x, idx, use_fp8=False) for x in xs]
        for x, d in zip(xs, ds, strict=True):  # (the experts' output: the rows themselves)
            want = (x.float() * w.sum(1, keepdim=True)).to(torch.bfloat16).float()
            got = combine(d).float()
            assert torch.allclose(got, want, rtol=1 / 64, atol=1e-2), f"rank {rank}: {(got - want).abs().max()}"
        torch.cuda.synchronize()
        ds = [buf.low_latency_dispatch(x, idx, use_fp8=False) for x in xs]
        combine(ds[0] if rank == 0 else ds[1])
        torch.cuda.synchronize()
        msg = _raised_not_timeout(lambda: buf.low_latency_dispatch(xs[0], idx, use_fp8=False), rank,
                                  "combines of different dispatches")
        assert f"in an earlier low_latency_combine on rank {rank}, rank " in msg, msg
        assert "handle of another low_latency_dispatch" in msg and "No row of it was read" in msg, msg
        sender = int(msg.split(f"on rank {rank}, rank ")[1].split()[0])
        assert (sender == 0) if rank != 0 else (sender != 0), msg
    finally:
        dist.barrier()
        buf.destroy()


def _progress(rank: int, what: str) -> None:
    """A timestamped line on stderr: where each rank was if a teardown test hangs (the pool dumps stacks too)."""
    import sys
    import time

    print(f"[{time.strftime('%H:%M:%S')}] rank {rank}: {what}", file=sys.stderr, flush=True)


def destroy_without_peer(rank: int, world: int, timeout_s: float) -> dict[str, float]:
    """Rank 1 never destroys its Buffer: every other rank's destroy() raises PeerTimeoutError naming rank 1 within
    the bound (instead of waiting forever in NVSHMEM's barrier), and the runtime then refuses new symmetric
    allocations at once. Run in a pool of its own: the processes cannot use NVSHMEM afterwards."""
    import os
    import time

    os.environ["LARGEEP_TIMEOUT_S"] = str(timeout_s)
    try:
        buf = largeep.Buffer(None, hidden=1024, num_experts=4 * world, num_topk=2, max_tokens_per_rank=64,
                             backend="nvshmem")
        if rank == 1:
            _progress(rank, "returning without destroying its Buffer")
            return {"elapsed_s": 0.0}  # never destroyed
        start = time.monotonic()
        try:
            _progress(rank, "destroying (rank 1 will not)")
            buf.destroy()
        except largeep.PeerTimeoutError as exc:
            elapsed = time.monotonic() - start
            assert "rank 1" in str(exc) and "destroy" in str(exc), str(exc)
        else:
            raise AssertionError("destroy() returned although rank 1 never called it")
        _progress(rank, f"destroy raised after {elapsed:.1f} s")
        assert elapsed < timeout_s + 10, f"gave up after {elapsed:.1f} s, bound {timeout_s} s"
        # NVSHMEM is refused at once from now on (a Buffer would first meet rank 1 in torch.distributed
        # collectives, so ask the runtime directly)
        start = time.monotonic()
        try:
            native.module().alloc(1 << 20, timeout_s)
        except RuntimeError as exc:
            assert "earlier rendezvous" in str(exc) and time.monotonic() - start < 1.0, str(exc)
        else:
            raise AssertionError("a symmetric allocation succeeded after a failed rendezvous")
        return {"elapsed_s": elapsed}
    finally:
        del os.environ["LARGEEP_TIMEOUT_S"]


def num_sms_of_the_gpu(rank: int, world: int) -> dict[str, Any]:
    """On the real GPU (normal mode, nvshmem): num_sms one above its SM count is refused with ArgumentError naming
    both on every rank, before NVSHMEM memory is taken; num_sms equal to it runs a checked round (the default
    is 24 where the GPU has more). Returns the message and the SM count."""
    from checked_calls import Checker, NormalCase, NormalRound

    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    kw: dict[str, Any] = dict(hidden=1024, num_experts=4 * world, num_topk=3, max_tokens_per_rank=64,
                              backend="nvshmem")
    try:
        largeep.Buffer(None, **kw, num_sms=sms + 1).destroy()
    except largeep.ArgumentError as exc:
        msg = str(exc)
    else:
        raise AssertionError(f"num_sms={sms + 1} was taken on a GPU of {sms} SMs")
    chk = Checker(f"num_sms={sms} on rank {rank}")
    buf = largeep.Buffer(None, **kw, num_sms=sms)
    try:
        NormalRound(buf, NormalCase(tuple(40 + 7 * r for r in range(world)), 1024, 4 * world, 3, 5), chk).run()
    finally:
        buf.destroy()
    return {"message": msg, "sms": sms, "failures": chk.failures}


def peer_exits(rank: int, world: int, timeout_s: float, low_latency: bool = False) -> dict[str, Any]:
    """After a good round on every rank, rank 1's process exits (os._exit(3)) where the others dispatch (normal
    mode: the count exchange's host wait; low-latency: the receive kernel, which gives up after the bound, named at
    the next call). Every other rank raises PeerTimeoutError naming the call and rank 1 within the bound, its
    Buffer then refuses the next call at once, and its destroy() ends within the bound too (PeerTimeoutError
    naming destroy, or returning) instead of hanging on the dead process. Run in a pool of its own with
    ``exits={1}``: NVSHMEM is unusable in these processes afterwards. Returns the times and messages."""
    import os
    import time

    buf = _bounded_buffer(world, timeout_s, low_latency=low_latency)
    op = "low_latency_dispatch" if low_latency else "dispatch"
    call = _bounded_dispatch(buf, world, low_latency)
    call()  # (every rank: a good round first)
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 1:
        _progress(rank, "exiting")
        os._exit(3)
    out: dict[str, Any] = {}
    start = time.monotonic()
    try:
        call()
        if low_latency:
            torch.cuda.synchronize()  # (the receive kernel waits for rank 1's rows until it gives up)
            call()
    except largeep.PeerTimeoutError as exc:
        out.update(elapsed_s=time.monotonic() - start, message=str(exc))
    else:
        raise AssertionError(f"{op} returned although rank 1 exited")
    _progress(rank, f"{op} raised after {out['elapsed_s']:.1f} s")
    start = time.monotonic()
    try:
        call()
    except largeep.PeerTimeoutError as exc:
        out.update(again_s=time.monotonic() - start, again=str(exc))
    else:
        raise AssertionError(f"a failed Buffer accepted another {op}")
    start = time.monotonic()
    try:
        buf.destroy()
    except largeep.PeerTimeoutError as exc:
        out["destroy"] = str(exc)
    out["destroy_s"] = time.monotonic() - start
    _progress(rank, f"destroy ended after {out['destroy_s']:.1f} s")
    return out


def low_latency_put_path(rank: int, world: int, ranks_per_node: int, *args: object) -> None:
    """bodies.low_latency_roundtrip with one host split into nodes, so peers on other nodes take the put path."""
    import bodies

    bodies.low_latency_roundtrip(rank, world, *args, ranks_per_node=ranks_per_node)  # type: ignore[arg-type]


def zero_copy_slots(rank: int, world: int) -> None:
    """Zero-copy receive slots (LARGEEP_ZERO_COPY_SLOTS, default 2): the first two fresh dispatches whose outputs
    stay alive return views of the Buffer's memory, later ones copy (no free slot); every result equals the
    reference after all of them ran (no later dispatch wrote over an earlier one's outputs); writing into an output
    does not reach the next dispatch; a slot is free again once its outputs die; a cached dispatch after a
    zero-copy one uses the copy slot and is right; with LARGEEP_ZERO_COPY_SLOTS=0 nothing is zero-copy."""
    import gc
    import os

    from reference import make_inputs, ref_dispatch

    hidden, experts, topk, m = 1024, 4 * world, 3, 64
    tokens = [m - 5 * r for r in range(world)]

    def case(seed: int) -> tuple[list, object]:
        inputs = [make_inputs(seed, r, tokens[r], hidden, experts, topk, torch.bfloat16) for r in range(world)]
        return inputs, ref_dispatch(inputs, rank, experts)

    def check(res: object, ref: object, what: str) -> None:
        rows = len(ref.src)  # type: ignore[attr-defined]
        assert res.x.shape == (rows, hidden), what  # type: ignore[attr-defined]
        assert torch.equal(res.x.cpu(), ref.x), f"{what}: x differs"  # type: ignore[attr-defined]
        assert torch.equal(res.topk_idx.cpu(), ref.topk_idx), f"{what}: topk_idx differs"  # type: ignore[attr-defined]
        assert torch.equal(res.topk_weights.cpu(), ref.topk_weights), f"{what}: weights differ"  # type: ignore[attr-defined]

    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=m,
                         backend="nvshmem")
    try:
        k, base = buf._impl.kernels, buf._impl.base  # type: ignore[attr-defined]
        size = int(buf._impl.C.normal_layout(world, experts, topk, hidden, m, world, 2)["total_bytes"])  # type: ignore[attr-defined]

        def inside(t: torch.Tensor) -> bool:
            return base <= t.data_ptr() < base + size

        kept, refs = [], []
        for i in range(4):
            inputs, ref = case(300 + i)
            mine = inputs[rank]
            res = buf.dispatch(mine.x.cuda(), mine.topk_idx.cuda(), mine.topk_weights.cuda())
            assert int(k.zc_busy()) == min(i + 1, 2), (i, int(k.zc_busy()))
            assert inside(res.x) == (i < 2) and inside(res.topk_idx) == (i < 2), f"dispatch {i}: zero-copy {i < 2}"
            kept.append(res)
            refs.append(ref)
        torch.cuda.synchronize()
        for i, (res, ref) in enumerate(zip(kept, refs, strict=True)):
            check(res, ref, f"dispatch {i} (checked after all four)")
        # writing into a zero-copy output changes nothing the next dispatch returns
        kept[0].x.fill_(7.0)
        del kept[1]
        gc.collect()
        assert int(k.zc_busy()) == 1
        inputs, ref = case(400)
        mine = inputs[rank]
        res = buf.dispatch(mine.x.cuda(), mine.topk_idx.cuda(), mine.topk_weights.cuda())
        assert inside(res.x), "a freed slot was not reused"
        check(res, ref, "dispatch into a reused slot")
        # a cached dispatch (copy slot) with that handle: new x, same routing
        x2 = torch.randn(tokens[rank], hidden, generator=torch.Generator().manual_seed(500 + rank)).to(torch.bfloat16)
        xs2 = [torch.randn(tokens[r], hidden, generator=torch.Generator().manual_seed(500 + r)).to(torch.bfloat16)
               for r in range(world)]
        for r in range(world):
            inputs[r].x = xs2[r]
        ref2 = ref_dispatch(inputs, rank, experts)
        res2 = buf.dispatch(x2.cuda(), handle=res.handle)
        assert not inside(res2.x)
        assert torch.equal(res2.x.cpu(), ref2.x), "cached dispatch after a zero-copy one: x differs"
        del kept, res, res2
        gc.collect()
        torch.cuda.synchronize()
        assert int(k.zc_busy()) == 0, int(k.zc_busy())
        # an output read on another stream (DispatchResult.record_stream): the slot's next dispatch waits for it
        side = torch.cuda.Stream()
        inputs, ref = case(700)
        mine = inputs[rank]
        res = buf.dispatch(mine.x.cuda(), mine.topk_idx.cuda(), mine.topk_weights.cuda())
        assert inside(res.x)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(100_000_000)  # ~50 ms: the next dispatch is queued long before the copy runs
            late = res.x.clone()
        res.record_stream(side)
        del res
        gc.collect()
        inputs2, ref2 = case(701)
        mine2 = inputs2[rank]
        res2 = buf.dispatch(mine2.x.cuda(), mine2.topk_idx.cuda(), mine2.topk_weights.cuda())
        assert inside(res2.x), "the released slot was not reused"
        torch.cuda.synchronize()
        assert torch.equal(late.cpu(), ref.x), "a later dispatch overwrote an output still read on another stream"
        check(res2, ref2, "dispatch after a cross-stream release")
        del res2
        dist.barrier()
    finally:
        buf.destroy()
    os.environ["LARGEEP_ZERO_COPY_SLOTS"] = "0"
    try:
        buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=m,
                             backend="nvshmem")
    finally:
        del os.environ["LARGEEP_ZERO_COPY_SLOTS"]
    try:
        inputs, ref = case(600)
        mine = inputs[rank]
        res = buf.dispatch(mine.x.cuda(), mine.topk_idx.cuda(), mine.topk_weights.cuda())
        assert int(buf._impl.kernels.zc_busy()) == 0  # type: ignore[attr-defined]
        check(res, ref, "LARGEEP_ZERO_COPY_SLOTS=0")
        dist.barrier()
    finally:
        buf.destroy()


def destroy_keeps_held_outputs(rank: int, world: int) -> None:
    """Buffer.destroy() while rank 0 still holds a zero-copy dispatch output (a view of the Buffer's symmetric
    memory): every rank keeps the memory allocated (rank 0 votes to keep it in free's rendezvous) and logs why, so a
    new Buffer's allocation does not reuse it: rank 0's output keeps its values through the new Buffer's dispatches
    (before, the memory was freed under it and the next Buffer's slots and flags landed there)."""
    import logging

    from largeep.backends import nvshmem_backend as nb
    from reference import make_inputs, ref_dispatch

    hidden, experts, topk, m = 1024, 4 * world, 3, 64
    tokens = [m - 5 * r for r in range(world)]
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logging.getLogger("largeep").addHandler(handler)
    try:
        inputs = [make_inputs(800, r, tokens[r], hidden, experts, topk, torch.bfloat16) for r in range(world)]
        ref = ref_dispatch(inputs, rank, experts)
        buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=m,
                             backend="nvshmem")
        base, size = buf._impl.base, buf._impl.heap_bytes  # type: ignore[attr-defined]
        live = nb._heap["live"]
        mine = inputs[rank]
        res = buf.dispatch(mine.x.cuda(), mine.topk_idx.cuda(), mine.topk_weights.cuda())
        assert base <= res.x.data_ptr() < base + size, "the dispatch output is not a zero-copy view"
        if rank != 0:
            del res
        torch.cuda.synchronize()
        buf.destroy()
        assert nb._heap["live"] == live, "the symmetric memory was freed under a live output"
        want = "on this rank are still alive" if rank == 0 else "another rank's dispatch outputs are still alive"
        assert any(want in m and "keeps its" in m for m in said), said
        buf2 = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=m,
                              backend="nvshmem")
        try:
            base2 = buf2._impl.base  # type: ignore[attr-defined]
            assert base2 >= base + size or base2 + size <= base, "the new Buffer took the kept memory"
            for i in range(3):
                new = [make_inputs(900 + i, r, tokens[r], hidden, experts, topk, torch.bfloat16) for r in range(world)]
                out = buf2.dispatch(new[rank].x.cuda(), new[rank].topk_idx.cuda(), new[rank].topk_weights.cuda())
                combined = buf2.combine(out.x, out.handle)
                del out, combined
            torch.cuda.synchronize()
            if rank == 0:
                assert torch.equal(res.x.cpu(), ref.x), "the output held over destroy changed"
                assert torch.equal(res.topk_idx.cpu(), ref.topk_idx), "the held ids changed"
            dist.barrier()
        finally:
            buf2.destroy()
    finally:
        logging.getLogger("largeep").removeHandler(handler)


def low_latency_raised_after_send(rank: int, world: int, op: str) -> None:
    """An exception between a low-latency call's send and its receive (here: where the receive is wrapped, made to
    raise) leaves the round taken on the device and never received: the Buffer is marked unusable, so its next call
    raises naming that error, rather than pairing with the peers' next round (which would take this round's slots).
    ``op``: "dispatch" or "combine"."""
    buf = largeep.Buffer(None, hidden=256, num_experts=2 * world, num_topk=2, max_tokens_per_rank=8,
                         backend="nvshmem", low_latency=True)
    try:
        g = torch.Generator(device="cuda").manual_seed(30 + rank)
        x = torch.randn(8, 256, device="cuda", generator=g).to(torch.bfloat16)
        idx = torch.rand(8, 2 * world, device="cuda", generator=g).topk(2, dim=1).indices
        w = torch.rand(8, 2, device="cuda", generator=g)
        d = buf.low_latency_dispatch(x, idx, use_fp8=False)

        def boom(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("raised between the send and its receive")

        buf._impl._ll_closes_round = boom  # type: ignore[attr-defined]
        try:
            if op == "dispatch":
                buf.low_latency_dispatch(x, idx, return_recv_hook=True)
            else:
                buf.low_latency_combine(d.x, idx, w, d.handle, return_recv_hook=True)
        except RuntimeError as exc:
            assert "raised between the send and its receive" in str(exc), str(exc)
        else:
            raise AssertionError(f"rank {rank}: the {op} did not raise")
        finally:
            del buf._impl._ll_closes_round  # type: ignore[attr-defined]
        torch.cuda.synchronize()
        try:
            buf.low_latency_dispatch(x, idx)
        except RuntimeError as exc:
            msg = str(exc)
        else:
            raise AssertionError(f"rank {rank}: the call after an abandoned low_latency_{op} round did not raise")
        assert f"an earlier low_latency_{op}" in msg and "after its send was queued and before its receive" in msg, msg
        assert "raised between the send and its receive" in msg and "unusable" in msg, msg
    finally:
        buf.destroy()


def config_mismatch_refused(rank: int, world: int) -> None:
    """Ranks that would lay out their symmetric memory differently (LARGEEP_ZERO_COPY_SLOTS differs) or speak
    different combine protocols (LARGEEP_TUNE comb 0 on rank 0 only) are refused on every rank at Buffer creation,
    before NVSHMEM allocates anything; a consistent Buffer works after."""
    import os

    from largeep.errors import ArgumentError

    for var, value, named in (("LARGEEP_ZERO_COPY_SLOTS", str(1 + rank), "LARGEEP_ZERO_COPY_SLOTS"),
                              ("LARGEEP_TUNE", f"comb={0 if rank == 0 else 3}", "comb")):
        before = os.environ.get(var)
        os.environ[var] = value
        try:
            try:
                largeep.Buffer(None, hidden=256, num_experts=2 * world, num_topk=2, max_tokens_per_rank=64,
                               backend="nvshmem")
            except ArgumentError as exc:
                assert "disagree" in str(exc) and named in str(exc), str(exc)
            else:
                raise AssertionError(f"a Buffer was created although the ranks disagree ({var})")
        finally:
            if before is None:
                del os.environ[var]
            else:
                os.environ[var] = before
    buf = largeep.Buffer(None, hidden=256, num_experts=2 * world, num_topk=2, max_tokens_per_rank=64,
                         backend="nvshmem")
    try:
        _roundtrip_small(buf, 3)
    finally:
        buf.destroy()


def layout_id_check(rank: int, world: int) -> None:
    """The nvshmem layout checks the expert ids in its kernel (largeep's own range check, no separate min/max):
    a bad id in a late block of tokens raises ArgumentError naming it (the lowest below -1 first, else the highest),
    the caller's tensor is unchanged and the Buffer works after; good layouts equal counts made with torch ops.
    The dispatch checks them in its prepare kernel the same way (every rank passing bad ids: each raises before
    its count exchange, no zero-copy slot stays taken, the next dispatch works), once per fresh dispatch, and not
    again after a layout of the same unchanged tensor."""
    from largeep.errors import ArgumentError

    t, e, k = 1000, 8 * world, 3
    buf = largeep.Buffer(None, hidden=256, num_experts=e, num_topk=k, max_tokens_per_rank=t, backend="nvshmem")
    try:
        g = torch.Generator(device="cuda").manual_seed(5 + rank)
        idx = torch.rand(t, e, device="cuda", generator=g).topk(k, dim=1).indices
        idx[::7, 1] = -1
        for bad, want in (({(900, 1): e + 7}, e + 7), ({(900, 1): e + 7, (700, 0): -4}, -4), ({(999, 2): -2}, -2)):
            wrong = idx.clone()
            for (i, j), v in bad.items():
                wrong[i, j] = v
            before = wrong.clone()
            try:
                buf.get_dispatch_layout(wrong)
            except ArgumentError as exc:
                assert f"expert id {want}" in str(exc) and "'topk_idx'" in str(exc), str(exc)
            else:
                raise AssertionError(f"no error for expert id {want}")
            assert torch.equal(wrong, before), "the caller's topk_idx changed"
            x = torch.randn(t, 256, device="cuda").to(torch.bfloat16)
            w = torch.rand(t, k, device="cuda")
            try:
                buf.dispatch(x, wrong, w)
            except ArgumentError as exc:
                assert f"expert id {want}" in str(exc) and "dispatch" in str(exc), str(exc)
            else:
                raise AssertionError(f"no dispatch error for expert id {want}")
            assert torch.equal(wrong, before), "the caller's topk_idx changed"
            assert buf._impl.kernels.zc_busy() == 0, "a refused dispatch left a zero-copy slot taken"
        impl = buf._impl
        x = torch.randn(t, 256, device="cuda").to(torch.bfloat16)
        w = torch.rand(t, k, device="cuda")
        checks_before = impl._layout_token
        d = buf.dispatch(x, idx, w)  # checked in its prepare kernel: one check
        assert impl._layout_token == checks_before + 1, "a fresh dispatch did not check its ids natively"
        buf.get_dispatch_layout(idx)
        buf.dispatch(x, idx, w)  # the layout checked this tensor: no second check
        assert impl._layout_token == checks_before + 2, "the dispatch checked ids its layout had checked"
        buf.dispatch(x, handle=d.handle)  # a cached dispatch checks nothing
        assert impl._layout_token == checks_before + 2
        del d
        # several blocks of tokens (counts zeroed first, then summed by atomics) and one block (256 tokens or fewer:
        # the kernel stores every count itself, zeros too, over memory a larger layout's outputs left behind)
        for n in (t, 256, 257, 100, 1, 700, 3, 0):
            sub = idx[:n]
            lay = buf.get_dispatch_layout(sub)
            valid = sub >= 0
            hit = torch.zeros(n, e, dtype=torch.bool, device="cuda")
            rows, cols = valid.nonzero(as_tuple=True)
            hit[rows, sub[rows, cols]] = True
            in_rank = hit.view(n, world, e // world).any(2)
            assert torch.equal(lay.num_tokens_per_expert, hit.sum(0, dtype=torch.int32)), n
            assert torch.equal(lay.is_token_in_rank, in_rank), n
            assert torch.equal(lay.num_tokens_per_rank, in_rank.sum(0, dtype=torch.int32)), n
            assert torch.equal(lay.num_tokens_per_node, in_rank.any(1).sum(0, dtype=torch.int32).view(1)), n
            del lay
        _roundtrip_small(buf, 9)
    finally:
        buf.destroy()


def finished_calls_on_streams(rank: int, world: int, rounds: int) -> None:
    """Calls without async_finish (the Buffer's finished-call path: native events, no record_stream on inputs) made
    from two caller streams in turn, each round's outputs used and dropped on its stream while the next round runs
    from the other: every combine of the dispatched rows equals x times the ranks each token reached (computed
    from the ids with torch ops), the results hold no event, and an async_finish call still returns one."""
    c_hidden, e, k, t = 512, 4 * world, 3, 200
    buf = largeep.Buffer(None, hidden=c_hidden, num_experts=e, num_topk=k, max_tokens_per_rank=t, backend="nvshmem")
    try:
        # LARGEEP_STREAM_PRIORITY's default: the Buffer's stream has the highest priority torch gives (below 0)
        assert buf._stream is not None
        highest = torch.cuda.Stream(priority=-(1 << 20)).priority
        assert highest < 0 and buf._stream.priority == highest, (buf._stream.priority, highest)
        streams = (torch.cuda.Stream(), torch.cuda.Stream())
        for i in range(rounds):
            s = streams[i % 2]
            with torch.cuda.stream(s):
                g = torch.Generator(device="cuda").manual_seed(100 * i + rank)
                x = torch.randn(t, c_hidden, device="cuda", generator=g).to(torch.bfloat16)
                idx = torch.rand(t, e, device="cuda", generator=g).topk(k, dim=1).indices
                idx[:: 5 + i % 3, 0] = -1
                w = torch.rand(t, k, device="cuda", generator=g)
                lay = buf.get_dispatch_layout(idx)
                d = buf.dispatch(x, idx, w)
                assert d.event.event is None, "a finished dispatch holds no event"
                out = buf.combine(d.x, d.handle)
                assert out.event.event is None
                out.event.current_stream_wait()  # fall back to the Buffer's stream: allowed, orders nothing new
                out.event.synchronize()
                epr = e // world  # the ranks each token went to, from its ids (not the layout's answer)
                hit = torch.stack([((idx >= 0) & (idx // epr == r)).any(1) for r in range(world)], dim=1)
                assert torch.equal(lay.is_token_in_rank, hit), f"round {i}: layout"
                want = (x.float() * hit.sum(1, dtype=torch.float32)[:, None]).to(torch.bfloat16)
                assert torch.equal(out.x, want), f"round {i}: combine of the dispatched rows"
                del d, out, x  # freed on this stream while the next round runs from the other
        a = buf.dispatch(torch.zeros(5, c_hidden, dtype=torch.bfloat16, device="cuda"),
                         torch.zeros(5, k, dtype=torch.int64, device="cuda"),
                         torch.ones(5, k, device="cuda"), async_finish=True)
        assert a.event.event is not None, "async_finish returns an event"
        a.event.current_stream_wait()
        torch.cuda.synchronize()
    finally:
        buf.destroy()


def with_tune(rank: int, world: int, tune: str, fn: Any, *args: Any) -> dict[str, Any]:
    """fn(rank, world, *args) with ``tune`` added to LARGEEP_TUNE for the Buffers it makes (read when a Buffer is
    made) -> {"result": fn's result, "fused": low-latency calls that ran as one kernel meanwhile, "ce": normal
    combines whose rows the copy engines moved meanwhile}."""
    import os

    from largeep.backends import nvshmem_backend

    old = os.environ.get("LARGEEP_TUNE")
    os.environ["LARGEEP_TUNE"] = f"{old},{tune}" if old else tune
    before, before_ce = nvshmem_backend.FUSED_LAUNCHES[0], nvshmem_backend.CE_LAUNCHES[0]
    try:
        result = fn(rank, world, *args)
        return {"result": result, "fused": nvshmem_backend.FUSED_LAUNCHES[0] - before,
                "ce": nvshmem_backend.CE_LAUNCHES[0] - before_ce}
    finally:
        if old is None:
            del os.environ["LARGEEP_TUNE"]
        else:
            os.environ["LARGEEP_TUNE"] = old


def with_tunes(rank: int, world: int, tunes: list[str], fn: Any, *args: Any) -> dict[str, Any]:
    """with_tune of this rank's entry of ``tunes`` (ranks whose settings differ)."""
    return with_tune(rank, world, tunes[rank], fn, *args)


def _start_low_latency_at(buf: largeep.Buffer, world: int, experts: int, last_round: int) -> None:
    """Makes a fresh low-latency nvshmem Buffer continue as if ``last_round`` rounds had run (every rank calls it
    before its first call): its round counters (dispatch and combine), and its slot-free flags (the peers freed
    both slot buffers), which sit first in its symmetric allocation as int64 [kind][slot][E/N * N]
    (low_latency.cu's ll_flag_index)."""
    impl = buf._impl  # type: ignore[attr-defined]
    per_slot = experts // world * world
    flags = torch.as_tensor(_DeviceWords(impl.base, 5 * 2 * per_slot), device="cuda").view(5, 2, per_slot)
    flags[1] = last_round  # kLLDispatchFree
    flags[3] = last_round  # kLLCombineFree
    impl.seq[2] = last_round  # kSeqLowLatency: dispatch rounds
    impl.seq[3] = last_round  # and combine rounds
    torch.cuda.synchronize()
    dist.barrier()


class _DeviceWords:
    """int64 [n] device memory at ``ptr``, for torch.as_tensor (CUDA array interface)."""

    def __init__(self, ptr: int, n: int) -> None:
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "<i8", "data": (ptr, False), "version": 2}


def low_latency_fp8_disagree(rank: int, world: int) -> None:
    """Rank 0 dispatches FP8 rows, the others BF16 (use_fp8 differs): every rank's next call raises RuntimeError
    naming use_fp8 and a rank that sent the other kind (the receivers read each row's kind and leave such rows
    unread; before, they decoded them as their own kind: garbage, silently)."""
    hidden, experts, topk, tokens = 2048, 8 * world, 4, 64
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=tokens,
                         backend="nvshmem", low_latency=True)
    try:
        g = torch.Generator(device="cuda").manual_seed(90 + rank)
        x = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
        idx = torch.rand(tokens, experts, device="cuda", generator=g).topk(topk, dim=1).indices
        buf.low_latency_dispatch(x, idx, use_fp8=rank == 0)
        torch.cuda.synchronize()
        try:
            buf.low_latency_dispatch(x, idx, use_fp8=rank == 0)
        except RuntimeError as exc:
            msg = str(exc)
        else:
            raise AssertionError(f"rank {rank}: the call after a round of mixed use_fp8 did not raise")
        assert "use_fp8" in msg and "from rank" in msg, msg
        sender = int(msg.split("from rank ")[1].split()[0])
        assert (sender == 0) if rank != 0 else (sender != 0), msg
    finally:
        buf.destroy()


def low_latency_rounds(rank: int, world: int, rounds: int, tokens: int, hidden: int, experts: int, topk: int,
                       last_round: int = 0) -> None:
    """``rounds`` dispatch + combine rounds without hooks or host syncs, the ranks starting each round up to 2 ms
    apart (so a round's sends meet slots the slower rank's previous rounds still hold), every round's combine of
    the dispatched rows checked: out[t] = sum over k of w[t, k] * 2 ** (id % 3) * x[t] (BF16 dispatch,
    _scaled_experts).
    ``last_round``: the Buffer starts as if that many rounds had run (the round numbers the kernels tag their
    count words with)."""
    import time

    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=tokens,
                         backend="nvshmem", low_latency=True)
    try:
        if last_round:
            _start_low_latency_at(buf, world, experts, last_round)
        outs = []
        for i in range(rounds):
            g = torch.Generator(device="cuda").manual_seed(1000 * i + rank)
            x = torch.randn(tokens - i % 3, hidden, device="cuda", generator=g).to(torch.bfloat16)
            idx = torch.rand(x.shape[0], experts, device="cuda", generator=g).topk(topk, dim=1).indices
            w = torch.rand(x.shape[0], topk, device="cuda", generator=g)
            if (i + rank) % 3 == 0:
                time.sleep(0.002)
            d = buf.low_latency_dispatch(x, idx, use_fp8=False)
            assert isinstance(d.x, torch.Tensor)
            out = buf.low_latency_combine(_scaled_experts(d.x, rank), idx, w, d.handle)
            outs.append((out.x, x, idx, w))
        torch.cuda.synchronize()
        for i, (got, x, idx, w) in enumerate(outs):
            _check_scaled_combine(got, x, idx, w, f"round {i}")
    finally:
        buf.destroy()


def previous_event_orders(rank: int, world: int, backend: str) -> None:
    """SPEC's previous_event and async_finish, with events that matter: x (then y) is written on a side stream
    after a spin of about 50 ms, and the event recorded after that write is all that orders the dispatch (then the
    combine) after it (the caller's stream never waits for the side stream): the rows must be the new x, against
    the reference, and the combine the new y's sums (an ignored previous_event reads the zeros there before).
    The calls' own events (async_finish=True), waited on from another stream, order the reads of their outputs.
    Then a low-latency dispatch and combine with async_finish=True, read from another stream after their events."""
    from reference import RankInputs, ref_dispatch

    experts, topk, t = 8 * world, 2, 48
    kw: dict[str, Any] = dict(hidden=256, num_experts=experts, num_topk=topk, max_tokens_per_rank=t,
                              backend=backend)
    buf = largeep.Buffer(None, **kw)
    ll = largeep.Buffer(None, **kw, low_latency=True)
    side, reader = torch.cuda.Stream(), torch.cuda.Stream()
    try:
        g = torch.Generator(device="cuda").manual_seed(5 + rank)
        x_new = torch.randn(t, 256, device="cuda", generator=g).to(torch.bfloat16)
        idx = torch.rand(t, experts, device="cuda", generator=g).topk(topk, dim=1).indices
        idx[::7, 1] = -1
        w = torch.rand(t, topk, device="cuda", generator=g)
        x = torch.zeros_like(x_new)
        torch.cuda.synchronize()
        dist.barrier()

        def late_write(dst: torch.Tensor, src: torch.Tensor) -> largeep.EventOverlap:
            side.wait_stream(torch.cuda.current_stream())  # (dst was made on the caller's stream)
            with torch.cuda.stream(side):
                torch.cuda._sleep(100_000_000)
                dst.copy_(src)
                ev = torch.cuda.Event()
                ev.record(side)
            return largeep.EventOverlap(ev)

        d = buf.dispatch(x, idx, w, previous_event=late_write(x, x_new), async_finish=True)
        every = [[torch.empty_like(v) for _ in range(world)] for v in (x_new, idx, w)]
        for out, v in zip(every, (x_new, idx, w), strict=True):
            dist.all_gather(out, v)
        ref = ref_dispatch([RankInputs(*(e[r].cpu() for e in every)) for r in range(world)], rank, experts)
        with torch.cuda.stream(reader):
            d.event.current_stream_wait()
            rows = d.x.clone()
        reader.synchronize()
        assert torch.equal(rows.cpu(), ref.x), "dispatch after previous_event: rows are not the x written before it"
        y = torch.zeros_like(d.x)
        comb = buf.combine(y, d.handle, previous_event=late_write(y, d.x), async_finish=True)
        with torch.cuda.stream(reader):
            comb.event.current_stream_wait()
            got = comb.x.clone()
        reader.synchronize()
        _check_identity_combine(got, x_new, idx, experts, world, "combine after previous_event")

        ld = ll.low_latency_dispatch(x_new, idx, use_fp8=False, async_finish=True)
        assert isinstance(ld.x, torch.Tensor)
        with torch.cuda.stream(reader):
            ld.event.current_stream_wait()
            lrows, counts = ld.x.clone(), ld.num_tokens_per_expert.clone()
        reader.synchronize()
        lo = rank * (experts // world)
        for e in range(experts // world):
            want_n = sum(int((v == lo + e).sum()) for v in every[1])
            assert int(counts[e]) == want_n, f"low-latency expert {e}: {int(counts[e])} rows, expected {want_n}"
        lc = ll.low_latency_combine(lrows, idx, w, ld.handle, async_finish=True)
        with torch.cuda.stream(reader):
            lc.event.current_stream_wait()
            lgot = lc.x.clone()
        reader.synchronize()
        _check_scaled_combine(lgot, x_new, idx, w, "low-latency combine after its event", scaled=False)
    finally:
        ll.destroy()
        buf.destroy()


def low_latency_send_holds_nothing(rank: int, world: int) -> dict[str, float]:
    """SPEC's hook mode: the send returns and its kernels end without waiting for any peer (no SM held until the
    hook). The other ranks start their dispatch (then their combine) 0.5 s late; rank 0's send, device synchronised,
    must take well under that, and its hook then completes the receive: counts against the ids, the combine of
    the scaled experts' rows element by element. Returns rank 0's send times in seconds (dispatch, combine)."""
    import time

    experts, topk, t = 8 * world, 4, 32
    buf = largeep.Buffer(None, hidden=2048, num_experts=experts, num_topk=topk, max_tokens_per_rank=t,
                         backend="nvshmem", low_latency=True)
    try:
        g = torch.Generator(device="cuda").manual_seed(17 + rank)
        x = torch.randn(t, 2048, device="cuda", generator=g).to(torch.bfloat16)
        idx = torch.rand(t, experts, device="cuda", generator=g).topk(topk, dim=1).indices
        w = torch.rand(t, topk, device="cuda", generator=g)
        warm = buf.low_latency_dispatch(x, idx, use_fp8=False)  # (first calls: allocations, module loads)
        buf.low_latency_combine(warm.x, idx, w, warm.handle)  # type: ignore[arg-type]
        torch.cuda.synchronize()
        times = {}
        dist.barrier()
        if rank != 0:
            time.sleep(0.5)
        t0 = time.monotonic()
        d = buf.low_latency_dispatch(x, idx, use_fp8=False, return_recv_hook=True)
        torch.cuda.synchronize()
        times["dispatch_send_s"] = time.monotonic() - t0
        assert d.hook is not None
        d.hook()
        assert isinstance(d.x, torch.Tensor)
        y = _scaled_experts(d.x, rank)
        torch.cuda.synchronize()
        if rank != 0:
            time.sleep(0.5)
        t0 = time.monotonic()
        c = buf.low_latency_combine(y, idx, w, d.handle, return_recv_hook=True)
        torch.cuda.synchronize()
        times["combine_send_s"] = time.monotonic() - t0
        assert c.hook is not None
        c.hook()
        every = [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(every, idx)
        lo = rank * (experts // world)
        counts = d.num_tokens_per_expert.tolist()
        assert counts == [sum(int((v == lo + e).sum()) for v in every) for e in range(experts // world)], counts
        _check_scaled_combine(c.x, x, idx, w, "hook-mode combine")
        if rank == 0:
            assert times["dispatch_send_s"] < 0.2 and times["combine_send_s"] < 0.2, (
                f"rank 0's send waited for the late ranks: {times}"
            )
        return times
    finally:
        buf.destroy()


def normal_stream_edges(rank: int, world: int, backend: str) -> None:
    """Normal mode on one GPU: a fresh dispatch without num_worst_tokens inside a CUDA graph capture is refused
    naming the argument, nothing captured (it waited for the count exchange until LARGEEP_TIMEOUT_S, then the
    Buffer was unusable); the layout's event (async_finish) orders a reader on another stream; a finished call's
    event given to another Buffer as previous_event is taken (that Buffer waits for the first one's stream); a
    previous_event of the wrong type is refused; the Buffers then work, their results right."""
    from largeep.errors import ArgumentError

    kw: dict[str, Any] = dict(hidden=256, num_experts=8 * world, num_topk=2, max_tokens_per_rank=64,
                              backend=backend)
    buf, other = largeep.Buffer(None, **kw), largeep.Buffer(None, **kw)
    try:
        x = torch.randn(64, 256, device="cuda").to(torch.bfloat16)
        idx = torch.stack([torch.randperm(8 * world, device="cuda")[:2] for _ in range(64)])
        w = torch.rand(64, 2, device="cuda")
        ranks = torch.stack([(idx // 8 == r).any(1) for r in range(world)], 1)
        want = (x.float() * ranks.sum(1, keepdim=True)).to(torch.bfloat16)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=side):
                buf.dispatch(x, idx, w)
        except ArgumentError as exc:
            assert "num_worst_tokens" in str(exc) and "capture" in str(exc), str(exc)
        else:
            raise AssertionError("a fresh variable-size dispatch was captured")
        torch.cuda.synchronize()
        layout = buf.get_dispatch_layout(idx, async_finish=True)
        assert layout.event is not None and layout.event.event is not None
        with torch.cuda.stream(side):
            layout.event.current_stream_wait()
            assert torch.equal(layout.num_tokens_per_rank, ranks.sum(0, dtype=torch.int32))
        torch.cuda.synchronize()
        y = torch.empty_like(x)
        d = buf.dispatch(x, idx, w)  # finished: no event of its own, its Buffer's stream
        assert d.event.event is None
        y.copy_(x)
        d2 = other.dispatch(y, idx, w, previous_event=d.event, async_finish=True)
        d2.event.current_stream_wait()
        assert torch.equal(other.combine(d2.x, d2.handle).x, want), "the other Buffer after a cross-Buffer event"
        assert torch.equal(buf.combine(d.x, d.handle).x, want), "combine"
        try:
            buf.dispatch(x, idx, w, previous_event=torch.cuda.Event())  # type: ignore[arg-type]
        except ArgumentError as exc:
            assert "previous_event" in str(exc), str(exc)
        else:
            raise AssertionError("a torch.cuda.Event was taken as previous_event")
    finally:
        other.destroy()
        buf.destroy()


def _ll_masked_ids(g: torch.Generator, tokens: int, experts: int, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dispatch ids, combine ids), int64 [tokens, topk] on the CPU. Dispatch: distinct random experts, about a quarter
    -1, and in every fifth token k 1 repeating k 0's expert. Combine: the dispatch's ids, with about a third of the
    valid ones -1 (a copy sent and masked), most of the -1 naming a random expert (a k the dispatch did not send),
    and some valid ones naming another expert (a copy sent, still counted: its row is the dispatch's expert's)."""
    d = torch.rand(tokens, experts, generator=g).topk(topk, dim=1).indices
    d = torch.where(torch.rand(tokens, topk, generator=g) < 0.25, -1, d)
    if topk > 1:
        d[::5, 1] = d[::5, 0]
    u = torch.rand(tokens, topk, generator=g)
    other = torch.randint(0, experts, (tokens, topk), generator=g)
    c = torch.where((d >= 0) & (u < 0.33), -1, d)
    c = torch.where((d < 0) & (u < 0.8), other, c)
    c = torch.where((d >= 0) & (u > 0.85), other, c)
    return d, c


def low_latency_combine_mask(rank: int, world: int, tokens: list[int], max_tokens: int, hidden: int, experts: int,
                             topk: int, ranks_per_node: int | None = None) -> None:
    """A low-latency combine whose topk_idx differs from its dispatch's (no weights sent): -1 at k the dispatch sent,
    experts at k the dispatch left at -1, other experts at k it sent. Each k adds iff the dispatch sent it and the
    combine names an expert there, with the row of the dispatch's expert: the nvshmem backend against the torch
    backend (the reference implementation) and against float64 sums, without and with hooks. Two rounds of large
    values at every k run first, so that the combine slots hold stale rows wherever this round sends none (the
    nvshmem combine read those before: it took the copies from its own ids). Then: the counts of a handle raised in
    place past every expert's rows (the combine send bounds them: the same result), and an eager combine given the
    handle of a dispatch captured in a CUDA graph and never replayed (its counts, metadata and kept ids are whatever
    the memory held: bounded, no fault), followed by a good round."""
    import bodies

    kw: dict[str, Any] = dict(hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=max_tokens,
                              low_latency=True)
    nv = largeep.Buffer(None, backend="nvshmem", ranks_per_node=ranks_per_node, **kw)
    tb = largeep.Buffer(None, backend="torch", **kw)
    dev_t = bodies.device_for("torch")
    epr = experts // world
    # expert e multiplies its rows by 2 ** (e % 3): exact in bf16, and the row a k adds says which expert made it
    factor = torch.tensor([2.0 ** ((rank * epr + e) % 3) for e in range(epr)])

    def expert(xe: torch.Tensor) -> torch.Tensor:
        return (xe.float() * factor.to(xe.device)[:, None, None]).to(torch.bfloat16)

    def roundtrip(buf: largeep.Buffer, dev: torch.device, x: torch.Tensor, idx_d: torch.Tensor, idx_c: torch.Tensor,
                  w: torch.Tensor, hook: bool) -> torch.Tensor:
        d = buf.low_latency_dispatch(x.to(dev), idx_d.to(dev), use_fp8=False, return_recv_hook=hook)
        if hook:
            assert d.hook is not None
            d.hook()
        c = buf.low_latency_combine(expert(d.x), idx_c.to(dev), w.to(dev), d.handle, return_recv_hook=hook)
        if hook:
            assert c.hook is not None
            c.hook()
        return c.x.cpu()

    try:
        g = torch.Generator().manual_seed(4100 + rank)
        t = tokens[rank]
        # stale rows: two rounds (both combine slot buffers) of large values at every k of every token
        for _ in range(2):
            x = (64 * torch.randn(max_tokens, hidden, generator=g)).to(torch.bfloat16)
            full = torch.rand(max_tokens, experts, generator=g).topk(topk, dim=1).indices
            roundtrip(nv, torch.device("cuda"), x, full, full, torch.ones(max_tokens, topk), False)
        for hook in (False, True):
            x = torch.randn(t, hidden, generator=g).to(torch.bfloat16)
            idx_d, idx_c = _ll_masked_ids(g, t, experts, topk)
            w = torch.rand(t, topk, generator=g) + 0.1
            got = roundtrip(nv, torch.device("cuda"), x, idx_d, idx_c, w, hook)
            ref = roundtrip(tb, dev_t, x, idx_d, idx_c, w, hook)
            keep = (idx_d >= 0) & (idx_c >= 0) & (idx_c < experts)
            scale = torch.where(keep, w.double() * 2.0 ** (idx_d.clamp(min=0) % 3).double(), 0.0)
            want = x.double() * scale.sum(1, keepdim=True)
            bodies._close(got, want, torch.bfloat16, f"rank {rank} hook={hook}: nvshmem combine against float64")
            bodies._close(ref, want, torch.bfloat16, f"rank {rank} hook={hook}: torch combine against float64")
            bodies._close(got, ref.double(), torch.bfloat16, f"rank {rank} hook={hook}: nvshmem against torch")

        # counts raised in place past the expert's rows: rows past the real count carry no source, nothing more moves
        x = torch.randn(t, hidden, generator=g).to(torch.bfloat16)
        idx_d, _ = _ll_masked_ids(g, t, experts, topk)
        w = torch.rand(t, topk, generator=g) + 0.1
        d = nv.low_latency_dispatch(x.cuda(), idx_d.cuda(), use_fp8=False)
        y = expert(d.x)
        d.num_tokens_per_expert.fill_(2**30)
        got = nv.low_latency_combine(y, idx_d.cuda(), w.cuda(), d.handle).x.cpu()
        scale = torch.where(idx_d >= 0, w.double() * 2.0 ** (idx_d.clamp(min=0) % 3).double(), 0.0)
        bodies._close(got, x.double() * scale.sum(1, keepdim=True), torch.bfloat16,
                      f"rank {rank}: combine with counts past the rows")

        # a captured dispatch never replayed: its handle's tensors were never written
        xs = torch.randn(max_tokens, hidden, generator=g).to(torch.bfloat16).cuda()
        ids = torch.rand(max_tokens, experts, generator=g).topk(topk, dim=1).indices.cuda()
        ws = torch.rand(max_tokens, topk, generator=g).cuda()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dg = nv.low_latency_dispatch(xs, ids, use_fp8=False)
        nv.low_latency_combine(torch.randn_like(dg.x), ids, ws, dg.handle)
        torch.cuda.synchronize()
        del graph, dg
        dist.barrier()
        x = torch.randn(t, hidden, generator=g).to(torch.bfloat16)
        idx_d, idx_c = _ll_masked_ids(g, t, experts, topk)
        w = torch.rand(t, topk, generator=g) + 0.1
        got = roundtrip(nv, torch.device("cuda"), x, idx_d, idx_c, w, False)
        keep = (idx_d >= 0) & (idx_c >= 0) & (idx_c < experts)
        scale = torch.where(keep, w.double() * 2.0 ** (idx_d.clamp(min=0) % 3).double(), 0.0)
        bodies._close(got, x.double() * scale.sum(1, keepdim=True), torch.bfloat16,
                      f"rank {rank}: the round after a combine of a never-replayed dispatch's handle")
    finally:
        dist.barrier()
        tb.destroy()
        nv.destroy()


def low_latency_layout_too_large(rank: int, world: int) -> None:
    """A low-latency Buffer may have more experts than the nvshmem layout kernel counts in shared memory (a
    normal-mode Buffer of these sizes is refused at creation): its get_dispatch_layout raises ArgumentError naming
    the sizes before anything is queued, and the Buffer still works."""
    experts = 12288
    buf = largeep.Buffer(None, hidden=128, num_experts=experts, num_topk=1, max_tokens_per_rank=2,
                         backend="nvshmem", low_latency=True)
    try:
        idx = torch.tensor([[rank], [experts - 1]], device="cuda")
        try:
            buf.get_dispatch_layout(idx)
        except largeep.ArgumentError as exc:
            want = f"num_experts + ranks + nodes = {experts + 2 * world} must be at most 12288"
            assert "get_dispatch_layout" in str(exc) and want in str(exc), str(exc)
        else:
            raise AssertionError("a layout past the kernel's shared memory was not refused")
        x = torch.randn(2, 128, device="cuda").to(torch.bfloat16)
        d = buf.low_latency_dispatch(x, idx, use_fp8=False)
        torch.cuda.synchronize()
        counts = d.num_tokens_per_expert.cpu()
        assert int(counts.sum()) == (world if rank == 0 else 0) + (world if rank == world - 1 else 0), counts
    finally:
        buf.destroy()


def low_latency_fp8_bits(rank: int, world: int, tokens: int, hidden: int) -> dict[str, int]:
    """The low-latency kernels' FP8 rows are largeep.fp8.quantize's bits exactly (both divide by the scale in
    float32; a multiply by 1 / s lands on the neighbouring e4m3 code for about one value in a thousand), with and
    without round_scale, on values of a wide range of magnitudes and negative zeros. One expert per rank, each token
    sent to this rank's expert only. Returns the values compared."""
    from largeep import fp8

    buf = largeep.Buffer(None, hidden=hidden, num_experts=world, num_topk=1, max_tokens_per_rank=tokens,
                         backend="nvshmem", low_latency=True)
    compared = 0
    try:
        g = torch.Generator(device="cuda").manual_seed(900 + rank)
        for round_scale in (False, True):
            mag = torch.exp2(torch.randint(-20, 20, (tokens, hidden // 128, 1), device="cuda", generator=g).float())
            x = (torch.randn(tokens, hidden // 128, 128, device="cuda", generator=g) * mag).view(tokens, hidden)
            x = x.to(torch.bfloat16)
            x[0, 5] = -0.0  # (negative zeros keep their sign: code 0x80)
            x[1, 128:256] = -0.0  # (a group of them: amax 0, the scale 1e-4 / 448)
            idx = torch.full((tokens, 1), rank, device="cuda", dtype=torch.int64)
            res = buf.low_latency_dispatch(x, idx, use_fp8=True, round_scale=round_scale)
            q, s = res.x
            n = int(res.num_tokens_per_expert[0])
            assert n == tokens, n
            order = res.src_info[0, :n, 1].long()
            got_q, got_s = q[0, :n].cpu(), s[0, :n].cpu()
            for where in ("cuda", "cpu"):  # (fp8.quantize on either device: the same bits)
                want_q, want_s = (t.cpu() for t in fp8.quantize(x[order].to(where), round_scale=round_scale))
                off = int((got_q.view(torch.uint8) != want_q.view(torch.uint8)).sum())
                assert off == 0, f"round_scale={round_scale}: {off} e4m3 codes differ from fp8.quantize's on {where}"
                bad = int((got_s != want_s).sum())
                assert bad == 0, f"round_scale={round_scale}: {bad} scales differ from fp8.quantize's on {where}"
            compared += n * hidden
    finally:
        buf.destroy()
    return {"compared": compared}
