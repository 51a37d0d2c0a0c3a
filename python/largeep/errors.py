"""Exceptions raised by largeep."""

from __future__ import annotations


class ArgumentError(ValueError):
    """A call's argument is wrong (dtype, shape, device, value). Raised before anything is launched."""


class PeerTimeoutError(RuntimeError):
    """A peer did not answer within LARGEEP_TIMEOUT_S. The message names the operation and the ranks waited on."""


class BufferDestroyedError(RuntimeError):
    """A Buffer (or a handle of one) was used after ``destroy()``."""


class PeerRefusedError(RuntimeError):
    """Another rank refused its part of a collective call (bad input there), so the call was void on every rank:
    nothing was sent or received here, and the Buffer stays usable. The message names the ranks that refused."""
