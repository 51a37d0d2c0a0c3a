// The low-latency quantiser's arithmetic per value (no NVSHMEM: bench/micro/fp8_div_check.cu checks it alone): a
// group's FP8 scale from its maximum, and x / s, both bit for bit as largeep.fp8.quantize (SPEC's scale = amax /
// 448, q = x / s, correctly rounded in float32).
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

namespace largeep {

// The larger of a and b, NaN if either is (fmaxf drops a NaN): the group's amax carries a NaN to its scale.
__device__ __forceinline__ float max_keep_nan(float a, float b) { return (a != a || b != b) ? a + b : fmaxf(a, b); }

// A group's scale from the maximum of its absolute values: amax / 448 (amax at least 1e-4, so an all-zero group has
// a finite scale), the power of two at or above it with round_scale. NaN for a NaN amax, infinite for an infinite.
// The rounding takes the exponent bits, as largeep.fp8.round_up_pow2: a scale with mantissa bits set goes to the next
// exponent (exp2f(ceilf(log2f(s))) rounds down for an s a few float32 steps above a power of two).
__device__ __forceinline__ float fp8_group_scale(float amax, bool round_scale) {
    float s = max_keep_nan(amax, 1e-4f) / 448.f;
    if (round_scale && s == s) s = __uint_as_float((__float_as_uint(s) + 0x7FFFFFu) & 0xFF800000u);
    return s;
}

// x / s correctly rounded (__fdiv_rn's quotient) from the group's reciprocal inv = 1 / s, cheaper than a division
// per value: the product, one correction step of two fused multiply-adds, and x's sign (the correction turns -0 into
// +0). Not every quotient is __fdiv_rn's (some far below e4m3's smallest value differ), but its e4m3 code is, for
// every bf16 x and every scale fp8_group_scale makes (bench/micro/fp8_div_check.cu checks them all). For an infinite
// or NaN s, where the correction would be NaN, the product (x * 0, or NaN) is the quotient already.
__device__ __forceinline__ float fp8_div_by_scale(float x, float s, float inv, bool finite_s) {
    const float q = __fmul_rn(x, inv);
    return finite_s ? copysignf(fmaf(fmaf(-q, s, x), inv, q), x) : q;
}

// The e4m3 code of v, saturating: a finite value past +-448 becomes +-448, NaN stays NaN.
__device__ __forceinline__ uint8_t fp8_e4m3_code(float v) {
    return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

}  // namespace largeep
