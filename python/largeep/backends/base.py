"""What a backend receives from the Buffer and what it returns. Arguments reaching a backend are already checked."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, overload

import torch
import torch.distributed as dist

# The current stream's handle without building a torch.cuda.Stream (what triton calls; a few microseconds of host
# time a call at small sizes); None on builds without it, which then take torch.cuda.current_stream.
RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_raw_stream(device: torch.device) -> int:
    """The raw handle (cudaStream_t as an int) of the current stream on the CUDA ``device``."""
    if RAW_STREAM is not None and device.index is not None:
        return int(RAW_STREAM(device.index))
    return int(torch.cuda.current_stream(device).cuda_stream)


def on_device(dev: torch.device) -> Any:
    """Native kernels launch on the current device: make it the CUDA ``dev`` for the call (no-op when it is)."""
    if dev.index is None or dev.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(dev)


@overload
def align_up(v: int, a: int) -> int: ...
@overload
def align_up(v: torch.Tensor, a: int) -> torch.Tensor: ...
def align_up(v: int | torch.Tensor, a: int) -> int | torch.Tensor:
    """``v`` rounded up to a multiple of ``a`` (an int, or a tensor of ints elementwise): a per-expert row count
    under ``expert_alignment``."""
    return (v + a - 1) // a * a


@dataclass(frozen=True)
class GroupContext:
    """Facts about the process group and the Buffer's sizes, fixed at Buffer creation."""

    group: dist.ProcessGroup
    rank: int
    num_ranks: int
    ranks_per_node: int
    device: torch.device
    hidden: int
    num_experts: int
    num_topk: int
    max_tokens_per_rank: int
    num_sms: int
    low_latency: bool

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node


@dataclass
class NormalDispatchOut:
    """x [R, H] (or e4m3) with scales float32 [R, H/128] or None; topk_idx int64 [R, K] or None (cached);
    topk_weights float32 [R, K] or None; per-expert counts as a device int32 tensor [E/N] (always) and as a host
    list (empty when no host sync was allowed); state: the backend's part of the handle."""

    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_idx: torch.Tensor | None
    topk_weights: torch.Tensor | None
    num_tokens_per_expert: list[int]
    num_tokens_per_expert_tensor: torch.Tensor
    num_recv_tokens: int | None
    state: Any


@dataclass
class LowLatencyDispatchOut:
    x: torch.Tensor
    x_scales: torch.Tensor | None
    num_tokens_per_expert: torch.Tensor
    src_info: torch.Tensor
    state: Any
    finish: Callable[[], None] | None = field(default=None)
