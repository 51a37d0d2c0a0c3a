// Expert-side row kernels (no communication): the weighted sum of each dispatched row's expert outputs.
#include <cuda_bf16.h>

#include <algorithm>

#include "api.cuh"
#include "exception.cuh"
#include "vec.cuh"

namespace largeep {
namespace {

constexpr int kRowThreads = 512;
constexpr int kRowWarps = kRowThreads / 32;

// One warp per output row r: y[r] = sum over k with pos[r, k] != pad of w[r, k] * src[pos[r, k]], in float32,
// rounded once to T. Every lane owns 16-byte columns; the K source loads of a column are issued before any is
// used (kMaxK of them in flight).
template <typename T, int kMaxK>
__global__ void __launch_bounds__(kRowThreads) weighted_row_sum_kernel(const T* src, const int64_t* pos,
                                                                       const float* w, T* y, int64_t R, int K, int H,
                                                                       int64_t pad) {
    using V = Vec<T>;
    const int lane = threadIdx.x % 32;
    const int64_t nvec = H / V::kPer;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32; r < R;
         r += static_cast<int64_t>(gridDim.x) * kRowWarps) {
        int64_t p[kMaxK];
        float wk[kMaxK];
#pragma unroll
        for (int k = 0; k < kMaxK; ++k) {
            p[k] = k < K ? pos[r * K + k] : pad;
            wk[k] = k < K && p[k] != pad ? w[r * K + k] : 0.f;
        }
        for (int64_t v = lane; v < nvec; v += 32) {
            int4 in[kMaxK];
#pragma unroll
            for (int k = 0; k < kMaxK; ++k)
                if (p[k] != pad) in[k] = __ldg(reinterpret_cast<const int4*>(src + p[k] * H) + v);
            float acc[V::kPer] = {};
#pragma unroll
            for (int k = 0; k < kMaxK; ++k)
                if (p[k] != pad) V::fma(acc, wk[k], in[k]);
            V::store(y + r * H + v * V::kPer, acc);
        }
    }
}

template <typename T>
void launch_typed(const void* src, const int64_t* pos, const float* w, void* y, int64_t R, int K, int H, int64_t pad,
                  cudaStream_t stream) {
    const int64_t blocks = std::min<int64_t>((R + kRowWarps - 1) / kRowWarps, 65535);
    if (blocks == 0) return;
    auto* s = static_cast<const T*>(src);
    auto* o = static_cast<T*>(y);
    if (K <= 2) weighted_row_sum_kernel<T, 2><<<blocks, kRowThreads, 0, stream>>>(s, pos, w, o, R, K, H, pad);
    else if (K <= 4) weighted_row_sum_kernel<T, 4><<<blocks, kRowThreads, 0, stream>>>(s, pos, w, o, R, K, H, pad);
    else if (K <= 8) weighted_row_sum_kernel<T, 8><<<blocks, kRowThreads, 0, stream>>>(s, pos, w, o, R, K, H, pad);
    else weighted_row_sum_kernel<T, 16><<<blocks, kRowThreads, 0, stream>>>(s, pos, w, o, R, K, H, pad);
    LAUNCH_CHECK();
}

}  // namespace

void launch_weighted_row_sum(const void* src, int elem_bytes, const int64_t* pos, const float* w, void* y,
                             int64_t rows, int num_topk, int hidden, int64_t pad, cudaStream_t stream) {
    HOST_ASSERT(elem_bytes == 2 || elem_bytes == 4, "weighted_row_sum: rows must be bf16 or float32");
    HOST_ASSERT(num_topk >= 1 && num_topk <= 16, "weighted_row_sum: 1 <= num_topk <= 16");
    HOST_ASSERT(hidden % (16 / elem_bytes) == 0, "weighted_row_sum: hidden * element size must be a multiple of 16");
    if (elem_bytes == 2) launch_typed<__nv_bfloat16>(src, pos, w, y, rows, num_topk, hidden, pad, stream);
    else launch_typed<float>(src, pos, w, y, rows, num_topk, hidden, pad, stream);
}

}  // namespace largeep
