"""FP8 (e4m3) tokens with one float32 scale per 128 channels, as SPEC.md defines them.

A token row x [H] becomes ``q`` e4m3 [H] and ``s`` float32 [H/128] with ``s = amax(|x| over 128 channels) / 448``
and ``q = x / s``; ``x ~= q * s``. With ``round_scale`` the scale is rounded up to a power of two (UE8M0), which
keeps ``q`` inside the e4m3 range.

Two departures from that formula, the same in this module and in the low-latency kernels: the amax is taken at least
1e-4, so a group whose values are all below 1e-4 in magnitude gets the scale 1e-4 / 448 (an all-zero group a finite
scale, q 0, never a division by zero; values below about 2.2e-10, half e4m3's smallest step times that scale, then
become 0). And values that are not finite
spoil their group, alike here and in the kernels: a NaN makes the group's scale and every q NaN, and an infinity makes
the scale infinite, so that every value of the group dequantises to NaN (never to a plausible finite value).

On CUDA :func:`quantize` and :func:`dequantize` run one native kernel each where they can (the first such call
loads largeep's native module, and with it NVSHMEM's host library); elsewhere, and where the kernels cannot take
the tensors (see each function), torch ops that give the same bits.
"""

from __future__ import annotations

from typing import Any

import torch

from largeep.backends.base import current_raw_stream, on_device
from largeep.errors import ArgumentError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
GROUP = 128
# Scale floor: an all-zero group gets this scale (q stays 0), never a division by zero.
_MIN_AMAX = 1e-4


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two at or above each positive normal float32 ``scale`` (a subnormal one goes to
    2**-126; quantize's scales are never subnormal: see the amax floor), from its exponent bits: a scale with
    mantissa bits set goes to the next exponent. (``exp2(ceil(log2(s)))`` rounds down for an s a few float32 steps
    above a power of two, where log2 rounds to the integer; the scale would then be below amax / 448.) Exact powers of
    two and infinities stay, NaN stays NaN. The low-latency kernels' fp8_group_scale does the same."""
    bits = scale.view(torch.int32)
    up = ((bits + 0x7FFFFF) & ~0x7FFFFF).view(torch.float32)  # (positive finite s below 2**127 and infinity)
    return torch.where(torch.isnan(scale), scale, up)


def _native_for(*ts: torch.Tensor) -> Any:
    """The native module where its FP8 kernels can take the work on ``ts`` (plain CUDA tensors with storage, none
    needing a gradient, not while torch.compile traces, the module built for their GPU), else None: the torch ops
    below then do it, to the same bits (and with autograd, and for tensor subclasses, fake or functorch-wrapped
    tensors, which have no memory to hand a kernel)."""
    t = ts[0]
    if not t.is_cuda or torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(u.requires_grad for u in ts)):
        return None
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if any(type(u) is not torch.Tensor or (wrapped is not None and wrapped(u)) for u in ts):
        return None
    from largeep import native

    if native.unavailable_reason() is not None or native._arch_reason(t.device.index) is not None:
        return None
    return native.module()


def quantize(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (bf16/fp32, H % 128 == 0; fp16 and fp64 too, always by torch ops, rounded to float32 first: an fp64
    value beyond float32's range becomes infinite and spoils its group) -> (e4m3 [T, H], float32 scales [T, H/128]).
    No host sync. A wrong ``x`` (an FP8 one among them), or a ``round_scale`` that is not a bool, raises
    :class:`largeep.ArgumentError`. On CUDA
    one native kernel (one pass over x; torch ops where the native module is not built or not built for x's GPU,
    x is not contiguous or not 16-byte aligned, x needs a gradient or is a tensor subclass, or while torch.compile
    traces), the same bits either way."""
    if not isinstance(x, torch.Tensor):
        raise ArgumentError(f"fp8.quantize: argument 'x' must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ArgumentError(f"fp8.quantize: argument 'x' has {x.dim()} dimensions {tuple(x.shape)}, expected 2 "
                            "(tokens, hidden)")
    if not x.is_floating_point() or x.element_size() < 2:  # (an FP8 x would be its codes quantised again)
        raise ArgumentError(f"fp8.quantize: argument 'x' has dtype {x.dtype}, expected a floating-point dtype of 2 "
                            "bytes or more (bf16 or fp32; fp16 and fp64 through torch ops)")
    if not isinstance(round_scale, bool):  # (a string such as "no" is true: it would round)
        raise ArgumentError(f"fp8.quantize: argument 'round_scale' must be a bool (True or False), got "
                            f"{type(round_scale).__name__} {round_scale!r:.40}")
    t, h = x.shape
    if h % GROUP:
        raise ArgumentError(f"fp8.quantize: argument 'x' has shape {tuple(x.shape)}, expected a hidden size (dim 1) "
                            f"that is a multiple of {GROUP}")
    C = _native_for(x) if x.dtype in (torch.bfloat16, torch.float32) else None
    if C is not None and x.is_contiguous() and x.data_ptr() % 16 == 0:
        q = torch.empty(t, h, dtype=FP8_DTYPE, device=x.device)
        s = torch.empty(t, h // GROUP, dtype=torch.float32, device=x.device)
        with on_device(x.device):
            C.fp8_quantize(x.data_ptr(), x.element_size(), q.data_ptr(), s.data_ptr(), t * (h // GROUP),
                           bool(round_scale), current_raw_stream(x.device))
        return q, s
    g = x.float().contiguous().view(t, h // GROUP, GROUP)  # (q and s contiguous whatever x's strides)
    amax = g.abs().amax(dim=2).clamp_min(_MIN_AMAX)
    # (divided by a tensor: torch on CUDA multiplies by the reciprocal of a Python number, which is not always the
    # correctly rounded quotient that the CPU and the kernels give, and then about one e4m3 code in a thousand differs)
    scale = amax / torch.full_like(amax, FP8_MAX)
    if round_scale:
        scale = round_up_pow2(scale)
    # (SPEC's q = x / s, correctly rounded in float32, as the low-latency kernels' quantiser: the same bits)
    q = (g / scale.unsqueeze(2)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(t, h)
    return q, scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(e4m3 [..., H], float32 [..., H/128]) -> [..., H] in ``dtype`` (a floating-point dtype of 2 bytes or more):
    q * scale in float32, rounded once to ``dtype``. On CUDA with ``dtype`` bf16 or float32, one native kernel where
    the native module is built and q and scale are contiguous (q 16-byte aligned; not while torch.compile traces,
    nor for a scale that needs a gradient), else torch ops: the same bits. A wrong argument raises
    :class:`largeep.ArgumentError`."""
    if not isinstance(q, torch.Tensor) or q.dtype != FP8_DTYPE:
        raise ArgumentError(f"fp8.dequantize: argument 'q' must be a {FP8_DTYPE} tensor, got "
                            f"{q.dtype if isinstance(q, torch.Tensor) else type(q).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise ArgumentError(f"fp8.dequantize: argument 'dtype' must be a floating-point dtype of 2 bytes or more "
                            f"(bf16, float16, float32, float64), got {dtype}")
    h = q.shape[-1] if q.dim() else 0
    if q.dim() == 0 or h % GROUP or not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 \
            or tuple(scale.shape) != (*q.shape[:-1], h // GROUP):
        raise ArgumentError(
            f"fp8.dequantize: expected q [..., H] with H a multiple of {GROUP} and scale float32 [..., H/{GROUP}], "
            f"got q {tuple(q.shape)} and scale "
            f"{(scale.dtype, tuple(scale.shape)) if isinstance(scale, torch.Tensor) else type(scale).__name__}"
            + (": argument 'q' has no dimensions" if not q.dim() else
               f": argument 'q' has H = {h}, not a multiple of {GROUP}" if h % GROUP else
               ": argument 'scale' is not a float32 tensor" if not isinstance(scale, torch.Tensor)
               or scale.dtype != torch.float32 else
               f": argument 'scale' must have shape {(*q.shape[:-1], h // GROUP)}")
        )
    if scale.device != q.device:
        raise ArgumentError(f"fp8.dequantize: argument 'scale' is on {scale.device}, expected q's device {q.device}")
    C = _native_for(q, scale) if dtype in (torch.bfloat16, torch.float32) else None
    if C is not None and q.is_contiguous() and scale.is_contiguous() and q.data_ptr() % 16 == 0:
        y = torch.empty(q.shape, dtype=dtype, device=q.device)
        with on_device(q.device):
            C.fp8_dequantize(q.data_ptr(), scale.data_ptr(), y.data_ptr(), y.element_size(), q.numel() // GROUP,
                             current_raw_stream(q.device))
        return y
    g = q.float().view(*q.shape[:-1], h // GROUP, GROUP)
    return (g * scale.unsqueeze(-1)).view(*q.shape).to(dtype)
