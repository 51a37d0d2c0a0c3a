// Expert-side row kernels (no communication): the weighted sum of each dispatched row's expert outputs, the expert
// order of a dispatch's (row, k) entries, the gather of the rows in that order, and FP8 rows' quantisation and
// dequantisation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "api.cuh"
#include "exception.cuh"
#include "fp8.cuh"
#include "vec.cuh"

namespace largeep {
namespace {

constexpr int kRowThreads = 512;
constexpr int kRowWarps = kRowThreads / 32;

// One warp per output row r: y[r] = sum over k with pos[r, k] != pad and 0 <= pos[r, k] < limit of w[r, k] *
// src[pos[r, k]], in float32, rounded once to T (limit = the rows of src, or *count if fewer). A skipped entry
// reads neither its source row nor its weight, so whatever those hold (NaN included) cannot reach y. Every lane owns
// 16-byte columns; the K source loads of a column are issued before any is used (kMaxK of them in flight).
template <typename T, int kMaxK>
__global__ void __launch_bounds__(kRowThreads) weighted_row_sum_kernel(const T* src, int64_t src_rows,
                                                                       const int64_t* pos, const float* w, T* y,
                                                                       int64_t R, int K, int H, int64_t pad,
                                                                       const int* count) {
    using V = Vec<T>;
    const int lane = threadIdx.x % 32;
    const int64_t nvec = H / V::kPer;
    const int64_t limit = count != nullptr ? min(static_cast<int64_t>(*count), src_rows) : src_rows;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32; r < R;
         r += static_cast<int64_t>(gridDim.x) * kRowWarps) {
        int64_t p[kMaxK];
        float wk[kMaxK];
#pragma unroll
        for (int k = 0; k < kMaxK; ++k) {
            p[k] = k < K ? pos[r * K + k] : pad;
            if (p[k] < 0 || p[k] >= limit) p[k] = pad;
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

// ---- the experts' gated activation: bias add and act(gate, up) of the grouped GEMM's output ------------------
// h [P, 2F] holds each row's gate projection in columns [0, F) and its up projection in [F, 2F); the rows are
// sorted by expert, offs int32 [E] the inclusive end row of each expert; bias [E, 2F] or null is added to each row
// (its expert's). One warp per row: a row at or past offs[E-1] is written as zeros (its h is not read); the others
// find their expert by a binary search of offs. Float32 math, one rounding to T per output value. kind 0:
// silu(g) * u; kind 1 (GPT-OSS's): (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'), g' = min(g, limit).
// The clamps keep NaN (as torch.clamp), and their gradient passes where the value lies within them (limits
// included), as torch.clamp's.
constexpr int kActThreads = 256;
constexpr int kActWarps = kActThreads / 32;

struct ActParams {
    int kind;
    float alpha, limit;
};

__device__ __forceinline__ int row_expert(const int* offs, int E, int64_t r) {
    int lo = 0, hi = E - 1;  // (the caller made sure offs[E - 1] > r)
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (static_cast<int64_t>(offs[mid]) > r) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float act_value(float g, float u, const ActParams& p) {
    if (p.kind == 0) return g * sigmoidf(g) * u;
    g = g > p.limit ? p.limit : g;
    u = u > p.limit ? p.limit : (u < -p.limit ? -p.limit : u);
    return (u + 1.f) * g * sigmoidf(p.alpha * g);
}

__device__ __forceinline__ void act_grad(float g, float u, float da, const ActParams& p, float* dg, float* du) {
    if (p.kind == 0) {
        const float s = sigmoidf(g);
        *dg = da * u * s * (1.f + g * (1.f - s));
        *du = da * g * s;
        return;
    }
    const bool g_in = g <= p.limit, u_in = u >= -p.limit && u <= p.limit;
    const float gc = g > p.limit ? p.limit : g;
    const float uc = u > p.limit ? p.limit : (u < -p.limit ? -p.limit : u);
    const float s = sigmoidf(p.alpha * gc);
    *dg = g_in ? da * (uc + 1.f) * (s + gc * p.alpha * s * (1.f - s)) : 0.f;
    *du = u_in ? da * gc * s : 0.f;
}

template <typename T>
__device__ __forceinline__ void load_floats(const T* src, float* out) {
    using V = Vec<T>;
#pragma unroll
    for (int i = 0; i < V::kPer; ++i) out[i] = 0.f;
    V::add(out, *reinterpret_cast<const int4*>(src));
}

template <typename T>
__global__ void __launch_bounds__(kActThreads) expert_act_kernel(const T* h, const T* bias, const int* offs, int E,
                                                                 T* a, int64_t P, int F, ActParams p) {
    using V = Vec<T>;
    const int lane = threadIdx.x % 32;
    const int64_t used = E > 0 ? static_cast<int64_t>(offs[E - 1]) : 0;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * kActWarps + threadIdx.x / 32; r < P;
         r += static_cast<int64_t>(gridDim.x) * kActWarps) {
        T* out = a + r * F;
        if (r >= used) {
            for (int c = lane * V::kPer; c < F; c += 32 * V::kPer)
                *reinterpret_cast<int4*>(out + c) = make_int4(0, 0, 0, 0);
            continue;
        }
        const T* row = h + r * 2 * static_cast<int64_t>(F);
        const T* b = bias != nullptr ? bias + static_cast<int64_t>(row_expert(offs, E, r)) * 2 * F : nullptr;
        for (int c = lane * V::kPer; c < F; c += 32 * V::kPer) {
            float g[V::kPer], u[V::kPer], res[V::kPer];
            load_floats(row + c, g);
            load_floats(row + F + c, u);
            if (b != nullptr) {
                V::add(g, *reinterpret_cast<const int4*>(b + c));
                V::add(u, *reinterpret_cast<const int4*>(b + F + c));
            }
#pragma unroll
            for (int i = 0; i < V::kPer; ++i) res[i] = act_value(g[i], u[i], p);
            V::store(out + c, res);
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(kActThreads) expert_act_backward_kernel(const T* da, const T* h, const T* bias,
                                                                          const int* offs, int E, T* dh, int64_t P,
                                                                          int F, ActParams p) {
    using V = Vec<T>;
    const int lane = threadIdx.x % 32;
    const int64_t used = E > 0 ? static_cast<int64_t>(offs[E - 1]) : 0;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * kActWarps + threadIdx.x / 32; r < P;
         r += static_cast<int64_t>(gridDim.x) * kActWarps) {
        T* out = dh + r * 2 * static_cast<int64_t>(F);
        if (r >= used) {
            for (int c = lane * V::kPer; c < 2 * F; c += 32 * V::kPer)
                *reinterpret_cast<int4*>(out + c) = make_int4(0, 0, 0, 0);
            continue;
        }
        const T* row = h + r * 2 * static_cast<int64_t>(F);
        const T* b = bias != nullptr ? bias + static_cast<int64_t>(row_expert(offs, E, r)) * 2 * F : nullptr;
        for (int c = lane * V::kPer; c < F; c += 32 * V::kPer) {
            float g[V::kPer], u[V::kPer], d[V::kPer], dg[V::kPer], du[V::kPer];
            load_floats(row + c, g);
            load_floats(row + F + c, u);
            load_floats(da + r * F + c, d);
            if (b != nullptr) {
                V::add(g, *reinterpret_cast<const int4*>(b + c));
                V::add(u, *reinterpret_cast<const int4*>(b + F + c));
            }
#pragma unroll
            for (int i = 0; i < V::kPer; ++i) act_grad(g[i], u[i], d[i], p, dg + i, du + i);
            V::store(out + c, dg);
            V::store(out + F + c, du);
        }
    }
}

// y [P, N] = x + bias[e] for the rows of expert e (rows sorted by expert, offs int32 [E] inclusive ends); rows at
// or past offs[E-1] are written as zeros (x's not read). One warp per row, float32 add, one rounding.
template <typename T>
__global__ void __launch_bounds__(kActThreads) row_bias_add_kernel(const T* x, const T* bias, const int* offs, int E,
                                                                   T* y, int64_t P, int N) {
    using V = Vec<T>;
    const int lane = threadIdx.x % 32;
    const int64_t used = E > 0 ? static_cast<int64_t>(offs[E - 1]) : 0;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * kActWarps + threadIdx.x / 32; r < P;
         r += static_cast<int64_t>(gridDim.x) * kActWarps) {
        T* out = y + r * N;
        if (r >= used) {
            for (int c = lane * V::kPer; c < N; c += 32 * V::kPer)
                *reinterpret_cast<int4*>(out + c) = make_int4(0, 0, 0, 0);
            continue;
        }
        const T* row = x + r * N;
        const T* b = bias + static_cast<int64_t>(row_expert(offs, E, r)) * N;
        for (int c = lane * V::kPer; c < N; c += 32 * V::kPer) {
            float acc[V::kPer];
            load_floats(row + c, acc);
            V::add(acc, *reinterpret_cast<const int4*>(b + c));
            V::store(out + c, acc);
        }
    }
}

// out [E, N] = per expert e, the sum of g's rows [offs[e-1], offs[e]) (offs int32 [E] inclusive ends, offs[-1] = 0
// before the first): a bias's gradient from its rows'. Block (column chunk, expert): each of its warps adds every
// kSumWarps-th row of the expert in float32, then warp 0 adds the warps' sums in their order and rounds once:
// the same bits on every call (no atomics), and no row outside the experts' is read.
constexpr int kSumWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kSumWarps * 32) segment_row_sum_kernel(const T* g, const int* offs, T* out, int N) {
    using V = Vec<T>;
    __shared__ float part[kSumWarps][32 * V::kPer];
    const int e = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int c = (blockIdx.x * 32 + lane) * V::kPer;
    const int64_t start = e > 0 ? static_cast<int64_t>(offs[e - 1]) : 0, end = offs[e];
    float acc[V::kPer] = {};
    if (c < N)
        for (int64_t r = start + warp; r < end; r += kSumWarps)
            V::add(acc, *reinterpret_cast<const int4*>(g + r * N + c));
#pragma unroll
    for (int i = 0; i < V::kPer; ++i) part[warp][lane * V::kPer + i] = acc[i];
    __syncthreads();
    if (warp != 0 || c >= N) return;
    float sum[V::kPer] = {};
    for (int w = 0; w < kSumWarps; ++w)
#pragma unroll
        for (int i = 0; i < V::kPer; ++i) sum[i] += part[w][lane * V::kPer + i];
    V::store(out + static_cast<int64_t>(e) * N + c, sum);
}

int64_t act_blocks(int64_t rows) { return std::min<int64_t>((rows + kActWarps - 1) / kActWarps, 65535); }

template <typename T>
void launch_typed(const void* src, int64_t src_rows, const int64_t* pos, const float* w, void* y, int64_t R, int K,
                  int H, int64_t pad, const int* count, cudaStream_t stream) {
    const int64_t blocks = std::min<int64_t>((R + kRowWarps - 1) / kRowWarps, 65535);
    if (blocks == 0) return;
    auto* s = static_cast<const T*>(src);
    auto* o = static_cast<T*>(y);
    auto* kernel = K <= 2   ? weighted_row_sum_kernel<T, 2>
                   : K <= 4 ? weighted_row_sum_kernel<T, 4>
                   : K <= 8 ? weighted_row_sum_kernel<T, 8>
                            : weighted_row_sum_kernel<T, 16>;
    kernel<<<blocks, kRowThreads, 0, stream>>>(s, src_rows, pos, w, o, R, K, H, pad, count);
    LAUNCH_CHECK();
}

// ---- expert order: a stable counting sort of the (row, k) entries of topk_idx by local expert ----------------
// Entries are taken in chunks (expert_order_chunk: 256 or more, a multiple of 32), one warp per chunk, 32
// consecutive entries per step; key = the local expert, or E for an entry naming none. Pass 1 counts each chunk's
// keys into work[key][chunk]; pass 2 (one block, a warp per key) turns them into each (key, chunk)'s first position
// and writes offs; pass 3 hands out positions in entry order (lanes of one key ranked by __match_any_sync), so the
// result equals a stable argsort of the keys.
constexpr int kOrderWarps = 8;
constexpr int64_t kOrderMinChunk = 256;
constexpr int64_t kOrderMaxChunks = 2048;  // bounds the work array: (E + 1) * 2048 ints

__device__ __forceinline__ int order_key(const int64_t* idx, int64_t i, int64_t end, int E) {
    if (i >= end) return -1;
    const int64_t e = idx[i];
    return e >= 0 && e < E ? static_cast<int>(e) : E;
}

__global__ void __launch_bounds__(kOrderWarps * 32) order_count_kernel(const int64_t* idx, int64_t n, int64_t chunk_len,
                                                                      int E, int* work, int64_t chunks) {
    extern __shared__ int hist[];  // [kOrderWarps][E + 1]
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kOrderWarps + warp;
    int* h = hist + warp * (E + 1);
    for (int k = lane; k <= E; k += 32) h[k] = 0;
    __syncwarp();
    if (chunk >= chunks) return;
    const int64_t begin = chunk * chunk_len, end = min(begin + chunk_len, n);
    for (int64_t b = begin; b < end; b += 32) {
        const int key = order_key(idx, b + lane, end, E);
        const unsigned peers = __match_any_sync(0xffffffffu, key);
        if (key >= 0 && (peers & ((1u << lane) - 1u)) == 0) h[key] += __popc(peers);
        __syncwarp();
    }
    for (int k = lane; k <= E; k += 32) work[static_cast<int64_t>(k) * chunks + chunk] = h[k];
}

// work[key][chunk] counts -> first positions; offs[e] = inclusive end of expert e; src[pad] = 0 when pad >= 0.
__global__ void __launch_bounds__(1024) order_scan_kernel(int* work, int64_t chunks, int E, int* offs, int64_t* src,
                                                          int64_t src_len, int64_t pad) {
    __shared__ int64_t s_base[1025];  // per key: its total, then the first position of its entries
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    for (int k = warp; k <= E; k += nwarps) {  // exclusive prefix over the chunks of key k, in tiles of 32
        int* w = work + static_cast<int64_t>(k) * chunks;
        int64_t run = 0;
        for (int64_t c0 = 0; c0 < chunks; c0 += 32) {
            const int64_t c = c0 + lane;
            const int v = c < chunks ? w[c] : 0;
            int incl = v;
            for (int d = 1; d < 32; d *= 2) {
                const int o = __shfl_up_sync(0xffffffffu, incl, d);
                if (lane >= d) incl += o;
            }
            if (c < chunks) w[c] = static_cast<int>(run) + incl - v;
            run += __shfl_sync(0xffffffffu, incl, 31);
        }
        if (lane == 0) s_base[k] = run;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int64_t run = 0;
        for (int k = 0; k <= E; ++k) {
            const int64_t t = s_base[k];
            s_base[k] = run;
            run += t;
            if (k < E) offs[k] = static_cast<int>(run);
        }
        if (pad >= 0 && pad < src_len) src[pad] = 0;  // the extra row that entries naming no expert point at
    }
    __syncthreads();
    for (int k = warp; k <= E; k += nwarps) {
        int* w = work + static_cast<int64_t>(k) * chunks;
        const int base = static_cast<int>(s_base[k]);
        for (int64_t c = lane; c < chunks; c += 32) w[c] += base;
    }
}

// pos[i] = position of entry i (pad for an entry naming no expert when pad >= 0); src[position] = i / K for the
// positions below src_len.
__global__ void __launch_bounds__(kOrderWarps * 32) order_assign_kernel(const int64_t* idx, int64_t n,
                                                                       int64_t chunk_len, int K, int E,
                                                                       const int* work, int64_t chunks, int64_t* pos,
                                                                       int64_t* src, int64_t src_len, int64_t pad) {
    extern __shared__ int run[];  // [kOrderWarps][E + 1]
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kOrderWarps + warp;
    if (chunk >= chunks) return;
    int* r = run + warp * (E + 1);
    for (int k = lane; k <= E; k += 32) r[k] = work[static_cast<int64_t>(k) * chunks + chunk];
    __syncwarp();
    const int64_t begin = chunk * chunk_len, end = min(begin + chunk_len, n);
    for (int64_t b = begin; b < end; b += 32) {
        const int64_t i = b + lane;
        const int key = order_key(idx, i, end, E);
        const unsigned peers = __match_any_sync(0xffffffffu, key);
        const unsigned before = peers & ((1u << lane) - 1u);
        const int64_t p = key >= 0 ? r[key] + __popc(before) : 0;
        __syncwarp();
        if (key >= 0) {
            if (before == 0) r[key] += __popc(peers);
            const bool none = key == E && pad >= 0;
            pos[i] = none ? pad : p;
            if (!none && p < src_len) src[p] = i / K;
        }
        __syncwarp();
    }
}


// ---- gather: out[i] = x[src[i]] for the positions i below *count (count on the device, never read by the host) --
// One warp per output row, grid-stride; each lane moves kGatherUnroll 16-byte vectors per step, all loads issued
// before the stores. Rows at or past *count are not written, and their src entries are not read.
constexpr int kGatherThreads = 256;
constexpr int kGatherWarps = kGatherThreads / 32;
constexpr int kGatherUnroll = 4;

__global__ void __launch_bounds__(kGatherThreads) gather_rows_kernel(const int4* __restrict__ x, int64_t x_rows,
                                                                    const int64_t* __restrict__ src,
                                                                    const int* __restrict__ count,
                                                                    int4* __restrict__ out, int64_t rows,
                                                                    int64_t nvec) {
    const int lane = threadIdx.x % 32;
    const int64_t end = min(rows, static_cast<int64_t>(max(*count, 0)));
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kGatherWarps + threadIdx.x / 32; i < end;
         i += static_cast<int64_t>(gridDim.x) * kGatherWarps) {
        const int64_t s = src[i];
        DEVICE_ASSERT(s >= 0 && s < x_rows);
        const int4* in = x + s * nvec;
        int4* o = out + i * nvec;
        for (int64_t v0 = lane; v0 < nvec; v0 += 32 * kGatherUnroll) {
            int4 buf[kGatherUnroll];
#pragma unroll
            for (int u = 0; u < kGatherUnroll; ++u) {
                const int64_t v = v0 + u * 32;
                if (v < nvec) buf[u] = __ldg(in + v);
            }
#pragma unroll
            for (int u = 0; u < kGatherUnroll; ++u) {
                const int64_t v = v0 + u * 32;
                if (v < nvec) o[v] = buf[u];
            }
        }
    }
}

}  // namespace

int64_t expert_order_chunk(int64_t entries) {
    const int64_t per = (entries + kOrderMaxChunks - 1) / kOrderMaxChunks;
    return std::max(kOrderMinChunk, (per + 31) / 32 * 32);
}

int64_t expert_order_chunks(int64_t entries) {
    const int64_t len = expert_order_chunk(entries);
    return (entries + len - 1) / len;
}

void launch_expert_order(const int64_t* idx, int64_t rows, int num_topk, int num_experts, int* offs, int* work,
                         int64_t* pos, int64_t* src, int64_t src_len, int64_t pad, cudaStream_t stream) {
    HOST_ASSERT(num_experts >= 1 && num_experts <= kExpertOrderMaxExperts,
                "expert_order: 1 <= experts <= 1024, got " << num_experts);
    const int64_t n = rows * num_topk;
    HOST_ASSERT(n <= INT32_MAX, "expert_order: at most 2^31 - 1 entries (positions are int32), got " << n);
    const int64_t len = expert_order_chunk(n), chunks = expert_order_chunks(n);
    const size_t smem = static_cast<size_t>(kOrderWarps) * (num_experts + 1) * sizeof(int);
    const int64_t blocks = (chunks + kOrderWarps - 1) / kOrderWarps;
    if (blocks > 0) {
        order_count_kernel<<<blocks, kOrderWarps * 32, smem, stream>>>(idx, n, len, num_experts, work, chunks);
        LAUNCH_CHECK();
    }
    order_scan_kernel<<<1, 1024, 0, stream>>>(work, chunks, num_experts, offs, src, src_len, pad);
    LAUNCH_CHECK();
    if (blocks > 0) {
        order_assign_kernel<<<blocks, kOrderWarps * 32, smem, stream>>>(idx, n, len, num_topk, num_experts, work,
                                                                       chunks, pos, src, src_len, pad);
        LAUNCH_CHECK();
    }
}

void launch_weighted_row_sum(const void* src, int64_t src_rows, int elem_bytes, const int64_t* pos, const float* w,
                             void* y, int64_t rows, int num_topk, int hidden, int64_t pad, const int* count,
                             cudaStream_t stream) {
    HOST_ASSERT(elem_bytes == 2 || elem_bytes == 4, "weighted_row_sum: rows must be bf16 or float32");
    HOST_ASSERT(src_rows >= 0, "weighted_row_sum: src_rows must be >= 0");
    HOST_ASSERT(num_topk >= 1 && num_topk <= 16, "weighted_row_sum: 1 <= num_topk <= 16");
    HOST_ASSERT(hidden % (16 / elem_bytes) == 0, "weighted_row_sum: hidden * element size must be a multiple of 16");
    if (elem_bytes == 2)
        launch_typed<__nv_bfloat16>(src, src_rows, pos, w, y, rows, num_topk, hidden, pad, count, stream);
    else launch_typed<float>(src, src_rows, pos, w, y, rows, num_topk, hidden, pad, count, stream);
}

int gather_rows_default_blocks(int num_sms) { return std::max(num_sms, 1) * (2048 / kGatherThreads); }

void launch_gather_rows(const void* x, int64_t x_rows, int64_t row_bytes, const int64_t* src, const int* count,
                        void* out, int64_t rows, int num_blocks, cudaStream_t stream) {
    HOST_ASSERT(row_bytes >= 0 && row_bytes % 16 == 0, "gather_rows: row bytes must be a multiple of 16");
    HOST_ASSERT(reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0,
                "gather_rows: x and out must be 16-byte aligned");
    HOST_ASSERT(num_blocks >= 1, "gather_rows: num_blocks must be >= 1");
    const int64_t blocks = std::min<int64_t>({(rows + kGatherWarps - 1) / kGatherWarps, num_blocks, INT32_MAX});
    if (blocks == 0 || row_bytes == 0) return;
    gather_rows_kernel<<<blocks, kGatherThreads, 0, stream>>>(static_cast<const int4*>(x), x_rows, src, count,
                                                              static_cast<int4*>(out), rows, row_bytes / 16);
    LAUNCH_CHECK();
}

namespace {

// ---- FP8 rows (largeep.fp8): one half-warp per 128-channel group, eight consecutive values per lane ----------
// (16-byte loads of bf16 x and 16-byte stores of bf16 y; four lanes per group held a single 8-byte load in flight per
// lane and group, session 37: quantise 2.4 TB/s at 32768 x 7168.)
constexpr int kFp8Threads = 256;
constexpr int kFp8Warps = kFp8Threads / 32;

__device__ __forceinline__ void load8(const float* p, float* v) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float* v) {
    uint4 raw;
    auto* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
}
__device__ __forceinline__ void store8(float* p, const float* v) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// A lane's eight values of its group as loaded: bf16 stays packed for the group's maximum (two values per
// instruction: the maximum of bf16 values is one of them, so it is the same taken in bf16 or in float32; NaN if any
// is), float32 as it is.
template <typename T>
struct Fp8Lane;
template <>
struct Fp8Lane<__nv_bfloat16> {
    uint4 raw;
    __device__ __forceinline__ void load(const __nv_bfloat16* p) { raw = *reinterpret_cast<const uint4*>(p); }
    __device__ __forceinline__ void zero() { raw = make_uint4(0, 0, 0, 0); }
    __device__ __forceinline__ float amax() const {
        const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
        __nv_bfloat162 m = __habs2(h[0]);
#pragma unroll
        for (int i = 1; i < 4; ++i) m = __hmax2_nan(m, __habs2(h[i]));
        return __bfloat162float(__hmax_nan(__low2bfloat16(m), __high2bfloat16(m)));
    }
    __device__ __forceinline__ void values(float* v) const {
        const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 f = __bfloat1622float2(h[i]);
            v[2 * i] = f.x, v[2 * i + 1] = f.y;
        }
    }
};
template <>
struct Fp8Lane<float> {
    float v8[8];
    __device__ __forceinline__ void load(const float* p) { load8(p, v8); }
    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int i = 0; i < 8; ++i) v8[i] = 0.f;
    }
    __device__ __forceinline__ float amax() const {
        float a = fabsf(v8[0]);
#pragma unroll
        for (int i = 1; i < 8; ++i) a = max_keep_nan(a, fabsf(v8[i]));
        return a;
    }
    __device__ __forceinline__ void values(float* v) const {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = v8[i];
    }
};

// Each warp takes kFp8Unroll consecutive pairs of groups per step (the lower half-warp the pair's first group, the
// upper its second), their loads issued before any is used.
constexpr int kFp8Unroll = 4;
constexpr int kFp8GroupsPerWarpStep = 2 * kFp8Unroll;

// q, s of x [groups * 128] as largeep.fp8.quantize makes them, bit for bit: the group's scale (fp8_group_scale of
// its amax, NaN kept), then each x / s correctly rounded, as torch's division, and saturated to e4m3 (the clamp to
// +-448, NaN kept), two values per conversion. A bf16 x divides as the low-latency quantiser does
// (fp8_div_by_scale: a product and one correction, whose e4m3 code is __fdiv_rn's for every bf16 value and every
// scale of a bf16 group, bench/micro/fp8_div_check.cu); a float32 x, which that check does not cover, by __fdiv_rn.
// A half-warp whose group is past the end (the last pair's second, for an odd count) takes part in the shuffles,
// which stay inside each half-warp, and stores nothing.
template <typename T>
__global__ void __launch_bounds__(kFp8Threads) fp8_quantize_kernel(const T* x, uint8_t* q, float* s, int64_t groups,
                                                                  bool round_scale) {
    const int lane = threadIdx.x % 32, half = lane / 16, hl = lane % 16;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * kFp8Warps;
    for (int64_t g0 = (static_cast<int64_t>(blockIdx.x) * kFp8Warps + threadIdx.x / 32) * kFp8GroupsPerWarpStep;
         g0 < groups; g0 += warps * kFp8GroupsPerWarpStep) {
        Fp8Lane<T> in[kFp8Unroll];
#pragma unroll
        for (int u = 0; u < kFp8Unroll; ++u) {
            const int64_t g = g0 + 2 * u + half;
            if (g < groups) {
                in[u].load(x + g * 128 + hl * 8);
            } else {
                in[u].zero();
            }
        }
#pragma unroll
        for (int u = 0; u < kFp8Unroll; ++u) {
            // (a pair past the end computes on zeros and stores nothing: no branch around the shuffles)
            const int64_t g = g0 + 2 * u + half;
            float amax = in[u].amax();
            float v[8];
            in[u].values(v);
#pragma unroll
            for (int o = 8; o > 0; o /= 2) amax = max_keep_nan(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            const float scale = fp8_group_scale(amax, round_scale);
            const float inv = 1.f / scale;
            const bool finite_s = isfinite(scale);
            float d[8];
#pragma unroll
            for (int i = 0; i < 8; ++i)
                d[i] = std::is_same_v<T, __nv_bfloat16> ? fp8_div_by_scale(v[i], scale, inv, finite_s)
                                                        : __fdiv_rn(v[i], scale);
            uint32_t word[2];
#pragma unroll
            for (int w = 0; w < 2; ++w) {
                // (x.x goes to the low byte: codes in x's order)
                const uint32_t lo =
                    __nv_cvt_float2_to_fp8x2(make_float2(d[4 * w], d[4 * w + 1]), __NV_SATFINITE, __NV_E4M3);
                const uint32_t hi =
                    __nv_cvt_float2_to_fp8x2(make_float2(d[4 * w + 2], d[4 * w + 3]), __NV_SATFINITE, __NV_E4M3);
                word[w] = lo | (hi << 16);
            }
            if (g < groups) {
                *reinterpret_cast<uint2*>(q + g * 128 + hl * 8) = make_uint2(word[0], word[1]);
                if (hl == 0) s[g] = scale;
            }
        }
    }
}

// y [groups * 128] = q * s in float32 (one rounding), then rounded to T: largeep.fp8.dequantize's bits.
template <typename T>
__global__ void __launch_bounds__(kFp8Threads) fp8_dequantize_kernel(const uint8_t* q, const float* s, T* y,
                                                                    int64_t groups) {
    const int lane = threadIdx.x % 32, half = lane / 16, hl = lane % 16;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * kFp8Warps;
    for (int64_t g0 = (static_cast<int64_t>(blockIdx.x) * kFp8Warps + threadIdx.x / 32) * kFp8GroupsPerWarpStep;
         g0 < groups; g0 += warps * kFp8GroupsPerWarpStep) {
        uint2 packed[kFp8Unroll];
        float scale[kFp8Unroll];
#pragma unroll
        for (int u = 0; u < kFp8Unroll; ++u) {
            const int64_t g = g0 + 2 * u + half;
            if (g < groups) {
                packed[u] = *reinterpret_cast<const uint2*>(q + g * 128 + hl * 8);
                scale[u] = s[g];
            }
        }
#pragma unroll
        for (int u = 0; u < kFp8Unroll; ++u) {
            const int64_t g = g0 + 2 * u + half;
            if (g >= groups) break;  // (no shuffles here: each half-warp on its own)
            float v[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint32_t word = i < 2 ? packed[u].x : packed[u].y;
                const __half2 h(__nv_cvt_fp8x2_to_halfraw2(
                    static_cast<__nv_fp8x2_storage_t>(word >> (16 * (i % 2))), __NV_E4M3));
                const float2 f = __half22float2(h);
                v[2 * i] = __fmul_rn(f.x, scale[u]), v[2 * i + 1] = __fmul_rn(f.y, scale[u]);
            }
            store8(y + g * 128 + hl * 8, v);
        }
    }
}

int64_t fp8_blocks(int64_t groups) {
    constexpr int64_t per_block = static_cast<int64_t>(kFp8Warps) * kFp8GroupsPerWarpStep;
    return std::min<int64_t>((groups + per_block - 1) / per_block, 1 << 20);
}

}  // namespace

void launch_fp8_quantize(const void* x, int elem_bytes, uint8_t* q, float* s, int64_t groups, bool round_scale,
                         cudaStream_t stream) {
    HOST_ASSERT(elem_bytes == 2 || elem_bytes == 4, "fp8_quantize: x must be bf16 or float32");
    HOST_ASSERT(groups >= 0, "fp8_quantize: groups must be >= 0");
    HOST_ASSERT(reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(q) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(s) % 4 == 0,
                "fp8_quantize: x and q must be 16-byte aligned, s 4-byte");
    if (groups == 0) return;
    if (elem_bytes == 2)
        fp8_quantize_kernel<<<fp8_blocks(groups), kFp8Threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), q,
                                                                             s, groups, round_scale);
    else
        fp8_quantize_kernel<<<fp8_blocks(groups), kFp8Threads, 0, stream>>>(static_cast<const float*>(x), q, s,
                                                                             groups, round_scale);
    LAUNCH_CHECK();
}

void launch_fp8_dequantize(const uint8_t* q, const float* s, void* y, int elem_bytes, int64_t groups,
                           cudaStream_t stream) {
    HOST_ASSERT(elem_bytes == 2 || elem_bytes == 4, "fp8_dequantize: y must be bf16 or float32");
    HOST_ASSERT(groups >= 0, "fp8_dequantize: groups must be >= 0");
    HOST_ASSERT(reinterpret_cast<uintptr_t>(y) % 16 == 0 && reinterpret_cast<uintptr_t>(q) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(s) % 4 == 0,
                "fp8_dequantize: y and q must be 16-byte aligned, s 4-byte");
    if (groups == 0) return;
    if (elem_bytes == 2)
        fp8_dequantize_kernel<<<fp8_blocks(groups), kFp8Threads, 0, stream>>>(q, s, static_cast<__nv_bfloat16*>(y),
                                                                               groups);
    else
        fp8_dequantize_kernel<<<fp8_blocks(groups), kFp8Threads, 0, stream>>>(q, s, static_cast<float*>(y), groups);
    LAUNCH_CHECK();
}


void launch_expert_act(const void* h, const void* bias, const int* offs, int num_experts, void* a, int64_t rows,
                       int ffn, int elem_bytes, int kind, float alpha, float limit, cudaStream_t stream) {
    HOST_ASSERT(elem_bytes == 2 || elem_bytes == 4, "expert_act: rows must be bf16 or float32");
    HOST_ASSERT(kind == 0 || kind == 1, "expert_act: kind must be 0 (silu) or 1 (clamped)");
    HOST_ASSERT(rows >= 0 && num_experts >= 0 && ffn >= 0, "expert_act: sizes must be >= 0");
    HOST_ASSERT((static_cast<int64_t>(ffn) * elem_bytes) % 16 == 0,
                "expert_act: F * element size must be a multiple of 16");
    HOST_ASSERT(reinterpret_cast<uintptr_t>(h) % 16 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(bias) % 16 == 0,
                "expert_act: h, a and bias must be 16-byte aligned");
    const int64_t blocks = act_blocks(rows);
    if (blocks == 0 || ffn == 0) return;
    const ActParams p{kind, alpha, limit};
    if (elem_bytes == 2)
        expert_act_kernel<<<blocks, kActThreads, 0, stream>>>(
            static_cast<const __nv_bfloat16*>(h), static_cast<const __nv_bfloat16*>(bias), offs, num_experts,
            static_cast<__nv_bfloat16*>(a), rows, ffn, p);
    else
        expert_act_kernel<<<blocks, kActThreads, 0, stream>>>(static_cast<const float*>(h),
                                                              static_cast<const float*>(bias), offs, num_experts,
                                                              static_cast<float*>(a), rows, ffn, p);
    LAUNCH_CHECK();
}

void launch_expert_act_backward(const void* da, const void* h, const void* bias, const int* offs, int num_experts,
                                void* dh, int64_t rows, int ffn, int elem_bytes, int kind, float alpha, float limit,
                                cudaStream_t stream) {
    HOST_ASSERT(elem_bytes == 2 || elem_bytes == 4, "expert_act_backward: rows must be bf16 or float32");
    HOST_ASSERT(kind == 0 || kind == 1, "expert_act_backward: kind must be 0 (silu) or 1 (clamped)");
    HOST_ASSERT(rows >= 0 && num_experts >= 0 && ffn >= 0, "expert_act_backward: sizes must be >= 0");
    HOST_ASSERT((static_cast<int64_t>(ffn) * elem_bytes) % 16 == 0,
                "expert_act_backward: F * element size must be a multiple of 16");
    HOST_ASSERT(reinterpret_cast<uintptr_t>(h) % 16 == 0 && reinterpret_cast<uintptr_t>(da) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(dh) % 16 == 0 && reinterpret_cast<uintptr_t>(bias) % 16 == 0,
                "expert_act_backward: da, h, dh and bias must be 16-byte aligned");
    const int64_t blocks = act_blocks(rows);
    if (blocks == 0 || ffn == 0) return;
    const ActParams p{kind, alpha, limit};
    if (elem_bytes == 2)
        expert_act_backward_kernel<<<blocks, kActThreads, 0, stream>>>(
            static_cast<const __nv_bfloat16*>(da), static_cast<const __nv_bfloat16*>(h),
            static_cast<const __nv_bfloat16*>(bias), offs, num_experts, static_cast<__nv_bfloat16*>(dh), rows, ffn, p);
    else
        expert_act_backward_kernel<<<blocks, kActThreads, 0, stream>>>(
            static_cast<const float*>(da), static_cast<const float*>(h), static_cast<const float*>(bias), offs,
            num_experts, static_cast<float*>(dh), rows, ffn, p);
    LAUNCH_CHECK();
}


void launch_row_bias_add(const void* x, const void* bias, const int* offs, int num_experts, void* y, int64_t rows,
                         int cols, int elem_bytes, cudaStream_t stream) {
    HOST_ASSERT(elem_bytes == 2 || elem_bytes == 4, "row_bias_add: rows must be bf16 or float32");
    HOST_ASSERT(rows >= 0 && num_experts >= 0 && cols >= 0, "row_bias_add: sizes must be >= 0");
    HOST_ASSERT((static_cast<int64_t>(cols) * elem_bytes) % 16 == 0,
                "row_bias_add: columns * element size must be a multiple of 16");
    HOST_ASSERT(reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(bias) % 16 == 0,
                "row_bias_add: x, y and bias must be 16-byte aligned");
    const int64_t blocks = act_blocks(rows);
    if (blocks == 0 || cols == 0) return;
    if (elem_bytes == 2)
        row_bias_add_kernel<<<blocks, kActThreads, 0, stream>>>(
            static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(bias), offs, num_experts,
            static_cast<__nv_bfloat16*>(y), rows, cols);
    else
        row_bias_add_kernel<<<blocks, kActThreads, 0, stream>>>(static_cast<const float*>(x),
                                                                static_cast<const float*>(bias), offs, num_experts,
                                                                static_cast<float*>(y), rows, cols);
    LAUNCH_CHECK();
}


void launch_segment_row_sum(const void* g, const int* offs, int num_experts, void* out, int cols, int elem_bytes,
                            cudaStream_t stream) {
    HOST_ASSERT(elem_bytes == 2 || elem_bytes == 4, "segment_row_sum: rows must be bf16 or float32");
    HOST_ASSERT(num_experts >= 0 && num_experts <= 65535 && cols >= 0, "segment_row_sum: 0 <= experts <= 65535");
    HOST_ASSERT((static_cast<int64_t>(cols) * elem_bytes) % 16 == 0,
                "segment_row_sum: columns * element size must be a multiple of 16");
    HOST_ASSERT(reinterpret_cast<uintptr_t>(g) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0,
                "segment_row_sum: g and out must be 16-byte aligned");
    if (num_experts == 0 || cols == 0) return;
    const int per = 16 / elem_bytes;
    const dim3 grid((cols / per + 31) / 32, num_experts);
    if (elem_bytes == 2)
        segment_row_sum_kernel<<<grid, kSumWarps * 32, 0, stream>>>(static_cast<const __nv_bfloat16*>(g), offs,
                                                                     static_cast<__nv_bfloat16*>(out), cols);
    else
        segment_row_sum_kernel<<<grid, kSumWarps * 32, 0, stream>>>(static_cast<const float*>(g), offs,
                                                                     static_cast<float*>(out), cols);
    LAUNCH_CHECK();
}

}  // namespace largeep
