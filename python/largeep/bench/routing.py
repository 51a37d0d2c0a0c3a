"""Seeded routings for the benchmark: top-k distinct experts per token, uniform or Zipf-skewed."""

from __future__ import annotations

import torch

ROUTINGS = ("uniform", "zipf")


def random_topk(
    num_tokens: int,
    num_experts: int,
    num_topk: int,
    *,
    seed: int,
    routing: str = "uniform",
    zipf_s: float = 1.0,
    popularity_seed: int = 0,
) -> torch.Tensor:
    """int64 [T, K] on the CPU: K distinct experts per token.

    uniform: every K-subset of the E experts equally likely (the top K of i.i.d. uniform scores).
    zipf: experts drawn without replacement with probability proportional to ``1 / rank**zipf_s``, the ranks of
    the experts shuffled by ``popularity_seed`` (the same on every process, so every rank agrees on which experts
    are hot). Sampling without replacement uses the Gumbel top-k trick.
    """
    if not 0 < num_topk <= num_experts:
        raise ValueError(f"random_topk: num_topk = {num_topk} must be in [1, num_experts = {num_experts}]")
    gen = torch.Generator().manual_seed(seed)
    if routing == "uniform":
        scores = torch.rand(num_tokens, num_experts, generator=gen)
    elif routing == "zipf":
        order = torch.randperm(num_experts, generator=torch.Generator().manual_seed(popularity_seed))
        log_p = -zipf_s * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float64))
        log_p = log_p[torch.argsort(order)]  # expert e has popularity rank order^-1[e]
        u = torch.rand(num_tokens, num_experts, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        scores = log_p - torch.log(-torch.log(u))
    else:
        raise ValueError(f"random_topk: routing {routing!r}, expected one of {ROUTINGS}")
    return scores.topk(num_topk, dim=1).indices.to(torch.int64)


def random_weights(num_tokens: int, num_topk: int, *, seed: int) -> torch.Tensor:
    """float32 [T, K] in (0, 1], rows summing to 1 (softmax of Gaussian logits)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(num_tokens, num_topk, generator=gen), dim=1)
