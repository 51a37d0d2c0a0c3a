"""largeep.ops: the grouped GEMM, and dispatch/combine as each other's backward (eager autograd Functions and the
torch.library custom ops) on 1, 2 and 4 ranks over gloo."""

from __future__ import annotations

import layer_bodies
import pytest
import torch
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


def test_grouped_mm_opcheck() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(12, 16, generator=g, requires_grad=True)
    b = torch.randn(3, 16, 8, generator=g, requires_grad=True)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    torch.library.opcheck(torch.ops.largeep.grouped_mm.default, (a, b, offs))
    torch.library.opcheck(torch.ops.largeep.grouped_mm.default, (a, b, offs, 10))
    torch.library.opcheck(torch.ops.largeep.grouped_mm_wgrad.default, (a.detach(), torch.randn(12, 8), offs))


def _tokens(world: int) -> list[int]:
    return [0 if (r == 1 and world > 1) else 11 + 4 * r for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("use_custom_ops", [False, True])
@pytest.mark.parametrize("num_worst", [0, 64])
def test_dispatch_combine_autograd(pools, world: int, use_custom_ops: bool, num_worst: int) -> None:
    pools(world).run(
        layer_bodies.ops_autograd, _tokens(world), 64, 4 * world, 3, num_worst, use_custom_ops, world + num_worst
    )


def test_registry(pools) -> None:
    pools(2).run(layer_bodies.ops_registry_errors)
