// 16-byte vectors of bf16 or float32: float32 accumulation in registers (no NVSHMEM; shared by every kernel family).
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

// 8 float32 values as two bf16 vectors: *hi their rounding, *lo the rounding of what is left (hi + lo holds about
// 16 significant bits of each value: float32 sums sent in bf16 rows). An infinite hi (an infinite value, or one
// rounding past bf16's largest) has lo 0, so that hi + lo stays infinite rather than NaN.
__device__ __forceinline__ void split_bf16x8(const float* acc, int4* hi, int4* lo) {
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(hi);
    __nv_bfloat162* l = reinterpret_cast<__nv_bfloat162*>(lo);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
        const float2 r = __bfloat1622float2(h[i]);
        l[i] = __floats2bfloat162_rn(isinf(r.x) ? 0.f : acc[2 * i] - r.x, isinf(r.y) ? 0.f : acc[2 * i + 1] - r.y);
    }
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

// 16 bytes of T (bf16 or float32) against kPer float32 accumulators: add, weighted add, pack back to T (as 16
// bytes, or stored at dst).
template <typename T>
struct Vec;
template <>
struct Vec<__nv_bfloat16> {
    static constexpr int kPer = 8;  // elements per 16 bytes
    __device__ static void add(float* acc, int4 v) {
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float2 f = __bfloat1622float2(h[i]);
            acc[2 * i] += f.x;
            acc[2 * i + 1] += f.y;
        }
    }
    __device__ static void fma(float* acc, float w, int4 v) { fma_bf16x8(acc, w, v); }
    __device__ static int4 pack(const float* acc) { return pack_bf16x8(acc); }
    __device__ static void store(__nv_bfloat16* dst, const float* acc) {
        *reinterpret_cast<int4*>(dst) = pack_bf16x8(acc);
    }
};
template <>
struct Vec<float> {
    static constexpr int kPer = 4;
    __device__ static void add(float* acc, int4 v) {
        const float* f = reinterpret_cast<const float*>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] += f[i];
    }
    __device__ static void fma(float* acc, float w, int4 v) {
        const float* f = reinterpret_cast<const float*>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] += w * f[i];
    }
    __device__ static int4 pack(const float* acc) {
        int4 v;
        float* f = reinterpret_cast<float*>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) f[i] = acc[i];
        return v;
    }
    __device__ static void store(float* dst, const float* acc) {
        *reinterpret_cast<float4*>(dst) = make_float4(acc[0], acc[1], acc[2], acc[3]);
    }
};

}  // namespace largeep
