// 16-byte vectors of bf16: float32 accumulation in registers (no NVSHMEM; shared by every kernel family).
#pragma once

#include <cuda_bf16.h>

namespace largeep {

// 8 float32 values rounded to bf16, packed into 16 bytes.
__device__ __forceinline__ int4 pack_bf16x8(const float* acc) {
    int4 res;
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&res);
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    return res;
}

// acc[0, 8) += w * the 8 bf16 values of v.
__device__ __forceinline__ void fma_bf16x8(float* acc, float w, int4 v) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        acc[2 * i] += w * f.x;
        acc[2 * i + 1] += w * f.y;
    }
}

}  // namespace largeep
