"""Dispatch layout in plain torch: which ranks, nodes and experts each token needs. No host sync."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Layout:
    """Result of ``Buffer.get_dispatch_layout``.

    num_tokens_per_rank: int32 [N], tokens that need rank r (a token counts once per rank).
    num_tokens_per_node: int32 [nodes], tokens that need any rank of node n.
    num_tokens_per_expert: int32 [E], tokens that name expert e (once per token).
    is_token_in_rank: bool [T, N].
    event: the call's EventOverlap (``Buffer.get_dispatch_layout``; with ``async_finish=True`` wait on it before
    reading the counts on another stream), else None.
    """

    num_tokens_per_rank: torch.Tensor
    num_tokens_per_node: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor
    event: Any = None


def one_hot_mask(ids: torch.Tensor, width: int) -> torch.Tensor:
    """ids int64 [T, K] -> bool [T, width] (a view, not contiguous): column c set if any id == c. Ids outside
    [0, width) set nothing (-1: none; an id out of range, which only unchecked calls let through, is ignored, as
    every backend's layout and dispatch ignore it)."""
    t = ids.shape[0]
    mask = torch.zeros(t, width + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, torch.where((ids >= 0) & (ids < width), ids, width), True)
    return mask[:, :width]


def compute_layout(topk_idx: torch.Tensor, num_ranks: int, num_experts: int, ranks_per_node: int) -> Layout:
    """topk_idx int64 [T, K] (values in [-1, E); others count nowhere) -> :class:`Layout`."""
    experts_per_rank = num_experts // num_ranks
    t = topk_idx.shape[0]
    rank_of = torch.where(topk_idx >= 0, topk_idx // experts_per_rank, -1)
    in_rank = one_hot_mask(rank_of, num_ranks)
    in_expert = one_hot_mask(topk_idx, num_experts)
    in_node = in_rank.view(t, num_ranks // ranks_per_node, ranks_per_node).any(dim=2)
    return Layout(
        num_tokens_per_rank=in_rank.sum(0, dtype=torch.int32),
        num_tokens_per_node=in_node.sum(0, dtype=torch.int32),
        num_tokens_per_expert=in_expert.sum(0, dtype=torch.int32),
        is_token_in_rank=in_rank.contiguous(),  # (one_hot_mask's is a view; the nvshmem backend's is contiguous)
    )
