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


def _buffer(world: int, max_tokens: int = 8) -> largeep.Buffer:
    return largeep.Buffer(None, hidden=HIDDEN, num_experts=2 * world, num_topk=TOPK, max_tokens_per_rank=max_tokens,
                          backend="torch")


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


def ops_refused_call_keeps_handle(rank: int, world: int) -> list[str]:
    """On the custom-op path a combine, or a combine's backward (dispatch_cached), refused for its arguments leaves
    the handle's count as it was: a corrected inference combine still finds the handle (and frees it), and a
    training step whose combine and cached dispatch were first refused ends with a backward that releases it."""
    fails: list[str] = []
    buf = _buffer(world)
    try:
        bid = ops.register_buffer(buf)
        x, idx, w = _inputs(rank, world, 5, seed=1)
        want = x * _ranks_reached(idx, world)
        with torch.no_grad():
            d = ops.dispatch(bid, x, idx, w, use_custom_ops=True)
            _refused(fails, "inference combine of float64 rows", ops.combine, bid, d.x.double(), d.handle)
            c = _attempt(fails, "corrected inference combine", ops.combine, bid, d.x, d.handle)
            _check(fails, c is None or torch.allclose(c.x, want, rtol=1e-6), "corrected inference combine's value")
            _check(fails, ops.live_handles(bid) == 0, f"inference: {ops.live_handles(bid)} live handles, want 0")
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
    return fails
