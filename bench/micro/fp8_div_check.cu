// Exhaustive check of the low-latency quantiser's arithmetic (csrc/kernels/fp8.cuh, used by low_latency.cu): over
// every pair of a bf16 group maximum `amax` (+0 to the largest finite) and a bf16 value x with |x| <= amax, the
// scale s = fp8_group_scale(amax) and the e4m3 code of x / s, three ways:
//   div: __fdiv_rn(x, s), the correctly rounded quotient (SPEC's and largeep.fp8's x / s);
//   mul: x * (1 / s), one multiply (the quantiser before session 34);
//   lib: fp8_div_by_scale, what the quantiser runs (the product, one FMA correction step, x's sign).
// Prints how many quotients and e4m3 codes of mul and lib differ from div's, without and with round_scale, and how
// many of lib's differing quotients are at or above 2**-10 (half of e4m3's smallest subnormal, 2**-9: smaller ones
// all give the code of +-0). A bf16 input has 2**16 values and a group's scale depends only on its maximum, so these
// pairs are every input the quantiser can see (a NaN or infinity spoils its group; fp8.cuh handles that apart).
// Exit status 0 when every lib code is div's.
// Build and run: nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/fdc bench/micro/fp8_div_check.cu && /tmp/fdc
#include <cuda_bf16.h>

#include <cstdint>

#include "../../csrc/kernels/fp8.cuh"
#include "micro.cuh"

namespace {

// [round_scale][pairs, mul quotient, mul code, lib quotient, lib quotient >= 2**-10, lib code]
__device__ unsigned long long g_count[2][6];

__device__ __forceinline__ float bf16_bits(uint32_t b) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
}

__global__ void check(int round_scale) {
    using namespace largeep;
    const float amax = bf16_bits(blockIdx.x);  // (blocks 0 .. 0x7F7F: +0 to the largest finite bf16)
    const float s = fp8_group_scale(amax, round_scale != 0);
    const float inv = 1.f / s;
    const bool finite_s = isfinite(s);
    unsigned long long n[6] = {0, 0, 0, 0, 0, 0};
    for (uint32_t b = threadIdx.x; b < 0x10000u; b += blockDim.x) {
        const float x = bf16_bits(b);
        if (!(fabsf(x) <= amax)) continue;  // (NaN and values past the group's maximum: not in such a group)
        const float div = __fdiv_rn(x, s);
        const float mul = __fmul_rn(x, inv);
        const float lib = fp8_div_by_scale(x, s, inv, finite_s);
        const bool lib_off = __float_as_uint(lib) != __float_as_uint(div);
        n[0] += 1;
        n[1] += __float_as_uint(mul) != __float_as_uint(div);
        n[2] += fp8_e4m3_code(mul) != fp8_e4m3_code(div);
        n[3] += lib_off;
        n[4] += lib_off && fabsf(div) >= 0x1p-10f;
        n[5] += fp8_e4m3_code(lib) != fp8_e4m3_code(div);
    }
    for (int i = 0; i < 6; ++i) atomicAdd(&g_count[round_scale][i], n[i]);
}

}  // namespace

int main() {
    for (int rs = 0; rs < 2; ++rs) check<<<0x7F80, 256>>>(rs);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    unsigned long long h[2][6];
    CK(cudaMemcpyFromSymbol(h, g_count, sizeof(h)));
    bool ok = true;
    for (int rs = 0; rs < 2; ++rs) {
        std::printf("round_scale=%d pairs %llu | mul: quotients differ %llu, codes differ %llu | lib: quotients "
                    "differ %llu (%llu of them >= 2**-10), codes differ %llu\n",
                    rs, h[rs][0], h[rs][1], h[rs][2], h[rs][3], h[rs][4], h[rs][5]);
        ok = ok && h[rs][5] == 0;
    }
    std::printf("%s\n", ok ? "lib: every e4m3 code is div's" : "lib: codes DIFFER from div's");
    return ok ? 0 : 1;
}
