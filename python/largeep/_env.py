"""Every environment variable largeep reads, read in one place.

| variable | default | meaning |
| --- | --- | --- |
| LARGEEP_TIMEOUT_S | 100 | seconds any wait on a peer may take before it raises |
| LARGEEP_LOG_LEVEL | WARNING | level of the ``largeep`` logger |
| LARGEEP_CHECK_VALUES | 1 | check expert ids for range on the host (one device sync) before a dispatch |
| LARGEEP_NVSHMEM_HEAP_MARGIN | 1.25 | factor applied to the first Buffer's needs when largeep picks NVSHMEM_SYMMETRIC_SIZE |
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

_PREFIX = "LARGEEP_"


@dataclass(frozen=True)
class Settings:
    timeout_s: float
    log_level: str
    check_values: bool
    heap_margin: float


def _float(name: str, default: float) -> float:
    raw = os.environ.get(_PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{_PREFIX}{name}={raw!r}: expected a number") from exc
    if value <= 0:
        raise ValueError(f"{_PREFIX}{name}={raw!r}: expected a positive number")
    return value


def settings() -> Settings:
    """Reads the ``LARGEEP_*`` variables now (they may change between Buffers)."""
    return Settings(
        timeout_s=_float("TIMEOUT_S", 100.0),
        log_level=os.environ.get(_PREFIX + "LOG_LEVEL", "WARNING").upper(),
        check_values=os.environ.get(_PREFIX + "CHECK_VALUES", "1") not in ("0", "false", "False", ""),
        heap_margin=_float("NVSHMEM_HEAP_MARGIN", 1.25),
    )


logger = logging.getLogger("largeep")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[largeep %(levelname)s] %(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False
logger.setLevel(getattr(logging, settings().log_level, logging.WARNING))
