"""largeep: expert-parallel dispatch and combine for Mixture-of-Experts models (see SPEC.md)."""

from __future__ import annotations

import importlib as _importlib
from types import ModuleType as _ModuleType
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:  # (for the type checker only: at run time __getattr__ imports each on first use)
    from largeep import expert_tp as expert_tp
    from largeep import gate as gate
    from largeep import layers as layers
    from largeep import native as native
    from largeep import ops as ops
    from largeep import placement as placement

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

# public submodules that ``import largeep`` does not import (layers adds about 0.5 s, ops registers the torch.library
# custom ops): each is imported on its first use as an attribute, so ``largeep.ops.dispatch`` works after
# ``import largeep`` alone
_LAZY_SUBMODULES = ("expert_tp", "gate", "layers", "native", "ops", "placement")

if not TYPE_CHECKING:
    # (hidden from the type checker, which takes the submodules from the imports above: a module-level __getattr__
    # would make every unknown ``largeep.name`` a ModuleType to it, ``from largeep import _C`` included)

    def __getattr__(name: str) -> _ModuleType:
        if name in _LAZY_SUBMODULES:
            # (the import binds the submodule as this package's attribute: later lookups do not come here)
            return _importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({k for k in globals() if not k.startswith("_") and k not in ("TYPE_CHECKING", "annotations")}
                  | set(__all__) | set(_LAZY_SUBMODULES))
