"""largeep._inductor_order: the wrapper of Inductor's with_effects lowering (its effect on compiled pipelines is
tested in test_layers.py::test_pipeline_compiled[*-inductor], which fails without it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"

_PROBE = """
import torch
from torch._inductor import lowering
import largeep._inductor_order as fix
op = torch.ops.higher_order.with_effects
before = lowering.lowerings[op]
fix.ensure()
after = lowering.lowerings[op]
fix.ensure()
print(after is not before, lowering.lowerings[op] is after, getattr(after, "_largeep_order_fix", False))
"""


@pytest.mark.parametrize("setting,want", [(None, "True True True"), ("0", "False True False")])
def test_wraps_once_or_not_at_all(setting: str | None, want: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PYTHON_DIR), env.get("PYTHONPATH", "")])
    env.pop("LARGEEP_INDUCTOR_ORDER_FIX", None)
    if setting is not None:
        env["LARGEEP_INDUCTOR_ORDER_FIX"] = setting
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.split("\n")[-2] == want, out.stdout + out.stderr


def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from largeep import _env, info

    for word, on in (("yes", True), ("Off", False), (" 1 ", True), ("", True)):  # (the spellings of every flag)
        monkeypatch.setenv("LARGEEP_INDUCTOR_ORDER_FIX", word)
        assert _env.inductor_order_fix() is on, word
    monkeypatch.setenv("LARGEEP_INDUCTOR_ORDER_FIX", "2")
    with pytest.raises(ValueError, match="LARGEEP_INDUCTOR_ORDER_FIX='2'"):
        _env.inductor_order_fix()
    r = info.report()
    assert r["settings_error"] and "LARGEEP_INDUCTOR_ORDER_FIX" in r["settings_error"]
