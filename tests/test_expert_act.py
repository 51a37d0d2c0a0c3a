"""largeep.ops.expert_activation (the experts' bias add and gated activation of the first grouped GEMM's output)
against a float64 loop over rows: values and gradients of h13 and the bias, both activations, rows past offs[-1]
(NaN planted there reaches nothing), second derivatives; on CUDA largeep's kernels against the same loop and the
torch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from largeep import ops

ALPHA, LIMIT = 1.702, 0.9  # (a low limit: the clamps bite on unit-scale values)


def _loop64(h: torch.Tensor, bias: torch.Tensor | None, offs: list[int], kind: int) -> torch.Tensor:
    """Row by row in float64 (differentiable in h and bias): rows past offs[-1] are zero."""
    f = h.shape[1] // 2
    rows = []
    start = 0
    for e, end in enumerate(offs):
        for r in range(start, end):
            v = h[r] + bias[e] if bias is not None else h[r]
            g, u = v[:f], v[f:]
            if kind == ops.ACT_SILU:
                rows.append(F.silu(g) * u)
            else:
                gc = torch.clamp(g, max=LIMIT)  # (torch.clamp's gradient at the limit: passed, as GPT-OSS's)
                uc = torch.clamp(u, -LIMIT, LIMIT)
                rows.append((uc + 1) * gc * torch.sigmoid(ALPHA * gc))
        start = end
    rows += [h.new_zeros(f)] * (h.shape[0] - offs[-1])
    return torch.stack(rows)


def _case(seed: int, dtype: torch.dtype, device: str, with_bias: bool, f: int = 16, experts: int = 4,
          rows: int = 23) -> tuple[torch.Tensor, torch.Tensor | None, list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ends = sorted(torch.randint(0, rows - 3, (experts,), generator=g).tolist())  # (some empty, a tail past the end)
    h = torch.randn(rows, 2 * f, generator=g)
    h[ends[-1]:] = float("nan")  # what an unwritten GEMM tail may hold
    bias = torch.randn(experts, 2 * f, generator=g) * 0.5 if with_bias else None
    grad = torch.randn(rows, f, generator=g)
    return (h.to(device, dtype), bias.to(device, dtype) if bias is not None else None, ends,
            grad.to(device, dtype))


def _check(device: str, dtype: torch.dtype, kind: int, with_bias: bool, seed: int) -> None:
    h, bias, ends, grad = _case(seed, dtype, device, with_bias)
    offs = torch.tensor(ends, dtype=torch.int32, device=device)
    hh = h.clone().requires_grad_()
    bb = bias.clone().requires_grad_() if bias is not None else None
    a = ops.expert_activation(hh, offs, bb, kind, ALPHA, LIMIT)
    used = ends[-1]
    (a[:used].float() * grad[:used].float()).sum().backward()
    h64 = h.double().cpu().nan_to_num(0.0).requires_grad_()
    b64 = bias.double().cpu().requires_grad_() if bias is not None else None
    want = _loop64(h64, b64, ends, kind)
    (want[:used] * grad[:used].double().cpu()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    scale = float(want.detach().abs().max()) + 1e-30
    torch.testing.assert_close(a[:used].double().cpu(), want[:used].detach(), rtol=tol, atol=tol * scale)
    assert hh.grad is not None and torch.isfinite(hh.grad[:used]).all()
    torch.testing.assert_close(hh.grad[:used].double().cpu(), h64.grad[:used], rtol=tol,
                               atol=tol * float(h64.grad.abs().max()))
    if bb is not None:
        assert bb.grad is not None and torch.isfinite(bb.grad).all(), "NaN past offs[-1] reached the bias's grad"
        torch.testing.assert_close(bb.grad.double().cpu(), b64.grad, rtol=tol, atol=tol * float(b64.grad.abs().max()))


@pytest.mark.parametrize("kind", [ops.ACT_SILU, ops.ACT_CLAMPED])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_activation_cpu(kind: int, with_bias: bool, dtype: torch.dtype) -> None:
    for seed in range(3):
        _check("cpu", dtype, kind, with_bias, seed)


def _penalty(fn, h: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradient of a gradient penalty of fn(h, bias) ** 3 (create_graph)."""
    y = fn(h, bias)
    gh, gb = torch.autograd.grad((y**3).sum(), (h, bias), create_graph=True)
    return torch.autograd.grad((gh**2).sum() + (gb**2).sum(), (h, bias))


@pytest.mark.parametrize("kind", [ops.ACT_SILU, ops.ACT_CLAMPED])
def test_expert_activation_second_derivative(kind: int) -> None:
    """create_graph: the backward is recorded (torch ops), so a gradient penalty differentiates it again."""
    h, bias, ends, _ = _case(5, torch.float64, "cpu", True)
    assert bias is not None
    h = h.nan_to_num(0.0).requires_grad_()
    bias = bias.requires_grad_()
    offs = torch.tensor(ends, dtype=torch.int32)
    got = _penalty(lambda x, b: ops.expert_activation(x, offs, b, kind, ALPHA, LIMIT), h, bias)
    want = _penalty(lambda x, b: _loop64(x, b, ends, kind), h, bias)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9)


@pytest.mark.gpu(1)
@pytest.mark.parametrize("kind", [ops.ACT_SILU, ops.ACT_CLAMPED])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_activation_gpu(kind: int, with_bias: bool, dtype: torch.dtype) -> None:
    """largeep's kernels (forward and backward) against the float64 loop, rows past offs[-1] zero in both; and
    against the torch ops they replace (float32: to rounding)."""
    from largeep import native

    if native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    for seed in range(3):
        _check("cuda", dtype, kind, with_bias, seed)
    h, bias, ends, grad = _case(7, dtype, "cuda", with_bias, f=64, experts=8, rows=300)
    offs = torch.tensor(ends, dtype=torch.int32, device="cuda")
    assert ops._native_act_ok(h, bias, offs)
    a = ops._expert_act_impl(h, bias, offs, kind, ALPHA, LIMIT)
    assert (a[ends[-1]:] == 0).all(), "rows past offs[-1] must be zero"
    dh = ops._expert_act_backward_op(grad, h, bias, offs, kind, ALPHA, LIMIT)
    assert (dh[ends[-1]:] == 0).all()
    if dtype == torch.float32:
        used = ends[-1]
        want = ops._expert_act_torch(h, bias, offs, kind, ALPHA, LIMIT)
        torch.testing.assert_close(a[:used], want[:used], rtol=1e-5, atol=1e-6)
        want_dh = ops._expert_act_grad_torch(grad, h, bias, offs, kind, ALPHA, LIMIT)
        torch.testing.assert_close(dh[:used], want_dh[:used], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu(1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_bias_add(device: str, dtype: torch.dtype) -> None:
    """ops._row_bias_add: each row plus its expert's bias row (largeep's kernel on CUDA: rows past offs[-1] zero),
    the bias's gradient each expert's rows summed (NaN past offs[-1] reaching nothing); x's gradient passes."""
    if device == "cuda":
        from largeep import native

        if native.unavailable_reason() is not None:
            pytest.skip(str(native.unavailable_reason()))
    for seed in range(3):
        h, bias, ends, grad = _case(seed, dtype, device, True, f=32, experts=5, rows=40)
        assert bias is not None
        x, b = h[:, :32].contiguous().requires_grad_(), bias[:, :32].contiguous().requires_grad_()
        offs = torch.tensor(ends, dtype=torch.int32, device=device)
        if device == "cuda":
            assert ops._native_bias_ok(x, b, offs)
        y = ops._row_bias_add(x, b, offs)
        used = ends[-1]
        (y[:used].float() * grad[:used].float()).sum().backward()
        starts = [0] + ends[:-1]
        want = torch.cat([x[s:e].detach().double() + b[i].detach().double() for i, (s, e) in
                          enumerate(zip(starts, ends, strict=True))])
        tol = 1e-6 if dtype == torch.float32 else 2.0**-8
        torch.testing.assert_close(y[:used].double(), want, rtol=tol, atol=tol)
        if device == "cuda":
            assert (y[used:] == 0).all()
        want_db = torch.stack([grad[s:e].double().sum(0) for s, e in zip(starts, ends, strict=True)])
        assert b.grad is not None and torch.isfinite(b.grad).all()
        torch.testing.assert_close(b.grad.double(), want_db, rtol=tol * 4, atol=tol * 4 * float(want_db.abs().max()))
        assert x.grad is not None and torch.equal(x.grad[:used], grad[:used].to(x.grad.dtype))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu(1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_row_sum(device: str, dtype: torch.dtype) -> None:
    """Each expert's rows summed (the biases' gradients): against a float64 loop, empty experts zero, NaN in the
    rows past offs[-1] not read, the same bits on a second call (largeep's kernel on CUDA)."""
    if device == "cuda":
        from largeep import native

        if native.unavailable_reason() is not None:
            pytest.skip(str(native.unavailable_reason()))
    for seed in range(3):
        h, _, ends, _ = _case(seed, dtype, device, False, f=40, experts=6, rows=700)
        offs = torch.tensor(ends, dtype=torch.int32, device=device)
        got = ops._segment_row_sum_op(h, offs)
        starts = [0] + ends[:-1]
        want = torch.stack([h[s:e].double().sum(0) for s, e in zip(starts, ends, strict=True)])
        tol = 1e-6 if dtype == torch.float32 else 2.0**-8
        assert torch.isfinite(got).all(), "rows past offs[-1] were read"
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))
        assert torch.equal(ops._segment_row_sum_op(h, offs), got)


def test_expert_activation_arguments() -> None:
    """Caller mistakes are refused with an ArgumentError naming the argument (before the kernel, which would take
    another device's pointer, and before the torch ops, which would give another dtype or run ACT_CLAMPED for any
    kind); the accepted call still matches the float64 loop."""
    from largeep.errors import ArgumentError

    h, bias, ends, _ = _case(3, torch.float32, "cpu", True)
    assert bias is not None
    h = h.nan_to_num(0.0)
    offs = torch.tensor(ends, dtype=torch.int32)
    with pytest.raises(ArgumentError, match=r"h13 must be a floating \[P, 2F\] tensor, got torch.float32 \(23, 31\)"):
        ops.expert_activation(h[:, :31], offs)
    with pytest.raises(ArgumentError, match=r"h13 must be a floating \[P, 2F\]"):
        ops.expert_activation(h[0], offs)
    with pytest.raises(ArgumentError, match=r"offs must be an int32 \[E\] tensor on cpu, got torch.int64"):
        ops.expert_activation(h, offs.long())
    with pytest.raises(ArgumentError, match=r"offs must be an int32 \[E\] tensor on cpu, got .* on meta"):
        ops.expert_activation(h, offs.to("meta"))
    with pytest.raises(ArgumentError, match=r"bias must be None or a torch.float32 \(4, 32\) tensor .* got "
                                            r"torch.bfloat16"):
        ops.expert_activation(h, offs, bias.bfloat16())  # (the torch ops would have given float32 for bf16 h13)
    with pytest.raises(ArgumentError, match=r"bias must be None or a torch.float32 \(4, 32\) tensor .* \(4, 16\)"):
        ops.expert_activation(h, offs, bias[:, :16])
    with pytest.raises(ArgumentError, match=r"bias must be .* got torch.float32 \(4, 32\) on meta"):
        ops.expert_activation(h, offs, bias.to("meta"))
    with pytest.raises(ArgumentError, match=r"kind must be ACT_SILU \(0\) or ACT_CLAMPED \(1\), got 2"):
        ops.expert_activation(h, offs, bias, 2)
    with pytest.raises(ArgumentError, match=r"limit must be > 0 with ACT_CLAMPED, got -1.0"):
        ops.expert_activation(h, offs, bias, ops.ACT_CLAMPED, ALPHA, -1.0)
    with pytest.raises(ArgumentError, match=r"limit must be > 0 with ACT_CLAMPED, got nan"):
        ops.expert_activation(h, offs, bias, ops.ACT_CLAMPED, ALPHA, float("nan"))
    a = ops.expert_activation(h.bfloat16(), offs, bias.bfloat16(), ops.ACT_CLAMPED, ALPHA, LIMIT)
    assert a.dtype == torch.bfloat16 and a.shape == (23, 16)
    want = _loop64(h.bfloat16().double(), bias.bfloat16().double(), ends, ops.ACT_CLAMPED)
    torch.testing.assert_close(a[: ends[-1]].double(), want[: ends[-1]], rtol=2.0**-7,
                               atol=2.0**-7 * float(want.abs().max()))


def test_segment_row_sum_cpu_same_bits() -> None:
    """The torch ops' segment sum (the biases' gradients off CUDA) gives the same bits on every call (index_put's
    accumulation on CPU did not: its threads add in another order), and matches a float64 loop."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5000, 512, generator=g)
    ends = sorted(torch.randint(0, 5000, (8,), generator=g).tolist())
    offs = torch.tensor(ends, dtype=torch.int32)
    first = ops._segment_row_sum_torch(x, offs)
    for _ in range(20):
        assert torch.equal(ops._segment_row_sum_torch(x, offs), first), "the sum changed between calls"
    starts = [0] + ends[:-1]
    want = torch.stack([x[s:e].double().sum(0) for s, e in zip(starts, ends, strict=True)])
    torch.testing.assert_close(first.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu(1))])
@pytest.mark.parametrize("case", ["one_expert", "all_empty", "no_tail", "at_limits"])
def test_expert_activation_edges(device: str, case: str) -> None:
    """One expert; every expert empty (every row past offs[-1]); no row past it; values exactly at -limit and
    +limit (the clamps' gradients pass there, as torch.clamp's) -- against the float64 loop, both kinds, biases."""
    if device == "cuda":
        from largeep import native

        if native.unavailable_reason() is not None:
            pytest.skip(str(native.unavailable_reason()))
    f, rows = 8, 12
    g = torch.Generator().manual_seed(9)
    ends = {"one_expert": [9], "all_empty": [0, 0, 0], "no_tail": [3, 3, 12], "at_limits": [5, 12]}[case]
    h = torch.randn(rows, 2 * f, generator=g)
    if case == "at_limits":
        h[:, :f:2], h[:, f::3], h[:, f + 1::3] = LIMIT, LIMIT, -LIMIT
    bias = torch.zeros(len(ends), 2 * f) if case == "at_limits" else torch.randn(len(ends), 2 * f, generator=g)
    grad = torch.randn(rows, f, generator=g)
    offs = torch.tensor(ends, dtype=torch.int32, device=device)
    used = ends[-1]
    for kind in (ops.ACT_SILU, ops.ACT_CLAMPED):
        hh = h.to(device).clone().requires_grad_()
        bb = bias.to(device).clone().requires_grad_()
        a = ops.expert_activation(hh, offs, bb, kind, ALPHA, LIMIT)
        (a[:used] * grad[:used].to(device)).sum().backward()
        if device == "cuda":
            assert (a[used:] == 0).all()
        if used == 0:  # (no row is any expert's: nothing computed, no gradient)
            assert hh.grad is not None and not hh.grad.any() and bb.grad is not None and not bb.grad.any()
            continue
        h64, b64 = h.double().requires_grad_(), bias.double().requires_grad_()  # (new leaves: h is not one)
        want = _loop64(h64, b64, ends, kind)
        (want[:used] * grad[:used].double()).sum().backward()
        torch.testing.assert_close(a[:used].double().cpu(), want[:used].detach(), rtol=1e-5, atol=1e-6)
        assert hh.grad is not None and bb.grad is not None
        torch.testing.assert_close(hh.grad[:used].double().cpu(), h64.grad[:used], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bb.grad.double().cpu(), b64.grad, rtol=1e-5, atol=1e-5)
