"""Exceptions raised by largeep."""

from __future__ import annotations


class ArgumentError(ValueError):
    """A call's argument is wrong (dtype, shape, device, value). Raised before anything is launched."""


class PeerTimeoutError(RuntimeError):
    """A peer did not answer within LARGEEP_TIMEOUT_S. The message names the operation and the ranks waited on."""


class BufferDestroyedError(RuntimeError):
    """A Buffer (or a handle of one) was used after ``destroy()``."""
