"""The native module ``largeep._C`` (NVSHMEM kernels): whether it is there, and why not."""

from __future__ import annotations

import functools
from types import ModuleType

_HOW = (
    "build it with a CUDA toolkit (nvcc) and NVSHMEM present: `pip install nvidia-nvshmem-cu12` or "
    "`nvidia-nvshmem-cu13` (matching torch's CUDA) or set NVSHMEM_DIR, then reinstall largeep "
    "(`pip install --no-build-isolation .`)"
)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from largeep import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the native module largeep._C is not installed ({exc}); {_HOW}"
    from largeep import _env

    if _env.settings().fault_backtrace:
        _C.install_fault_backtrace()
    return _C, None


def module() -> ModuleType:
    """Returns largeep._C or raises RuntimeError saying why it is missing and how to get it."""
    mod, reason = _load()
    if mod is None:
        raise RuntimeError(reason)
    return mod


def unavailable_reason() -> str | None:
    """None when the nvshmem backend can be used in this process, else why not."""
    mod, reason = _load()
    if mod is None:
        return reason
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None
