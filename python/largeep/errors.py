"""Exceptions raised by largeep."""

from __future__ import annotations


class ArgumentError(ValueError):
    """A call's argument is wrong (dtype, shape, device, value). Raised before anything is launched."""


class PeerTimeoutError(RuntimeError):
    """A peer did not answer within LARGEEP_TIMEOUT_S. The message names the operation and the ranks waited on."""


class BufferDestroyedError(RuntimeError):
    """A Buffer was used after ``destroy()`` (a call, or the receive hook of one of its calls). A handle of a
    destroyed Buffer given to another Buffer is an :class:`ArgumentError` that says so."""


class PeerRefusedError(RuntimeError):
    """Another rank refused its part of a collective call (bad input there), so the call was void on every rank:
    nothing was sent or received here. The message names the ranks that refused. ``buffer_usable``: whether the
    Buffer takes further calls (False when a rank ran the call with num_worst_tokens, which cannot raise: that
    rank's Buffer is unusable, and so the group's; the message says so)."""

    def __init__(self, message: str, *, buffer_usable: bool = True) -> None:
        super().__init__(message)
        self.buffer_usable = buffer_usable


def _recomputation_stopped(exc: BaseException) -> bool:
    """Whether ``exc`` is non-reentrant activation checkpointing ending a recomputation early: torch raises it from
    the hook that saves a tensor, once the recomputation has every tensor the backward asked for, so it passes
    through the code of the checkpointed region (a layer's forward) -- not an error of it. Where it passes, nothing
    is to be undone: the dispatches a recomputation under ``ops.checkpoint_context_fn`` went through are the
    forward's own, saved, whose backward is still to come; every rank stops at the same place, so collective
    groups stay in step."""
    from torch.utils import checkpoint

    stop = getattr(checkpoint, "_StopRecomputationError", None)
    return stop is not None and isinstance(exc, stop)
