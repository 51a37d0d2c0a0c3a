"""largeep.ops: the grouped GEMM, and dispatch/combine as each other's backward (eager autograd Functions and the
torch.library custom ops) on 1, 2 and 4 ranks over gloo."""

from __future__ import annotations

import collections

import layer_bodies
import ops_bodies
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from largeep import ops


def _loop_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(a.shape[0], b.shape[2], dtype=torch.float64)
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end].double() @ b[g].double()
        start = end
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(32, 16), (30, 18)])  # 16-byte strides (native), odd sizes (padded bmm)
@pytest.mark.parametrize("counts", [[3, 0, 7, 1], [0, 0, 0, 0], [5, 6, 0, 2]])
@pytest.mark.parametrize("hint", [False, True])  # offs[-1] given on the host (used=) or not
def test_grouped_mm(dtype: torch.dtype, k: int, n: int, counts: list[int], hint: bool) -> None:
    g = torch.Generator().manual_seed(sum(counts) + k)
    rows = sum(counts) + 2  # two rows past offs[-1], poisoned: ignored, output (and grad) zero there
    a = torch.randn(rows, k, generator=g)
    a[sum(counts) :] = float("nan")
    a = a.to(dtype).requires_grad_()
    b = torch.randn(len(counts), k, n, generator=g).to(dtype).requires_grad_()
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    backend = ops.grouped_mm_backend(a, b)
    assert backend == ("native" if (k, n) == (32, 16) else "padded_bmm")
    ops.reset_grouped_mm_stats()
    out = ops.grouped_mm(a, b, offs, sum(counts) if hint else None)
    assert [name.split(" ")[0] for name in ops.grouped_mm_stats()] == [backend]
    assert out.dtype == dtype and out.shape == (rows, n)
    want = _loop_grouped_mm(a.detach(), b.detach(), offs)
    rtol = 1e-5 if dtype == torch.float32 else 2.0**-7
    layer_bodies.close(out, want, f"grouped_mm {backend}", rtol=rtol)
    assert (out[sum(counts):] == 0).all()
    cot = torch.randn(rows, n, generator=g).to(dtype)
    (out * cot).sum().backward()
    assert a.grad is not None and (a.grad[sum(counts) :] == 0).all()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    (_loop_grouped_mm_autograd(a64, b64, offs) * cot.double()).sum().backward()
    layer_bodies.close(a.grad, a64.grad, "grouped_mm grad a", rtol=rtol * 4)
    layer_bodies.close(b.grad, b64.grad, "grouped_mm grad b", rtol=rtol * 4)


def _loop_grouped_mm_autograd(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    parts, start = [], 0
    for g, end in enumerate(offs.tolist()):
        parts.append(a[start:end] @ b[g])
        start = end
    parts.append(torch.zeros(a.shape[0] - start, b.shape[2], dtype=a.dtype))
    return torch.cat(parts)


@pytest.mark.parametrize(
    "make,ok",
    [
        (lambda: torch.empty(8, 32), True),  # row-major, 128-byte rows
        (lambda: torch.empty(32, 8).t(), True),  # column-major
        (lambda: torch.empty(1, 30), False),  # one row of 120 bytes: torch checks its stride too
        (lambda: torch.empty(32, 1).t(), False),  # [1, 32] with strides (1, 1)
        (lambda: torch.empty(4, 32, 16)[:, :, :8], True),  # a w1-like view of a w13-like weight
        (lambda: torch.empty(4, 32, 16).transpose(1, 2), True),  # the backward's transposed weight
        (lambda: torch.empty(0, 32).unsqueeze(0), True),  # zero rows, batch stride 0: batch dims not checked
        (lambda: torch.empty(8, 32)[:, 1:], False),  # 16-byte misaligned data
        (lambda: torch.empty(8, 32)[:, ::2], False),  # no unit stride
    ],
)
def test_grouped_mm_stride_rule(make, ok: bool) -> None:
    # float32: 16 bytes are 4 elements
    assert ops._strides_ok(make()) is ok


@pytest.mark.parametrize("k,n", [(32, 16), (30, 18)])  # native, padded bmm
@pytest.mark.parametrize("clear_tail", [True, False])
def test_grouped_mm_second_derivative(k: int, n: int, clear_tail: bool) -> None:
    """A penalty on the gradients of a and b (create_graph=True, e.g. a gradient-norm penalty over the expert
    weights) differentiates the weight gradient too: against the float64 loop, rows past offs[-1] poisoned."""
    g = torch.Generator().manual_seed(k + n)
    counts = [3, 0, 5, 2]
    rows, used = sum(counts) + 2, sum(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    a0 = torch.randn(rows, k, generator=g)
    a0[used:] = float("nan")
    b0 = torch.randn(len(counts), k, n, generator=g)
    cot = torch.randn(rows, n, generator=g)
    u, v = torch.randn(rows, k, generator=g), torch.randn(len(counts), k, n, generator=g)
    got, want = [], []
    for fn, dt, out in ((lambda a, b: ops.grouped_mm(a, b, offs, clear_tail=clear_tail), torch.float32, got),
                        (lambda a, b: _loop_grouped_mm_autograd(a, b, offs), torch.float64, want)):
        a, b = a0.to(dt).requires_grad_(), b0.to(dt).requires_grad_()
        y = fn(a, b)[:used]
        ga, gb = torch.autograd.grad((y * cot[:used].to(dt)).sum() + (y**3).sum(), (a, b), create_graph=True)
        pen = (ga[:used] ** 2 * u[:used].to(dt)).sum() + (gb**2 * v.to(dt)).sum()
        out.extend(torch.autograd.grad(pen, (a, b)))
    if clear_tail:  # (else a's gradient past offs[-1] is unspecified, as grouped_mm says)
        assert (got[0][used:] == 0).all()
    for name, x, y in (("a", got[0][:used], want[0][:used]), ("b", got[1], want[1])):
        layer_bodies.close(x, y, f"grouped_mm second derivative in {name}", rtol=1e-4)


def test_grouped_mm_opcheck() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(12, 16, generator=g, requires_grad=True)
    b = torch.randn(3, 16, 8, generator=g, requires_grad=True)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    torch.library.opcheck(torch.ops.largeep.grouped_mm.default, (a, b, offs))
    torch.library.opcheck(torch.ops.largeep.grouped_mm.default, (a, b, offs, 10))
    torch.library.opcheck(torch.ops.largeep.grouped_mm_wgrad.default, (a.detach(), torch.randn(12, 8), offs))
    # (with grads: its autograd formula, a second derivative through grouped_mm's weight gradient)
    torch.library.opcheck(torch.ops.largeep.grouped_mm_wgrad.default, (a, torch.randn(12, 8, requires_grad=True), offs))


def _tokens(world: int) -> list[int]:
    return [0 if (r == 1 and world > 1) else 11 + 4 * r for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("use_custom_ops", [False, True])
@pytest.mark.parametrize("num_worst", [0, 64])
def test_dispatch_combine_autograd(pools, world: int, use_custom_ops: bool, num_worst: int) -> None:
    pools(world).run(
        layer_bodies.ops_autograd, _tokens(world), 64, 4 * world, 3, num_worst, use_custom_ops, world + num_worst
    )


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("use_custom_ops", [False, True])
@pytest.mark.parametrize("num_worst", [0, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_fp8_autograd(pools, world: int, use_custom_ops: bool, num_worst: int, dtype: torch.dtype) -> None:
    """ops.dispatch(use_fp8=True): the received x is each row's FP8 round trip in x's dtype, bit for bit; the grads
    of x and topk_weights (and of a combine through the handle) are those of the plain dispatch."""
    pools(world).run(
        layer_bodies.ops_autograd, _tokens(world), 256, 4 * world, 3, num_worst, use_custom_ops, 7 + world, True,
        dtype,
    )


def test_dispatch_fp8_strided(pools) -> None:
    _no_failures(pools(2).run(ops_bodies.ops_fp8_strided))


def test_dispatch_strided_inputs_custom_ops(pools) -> None:
    _no_failures(pools(2).run(ops_bodies.ops_strided_inputs))


def test_dispatch_strided_inputs_eager(pools) -> None:
    """The plain eager ops.dispatch copies strided inputs as the custom-op path does (the Buffer refuses them)."""
    _no_failures(pools(2).run(ops_bodies.ops_strided_eager, "torch", "cpu"))


@pytest.mark.parametrize("num_worst", [0, 16])
def test_eager_cotangents_and_counts(pools, num_worst: int) -> None:
    """The plain eager path: num_tokens_per_expert; strided cotangents (a plain sum's, a transposed one) copied for
    the backward's combine and cached dispatch; a backward through the weights alone (bf16, with and without
    bf16_partial_sums); use_fp8 with x on another device refused naming x."""
    _no_failures(pools(2).run(ops_bodies.ops_eager_cotangents, num_worst))


def test_low_latency_eager_fp8(pools) -> None:
    """The eager ops.low_latency_dispatch with use_fp8, with and without round_scale: SPEC's FP8 rows."""
    _no_failures(pools(2).run(ops_bodies.ops_low_latency_eager_fp8))


@pytest.mark.gpu(2)
@pytest.mark.parametrize("backend", ["nvshmem", "torch"])
def test_dispatch_strided_inputs_eager_gpu(pools, backend: str) -> None:
    """ops.dispatch of strided and misaligned inputs on CUDA, also after a previous_event whose x is written late
    and with the caller's stream busy after it (the copies must run after the event, before the dispatch)."""
    from largeep import native

    if backend == "nvshmem" and native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    _no_failures(pools(2, "nccl").run(ops_bodies.ops_strided_eager, backend, "cuda"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("num_worst", [0, 40])
def test_two_batches_compiled(pools, num_worst: int, backend: str) -> None:
    """ops.dispatch / ops.combine of two independent micro-batches in one compiled graph (fullgraph), forward and
    backward, equal eager."""
    pools(2).run(layer_bodies.ops_two_batches_compiled, num_worst, backend)


def test_returned_idx_changed_in_place(pools) -> None:
    pools(2).run(layer_bodies.ops_returned_idx_changed)


def test_registry(pools) -> None:
    pools(2).run(layer_bodies.ops_registry_errors)


def _no_failures(results: list[list[str]]) -> None:
    failed = [f"rank {r}: {f}" for r, fails in enumerate(results) for f in fails]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("use_custom_ops", [False, True])
@pytest.mark.parametrize("num_worst", [0, 16])
@pytest.mark.parametrize("tokens", [[6, 3], [5, 0]])
def test_second_derivative(pools, tokens: list[int], num_worst: int, use_custom_ops: bool) -> None:
    """A gradient penalty (create_graph=True, then a second backward) through dispatch (x and topk_weights) and
    combine against autograd over the whole world in one process; eager path only, the custom-op path raises."""
    _no_failures(pools(2).run(ops_bodies.ops_second_derivative, tokens, num_worst, use_custom_ops))


@pytest.mark.parametrize("world,ranks_per_node,use_custom_ops", [(4, 2, False), (4, 2, True), (2, None, False),
                                                                 (2, None, True)])
def test_bf16_partial_sums(pools, world: int, ranks_per_node: int | None, use_custom_ops: bool) -> None:
    """ops.combine(bf16_partial_sums=True), and the backward of ops.dispatch(bf16_partial_sums=True), bit for bit
    against float32 node partials rounded to bf16: 2 nodes of 2 ranks (where that rounding differs from float32
    partials), and one node (the same bits as without the flag)."""
    _no_failures(pools(world).run(ops_bodies.ops_bf16_partial_sums, ranks_per_node, use_custom_ops))


@pytest.mark.parametrize(
    "backend,num_chunks", [("eager", 0), ("eager", 2), ("aot_eager", 0), ("aot_eager", 1), ("aot_eager", 2),
                           ("inductor", 0)],
)
def test_checkpointed(pools, backend: str, num_chunks: int) -> None:
    """Dispatch and combine (num_chunks 0), or an MoE layer in chunks, under activation checkpointing with
    context_fn=ops.checkpoint_context_fn, eager and compiled, equal the same without checkpointing."""
    _no_failures(pools(2).run(ops_bodies.ops_checkpointed, backend, num_chunks))


@pytest.mark.gpu(2)
@pytest.mark.parametrize("backend", ["nvshmem", "torch"])
def test_second_derivative_and_checkpointed_gpu(pools, backend: str) -> None:
    """On CUDA (float32): the eager path's second derivatives (the weights' part sent as float32 rows by cached
    dispatches), the custom-op path's refusal of them; checkpoint_context_fn eagerly and with aot_eager."""
    from largeep import native

    if backend == "nvshmem" and native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    pool = pools(2, "nccl")
    for num_worst, custom in ((0, False), (32, False), (0, True)):
        _no_failures(pool.run(ops_bodies.ops_second_derivative, [6, 3], num_worst, custom, backend))
    for mode, chunks in (("eager", 0), ("eager", 2), ("aot_eager", 2)):
        _no_failures(pool.run(ops_bodies.ops_checkpointed, mode, chunks, backend))


@pytest.mark.gpu(2)
@pytest.mark.parametrize("backend", ["nvshmem", "torch"])
def test_dispatch_fp8_gpu(pools, backend: str) -> None:
    """ops.dispatch(use_fp8=True) on CUDA: FP8 round trips bit for bit in order, with async_finish, after a late
    previous_event and with num_worst_tokens; gradients those of the bf16 dispatch."""
    from largeep import native

    if backend == "nvshmem" and native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    _no_failures(pools(2, "nccl").run(ops_bodies.ops_fp8_gpu, backend))


@pytest.mark.gpu(2)
def test_zero_copy_training_gpu(pools) -> None:
    """Eager ops under autograd keep a mask of the received ids, not the ids: every dispatch of a step stays
    zero-copy while the graph lives, with and without async_finish, gradients as with copied outputs."""
    from largeep import native

    if native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    _no_failures(pools(2, "nccl").run(ops_bodies.ops_zero_copy_training))


def test_checkpoint_policy() -> None:
    """checkpoint_policy saves largeep's communication ops and dispatch_recv only; checkpoint_context_fn asks a
    policy of the caller's about every other op."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint

    lib = torch.ops.largeep
    for op in (lib.dispatch_send, lib.dispatch_recv, lib.dispatch_cached, lib.combine, lib.low_latency_dispatch,
               lib.low_latency_combine):
        assert ops.checkpoint_policy(None, op.default) == CheckpointPolicy.MUST_SAVE, op
    for op in (lib.grouped_mm.default, lib.expert_order.default, torch.ops.aten.mm.default):
        assert ops.checkpoint_policy(None, op) is None, op
    asked: set[str] = set()

    def mine(ctx, op, *args, **kwargs):
        asked.add(str(op))
        return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.sin.default else CheckpointPolicy.PREFER_RECOMPUTE

    x = torch.randn(5, requires_grad=True)
    y = checkpoint(lambda t: torch.sin(t).exp(), x, use_reentrant=False,
                   context_fn=functools.partial(ops.checkpoint_context_fn, policy=mine))
    y.sum().backward()
    assert torch.allclose(x.grad, torch.cos(x) * torch.sin(x).exp())
    assert asked == {"aten.sin.default", "aten.exp.default"}, asked


def test_partial_backward(pools) -> None:
    """Custom-op handles go with the graph: a backward that skips dispatch's, or none, leaves none behind."""
    _no_failures(pools(2).run(ops_bodies.ops_partial_backward))


def test_refused_call_keeps_handle(pools) -> None:
    """A custom-op combine or cached dispatch refused for its arguments leaves the handle for a corrected call."""
    _no_failures(pools(2).run(ops_bodies.ops_refused_call_keeps_handle))


def _wrs_reference(src: torch.Tensor, pos: torch.Tensor, w: torch.Tensor, pad: int | None) -> torch.Tensor:
    """The weighted row sum, one entry at a time in float64."""
    r, k = pos.shape
    out = torch.zeros(r, src.shape[1], dtype=torch.float64)
    for i in range(r):
        for j in range(k):
            p = int(pos[i, j])
            if pad is None or p != pad:
                out[i] += float(w[i, j]) * src[p].double().cpu()
    return out


def _wrs_case(seed: int, r: int, k: int, h: int, dtype: torch.dtype, pad: bool, device: str):
    g = torch.Generator().manual_seed(seed)
    p = r * k
    src = torch.randn(p + 1, h, generator=g).to(dtype)
    pos = torch.randperm(p, generator=g).view(r, k)
    padv = None
    if pad:
        padv = p  # the extra row: never summed
        pos = torch.where(torch.rand(r, k, generator=g) < 0.3, torch.full_like(pos, padv), pos)
    w = torch.rand(r, k, generator=g)
    return src.to(device), pos.to(device), w.to(device), padv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("pad", [False, True])
def test_weighted_row_sum(dtype: torch.dtype, k: int, pad: bool) -> None:
    """ops.weighted_row_sum against a float64 loop, forward and gradients (CPU: embedding_bag path)."""
    src, pos, w, padv = _wrs_case(7 + k, 9, k, 64, dtype, pad, "cpu")
    ref = _wrs_reference(src, pos, w, padv)
    y = ops.weighted_row_sum(src, pos, w, padv)
    assert y.dtype == dtype and y.shape == ref.shape
    tol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol)
    # gradients: against autograd through the same sum written with index ops in float64
    s64 = src.double().requires_grad_()
    w64 = w.double().requires_grad_()
    valid = pos != (padv if padv is not None else -1)
    safe = torch.where(valid, pos, 0)
    y64 = (s64[safe] * torch.where(valid, w64, 0.0).unsqueeze(2)).sum(1)
    gy = torch.randn(y64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y64.backward(gy)
    s_in, w_in = src.clone().requires_grad_(), w.clone().requires_grad_()
    ops.weighted_row_sum(s_in, pos, w_in, padv).backward(gy.to(dtype))
    assert torch.allclose(s_in.grad.double(), s64.grad, rtol=tol, atol=tol)
    assert torch.allclose(w_in.grad.double(), w64.grad, rtol=4 * tol, atol=4 * tol)


@pytest.mark.gpu(1)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k,h", [(1, 7168), (3, 7168), (8, 7168), (10, 7168), (20, 7168), (3, 100)])
@pytest.mark.parametrize("pad", [False, True])
def test_weighted_row_sum_gpu(dtype: torch.dtype, k: int, h: int, pad: bool) -> None:
    """On CUDA against a float64 loop: largeep's kernel (K <= 16, rows of 16-byte multiples), embedding_bag for
    the rest (K 20, 100 bf16 values a row)."""
    from largeep import native

    if native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    src, pos, w, padv = _wrs_case(11 + k, 37, k, h, dtype, pad, "cuda")
    native_ok = ops._native_rows_ok(src, pos)
    assert native_ok == (k <= 16 and (h * src.element_size()) % 16 == 0)
    y = ops.weighted_row_sum(src, pos, w, padv)
    # embedding_bag rounds the weights to src's dtype first (documented); largeep's kernel keeps them in float32
    w_ref = w.cpu() if native_ok else w.cpu().to(dtype).float()
    ref = _wrs_reference(src.cpu(), pos.cpu(), w_ref, padv)
    tol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    assert y.dtype == dtype
    assert torch.allclose(y.double().cpu(), ref, rtol=tol, atol=tol)


def test_weighted_row_sum_opcheck() -> None:
    src, pos, w, padv = _wrs_case(5, 6, 3, 32, torch.float32, True, "cpu")
    torch.library.opcheck(torch.ops.largeep.weighted_row_sum.default, (src.requires_grad_(), pos, w, padv))


class _OnCuda:
    """A CPU tensor that says it is on CUDA, for _native_rows_ok's routing decision on CPU."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.is_cuda = True

    def __getattr__(self, name: str) -> object:
        return getattr(self.t, name)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_weighted_row_sum_no_entries(monkeypatch: pytest.MonkeyPatch, requires_grad: bool) -> None:
    """K = 0 (no top-k entries): zeros [R, H] in src's dtype, without largeep's kernel (which takes 1 <= K <= 16),
    even where the kernel would otherwise be taken (routing faked on CPU); the gradient of src is zero."""
    src = torch.randn(5, 32)
    pos = torch.zeros(4, 0, dtype=torch.int64)
    assert not ops._native_rows_ok(_OnCuda(src), _OnCuda(pos))  # type: ignore[arg-type]
    assert ops._native_rows_ok(_OnCuda(src), _OnCuda(torch.zeros(4, 1, dtype=torch.int64)))  # type: ignore[arg-type]

    class NoKernel:
        def weighted_row_sum(self, *args: object) -> None:
            raise AssertionError("largeep's kernel was called with K = 0")

    monkeypatch.setattr(ops, "_native_rows_ok", lambda *a: True)
    monkeypatch.setattr(ops, "_native_rows", lambda: NoKernel())
    src.requires_grad_(requires_grad)
    y = ops.weighted_row_sum(src, pos, torch.zeros(4, 0), pad=None)
    assert y.shape == (4, 32) and y.dtype == src.dtype and not bool(y.any())
    if requires_grad:
        y.sum().backward()
        assert src.grad is not None and not bool(src.grad.any())


def test_weighted_row_sum_rejects() -> None:
    from largeep.errors import ArgumentError

    src, pos, w, _ = _wrs_case(5, 6, 3, 32, torch.float32, False, "cpu")
    with pytest.raises(ArgumentError, match="pos must be int64"):
        ops.weighted_row_sum(src, pos.int(), w)
    with pytest.raises(ArgumentError, match=r"w must be \[R, K\] = \(6, 3\) on cpu, got \(6, 2\)"):
        ops.weighted_row_sum(src, pos, w[:, :2])
    with pytest.raises(ArgumentError, match="w must be .* on cpu, got .* on meta"):  # (the kernel took its pointer)
        ops.weighted_row_sum(src, pos, w.to("meta"))
    with pytest.raises(ArgumentError, match="pad must be a row"):
        ops.weighted_row_sum(src, pos, w, -1)


def _order_reference(idx: torch.Tensor, e: int, num_pairs: int | None) -> tuple[list, list, list, int | None]:
    """Expert order by a Python stable sort: (offs, src, pos, pad) as ops.expert_order documents them."""
    r, k = idx.shape
    flat = idx.reshape(-1).tolist()
    keys = [v if 0 <= v < e else e for v in flat]
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    counts = collections.Counter(keys)
    offs, run = [], 0
    for x in range(e):
        run += counts[x]
        offs.append(run)
    pos = [0] * len(keys)
    for p, i in enumerate(order):
        pos[i] = p
    if num_pairs is None:
        return offs, [i // k for i in order], pos, None
    pad = num_pairs if num_pairs < r * k else None
    src = [i // k for i in order[:num_pairs]] + ([0] if pad is not None else [])
    pos = [pos[i] if keys[i] < e else pad for i in range(len(keys))]
    return offs, src, pos, pad


def _order_case(r: int, k: int, e: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, e + 2, (r, k), generator=g)  # -1, e and e + 1 name no expert
    return idx.to(device)


@pytest.mark.parametrize("r,k,e", [(0, 4, 3), (1, 1, 1), (7, 3, 5), (50, 8, 16), (300, 6, 40)])
@pytest.mark.parametrize("pairs", [False, True])
def test_expert_order(r: int, k: int, e: int, pairs: bool) -> None:
    """The torch path (CPU) against a Python stable sort, with and without the number of pairs."""
    idx = _order_case(r, k, e, r + k + e, "cpu")
    num_pairs = int(((idx >= 0) & (idx < e)).sum()) if pairs else None
    offs, src, pos, pad = ops.expert_order(idx, e, num_pairs)
    want = _order_reference(idx, e, num_pairs)
    assert (offs.tolist(), src.tolist(), pos.reshape(-1).tolist(), pad) == want
    assert offs.dtype == torch.int32 and src.dtype == torch.int64 and pos.shape == (r, k)


def test_expert_order_opcheck() -> None:
    idx = _order_case(9, 4, 6, 1, "cpu")
    torch.library.opcheck(torch.ops.largeep.expert_order.default, (idx, 6, -1))
    torch.library.opcheck(torch.ops.largeep.expert_order.default, (idx, 6, int(((idx >= 0) & (idx < 6)).sum())))


@pytest.mark.gpu(1)
@pytest.mark.parametrize("r,k,e", [(0, 8, 4), (1, 1, 1), (3, 8, 1024), (130, 8, 128), (4100, 8, 8),
                                   (20000, 6, 256), (1023, 1, 2), (333, 3, 1), (70000, 8, 64)])
@pytest.mark.parametrize("pairs", [False, True])
def test_expert_order_gpu(r: int, k: int, e: int, pairs: bool) -> None:
    """The native counting sort (CUDA) gives exactly the Python stable sort's order, chunk edges included (256
    entries a chunk; 288 for the 560,000 entries of the last case, above the 2048 chunks of 256 entries), for
    one expert up to 1024 and with entries naming none."""
    from largeep import native

    if native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    idx = _order_case(r, k, e, 7 * r + k, "cpu")
    num_pairs = int(((idx >= 0) & (idx < e)).sum()) if pairs else None
    offs, src, pos, pad = ops.expert_order(idx.cuda(), e, num_pairs)
    torch.cuda.synchronize()
    want = _order_reference(idx, e, num_pairs)
    assert (offs.tolist(), src.tolist(), pos.reshape(-1).tolist(), pad) == want
    if r == 130:
        torch.library.opcheck(torch.ops.largeep.expert_order.default, (idx.cuda(), e, num_pairs or -1))


def test_expert_order_rejects() -> None:
    from largeep.errors import ArgumentError

    idx = _order_case(5, 2, 3, 0, "cpu")
    with pytest.raises(ArgumentError, match="int64 \\[R, K\\]"):
        ops.expert_order(idx.int(), 3)
    with pytest.raises(ArgumentError, match="int64 \\[R, K\\]"):
        ops.expert_order(idx.reshape(-1), 3)
    with pytest.raises(ArgumentError, match="num_pairs must be in \\[0, 10\\]"):
        ops.expert_order(idx, 3, 11)
    with pytest.raises(ArgumentError, match="num_experts must be >= 1"):
        ops.expert_order(idx, 0)


def test_ops_bypass_only_in_plain_eager() -> None:
    """Eager calls without gradients skip the custom-op dispatch, but meta and fake tensors still get the ops' fake
    implementations (shapes, no data access), as before the bypass."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, b = torch.randn(8, 16), torch.randn(2, 16, 4)
    offs = torch.tensor([3, 8], dtype=torch.int32)
    idx = _order_case(6, 2, 3, 0, "cpu")
    assert ops._direct(a, b) and not ops._direct(a.requires_grad_(), b)
    a = a.detach()
    with torch.no_grad():
        ma, mb, mo = a.to("meta"), b.to("meta"), offs.to("meta")
        assert not ops._direct(ma, mb)
        assert ops.grouped_mm(ma, mb, mo).shape == (8, 4)
        assert ops.grouped_mm(ma, mb, mo, 8).shape == (8, 4)
        offs_m, src_m, pos_m, pad = ops.expert_order(idx.to("meta"), 3, 5)
        assert (offs_m.shape, src_m.shape, pos_m.shape, pad) == ((3,), (6,), (6, 2), 5)
        with FakeTensorMode() as mode:
            fa, fb, fo = mode.from_tensor(a), mode.from_tensor(b), mode.from_tensor(offs)
            assert not ops._direct(fa, fb)
            assert ops.grouped_mm(fa, fb, fo).shape == (8, 4)
            y = ops.weighted_row_sum(fa, mode.from_tensor(torch.zeros(3, 2, dtype=torch.int64)),
                                     mode.from_tensor(torch.ones(3, 2)), None)
            assert y.shape == (3, 16)


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(r=st.integers(0, 70), k=st.integers(1, 9), e=st.integers(1, 40), pairs=st.booleans(),
       seed=st.integers(0, 2**16))
def test_expert_order_property(r: int, k: int, e: int, pairs: bool, seed: int) -> None:
    """Random shapes (empty, one expert, more experts than entries) and ids in [-3, E + 3): the torch path (and the
    native one on CUDA, where the GPU test above runs it) equals the Python stable sort."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-3, e + 3, (r, k), generator=g)
    num_pairs = int(((idx >= 0) & (idx < e)).sum()) if pairs else None
    offs, src, pos, pad = ops.expert_order(idx, e, num_pairs)
    assert (offs.tolist(), src.tolist(), pos.reshape(-1).tolist(), pad) == _order_reference(idx, e, num_pairs)
    # every named row comes first in expert order, each expert's entries in entry order
    if r * k:
        keys = torch.where((idx >= 0) & (idx < e), idx, e).reshape(-1)
        if num_pairs is None:
            assert torch.equal(keys[torch.argsort(pos.reshape(-1))], torch.sort(keys, stable=True).values)


def test_ops_dispatch_refuses_what_it_cannot_differentiate() -> None:
    # refused before anything is looked up or sent: an FP8 pair (no gradient path) and missing weights
    from largeep import ArgumentError

    x, idx, w = torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1)
    with pytest.raises(ArgumentError, match="'x'.*use_fp8=True"):
        ops.dispatch(0, (x, x), idx, w)  # type: ignore[arg-type]
    # use_fp8: a bool, and an x that quantises (bf16/fp32, H a multiple of 128), on either path
    with pytest.raises(ArgumentError, match="'use_fp8' must be a bool"):
        ops.dispatch(0, x, idx, w, use_fp8=1)  # type: ignore[arg-type]
    for custom in (False, True):
        with pytest.raises(ArgumentError, match=r"use_fp8=True.*'x'.*multiple of 128.*\(2, 8\)"):
            ops.dispatch(0, x, idx, w, use_fp8=True, use_custom_ops=custom)
        with pytest.raises(ArgumentError, match="use_fp8=True.*'x'.*torch.float16"):
            ops.dispatch(0, torch.zeros(2, 128, dtype=torch.float16), idx, w, use_fp8=True, use_custom_ops=custom)
    # bf16_partial_sums: a bool, and bf16 x (the backward's combine of its gradient rows, in x's dtype), either path
    with pytest.raises(ArgumentError, match="'bf16_partial_sums' must be a bool"):
        ops.dispatch(0, x.bfloat16(), idx, w, bf16_partial_sums=1)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="ops.combine: argument 'bf16_partial_sums' must be a bool"):
        ops.combine(0, x.bfloat16(), None, bf16_partial_sums="yes")  # type: ignore[arg-type]
    for custom in (False, True):
        with pytest.raises(ArgumentError, match=r"'bf16_partial_sums' = True needs x in bfloat16.*torch.float32"):
            ops.dispatch(0, x, idx, w, bf16_partial_sums=True, use_custom_ops=custom)
    with pytest.raises(ArgumentError, match="'topk_weights'"):
        ops.dispatch(0, x, idx, None)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="'topk_weights'"):
        ops.dispatch(0, x, idx, None, use_custom_ops=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [None, True, "buf"])
def test_ops_refuse_what_is_no_buffer(bad: object) -> None:
    """Neither a Buffer nor an int id (True among them, which would name Buffer id 1): refused naming 'buffer', on
    either path, before anything is looked up or sent."""
    from largeep import ArgumentError

    x, idx, w = torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1)
    ll = torch.zeros(2, 8, dtype=torch.bfloat16)
    calls = [
        lambda custom: ops.dispatch(bad, x, idx, w, use_custom_ops=custom),  # type: ignore[arg-type]
        lambda custom: ops.low_latency_dispatch(bad, ll, idx, use_custom_ops=custom),  # type: ignore[arg-type]
    ]
    says = f"argument 'buffer' must be a largeep.Buffer.*{type(bad).__name__}"
    for call in calls:
        for custom in (False, True):
            with pytest.raises(ArgumentError, match=says):
                call(custom)
    for handle in (ops.TicketHandle(torch.zeros(1, dtype=torch.int64), 2), torch.zeros(1, dtype=torch.int64)):
        with pytest.raises(ArgumentError, match="argument 'buffer' must be a largeep.Buffer"):
            if isinstance(handle, ops.TicketHandle):
                ops.combine(bad, x, handle)  # type: ignore[arg-type]
            else:
                ops.low_latency_combine(bad, ll, idx, w, handle)  # type: ignore[arg-type]


def test_grouped_mm_refuses_caller_mistakes_without_turning_native_off() -> None:
    from largeep import ArgumentError

    a, b = torch.randn(4, 8), torch.randn(2, 8, 4)
    good = torch.tensor([2, 4], dtype=torch.int32)
    with pytest.raises(ArgumentError, match="int32"):
        ops.grouped_mm(a, b, good.long())
    with pytest.raises(ArgumentError, match="dtype"):
        ops.grouped_mm(a, b.double(), good)
    with pytest.raises(ArgumentError, match=r"got a \(4, 8\), b \(2, 16, 4\)"):
        ops.grouped_mm(a, torch.randn(2, 16, 4), good)  # K differs
    with pytest.raises(ArgumentError, match="offs"):
        ops.grouped_mm(a, b, torch.tensor([1, 2, 4], dtype=torch.int32))  # more groups than b has
    for dtype in (torch.float8_e4m3fn, torch.int64):  # (FP8: the padded bmm's NotImplementedError otherwise)
        with pytest.raises(ArgumentError, match=f"'a' and 'b' must be bf16/fp16/fp32.*got {dtype}"):
            ops.grouped_mm(a.to(dtype), b.to(dtype), good)
    assert (("cpu", torch.float32)) not in ops._native_failed
    ops.reset_grouped_mm_stats()
    ops.grouped_mm(a, b, good)
    assert set(ops.grouped_mm_stats()) == {"native"}, ops.grouped_mm_stats()


def test_grouped_mm_native_off_only_where_the_fallback_ran(monkeypatch) -> None:
    """A native failure turns the native kernel off for the process only once the padded bmm has run the same
    inputs: where the fallback fails too (inputs no kernel can run), the error is raised and native stays on."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm")
    a, b = torch.randn(4, 8), torch.randn(2, 8, 4)
    offs = torch.tensor([2, 4], dtype=torch.int32)
    want = torch.cat([a[:2] @ b[0], a[2:] @ b[1]])
    monkeypatch.setattr(ops, "_native_failed", {})

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported here")

    monkeypatch.setattr(torch, "_grouped_mm", broken)
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", broken)
    with pytest.raises(RuntimeError, match="unsupported here"):
        ops.grouped_mm(a, b, offs)
    assert ops._native_failed == {}
    monkeypatch.setattr(torch, "bmm", real_bmm)
    torch.testing.assert_close(ops.grouped_mm(a, b, offs), want)
    assert ops._native_failed[("cpu", torch.float32)].startswith("torch._grouped_mm failed: unsupported here")


# ---------------------------------------------------------------------------------------------------------------
# A device-side count: weighted_row_sum skipping the rows at or past it, and gather_rows stopping at it
# ---------------------------------------------------------------------------------------------------------------


def _count_case(seed: int, r: int, k: int, h: int, dtype: torch.dtype, count: int, device: str):
    """src [r*k, h] whose rows at or past count hold NaN (as unspecified GEMM rows may), pos a permutation of the
    positions [r, k], weights, count as an int32 tensor [1]."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(r * k, h, generator=g)
    src[count:] = float("nan")
    pos = torch.randperm(r * k, generator=g).view(r, k)
    w = torch.rand(r, k, generator=g)
    cnt = torch.tensor([count], dtype=torch.int32)
    return src.to(dtype).to(device), pos.to(device), w.to(device), cnt.to(device)


def _check_wrs_count(seed: int, r: int, k: int, h: int, dtype: torch.dtype, count: int, device: str) -> None:
    """weighted_row_sum with count against float64 autograd over the entries below count (the NaN rows replaced by
    zeros in the reference only): output, and grads of src (zero on the rows at or past count) and of the weights
    (zero for the skipped entries); nothing non-finite anywhere."""
    src, pos, w, cnt = _count_case(seed, r, k, h, dtype, count, device)
    s_in, w_in = src.clone().requires_grad_(), w.clone().requires_grad_()
    y = ops.weighted_row_sum(s_in, pos, w_in, None, cnt)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
    y.backward(gy.to(dtype).to(device))
    keep = (pos < count).cpu()
    s64 = torch.where(torch.arange(r * k).unsqueeze(1) < count, src.cpu().double(), 0.0).requires_grad_()
    w64 = w.cpu().double().requires_grad_()
    y64 = (s64[pos.cpu()] * torch.where(keep, w64, 0.0).unsqueeze(2)).sum(1)
    y64.backward(gy.to(dtype).double())
    # embedding_bag (the fallback) rounds the weights to src's dtype first; largeep's kernel keeps them in float32
    tol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    layer_bodies.close(y, y64, "weighted_row_sum with count", rtol=tol)
    layer_bodies.close(s_in.grad, s64.grad, "grad of src", rtol=tol)
    layer_bodies.close(w_in.grad, w64.grad, "grad of w", rtol=4 * tol)
    assert (s_in.grad[count:] == 0).all() and (w_in.grad[~keep.to(device)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("count", [0, 5, 17, 24])
def test_weighted_row_sum_count(dtype: torch.dtype, count: int) -> None:
    """CPU (embedding_bag path): entries at or past count are skipped, NaN in their rows leaks nowhere."""
    _check_wrs_count(count, 6, 4, 32, dtype, count, "cpu")


def test_weighted_row_sum_count_positions_past_src() -> None:
    """CPU (embedding_bag path): an entry left out by the count may name a position past src (the native kernel
    never reads it); the fallback must not read it either, nor let NaN in a pad row through."""
    src = torch.randn(4, 8)
    src[3] = float("nan")
    pos = torch.tensor([[0, 1], [2, 7], [3, 1]])
    w = torch.tensor([[0.5, 2.0], [1.5, 3.0], [4.0, 1.0]])
    y = ops.weighted_row_sum(src, pos, w, None, torch.tensor([3], dtype=torch.int32))
    want = torch.stack([0.5 * src[0] + 2.0 * src[1], 1.5 * src[2], 1.0 * src[1]])
    torch.testing.assert_close(y, want)
    y = ops.weighted_row_sum(src, pos, w, 1, torch.tensor([3], dtype=torch.int32))  # pad 1 and the count
    torch.testing.assert_close(y, torch.stack([0.5 * src[0], 1.5 * src[2], torch.zeros(8)]))


def _check_wrs_outside_src(device: str, pad: int | None, count: int | None) -> None:
    """Entries naming no row of src (negative, or at or past its rows) are left out like pad, on either path, and
    get zero weight gradients; nothing is read out of bounds (on CUDA an out-of-bounds read or a device assert would
    end the process's CUDA context). Against a loop over the entries kept."""
    g = torch.Generator().manual_seed(5)
    src = torch.randn(6, 64, generator=g)
    pos = torch.tensor([[0, -1], [7, 2], [-5, 9], [3, 4], [1_000_000, 5], [2, 6]])
    w = torch.rand(6, 2, generator=g)
    limit = 6 if count is None else min(count, 6)
    want = torch.zeros(6, 64, dtype=torch.float64)
    kept = torch.zeros(6, 2, dtype=torch.bool)
    for i in range(6):
        for j in range(2):
            p = int(pos[i, j])
            if 0 <= p < limit and p != pad:
                want[i] += float(w[i, j]) * src[p].double()
                kept[i, j] = True
    cnt = None if count is None else torch.tensor([count], dtype=torch.int32, device=device)
    s_in = src.to(device).requires_grad_()
    w_in = w.to(device).requires_grad_()
    y = ops.weighted_row_sum(s_in, pos.to(device), w_in, pad, cnt)
    layer_bodies.close(y, want, "weighted_row_sum with positions outside src", rtol=1e-5)
    y.sum().backward()
    assert (w_in.grad.cpu()[~kept] == 0).all() and (w_in.grad.cpu()[kept] != 0).all()
    named = torch.zeros(6, dtype=torch.bool)
    named[pos[kept]] = True
    assert (s_in.grad.cpu()[~named] == 0).all() and torch.isfinite(s_in.grad).all()


@pytest.mark.parametrize(("pad", "count"), [(None, None), (3, None), (None, 4), (3, 9)])
def test_weighted_row_sum_positions_outside_src(pad: int | None, count: int | None) -> None:
    """CPU (embedding_bag path)."""
    _check_wrs_outside_src("cpu", pad, count)


@pytest.mark.gpu(1)
@pytest.mark.parametrize(("pad", "count"), [(None, None), (3, None), (None, 4), (3, 9)])
def test_weighted_row_sum_positions_outside_src_gpu(pad: int | None, count: int | None) -> None:
    """CUDA: largeep's kernel (or embedding_bag where the native module is missing)."""
    _check_wrs_outside_src("cuda", pad, count)


def _gather_case(seed: int, n: int, k: int, e: int, h: int, dtype: torch.dtype, device: str):
    """An expert order of random ids (-1 and ids >= e name no expert) over x [n, h] whose rows naming no expert hold
    NaN; src's entries past the valid count replaced by rows out of range (never to be read)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, e + 1, (n, k), generator=g)
    if n > 2:
        idx[1] = -1
    x = torch.randn(n, h, generator=g)
    x[((idx < 0) | (idx >= e)).all(dim=1)] = float("nan")
    offs, src, pos, _ = ops.expert_order(idx, e, None)
    count = int(offs[-1]) if offs.numel() else 0
    src = src.clone()
    src[count:] = torch.tensor([10**9, -7]).repeat(n * k)[: n * k - count]
    return x.to(dtype).to(device), src.to(device), offs[-1:].to(device), pos.to(device), count


def _check_gather(seed: int, n: int, k: int, e: int, h: int, dtype: torch.dtype, with_pos: bool, device: str,
                  num_blocks: int | None = None) -> None:
    """gather_rows: the rows below count exactly x[src]; backward with NaN in the gradient's rows at or past count
    equals an index_add of the rows below it (float64), rows of x named by nothing get 0."""
    x, src, cnt, pos, count = _gather_case(seed, n, k, e, h, dtype, device)
    xg = x.clone().requires_grad_()
    out = ops.gather_rows(xg, src, cnt, pos if with_pos else None, num_blocks=num_blocks)
    assert out.shape == (n * k, h) and out.dtype == dtype
    assert torch.equal(out[:count], x[src[:count]]), "gathered rows differ"
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    g[count:] = float("nan")
    out.backward(g.to(device))
    ref = torch.zeros(n, h, dtype=torch.float64).index_add_(0, src[:count].cpu(), g[:count].double())
    layer_bodies.close(xg.grad, ref, "grad of x", rtol=2.0**-8 if dtype == torch.bfloat16 else 1e-6)
    assert xg.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k,e", [(0, 3, 2), (1, 1, 1), (9, 3, 4), (40, 4, 3)])
@pytest.mark.parametrize("with_pos", [False, True])
def test_gather_rows(dtype: torch.dtype, n: int, k: int, e: int, with_pos: bool) -> None:
    """CPU (torch path): the rows below the device-side count, src past it never read, grads of those rows only."""
    _check_gather(n * 10 + k, n, k, e, 24, dtype, with_pos, "cpu")


def test_gather_rows_count_bounds() -> None:
    # count 0 gathers nothing; a count past P stops at P; the fallback's rows past count are x[0]
    x = torch.randn(5, 8)
    src = torch.tensor([4, 2, 99, -3])
    out = ops.gather_rows(x, src, torch.tensor([2], dtype=torch.int32))
    assert torch.equal(out[:2], x[[4, 2]]) and torch.equal(out[2:], x[[0, 0]])
    full = ops.gather_rows(x, src[:2], torch.tensor([9], dtype=torch.int32))
    assert torch.equal(full, x[[4, 2]])
    assert ops.gather_rows(x[:0], src, torch.tensor([0], dtype=torch.int32)).shape == (4, 8)


def test_gather_rows_opcheck() -> None:
    x, src, cnt, pos, _ = _gather_case(3, 7, 3, 4, 16, torch.float32, "cpu")
    x = torch.nan_to_num(x)
    torch.library.opcheck(torch.ops.largeep.gather_rows.default, (x.requires_grad_(), src, cnt, pos, 0))
    torch.library.opcheck(torch.ops.largeep.gather_rows.default, (x, src, cnt, None, 0))
    s, p, w, c = _count_case(4, 5, 3, 16, torch.float32, 9, "cpu")
    torch.library.opcheck(torch.ops.largeep.weighted_row_sum.default,
                          (torch.nan_to_num(s).requires_grad_(), p, w, -1, c))


def test_gather_rows_rejects() -> None:
    from largeep.errors import ArgumentError

    x, src, cnt = torch.randn(4, 8), torch.tensor([0, 1]), torch.tensor([1], dtype=torch.int32)
    with pytest.raises(ArgumentError, match="x must be"):
        ops.gather_rows(x[0], src, cnt)
    with pytest.raises(ArgumentError, match="src must be int64"):
        ops.gather_rows(x, src.int(), cnt)
    with pytest.raises(ArgumentError, match="count must be an int32"):
        ops.gather_rows(x, src, cnt.long())
    with pytest.raises(ArgumentError, match="count must be an int32"):
        ops.gather_rows(x, src, torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ArgumentError, match="pos must be int64"):
        ops.gather_rows(x, src, cnt, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ArgumentError, match="num_blocks"):
        ops.gather_rows(x, src, cnt, num_blocks=0)
    with pytest.raises(ArgumentError, match=r"num_blocks must be in \[1, 2\*\*31\)"):
        ops.gather_rows(x, src, cnt, num_blocks=2**31)  # (the native kernel takes an int)
    with pytest.raises(ArgumentError, match="count must be an int32"):
        ops.weighted_row_sum(x, torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1), None, cnt.float())


def _native_or_skip() -> object:
    from largeep import native

    if native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    return native.module()


@pytest.mark.gpu(1)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("count", [0, 1, 333, 2048])
def test_weighted_row_sum_count_gpu(dtype: torch.dtype, count: int) -> None:
    """largeep's kernel with a device-side count (and the embedding_bag path for rows of 100 bf16): entries at or
    past it skipped, NaN in their rows leaks nowhere; against float64."""
    _native_or_skip()
    _check_wrs_count(count + 1, 256, 8, 512, dtype, count, "cuda")
    if dtype == torch.bfloat16:
        src, pos, _, _ = _count_case(1, 4, 3, 100, dtype, 5, "cuda")
        assert not ops._native_rows_ok(src, pos)
        _check_wrs_count(count + 2, 40, 3, 100, dtype, min(count, 120), "cuda")


@pytest.mark.gpu(1)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k,e,h", [(0, 8, 4, 7168), (1, 1, 1, 64), (37, 3, 5, 7168), (1000, 8, 16, 512),
                                     (300, 4, 8, 100)])
@pytest.mark.parametrize("with_pos", [False, True])
def test_gather_rows_gpu(dtype: torch.dtype, n: int, k: int, e: int, h: int, with_pos: bool) -> None:
    """largeep's gather (rows of 16-byte multiples; 100 bf16 = 200 bytes takes the torch path): the rows below the
    device-side count exactly x[src], src past it never read (out-of-range entries there), grads of those rows only;
    with one block (grid-stride) and the default grid."""
    _native_or_skip()
    x = torch.empty(2, h, dtype=dtype, device="cuda")
    assert ops._native_gather_ok(x, x.new_zeros(1, dtype=torch.int64), x.new_zeros(1, dtype=torch.int32)) == (
        h * x.element_size() % 16 == 0
    )
    _check_gather(n + k + h, n, k, e, h, dtype, with_pos, "cuda")
    _check_gather(n + k + h + 1, n, k, e, h, dtype, with_pos, "cuda", num_blocks=1)


@pytest.mark.gpu(1)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
@pytest.mark.parametrize("blocks", [1, 3, 0])
def test_gather_rows_leaves_tail_untouched_gpu(dtype: torch.dtype, blocks: int) -> None:
    """The native kernel into a poisoned output: rows below count are x[src] exactly, every byte of the rows at or
    past it is left as it was (count 0, inside, equal to P, past P); any row dtype (a byte copy)."""
    C = _native_or_skip()
    g = torch.Generator().manual_seed(blocks)
    n, p, h = 300, 700, 64
    x = torch.randint(0, 200, (n, h), generator=g).to(dtype).cuda()
    src = torch.randint(0, n, (p,), generator=g).cuda()
    for count in (0, 1, 451, p, p + 9):
        src_bad = src.clone()
        src_bad[count:] = 10**9  # never read
        out = torch.full((p, h), 77, dtype=dtype, device="cuda")
        cnt = torch.tensor([count], dtype=torch.int32, device="cuda")
        ops._gather_rows_into(C, out, x, src_bad, cnt, blocks)
        torch.cuda.synchronize()
        c = min(count, p)
        assert torch.equal(out[:c], x[src[:c]]), count
        assert (out[c:] == 77).all(), count


@pytest.mark.gpu(1)
def test_gather_rows_opcheck_gpu() -> None:
    # every row valid (the op's outputs past count are unspecified, which opcheck's comparisons cannot allow)
    _native_or_skip()
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 4, (50, 3), generator=g).cuda()
    offs, src, pos, _ = ops.expert_order(idx, 4, None)
    x = torch.randn(50, 64, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.largeep.gather_rows.default, (x, src, offs[-1:], pos, 0))
    torch.library.opcheck(torch.ops.largeep.gather_rows.default, (x, src, offs[-1:], None, 0))


def _within_one_rounding(got: torch.Tensor, ref: torch.Tensor, slack: torch.Tensor | float, what: str) -> None:
    """bf16 ``got`` is ``ref`` (float64) rounded once to bf16: |got - ref| <= 2^-8 |ref| (half a bf16 ulp, relative)
    plus ``slack`` (float32 rounding of the terms before that one rounding)."""
    err = (got.double() - ref).abs()
    bound = 2.0**-8 * ref.abs() + slack
    assert bool((err <= bound).all()), f"{what}: {int((err > bound).sum())} values off by more than one bf16 rounding"


@pytest.mark.parametrize("cut", ["pad", "count"])
def test_weighted_row_sum_bf16_grads_in_float32(cut: str) -> None:
    """bf16 rows, K = 8, H = 256: the weights' gradient is a float32 dot product of each bf16 row with the bf16
    output gradient (not rounded to bf16: against float64 to float32 rounding), and each row's gradient w * grad
    is rounded to bf16 once. Entries left out (pad, or at or past count) get zero gradients."""
    r, k, h = 12, 8, 256
    src, pos, w, padv = _wrs_case(21, r, k, h, torch.bfloat16, cut == "pad", "cpu")
    count = None
    if cut == "count":
        count = torch.tensor([r * k * 2 // 3], dtype=torch.int32)
    keep = pos != padv if padv is not None else pos < int(count)
    gy = torch.randn(r, h, generator=torch.Generator().manual_seed(22)).to(torch.bfloat16)
    s_in, w_in = src.clone().requires_grad_(), w.clone().requires_grad_()
    y = ops.weighted_row_sum(s_in, pos, w_in, padv, count)
    y.backward(gy)
    gy64 = gy.double()
    want_gw = torch.where(keep, (src.double()[pos.clamp(max=src.shape[0] - 1)] * gy64.unsqueeze(1)).sum(-1), 0.0)
    layer_bodies.close(w_in.grad, want_gw, f"{cut}: grad of w (float32 dot products)", rtol=1e-5)
    want_gs = torch.zeros(src.shape, dtype=torch.float64)
    for i, j in keep.nonzero().tolist():
        want_gs[pos[i, j]] += w[i, j].double() * gy64[i]
    assert s_in.grad.dtype == torch.bfloat16
    _within_one_rounding(s_in.grad, want_gs, 1e-30, f"{cut}: grad of src")


@pytest.mark.parametrize("case", ["fp32", "bf16", "aligned", "fp8", "worst", "async", "compiled"])
def test_own_layer_recipe(pools, case: str) -> None:
    """docs/usage.md, "Your own MoE layer on largeep.ops": the code block as written, on 4 ranks, against a dense
    single-process float64 computation of the output and the gradients of input, router and experts."""
    import pathlib

    if not (pathlib.Path(__file__).resolve().parents[1] / "docs" / "usage.md").exists():
        pytest.skip("needs the source tree (docs/usage.md)")
    _no_failures(pools(4).run(ops_bodies.ops_own_layer, case))


@pytest.mark.gpu(2)
@pytest.mark.parametrize("case", ["fp32", "bf16", "aligned", "fp8", "worst", "async", "compiled"])
def test_own_layer_recipe_gpu(pools, case: str) -> None:
    """The same recipe on CUDA with the nvshmem backend (2 ranks): expert_order, weighted_row_sum and the grouped
    GEMM on the GPU, async_finish overlapping for real."""
    import pathlib

    from largeep import native

    if native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    if not (pathlib.Path(__file__).resolve().parents[1] / "docs" / "usage.md").exists():
        pytest.skip("needs the source tree (docs/usage.md)")
    _no_failures(pools(2, "nccl").run(ops_bodies.ops_own_layer, case, "nvshmem"))
