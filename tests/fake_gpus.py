"""A pytest plugin for test_harness.py: torch sees LARGEEP_FAKE_GPUS GPUs (none are used: collection only) and the
native module loads, so that conftest's choices of what runs on a machine of that many GPUs can be checked on CPU.
Each selected test is printed with its skip reason, or "run"."""

from __future__ import annotations

import os

import pytest
import torch

_N = int(os.environ["LARGEEP_FAKE_GPUS"])
torch.cuda.is_available = lambda: _N > 0
torch.cuda.device_count = lambda: _N
from largeep import native  # noqa: E402

if os.environ.get("LARGEEP_FAKE_NATIVE") == "1":
    native.unavailable_reason = lambda *a, **k: None
else:
    native.unavailable_reason = lambda *a, **k: "fake_gpus.py: the native module made unavailable"


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        skip = next(item.iter_markers("skip"), None)
        cond = next((m for m in item.iter_markers("skipif") if m.args and m.args[0]), None)
        why = skip.kwargs.get("reason", "") if skip else cond.kwargs.get("reason", "") if cond else "run"
        print(f"HARNESS {item.nodeid.split('::')[-1]} | {why}")
