"""Keeps Inductor from reordering largeep's communication ops among themselves.

largeep registers its communication ops as ORDERED effectful ops (``largeep.ops``): every rank must issue them in
the same order. ``torch.compile`` threads effect tokens through them, and Inductor's lowering of ``with_effects``
records an ordering edge from each effectful op to the one before it. In the torch versions this was written
against (2.11 to 2.13) that edge is stored under the new op's *buffer* name while the scheduler looks it up by
*operation* name, so it is lost and the scheduler may move one communication op past another (pytorch/pytorch pull
request 188301 describes and fixes this). Two ranks that compiled graphs of different shapes (for example
different token counts) then issue their dispatches and combines in different orders: a collective mismatch (a
crash on gloo, a timeout on the nvshmem backend). A graph whose communication ops depend on each other through
data (one unchunked layer after another) is not affected; chunked layers and ``MoEPipeline`` are.

:func:`ensure` wraps that lowering once per process so that the edges it records under buffer names are also
recorded under the operation names the scheduler reads (as the upstream fix does); where the edges are already
keyed right, or the lowering has another shape, the wrapper adds nothing. It is called from the fake
implementations of largeep's effectful ops, that is only while a graph holding one is traced; from then on it
applies to every ORDERED effectful op Inductor lowers in the process (as the upstream fix does), not only largeep's.
``LARGEEP_INDUCTOR_ORDER_FIX=0`` turns it off.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from largeep import _env
from largeep._env import logger

_state = {"done": False}


def ensure() -> None:
    """Wraps Inductor's ``with_effects`` lowering (once per process; see the module docstring)."""
    if _state["done"]:
        return
    enabled = _env.inductor_order_fix()  # (a bad value raises, naming the variable, at every trace until fixed)
    _state["done"] = True
    if not enabled:
        logger.info("LARGEEP_INDUCTOR_ORDER_FIX=0: Inductor's ordering of communication ops is left as it is")
        return
    try:
        from torch._inductor import lowering
        from torch._inductor.virtualized import V

        op = torch.ops.higher_order.with_effects
        orig = lowering.lowerings[op]
    except (ImportError, AttributeError, KeyError) as exc:
        logger.debug("largeep: Inductor's with_effects lowering not found (%s); nothing to fix", exc)
        return
    if getattr(orig, "_largeep_order_fix", False):
        return

    @functools.wraps(orig)
    def with_effects(*args: Any, **kwargs: Any) -> Any:
        first = len(V.graph.operations)
        out = orig(*args, **kwargs)
        deps = getattr(V.graph, "additional_star_deps", None)
        if deps is not None:
            for new in V.graph.operations[first:]:
                # (plain attributes: an operation without a buffer name asserts in get_name())
                buffer_name = getattr(new, "name", None)
                op_name = getattr(new, "operation_name", None)
                edges = deps.get(buffer_name) if buffer_name is not None else None
                if edges and op_name is not None and op_name != buffer_name:
                    deps.setdefault(op_name, type(edges)())
                    deps[op_name] |= edges
        return out

    with_effects._largeep_order_fix = True  # type: ignore[attr-defined]
    lowering.lowerings[op] = with_effects
