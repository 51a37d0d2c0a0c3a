// Exhaustive check of the low-latency quantiser's division (low_latency.cu, quantize_e4m3x8): over every pair of a
// bf16 group maximum `amax` (positive, finite) and a bf16 value x with |x| <= amax, the scale s = max(amax, 1e-4)
// / 448 and the e4m3 code of x / s, three ways:
//   div: __fdiv_rn(x, s), the correctly rounded quotient (SPEC's and largeep.fp8's x / s);
//   mul: x * (1 / s), one multiply;
//   fma: q = x * (1 / s), then q + (x - q * s) * (1 / s) with two fused multiply-adds (the correction step).
// Prints how many quotients and e4m3 codes of mul and fma differ from div's, without and with round_scale (s the
// power of two at or above it). A bf16 input has only 2**16 values and a group's scale depends only on its maximum,
// so these pairs are every input the quantiser can see (a NaN or infinity spoils its group before any division).
// Build and run: nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/fdc bench/micro/fp8_div_check.cu && /tmp/fdc
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "micro.cuh"

namespace {

__device__ unsigned long long g_count[2][5];  // [round_scale][pairs, mul quotient, mul code, fma quotient, fma code]

__device__ __forceinline__ float bf16_bits(uint32_t b) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
}

__device__ __forceinline__ uint8_t e4m3(float v) { return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3); }

__global__ void check(int round_scale) {
    const float amax = bf16_bits(blockIdx.x);  // (blocks 0 .. 0x7F7F: +0 to the largest finite bf16)
    float s = fmaxf(amax, 1e-4f) / 448.f;
    if (round_scale) s = exp2f(ceilf(log2f(s)));
    const float inv = 1.f / s;
    unsigned long long n[5] = {0, 0, 0, 0, 0};
    for (uint32_t b = threadIdx.x; b < 0x10000u; b += blockDim.x) {
        const float x = bf16_bits(b);
        if (!(fabsf(x) <= amax)) continue;  // (NaN and values past the group's maximum: not in such a group)
        const float div = __fdiv_rn(x, s);
        const float mul = __fmul_rn(x, inv);
        const float fma = fmaf(fmaf(-mul, s, x), inv, mul);
        n[0] += 1;
        n[1] += __float_as_uint(mul) != __float_as_uint(div);
        n[2] += e4m3(mul) != e4m3(div);
        n[3] += __float_as_uint(fma) != __float_as_uint(div);
        n[4] += e4m3(fma) != e4m3(div);
    }
    for (int i = 0; i < 5; ++i) atomicAdd(&g_count[round_scale][i], n[i]);
}

}  // namespace

int main() {
    for (int rs = 0; rs < 2; ++rs) check<<<0x7F80, 256>>>(rs);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    unsigned long long h[2][5];
    CK(cudaMemcpyFromSymbol(h, g_count, sizeof(h)));
    for (int rs = 0; rs < 2; ++rs)
        std::printf("round_scale=%d pairs %llu | mul: quotients differ %llu, codes differ %llu | fma: quotients differ "
                    "%llu, codes differ %llu\n", rs, h[rs][0], h[rs][1], h[rs][2], h[rs][3], h[rs][4]);
    const bool ok = h[0][3] == 0 && h[0][4] == 0 && h[1][3] == 0 && h[1][4] == 0;
    std::printf("%s\n", ok ? "fma: every quotient and code is div's" : "fma: DIFFERS from div");
    return ok ? 0 : 1;
}
