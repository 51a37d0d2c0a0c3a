"""The package surface: submodules reached as attributes of ``largeep``, the boolean ``LARGEEP_*`` variables, and
the argument checks of ``largeep.fp8`` (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from largeep import ArgumentError, _env, fp8

_LAZY = ("expert_tp", "gate", "layers", "native", "ops", "placement")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=120)


def test_submodules_as_attributes() -> None:
    """``import largeep`` alone reaches the public submodules (as README writes them), imports none of them until
    asked, and an unknown name raises AttributeError in the usual wording."""
    code = f"""
import sys
import largeep
lazy = {_LAZY!r}
assert not [m for m in lazy if "largeep." + m in sys.modules], sorted(sys.modules)
assert set(lazy) <= set(dir(largeep)) and "Buffer" in dir(largeep)
assert largeep.layers.MoELayer and largeep.ops.dispatch and largeep.native.unavailable_reason
assert largeep.gate and largeep.placement.Placement and largeep.expert_tp.make_expert_tp_groups
assert largeep.layers is sys.modules["largeep.layers"]
try:
    largeep.nonexistent
except AttributeError as exc:
    assert str(exc) == "module 'largeep' has no attribute 'nonexistent'", str(exc)
else:
    raise SystemExit("largeep.nonexistent did not raise")
assert not hasattr(largeep, "_C_nonexistent")
from largeep import gate  # (from-imports still work)
print("ok")
"""
    run = _python(code)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


@pytest.mark.parametrize("name,default", [("CHECK_VALUES", True), ("SEGV_BACKTRACE", False)])
@pytest.mark.parametrize("raw,want", [(None, None), ("", None), ("  ", None), ("1", True), ("TRUE", True),
                                      (" on ", True), ("Yes", True), ("0", False), ("False", False), ("OFF", False),
                                      ("no", False)])
def test_flags_accept(monkeypatch: pytest.MonkeyPatch, name: str, default: bool, raw: str | None,
                      want: bool | None) -> None:
    """Both boolean variables take the same spellings; unset and empty mean the default, as for every other
    LARGEEP_* variable (before, an empty LARGEEP_CHECK_VALUES turned the checks off, and LARGEEP_SEGV_BACKTRACE took
    exactly "1": "true" was ignored)."""
    if raw is None:
        monkeypatch.delenv("LARGEEP_" + name, raising=False)
    else:
        monkeypatch.setenv("LARGEEP_" + name, raw)
    expect = default if want is None else want
    if name == "CHECK_VALUES":
        assert _env.settings().check_values is expect
    else:
        assert _env.fault_backtrace() is expect
        _env.settings()  # (a good value: the Buffer's settings take it)


@pytest.mark.parametrize("name", ["CHECK_VALUES", "SEGV_BACKTRACE"])
@pytest.mark.parametrize("raw", ["disable", "2", "y"])
def test_flags_refuse(monkeypatch: pytest.MonkeyPatch, name: str, raw: str) -> None:
    """Anything else raises ValueError naming the variable: in the Buffer's settings (so that a Buffer is refused on
    every rank) and, for LARGEEP_SEGV_BACKTRACE, where the native module's load reads it."""
    monkeypatch.setenv("LARGEEP_" + name, raw)
    with pytest.raises(ValueError, match=f"LARGEEP_{name}={raw!r}: expected 1 \\(or true, yes, on\\)"):
        _env.settings()
    if name == "SEGV_BACKTRACE":
        with pytest.raises(ValueError, match=f"LARGEEP_SEGV_BACKTRACE={raw!r}"):
            _env.fault_backtrace()


def test_fp8_quantize_argument_errors() -> None:
    """fp8.quantize refuses wrong arguments with largeep.ArgumentError (a ValueError) naming the argument and what
    was expected; a right one still quantizes (0 tokens included)."""
    g = torch.Generator().manual_seed(5)
    cases = [
        (torch.randn(4, 200, generator=g), r"argument 'x' has shape \(4, 200\), expected a hidden size \(dim 1\) "
                                           r"that is a multiple of 128"),
        (torch.randn(2, 4, 128, generator=g), r"argument 'x' has 3 dimensions \(2, 4, 128\), expected 2"),
        (torch.randn(256, generator=g), r"argument 'x' has 1 dimensions \(256,\), expected 2"),
        (torch.randint(0, 9, (3, 128), generator=g), r"argument 'x' has dtype torch.int64, expected a floating-point"),
        ([[0.5] * 128], r"argument 'x' must be a torch.Tensor, got list"),
        # an FP8 x: its codes would be quantised again
        (fp8.quantize(torch.randn(2, 128, generator=g))[0],
         r"argument 'x' has dtype torch.float8_e4m3fn, expected a floating-point dtype of 2 bytes or more"),
    ]
    for x, msg in cases:
        with pytest.raises(ArgumentError, match=r"fp8.quantize: " + msg):
            fp8.quantize(x)  # type: ignore[arg-type]
        assert issubclass(ArgumentError, ValueError)
    x = torch.randn(2, 128, generator=g)
    for flag in ("no", 0, None):  # (each is refused, not read as its truth: "no" would round the scales)
        with pytest.raises(ArgumentError, match=r"fp8.quantize: argument 'round_scale' must be a bool \(True or "
                                                 rf"False\), got {type(flag).__name__}"):
            fp8.quantize(x, round_scale=flag)  # type: ignore[arg-type]
    for t in (0, 3):
        x = torch.randn(t, 256, generator=g).to(torch.bfloat16)
        q, s = fp8.quantize(x)
        assert q.shape == (t, 256) and q.dtype == fp8.FP8_DTYPE and s.shape == (t, 2) and s.dtype == torch.float32
        back = fp8.dequantize(q, s)
        assert torch.allclose(back, x.float(), rtol=0.07, atol=1e-3)


def test_fp8_dequantize_argument_errors() -> None:
    """fp8.dequantize refuses what it would read wrong (a uint8 view of the codes read as integers, an integer or
    8-bit output, scales of another shape) with largeep.ArgumentError naming the argument; float16 and float64 work,
    and gradients flow to the scales (the torch ops)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 256, generator=g)
    q, s = fp8.quantize(x)
    cases = [
        ((q.view(torch.uint8), s), {}, r"argument 'q' must be a torch.float8_e4m3fn tensor, got torch.uint8"),
        (([1.0], s), {}, r"argument 'q' must be a torch.float8_e4m3fn tensor, got list"),
        ((q, s), {"dtype": torch.int32}, r"argument 'dtype' must be a floating-point dtype of 2 bytes or more"),
        ((q, s), {"dtype": fp8.FP8_DTYPE}, r"argument 'dtype' must be a floating-point dtype of 2 bytes or more"),
        ((q, s[:, :1]), {}, r"scale float32 \[\.\.\., H/128\], got q \(3, 256\) and scale \(torch.float32, \(3, 1\)\)"),
        ((q, s.double()), {}, r"got q \(3, 256\) and scale \(torch.float64, \(3, 2\)\)"),
        ((q[:, :200], s), {}, r"H a multiple of 128.*: argument 'q' has H = 200, not a multiple of 128"),
        ((q, s[:, :1]), {}, r": argument 'scale' must have shape \(3, 2\)"),
        ((q, s.double()), {}, r": argument 'scale' is not a float32 tensor"),
        ((q[0, 0], s), {}, r": argument 'q' has no dimensions"),
        # scales on another device than the codes (torch's own error named neither argument)
        ((q, s.to("meta")), {}, r"argument 'scale' is on meta, expected q's device cpu"),
        ((q.to("meta"), s), {}, r"argument 'scale' is on cpu, expected q's device meta"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ArgumentError, match=r"fp8.dequantize: .*" + msg):
            fp8.dequantize(*args, **kw)  # type: ignore[arg-type]
    want = fp8.dequantize(q, s)
    for dt in (torch.float16, torch.float64, torch.bfloat16):
        assert torch.equal(fp8.dequantize(q, s, dt), want.to(dt))
    sg = s.clone().requires_grad_()
    fp8.dequantize(q, sg, torch.bfloat16).float().sum().backward()
    assert sg.grad is not None and torch.equal(sg.grad, q.float().view(3, 2, 128).sum(-1))
