// Normal (high-throughput) mode between ranks that all reach each other over NVLink.
//
// Dispatch pulls: each source stages its tokens once in its own symmetric memory (x | scales | ids | weights),
// then every receiver reads the rows it needs straight into its output tensor through NVLink peer pointers, in
// SPEC order (sources ascending, then tokens). A token crosses NVLink once per destination rank and is written to
// the output once; the only extra traffic is the local staging copy of T rows.
//
// Combine pushes: each receiver writes row i of y into its source's `comb` buffer (slot [me][j], j = the row's
// position in the source->me list); the source then sums the slots of each token in float32.
//
// Rounds are numbered by device-side sequence counters (NormalCtx::seq), so kernels captured in a CUDA graph
// keep working on replay. Every wait is bounded by timeout_ns; on a timeout the kernel records (op, rank) in the
// host-mapped status area and skips the rest of its work, and later kernels of the Buffer skip theirs.
#include "launch.cuh"

namespace largeep {

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarp;

__device__ __forceinline__ int64_t* flags_of(uint8_t* base, const NormalCtx& c) {
    return reinterpret_cast<int64_t*>(base + c.off_flags);
}
__device__ __forceinline__ uint8_t* peer(const NormalCtx& c, int r) {
    return reinterpret_cast<uint8_t*>(c.peer_base[r]);
}

// ---- stage --------------------------------------------------------------------------------------------------
// Blocks [0, list_blocks): block r builds destination r's token list, send_pos[:, r] and out_counts[r].
// Other blocks: one warp per token copies x, scales, ids and weights into the stage.
__global__ void __launch_bounds__(kThreads) dispatch_stage_kernel(NormalCtx c, const uint8_t* x, int x_elem,
                                                                  const float* scales, const int64_t* idx,
                                                                  const float* w, int T, int* send_pos,
                                                                  int list_blocks) {
    const int N = c.num_ranks, K = c.num_topk, epr = c.num_experts / N;
    const int64_t seq = c.seq[kSeqDispatch] + 1;
    // Nobody may still be reading the previous round's stage or lists.
    if (!block_wait_flags(flags_of(c.base, c) + kFlagReadDone * N, N, seq - 1, c.timeout_ns, c.status,
                          kOpDispatch))
        return;
    if (static_cast<int>(blockIdx.x) < list_blocks) {
        extern __shared__ int hist[];  // [E/N]: rows naming each of r's experts
        const int r = blockIdx.x;
        for (int i = threadIdx.x; i < epr; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        int* list = reinterpret_cast<int*>(c.base + c.off_list) + static_cast<int64_t>(r) * c.max_tokens;
        int base = 0;
        for (int start = 0; start < T; start += blockDim.x) {
            const int t = start + threadIdx.x;
            int hit = 0;
            if (t < T) {
                const int64_t* row = idx + static_cast<int64_t>(t) * K;
                for (int k = 0; k < K; ++k) {
                    const int64_t e = row[k];
                    if (e < 0 || e >= c.num_experts || e / epr != r) continue;
                    hit = 1;
                    bool seen = false;
                    for (int j = 0; j < k; ++j) seen |= (row[j] == e);
                    if (!seen) atomicAdd(&hist[e - static_cast<int64_t>(r) * epr], 1);
                }
            }
            int total;
            const int pos = base + block_exclusive_scan(hit, &total);
            if (t < T) {
                send_pos[static_cast<int64_t>(t) * N + r] = hit ? pos : -1;
                if (hit) list[pos] = t;
            }
            base += total;
        }
        __syncthreads();
        int* out = reinterpret_cast<int*>(c.base + c.off_out_counts) + static_cast<int64_t>(r) * (1 + epr);
        if (threadIdx.x == 0) out[0] = base;
        for (int i = threadIdx.x; i < epr; i += blockDim.x) out[1 + i] = hist[i];
        return;
    }
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int copy_blocks = gridDim.x - list_blocks;
    const int64_t x_bytes = static_cast<int64_t>(c.hidden) * x_elem;
    const int num_scales = c.hidden / 128;
    for (int t = (blockIdx.x - list_blocks) * kWarps + warp; t < T; t += copy_blocks * kWarps) {
        uint8_t* dst = c.base + c.off_stage + static_cast<int64_t>(t) * c.stage_stride;
        warp_copy(reinterpret_cast<int4*>(dst), reinterpret_cast<const int4*>(x + t * x_bytes), x_bytes, lane);
        if (scales != nullptr) {
            float* ds = reinterpret_cast<float*>(dst + c.stage_off_scales);
            for (int i = lane; i < num_scales; i += kWarp) ds[i] = scales[static_cast<int64_t>(t) * num_scales + i];
        }
        if (idx != nullptr && lane < K) {
            reinterpret_cast<int64_t*>(dst + c.stage_off_idx)[lane] = idx[static_cast<int64_t>(t) * K + lane];
            reinterpret_cast<float*>(dst + c.stage_off_w)[lane] = w[static_cast<int64_t>(t) * K + lane];
        }
    }
}

// ---- notify -------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) dispatch_notify_kernel(NormalCtx c, int cached, int report) {
    const int N = c.num_ranks, epr = c.num_experts / N, me = c.rank, row = 1 + epr;
    const int64_t seq = c.seq[kSeqDispatch] + 1;
    if (has_error(c.status)) return;
    if (!cached) {
        // my count row for destination r goes to r's in_counts[me]
        const int* out = reinterpret_cast<const int*>(c.base + c.off_out_counts);
        for (int i = threadIdx.x; i < N * row; i += blockDim.x) {
            const int r = i / row, j = i % row;
            int* in = reinterpret_cast<int*>(peer(c, r) + c.off_in_counts);
            in[me * row + j] = out[i];
        }
    }
    __threadfence_system();  // counts (and the stage kernel's rows) before the flag
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < N)
        st_release_sys(flags_of(peer(c, threadIdx.x), c) + kFlagCounts * N + me, seq);
    if (!block_wait_flags(flags_of(c.base, c) + kFlagCounts * N, N, seq, c.timeout_ns, c.status,
                          kOpDispatchNotify))
        return;
    if (cached || !report) return;
    const int* in = reinterpret_cast<const int*>(c.base + c.off_in_counts);
    volatile int64_t* st = c.status;
    for (int e = threadIdx.x; e < epr; e += blockDim.x) {
        int64_t s = 0;
        for (int src = 0; src < N; ++src) s += in[src * row + 1 + e];
        st[kPerExpert + e] = s;
    }
    if (threadIdx.x == 0) {
        int64_t total = 0;
        for (int src = 0; src < N; ++src) total += in[src * row];
        st[kNumRecv] = total;
    }
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) st[kReadySeq] = seq;
}

// ---- pull ---------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) dispatch_pull_kernel(NormalCtx c, uint8_t* out_x, int x_elem,
                                                                 float* out_s, int64_t* out_idx, float* out_w,
                                                                 int* recv_src, int* recv_off, int num_rows,
                                                                 int cached) {
    const int N = c.num_ranks, K = c.num_topk, epr = c.num_experts / N, me = c.rank;
    const int64_t seq = c.seq[kSeqDispatch] + 1;
    __shared__ int off[33];
    const bool ok = !has_error(c.status);
    if (threadIdx.x == 0 && ok) {
        if (cached) {
            for (int s = 0; s <= N; ++s) off[s] = recv_off[s];
        } else {
            const int* in = reinterpret_cast<const int*>(c.base + c.off_in_counts);
            off[0] = 0;
            for (int s = 0; s < N; ++s) off[s + 1] = off[s] + in[s * (1 + epr)];
            if (blockIdx.x == 0)
                for (int s = 0; s <= N; ++s) recv_off[s] = off[s];
        }
    }
    __syncthreads();
    if (ok) {
        const int R = off[N];
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
        const int64_t x_bytes = static_cast<int64_t>(c.hidden) * x_elem;
        const int num_scales = c.hidden / 128;
        for (int i = blockIdx.x * kWarps + warp; i < num_rows; i += gridDim.x * kWarps) {
            if (i >= R) {  // num_worst_tokens tail
                if (!cached && lane < K) {
                    out_idx[static_cast<int64_t>(i) * K + lane] = -1;
                    out_w[static_cast<int64_t>(i) * K + lane] = 0.f;
                }
                continue;
            }
            int s = 0;
            while (off[s + 1] <= i) ++s;
            int t;
            if (cached) {
                t = recv_src[2 * static_cast<int64_t>(i) + 1];
            } else {
                const int* list = reinterpret_cast<const int*>(peer(c, s) + c.off_list);
                t = list[static_cast<int64_t>(me) * c.max_tokens + (i - off[s])];
                if (lane == 0) {
                    recv_src[2 * static_cast<int64_t>(i)] = s;
                    recv_src[2 * static_cast<int64_t>(i) + 1] = t;
                }
            }
            const uint8_t* src = peer(c, s) + c.off_stage + static_cast<int64_t>(t) * c.stage_stride;
            warp_copy(reinterpret_cast<int4*>(out_x + i * x_bytes), reinterpret_cast<const int4*>(src), x_bytes,
                      lane);
            if (out_s != nullptr) {
                const float* ss = reinterpret_cast<const float*>(src + c.stage_off_scales);
                for (int q = lane; q < num_scales; q += kWarp) out_s[static_cast<int64_t>(i) * num_scales + q] = ss[q];
            }
            if (!cached && lane < K) {
                const int64_t e = reinterpret_cast<const int64_t*>(src + c.stage_off_idx)[lane];
                const int64_t le = e - static_cast<int64_t>(me) * epr;
                const bool mine = e >= 0 && le >= 0 && le < epr;
                out_idx[static_cast<int64_t>(i) * K + lane] = mine ? le : -1;
                out_w[static_cast<int64_t>(i) * K + lane] =
                    mine ? reinterpret_cast<const float*>(src + c.stage_off_w)[lane] : 0.f;
            }
        }
    }
    // Every block has finished reading: tell each source its stage is free, and close the round.
    if (last_block(c.block_counter + 0)) {
        if (static_cast<int>(threadIdx.x) < N)
            st_release_sys(flags_of(peer(c, threadIdx.x), c) + kFlagReadDone * N + me, seq);
        if (threadIdx.x == 0) c.seq[kSeqDispatch] = seq;
    }
}

// ---- combine ------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) combine_push_kernel(NormalCtx c, const uint8_t* y, int y_elem,
                                                                const float* y_w, const int* recv_src,
                                                                const int* recv_off, int num_rows) {
    const int N = c.num_ranks, K = c.num_topk, me = c.rank;
    const int64_t seq = c.seq[kSeqCombine] + 1;
    __shared__ int off[33];
    // Each source must have finished reducing the previous round before its buffer is overwritten.
    const bool ok = block_wait_flags(flags_of(c.base, c) + kFlagCombFree * N, N, seq - 1, c.timeout_ns, c.status,
                                     kOpCombine);
    if (threadIdx.x <= static_cast<unsigned>(N)) off[threadIdx.x] = recv_off[threadIdx.x];
    __syncthreads();
    if (ok) {
        const int R = min(off[N], num_rows);
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
        const int64_t y_bytes = static_cast<int64_t>(c.hidden) * y_elem;
        for (int i = blockIdx.x * kWarps + warp; i < R; i += gridDim.x * kWarps) {
            const int s = recv_src[2 * static_cast<int64_t>(i)];
            const int64_t slot = static_cast<int64_t>(me) * c.max_tokens + (i - off[s]);
            uint8_t* dst = peer(c, s) + c.off_comb + slot * c.comb_stride;
            warp_copy(reinterpret_cast<int4*>(dst), reinterpret_cast<const int4*>(y + i * y_bytes), y_bytes, lane);
            if (y_w != nullptr && lane < K)
                reinterpret_cast<float*>(peer(c, s) + c.off_comb_w)[slot * K + lane] =
                    y_w[static_cast<int64_t>(i) * K + lane];
        }
    }
    __threadfence_system();  // this thread's remote stores before the flag
    if (last_block(c.block_counter + 1)) {
        if (static_cast<int>(threadIdx.x) < N)
            st_release_sys(flags_of(peer(c, threadIdx.x), c) + kFlagCombReady * N + me, seq);
    }
}

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
    __device__ static int4 pack(const float* acc) {
        int4 v;
        __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
        return v;
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
    __device__ static int4 pack(const float* acc) {
        int4 v;
        float* f = reinterpret_cast<float*>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) f[i] = acc[i];
        return v;
    }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_reduce_kernel(NormalCtx c, T* out, float* out_w,
                                                                  const int* send_pos, int num_tokens,
                                                                  int with_weights) {
    constexpr int kPer = Vec<T>::kPer;
    const int N = c.num_ranks, K = c.num_topk, me = c.rank;
    const int64_t seq = c.seq[kSeqCombine] + 1;
    const bool ok = block_wait_flags(flags_of(c.base, c) + kFlagCombReady * N, N, seq, c.timeout_ns, c.status,
                                     kOpCombineReduce);
    if (ok) {
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
        const int nvec = c.hidden / kPer;
        const uint8_t* comb = c.base + c.off_comb;
        const float* comb_w = reinterpret_cast<const float*>(c.base + c.off_comb_w);
        for (int t = blockIdx.x * kWarps + warp; t < num_tokens; t += gridDim.x * kWarps) {
            int pos[8];
            int n_src = 0;
            const int4* rows[8];
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                pos[r] = -1;
                rows[r] = nullptr;
            }
            for (int r = 0; r < N; ++r) {
                const int p = send_pos[static_cast<int64_t>(t) * N + r];
                if (p >= 0) {
                    rows[n_src] = reinterpret_cast<const int4*>(
                        comb + (static_cast<int64_t>(r) * c.max_tokens + p) * c.comb_stride);
                    pos[n_src] = r * c.max_tokens + p;
                    ++n_src;
                }
            }
            int4* dst = reinterpret_cast<int4*>(out + static_cast<int64_t>(t) * c.hidden);
            for (int v = lane; v < nvec; v += kWarp) {
                float acc[kPer];
#pragma unroll
                for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    if (j < n_src) Vec<T>::add(acc, ld_nc_v4(rows[j] + v));
                st_na_v4(dst + v, Vec<T>::pack(acc));
            }
            if (with_weights && lane < K) {
                float s = 0.f;
                for (int j = 0; j < n_src; ++j) s += comb_w[static_cast<int64_t>(pos[j]) * K + lane];
                out_w[static_cast<int64_t>(t) * K + lane] = s;
            }
        }
    }
    // Every block has read its slots: each pusher may write into my buffer again.
    if (last_block(c.block_counter + 2)) {
        if (static_cast<int>(threadIdx.x) < N)
            st_release_sys(flags_of(peer(c, threadIdx.x), c) + kFlagCombFree * N + me, seq);
        if (threadIdx.x == 0) c.seq[kSeqCombine] = seq;
    }
}

}  // namespace

NormalLayout normal_layout(int N, int E, int K, int H, int T) {
    NormalLayout l{};
    const int64_t row = 1 + E / N;
    int64_t off = 0;
    auto take = [&off](int64_t bytes) {
        const int64_t at = off;
        off += (bytes + 255) / 256 * 256;
        return at;
    };
    l.stage_off_scales = align16(static_cast<int64_t>(H) * 4);
    l.stage_off_idx = l.stage_off_scales + align16(static_cast<int64_t>(H / 128) * 4);
    l.stage_off_w = l.stage_off_idx + align16(static_cast<int64_t>(K) * 8);
    l.stage_stride = l.stage_off_w + align16(static_cast<int64_t>(K) * 4);
    l.comb_stride = align16(static_cast<int64_t>(H) * 4);
    l.off_flags = take(8ll * kNumFlagKinds * N);
    l.off_in_counts = take(4ll * N * row);
    l.off_out_counts = take(4ll * N * row);
    l.off_list = take(4ll * N * T);
    l.off_stage = take(l.stage_stride * T);
    l.off_comb = take(l.comb_stride * N * T);
    l.off_comb_w = take(4ll * N * T * K);
    l.total_bytes = off;
    return l;
}

void launch_dispatch_stage(const NormalCtx& ctx, const void* x, int x_elem_bytes, const float* x_scales,
                           const int64_t* topk_idx, const float* topk_weights, int num_tokens, int* send_pos,
                           bool cached, int num_sms, cudaStream_t stream) {
    HOST_ASSERT(ctx.num_topk <= kWarp, "num_topk must be <= 32");
    HOST_ASSERT((static_cast<int64_t>(ctx.hidden) * x_elem_bytes) % 16 == 0, "hidden * element size must be a multiple of 16");
    const int list_blocks = cached ? 0 : ctx.num_ranks;
    const int copy_blocks = std::max(1, num_sms);
    const size_t smem = sizeof(int) * (ctx.num_experts / ctx.num_ranks);
    HOST_ASSERT(smem <= 48 * 1024, "too many experts per rank");
    dispatch_stage_kernel<<<list_blocks + copy_blocks, kThreads, smem, stream>>>(
        ctx, static_cast<const uint8_t*>(x), x_elem_bytes, x_scales, cached ? nullptr : topk_idx, topk_weights,
        num_tokens, send_pos, list_blocks);
    LAUNCH_CHECK();
}

void launch_dispatch_notify(const NormalCtx& ctx, bool cached, bool report, cudaStream_t stream) {
    HOST_ASSERT(ctx.num_ranks <= kThreads, "too many ranks");
    dispatch_notify_kernel<<<1, kThreads, 0, stream>>>(ctx, cached ? 1 : 0, report ? 1 : 0);
    LAUNCH_CHECK();
}

void launch_dispatch_pull(const NormalCtx& ctx, void* out_x, int x_elem_bytes, float* out_scales, int64_t* out_idx,
                          float* out_w, int* recv_src, int* recv_off, int num_rows, bool cached, int num_sms,
                          cudaStream_t stream) {
    HOST_ASSERT(ctx.num_ranks <= 32, "intranode kernels support at most 32 ranks");
    dispatch_pull_kernel<<<std::max(1, num_sms), kThreads, 0, stream>>>(
        ctx, static_cast<uint8_t*>(out_x), x_elem_bytes, out_scales, out_idx, out_w, recv_src, recv_off, num_rows,
        cached ? 1 : 0);
    LAUNCH_CHECK();
}

void launch_combine_push(const NormalCtx& ctx, const void* y, int y_elem_bytes, const float* y_w,
                         const int* recv_src, const int* recv_off, int num_rows, int num_sms, cudaStream_t stream) {
    HOST_ASSERT((static_cast<int64_t>(ctx.hidden) * y_elem_bytes) % 16 == 0, "hidden * element size must be a multiple of 16");
    combine_push_kernel<<<std::max(1, num_sms), kThreads, 0, stream>>>(
        ctx, static_cast<const uint8_t*>(y), y_elem_bytes, y_w, recv_src, recv_off, num_rows);
    LAUNCH_CHECK();
}

void launch_combine_reduce(const NormalCtx& ctx, void* out, int out_elem_bytes, float* out_w, const int* send_pos,
                           int num_tokens, bool with_weights, int num_sms, cudaStream_t stream) {
    HOST_ASSERT(ctx.num_ranks <= 8, "combine supports at most 8 ranks per node");
    const int grid = std::max(1, num_sms);
    if (out_elem_bytes == 2) {
        combine_reduce_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
            ctx, static_cast<__nv_bfloat16*>(out), out_w, send_pos, num_tokens, with_weights ? 1 : 0);
    } else {
        HOST_ASSERT(out_elem_bytes == 4, "combine output must be bf16 or float32");
        combine_reduce_kernel<float><<<grid, kThreads, 0, stream>>>(ctx, static_cast<float*>(out), out_w, send_pos,
                                                                    num_tokens, with_weights ? 1 : 0);
    }
    LAUNCH_CHECK();
}

}  // namespace largeep
