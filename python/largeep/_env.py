"""Every environment variable largeep reads, read in one place.

| variable | default | meaning |
| --- | --- | --- |
| LARGEEP_TIMEOUT_S | 100 | seconds (0.001 to 1e7) any wait on a peer may take before it raises |
| LARGEEP_INIT_TIMEOUT_S | 300 | seconds (0.001 to 1e7) NVSHMEM's initialisation (a process's first Buffer) may take |
| LARGEEP_LOG_LEVEL | WARNING | level of the ``largeep`` logger |
| LARGEEP_CHECK_VALUES | 1 | check expert ids for range before a layout or dispatch (one host wait per ids tensor); |
| | | 1/true/yes/on, or 0/false/no/off (any case); empty: the default; anything else raises |
| LARGEEP_NVSHMEM_HEAP_MARGIN | 1.25 | factor (1 to 100) on the first Buffer's needs when largeep sets |
| | | NVSHMEM_SYMMETRIC_SIZE |
| LARGEEP_ZERO_COPY_SLOTS | 2 | nvshmem normal mode, one node: receive slots whose planes a dispatch returns as its |
| | | outputs (no copy-out); each holds N * max_tokens_per_rank rows; 0: every dispatch copies; at most 64 |
| LARGEEP_TUNE | threads=1024,unroll=8,ll_spread=1,ll_fuse=0,comb=3 | normal-mode copy kernels: |
| | | threads per block, 16-byte loads in flight per lane (4 or 8); |
| | | ll_spread=1 the low-latency receives and combine send share their rows over the |
| | | grid, 0 per expert; ll_fuse=1 a low-latency call without a hook runs send and receive in one cooperative |
| | | kernel (needs every SM free at once: see README), 0 in two; |
| | | combine inside one node: 1..7 one kernel with comb/8 of its blocks pushing while the rest reduce, 0 a |
| | | push kernel then a reduce kernel (groups of several nodes always take the latter); 8: the copy engines |
| | | push (no SM) while every block reduces, for handles of variable-size dispatches (comb=3 for the others; |
| | | docs/usage.md); the same on every rank |
| LARGEEP_STREAM_PRIORITY | high | the priority of each Buffer's stream (and of the side stream a layer's dispatch is |
| | | issued from): ``high``, the highest torch gives, so that a communication kernel queued behind compute |
| | | gets SMs as they free up, before the compute kernels' waiting blocks; ``normal``: the default priority |
| LARGEEP_SEGV_BACKTRACE | 0 | 1 (true/yes/on): a crash (SIGSEGV, SIGBUS) inside the process prints the native stack |
| | | (diagnostics); 0/false/no/off (any case); empty: the default; anything else raises |
| LARGEEP_INDUCTOR_ORDER_FIX | 1 | 1: keep Inductor from reordering largeep's communication ops (_inductor_order.py); |
| | | 0: leave Inductor as it is |
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any

_PREFIX = "LARGEEP_"


@dataclass(frozen=True)
class Settings:
    timeout_s: float
    init_timeout_s: float
    check_values: bool
    heap_margin: float
    zero_copy_slots: int
    tune: dict[str, int]
    high_priority: bool

    @property
    def stream_priority(self) -> int:
        """The priority of largeep's streams (LARGEEP_STREAM_PRIORITY)."""
        return HIGHEST_PRIORITY if self.high_priority else 0


def _float(name: str, default: float, least: float | None = None, most: float | None = None) -> float:
    """A finite number > 0 (>= ``least`` when given: the timeouts, which torch's waits take in whole milliseconds,
    where 0 means no bound at all; <= ``most`` when given: the timeouts again, which the native waits take in
    nanoseconds of 64 bits and Python's in a timedelta)."""
    raw = os.environ.get(_PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{_PREFIX}{name}={raw!r}: expected a number") from exc
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{_PREFIX}{name}={raw!r}: expected a positive number (finite)")
    if least is not None and value < least:
        raise ValueError(f"{_PREFIX}{name}={raw!r}: expected a number >= {least:g}")
    if most is not None and value > most:
        raise ValueError(f"{_PREFIX}{name}={raw!r}: expected a number <= {most:g}")
    return value


def _flag(name: str, default: bool) -> bool:
    """1/true/yes/on or 0/false/no/off (any case, blanks around ignored); unset or empty: ``default``."""
    raw = os.environ.get(_PREFIX + name)
    word = (raw or "").strip().lower()
    if word == "":
        return default
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{_PREFIX}{name}={raw!r}: expected 1 (or true, yes, on) or 0 (or false, no, off)")


# the least timeout taken: torch's waits count whole milliseconds, and a bound of 0 ms is none
_LEAST_TIMEOUT_S = 0.001
_MOST_TIMEOUT_S = 1e7  # (116 days: far inside the native waits' 64-bit nanoseconds and a timedelta)
DEFAULT_TIMEOUT_S = 100.0  # LARGEEP_TIMEOUT_S unset (also the bound where the variables could not be read)

# (a slot number travels in a count row's word beside the refusal and kind bits, from bit 20: far above this)
_MAX_ZERO_COPY_SLOTS = 64


def _int(text: str) -> int | None:
    """``text`` (blanks around it ignored) as an int when it is ASCII digits, an optional leading minus, and few
    enough digits for int() (Python refuses more than 4300 by default, with a message that names no variable);
    else None. (ASCII only: str.isdigit takes other scripts' digits and superscripts, which int() refuses or
    reads.)"""
    text = text.strip()
    if not re.fullmatch(r"-?[0-9]+", text):
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _count(name: str, default: int, most: int | None = None) -> int:
    raw = os.environ.get(_PREFIX + name)
    if raw is None or raw == "":
        return default
    value = _int(raw)
    if value is None or value < 0 or (most is not None and value > most):
        limit = f" and <= {most}" if most is not None else ""
        raise ValueError(f"{_PREFIX}{name}={raw!r}: expected a whole number >= 0{limit}")
    return value


def settings() -> Settings:
    """Reads the ``LARGEEP_*`` variables now (they may change between Buffers). Raises one ValueError naming every
    variable that is wrong."""
    errors: list[str] = []

    def read(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except ValueError as exc:
            errors.append(str(exc))
            return None

    values = {
        "timeout_s": read(_float, "TIMEOUT_S", DEFAULT_TIMEOUT_S, _LEAST_TIMEOUT_S, _MOST_TIMEOUT_S),
        "init_timeout_s": read(_float, "INIT_TIMEOUT_S", 300.0, _LEAST_TIMEOUT_S, _MOST_TIMEOUT_S),
        "check_values": read(_flag, "CHECK_VALUES", True),
        "heap_margin": read(_float, "NVSHMEM_HEAP_MARGIN", 1.25, 1.0, 100.0),
        "zero_copy_slots": read(_count, "ZERO_COPY_SLOTS", 2, _MAX_ZERO_COPY_SLOTS),
        "tune": read(lambda: _tune(os.environ.get(_PREFIX + "TUNE", ""))),
        "high_priority": read(lambda: _choice("STREAM_PRIORITY", ("high", "normal")) == "high"),
    }
    # (read when the native module loads, not kept here; checked here too so that a bad value refuses the Buffer
    # on every rank, as the others do, instead of raising on one rank as it loads the module)
    read(fault_backtrace)
    read(_checked_log_level)
    if errors:
        raise ValueError("; ".join(errors))
    return Settings(**values)


def fault_backtrace() -> bool:
    """LARGEEP_SEGV_BACKTRACE (default off; the spellings of :func:`_flag`, anything else raises ValueError naming
    the variable). Read when the native module loads, apart from the Buffer's settings: a bad value of another
    variable is an error of the Buffer that reads it."""
    return _flag("SEGV_BACKTRACE", False)


def inductor_order_fix() -> bool:
    """LARGEEP_INDUCTOR_ORDER_FIX (read when a graph holding a largeep communication op is first traced): on by
    default; the spellings of :func:`_flag`, anything else raises ValueError naming the variable."""
    return _flag("INDUCTOR_ORDER_FIX", True)


def _choice(name: str, values: tuple[str, ...]) -> str:
    """One of ``values`` (the first is the default)."""
    raw = os.environ.get(_PREFIX + name, "")
    word = raw.strip().lower() or values[0]
    if word not in values:  # (the value as set, not as compared)
        raise ValueError(f"{_PREFIX}{name}={raw!r}: expected one of {', '.join(values)}")
    return word


# torch maps a priority below its range to the highest it has (a lower number is a higher priority)
HIGHEST_PRIORITY = -(1 << 20)


_TUNE_DEFAULTS = {"threads": 1024, "unroll": 8, "ll_spread": 1, "ll_fuse": 0, "comb": 3}


# the values each LARGEEP_TUNE key takes (the native kernels assert the same)
_TUNE_RANGES = {
    "threads": (tuple(range(64, 1025, 32)), "a multiple of 32 in [64, 1024]"),
    "unroll": ((4, 8), "4 or 8"),
    "ll_spread": ((0, 1), "0 or 1"),
    "ll_fuse": ((0, 1), "0 or 1"),
    "comb": (tuple(range(9)), "0 (push, then reduce), 1..7 (fused: eighths of the blocks that push) or 8 (the "
             "copy engines push)"),
}


def _tune(raw: str) -> dict[str, int]:
    out = dict(_TUNE_DEFAULTS)
    given: set[str] = set()
    for item in filter(None, (p.strip() for p in raw.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()  # (spaces around "=" are taken, as around the items)
        number = _int(value)
        if key not in out or number is None:
            raise ValueError(f"{_PREFIX}TUNE={raw!r}: expected comma-separated key=int with keys {sorted(out)}")
        if key in given:
            raise ValueError(f"{_PREFIX}TUNE={raw!r}: {key} given twice")
        given.add(key)
        out[key] = number
        allowed, what = _TUNE_RANGES[key]
        if out[key] not in allowed:
            raise ValueError(f"{_PREFIX}TUNE={raw!r}: {key}={out[key]}, expected {what}")
    return out


def log_level() -> int | None:
    """LARGEEP_LOG_LEVEL as a logging level (default WARNING): a level's name (DEBUG, INFO, WARNING, ERROR,
    CRITICAL; any case) or a whole number; None when it is neither (``import largeep`` then logs at WARNING, and
    the next Buffer, which reads every variable, raises ValueError naming it)."""
    raw = os.environ.get(_PREFIX + "LOG_LEVEL", "").strip().upper() or "WARNING"
    if re.fullmatch(r"[0-9]+", raw):
        return _int(raw)  # (None for more digits than int() reads: ``import largeep`` must not raise)
    # the five names the README lists (logging also knows WARN, FATAL and NOTSET: refused, as documented)
    return getattr(logging, raw) if raw in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else None


def _checked_log_level() -> int:
    level = log_level()
    if level is None:
        raise ValueError(f"{_PREFIX}LOG_LEVEL={os.environ.get(_PREFIX + 'LOG_LEVEL')!r}: expected DEBUG, INFO, "
                         "WARNING, ERROR, CRITICAL or a whole number")
    return level


logger = logging.getLogger("largeep")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[largeep %(levelname)s] %(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False
# (only the log level at import: a bad value of another variable is an error of the Buffer that reads it, not of
# ``import largeep``)
_level = log_level()
# (0 is logging's NOTSET, which would defer to the root logger's level, WARNING by default: here it means every
# message, as the number's order says)
logger.setLevel(logging.WARNING if _level is None else max(_level, 1))
