"""largeep: expert-parallel dispatch and combine for Mixture-of-Experts models (see SPEC.md)."""

from largeep.buffer import (
    Buffer,
    CombineResult,
    DispatchHandle,
    DispatchResult,
    EventOverlap,
    LowLatencyCombineResult,
    LowLatencyDispatchResult,
    LowLatencyHandle,
)
from largeep.errors import ArgumentError, BufferDestroyedError, PeerRefusedError, PeerTimeoutError
from largeep.layout import Layout

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "Buffer",
    "BufferDestroyedError",
    "CombineResult",
    "DispatchHandle",
    "DispatchResult",
    "EventOverlap",
    "Layout",
    "LowLatencyCombineResult",
    "LowLatencyDispatchResult",
    "LowLatencyHandle",
    "PeerRefusedError",
    "PeerTimeoutError",
    "__version__",
]
