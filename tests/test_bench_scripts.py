"""The standalone scripts in bench/: their launcher and the arithmetic behind their records, on the CPU."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return ROOT / "bench"


def test_run_ranks_refuses_no_ranks_at_once(bench_dir: Path) -> None:
    """No GPU visible gives the GPU scripts 0 ranks: run_ranks says so at once instead of waiting out its timeout
    for a result no process will send."""
    import _launch

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="0 ranks"):
        _launch.run_ranks(print, 0, None, backend="gloo", timeout_s=30.0)
    assert time.monotonic() - t0 < 5.0
