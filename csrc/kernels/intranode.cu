// Normal (high-throughput) mode between ranks that all reach each other over NVLink.
//
// Dispatch pushes: each source reads a token's row once from the caller's tensor and writes it over NVLink into
// the receive buffer (symmetric memory) of every rank that needs it, at its final row in SPEC order (sources
// ascending, then tokens; offsets come from the count exchange). The receiver then copies its buffer into the
// output tensors (local traffic only). NVLink writes are posted, so no round trip limits them; NVLink reads
// measured about 1.7x slower here, which is why an earlier pull design was dropped.
//
// Combine pushes: each receiver writes row i of y into its source's `comb` buffer (slot [me][j], j = the row's
// position in the source->me list); the source then sums the slots of each token in float32.
//
// Rounds are numbered by device-side sequence counters (NormalCtx::seq), so kernels captured in a CUDA graph
// keep working on replay. Every wait is bounded by timeout_ns; on a timeout the kernel records (op, rank) in the
// ErrorWord (a device word, copied to the host-mapped status area) and skips the rest of its work, and later
// kernels of the Buffer skip theirs.
#include "launch.cuh"

namespace largeep {

namespace {

// Copy kernels run 1024 threads (32 warps) per SM so that enough NVLink traffic is in flight; the reduction keeps
// 512 threads for the registers its unrolled loads need.
constexpr int kThreads = 1024;  // the most threads a copy kernel may be launched with (NormalCtx::threads)
constexpr int kReduceThreads = 512;
constexpr int kReduceWarps = kReduceThreads / kWarp;

__device__ __forceinline__ int64_t* flags_of(uint8_t* base, const NormalCtx& c) {
    return reinterpret_cast<int64_t*>(base + c.off_flags);
}
__device__ __forceinline__ uint8_t* peer(const NormalCtx& c, int r) {
    return reinterpret_cast<uint8_t*>(c.peer_base[r]);
}

// ---- prepare ------------------------------------------------------------------------------------------------
// Block r: send_pos[:, r] (position of each token in the list of rows for rank r, -1 if none) and the count row
// for r (rows, then rows naming each of r's experts) into out_counts[r]. Local work only.
__global__ void __launch_bounds__(kThreads) dispatch_prepare_kernel(NormalCtx c, const int64_t* idx, int T,
                                                                    int* send_pos) {
    const int N = c.num_ranks, K = c.num_topk, epr = c.num_experts / N;
    extern __shared__ int hist[];  // [E/N]: rows naming each of r's experts
    const int r = blockIdx.x;
    for (int i = threadIdx.x; i < epr; i += blockDim.x) hist[i] = 0;
    __syncthreads();
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
        if (t < T) send_pos[static_cast<int64_t>(t) * N + r] = hit ? pos : -1;
        base += total;
    }
    __syncthreads();
    int* out = reinterpret_cast<int*>(c.base + c.off_out_counts) + static_cast<int64_t>(r) * (1 + epr);
    if (threadIdx.x == 0) out[0] = base;
    for (int i = threadIdx.x; i < epr; i += blockDim.x) out[1 + i] = hist[i];
}

// ---- notify -------------------------------------------------------------------------------------------------
// Waits until every receiver has consumed the previous round (its counts and its receive buffer), then sends
// every peer my count row for it and my row of the [N, N] count matrix, raises kFlagCounts and waits for every
// peer's. Then computes this rank's recv_off [N + 1] (receive rows per source, prefix) and send_off [N] (where my
// rows start in each receiver's buffer) into the handle, and, with `report`, the totals for the host.
__global__ void __launch_bounds__(kThreads) dispatch_notify_kernel(NormalCtx c, int* recv_off, int* send_off,
                                                                   int report) {
    const int N = c.num_ranks, epr = c.num_experts / N, me = c.rank, row = 1 + epr;
    const int64_t seq = c.seq[kSeqDispatch] + 1;
    if (!block_wait_flags(flags_of(c.base, c) + kFlagRecvFree * N, N, seq - 1, c.timeout_ns, c.err,
                          kOpDispatch))
        return;
    const int* out = reinterpret_cast<const int*>(c.base + c.off_out_counts);
    for (int i = threadIdx.x; i < N * row; i += blockDim.x) {
        const int r = i / row, j = i % row;
        reinterpret_cast<int*>(peer(c, r) + c.off_in_counts)[me * row + j] = out[i];
    }
    for (int i = threadIdx.x; i < N * N; i += blockDim.x) {
        const int r = i / N, j = i % N;  // to rank r: matrix[me][j] = rows I send to j
        reinterpret_cast<int*>(peer(c, r) + c.off_matrix)[me * N + j] = out[j * row];
    }
    __threadfence_system();  // counts before the flag
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < N)
        st_release_sys(flags_of(peer(c, threadIdx.x), c) + kFlagCounts * N + me, seq);
    if (!block_wait_flags(flags_of(c.base, c) + kFlagCounts * N, N, seq, c.timeout_ns, c.err,
                          kOpDispatchNotify))
        return;
    const int* in = reinterpret_cast<const int*>(c.base + c.off_in_counts);
    const int* matrix = reinterpret_cast<const int*>(c.base + c.off_matrix);
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int s = 0; s < N; ++s) {
            recv_off[s] = acc;
            acc += in[s * row];
        }
        recv_off[N] = acc;
    }
    if (static_cast<int>(threadIdx.x) < N) {
        const int r = threadIdx.x;
        int acc = 0;
        for (int s = 0; s < me; ++s) acc += matrix[s * N + r];
        send_off[r] = acc;
    }
    if (!report) return;
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

// ---- push ---------------------------------------------------------------------------------------------------
// One warp pushes token t: the x row is read once from the caller's tensor and written into the receive buffer
// of every rank that needs it (row send_off[r] + send_pos[t, r]), then scales, expert ids made local to r (-1
// elsewhere), weights and the token index; with tag != 0 (fused dispatch) the row's tag word last.
__device__ __forceinline__ void push_token(const NormalCtx& c, const uint8_t* x, int64_t x_bytes, const float* scales,
                                           const int64_t* idx, const float* w, const int* send_pos, const int* off,
                                           int t, int lane, int64_t tag) {
    const int N = c.num_ranks, K = c.num_topk, epr = c.num_experts / N;
    const int num_scales = c.hidden / 128;
    const int p = lane < N ? send_pos[static_cast<int64_t>(t) * N + lane] : -1;
    unsigned dests = __ballot_sync(0xffffffffu, p >= 0);
    const int4* src = reinterpret_cast<const int4*>(x + t * x_bytes);
    // Load the row once (in chunks that fit registers) and store it to every destination.
    const int nvec = static_cast<int>(x_bytes / 16);
    constexpr int kChunk = 8;
    for (int v0 = 0; v0 < nvec; v0 += kChunk * kWarp) {
        int4 buf[kChunk];
#pragma unroll
        for (int u = 0; u < kChunk; ++u) {
            const int v = v0 + u * kWarp + lane;
            if (v < nvec) buf[u] = ld_nc_v4(src + v);
        }
        unsigned m = dests;
        while (m) {
            const int r = __ffs(m) - 1;
            m &= m - 1;
            const int pr = __shfl_sync(0xffffffffu, p, r);
            int4* dst = reinterpret_cast<int4*>(peer(c, r) + c.off_recv +
                                                static_cast<int64_t>(off[r] + pr) * c.recv_stride);
#pragma unroll
            for (int u = 0; u < kChunk; ++u) {
                const int v = v0 + u * kWarp + lane;
                if (v < nvec) st_na_v4(dst + v, buf[u]);
            }
        }
    }
    unsigned m = dests;
    while (m) {
        const int r = __ffs(m) - 1;
        m &= m - 1;
        const int pr = __shfl_sync(0xffffffffu, p, r);
        uint8_t* dst = peer(c, r) + c.off_recv + static_cast<int64_t>(off[r] + pr) * c.recv_stride;
        if (scales != nullptr)
            for (int q = lane; q < num_scales; q += kWarp)
                reinterpret_cast<float*>(dst + c.recv_off_scales)[q] =
                    scales[static_cast<int64_t>(t) * num_scales + q];
        if (idx != nullptr && lane < K) {
            const int64_t e = idx[static_cast<int64_t>(t) * K + lane];
            const int64_t le = e - static_cast<int64_t>(r) * epr;
            const bool mine = e >= 0 && le >= 0 && le < epr;
            reinterpret_cast<int64_t*>(dst + c.recv_off_idx)[lane] = mine ? le : -1;
            reinterpret_cast<float*>(dst + c.recv_off_w)[lane] = mine ? w[static_cast<int64_t>(t) * K + lane] : 0.f;
        }
        if (lane == 0) reinterpret_cast<int*>(dst + c.recv_off_src)[0] = t;
        if (tag != 0) {  // fused dispatch: the row's tag last, after every lane's part of the row
            __threadfence_system();
            __syncwarp();
            if (lane == 0) st_release_sys(reinterpret_cast<int64_t*>(dst + c.recv_off_tag), tag);
        }
    }
}

// One warp per token: the token's x row is read once from the caller's tensor and written over NVLink into the
// receive buffer of every rank that needs it, at row send_off[r] + send_pos[t, r], followed by its scales, its
// expert ids made local to r (-1 elsewhere), weights, and the token index. Stores are posted: no round trip.
__global__ void __launch_bounds__(kThreads) dispatch_push_kernel(NormalCtx c, const uint8_t* x, int x_elem,
                                                                 const float* scales, const int64_t* idx,
                                                                 const float* w, int T, const int* send_pos,
                                                                 const int* send_off) {
    const int N = c.num_ranks, me = c.rank;
    const int64_t seq = c.seq[kSeqDispatch] + 1;
    __shared__ int off[32];
    // Receivers must have consumed the previous round (the notify kernel checked it for non-cached calls).
    const bool ok = block_wait_flags(flags_of(c.base, c) + kFlagRecvFree * N, N, seq - 1, c.timeout_ns, c.err,
                                     kOpDispatch);
    if (static_cast<int>(threadIdx.x) < N) off[threadIdx.x] = send_off[threadIdx.x];
    __syncthreads();
    if (ok) {
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, kWarps = blockDim.x / kWarp;
        const int64_t x_bytes = static_cast<int64_t>(c.hidden) * x_elem;
        for (int t = blockIdx.x * kWarps + warp; t < T; t += gridDim.x * kWarps)
            push_token(c, x, x_bytes, scales, idx, w, send_pos, off, t, lane, 0);
    }
    __threadfence_system();  // this thread's remote stores before the flag
    if (last_block(c.block_counter + 0)) {
        if (static_cast<int>(threadIdx.x) < N)
            st_release_sys(flags_of(peer(c, threadIdx.x), c) + kFlagRows * N + me, seq);
    }
}

// ---- copy-out -----------------------------------------------------------------------------------------------
// One warp copies receive-buffer row i into the outputs (local memory only); rows in [R, num_rows) (the
// num_worst_tokens tail) get topk_idx -1 and weight 0. Weak loads: peers wrote these rows during this kernel.
__device__ __forceinline__ void copy_out_row(const NormalCtx& c, uint8_t* out_x, int64_t x_bytes, float* out_s,
                                             int64_t* out_idx, float* out_w, int* recv_src, const int* off, int R,
                                             int i, int cached, int lane) {
    const int K = c.num_topk;
    const int num_scales = c.hidden / 128;
    if (i >= R) {
        if (!cached && lane < K) {
            out_idx[static_cast<int64_t>(i) * K + lane] = -1;
            out_w[static_cast<int64_t>(i) * K + lane] = 0.f;
        }
        return;
    }
    const uint8_t* src = c.base + c.off_recv + static_cast<int64_t>(i) * c.recv_stride;
    warp_copy_rt(reinterpret_cast<int4*>(out_x + i * x_bytes), reinterpret_cast<const int4*>(src), x_bytes, lane, 1,
                 c.unroll);
    if (out_s != nullptr)
        for (int q = lane; q < num_scales; q += kWarp)
            out_s[static_cast<int64_t>(i) * num_scales + q] = reinterpret_cast<const float*>(src + c.recv_off_scales)[q];
    if (cached) return;
    if (lane < K) {
        out_idx[static_cast<int64_t>(i) * K + lane] = reinterpret_cast<const int64_t*>(src + c.recv_off_idx)[lane];
        out_w[static_cast<int64_t>(i) * K + lane] = reinterpret_cast<const float*>(src + c.recv_off_w)[lane];
    }
    if (lane == 0) {
        int s = 0;
        while (off[s + 1] <= i) ++s;
        recv_src[2 * static_cast<int64_t>(i)] = s;
        recv_src[2 * static_cast<int64_t>(i) + 1] = reinterpret_cast<const int*>(src + c.recv_off_src)[0];
    }
}

// Waits for every source's rows, then copies receive-buffer rows [0, R) into the caller-visible outputs (local
// memory only), and tells every source that my receive buffer is free again. Rows in [R, num_rows) (the
// num_worst_tokens tail) get topk_idx -1 and weight 0.
__global__ void __launch_bounds__(kThreads) dispatch_copyout_kernel(NormalCtx c, uint8_t* out_x, int x_elem,
                                                                    float* out_s, int64_t* out_idx, float* out_w,
                                                                    int* recv_src, const int* recv_off,
                                                                    int num_rows, int cached) {
    const int N = c.num_ranks, me = c.rank;
    const int64_t seq = c.seq[kSeqDispatch] + 1;
    __shared__ int off[33];
    const bool ok = block_wait_flags(flags_of(c.base, c) + kFlagRows * N, N, seq, c.timeout_ns, c.err,
                                     kOpDispatch);
    if (static_cast<int>(threadIdx.x) <= N) off[threadIdx.x] = recv_off[threadIdx.x];
    __syncthreads();
    if (ok) {
        const int R = off[N];
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, kWarps = blockDim.x / kWarp;
        const int64_t x_bytes = static_cast<int64_t>(c.hidden) * x_elem;
        for (int i = blockIdx.x * kWarps + warp; i < num_rows; i += gridDim.x * kWarps)
            copy_out_row(c, out_x, x_bytes, out_s, out_idx, out_w, recv_src, off, R, i, cached, lane);
    }
    if (last_block(c.block_counter + 3)) {
        if (static_cast<int>(threadIdx.x) < N)
            st_release_sys(flags_of(peer(c, threadIdx.x), c) + kFlagRecvFree * N + me, seq);
        if (threadIdx.x == 0) c.seq[kSeqDispatch] = seq;
    }
}

// ---- dispatch, push and copy-out overlapped (LARGEEP_TUNE fused=1) ------------------------------------------
// Launched after the count exchange (and, without num_worst_tokens, after the host allocated the outputs).
// Blocks [0, push_blocks) push tokens as dispatch_push_kernel does, each row ending with its tag = the round
// (release store after a system fence). The other blocks copy rows out as soon as their tag shows this round
// (acquire), so the local copy overlaps the NVLink transfer. The last block frees every source's next round.
__global__ void __launch_bounds__(kThreads) dispatch_fused_kernel(NormalCtx c, const uint8_t* x, int x_elem,
                                                                  const float* scales, const int64_t* idx,
                                                                  const float* w, int T, const int* send_pos,
                                                                  const int* send_off, uint8_t* out_x, float* out_s,
                                                                  int64_t* out_idx, float* out_w, int* recv_src,
                                                                  const int* recv_off, int num_rows, int cached,
                                                                  int push_blocks) {
    const int N = c.num_ranks, me = c.rank;
    const int64_t seq = c.seq[kSeqDispatch] + 1;
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, kWarps = blockDim.x / kWarp;
    const int64_t x_bytes = static_cast<int64_t>(c.hidden) * x_elem;
    __shared__ int off[33];
    if (static_cast<int>(blockIdx.x) < push_blocks) {
        const bool ok = block_wait_flags(flags_of(c.base, c) + kFlagRecvFree * N, N, seq - 1, c.timeout_ns,
                                         c.err, kOpDispatch);
        if (static_cast<int>(threadIdx.x) < N) off[threadIdx.x] = send_off[threadIdx.x];
        __syncthreads();
        if (ok)
            for (int t = blockIdx.x * kWarps + warp; t < T; t += push_blocks * kWarps)
                push_token(c, x, x_bytes, scales, cached ? nullptr : idx, w, send_pos, off, t, lane, seq);
    } else {
        __shared__ volatile int failed;
        if (threadIdx.x == 0) failed = has_error(c.err) ? 1 : 0;
        if (static_cast<int>(threadIdx.x) <= N) off[threadIdx.x] = recv_off[threadIdx.x];
        __syncthreads();
        const int R = off[N];
        const int copy_blocks = gridDim.x - push_blocks;
        for (int i = (blockIdx.x - push_blocks) * kWarps + warp; i < num_rows && !failed; i += copy_blocks * kWarps) {
            int ok = 1;
            if (i < R && lane == 0) {
                const int64_t* tag = reinterpret_cast<const int64_t*>(
                    c.base + c.off_recv + static_cast<int64_t>(i) * c.recv_stride + c.recv_off_tag);
                int s = 0;  // the source of row i, named if it never arrives
                while (off[s + 1] <= i) ++s;
                ok = wait_flag(tag, seq, c.timeout_ns, c.err, kOpDispatch, s) ? 1 : 0;
            }
            ok = __shfl_sync(0xffffffffu, ok, 0);
            __syncwarp();  // lane 0's acquire orders the whole warp's reads of the row
            if (!ok) {
                if (lane == 0) failed = 1;
                break;
            }
            copy_out_row(c, out_x, x_bytes, out_s, out_idx, out_w, recv_src, off, R, i, cached, lane);
        }
    }
    __threadfence_system();
    if (last_block(c.block_counter + 3)) {
        if (static_cast<int>(threadIdx.x) < N)
            st_release_sys(flags_of(peer(c, threadIdx.x), c) + kFlagRecvFree * N + me, seq);
        if (threadIdx.x == 0) c.seq[kSeqDispatch] = seq;
    }
}

// ---- combine ------------------------------------------------------------------------------------------------
// Row i of y goes to its source s, slot [me][i - off[s]] of s's comb buffer (one warp); returns the source.
__device__ __forceinline__ int push_combine_row(const NormalCtx& c, const uint8_t* y, int64_t y_bytes,
                                                const float* y_w, const int* recv_src, const int* off, int i,
                                                int lane) {
    const int K = c.num_topk;
    const int s = recv_src[2 * static_cast<int64_t>(i)];
    const int64_t slot = static_cast<int64_t>(c.rank) * c.max_tokens + (i - off[s]);
    uint8_t* dst = peer(c, s) + c.off_comb + slot * c.comb_stride;
    warp_copy_rt(reinterpret_cast<int4*>(dst), reinterpret_cast<const int4*>(y + i * y_bytes), y_bytes, lane, 0,
                 c.unroll);
    if (y_w != nullptr && lane < K)
        reinterpret_cast<float*>(peer(c, s) + c.off_comb_w)[slot * K + lane] = y_w[static_cast<int64_t>(i) * K + lane];
    return s;
}

__global__ void __launch_bounds__(kThreads) combine_push_kernel(NormalCtx c, const uint8_t* y, int y_elem,
                                                                const float* y_w, const int* recv_src,
                                                                const int* recv_off, int num_rows) {
    const int N = c.num_ranks, me = c.rank;
    const int64_t seq = c.seq[kSeqCombine] + 1;
    __shared__ int off[33];
    // Each source must have finished reducing the previous round before its buffer is overwritten.
    const bool ok = block_wait_flags(flags_of(c.base, c) + kFlagCombFree * N, N, seq - 1, c.timeout_ns, c.err,
                                     kOpCombine);
    if (threadIdx.x <= static_cast<unsigned>(N)) off[threadIdx.x] = recv_off[threadIdx.x];
    __syncthreads();
    if (ok) {
        const int R = min(off[N], num_rows);
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, kWarps = blockDim.x / kWarp;
        const int64_t y_bytes = static_cast<int64_t>(c.hidden) * y_elem;
        for (int i = blockIdx.x * kWarps + warp; i < R; i += gridDim.x * kWarps)
            push_combine_row(c, y, y_bytes, y_w, recv_src, off, i, lane);
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

// out[t] = sum over ranks r with send_pos[t, r] >= 0 of comb[r][send_pos[t, r]], in float32 (one warp).
template <typename T>
__device__ __forceinline__ void reduce_token(const NormalCtx& c, T* out, float* out_w, const int* send_pos, int t,
                                             int with_weights, int lane) {
    constexpr int kPer = Vec<T>::kPer;
    constexpr int kMaxSrc = 8;
    constexpr int kUnroll = 2;
    const int N = c.num_ranks, K = c.num_topk;
    const int nvec = c.hidden / kPer;
    const uint8_t* comb = c.base + c.off_comb;
    const float* comb_w = reinterpret_cast<const float*>(c.base + c.off_comb_w);
    // lane r < N reads send_pos[t, r]; the warp shares the list of slots holding t's rows
    const int p = lane < N ? send_pos[static_cast<int64_t>(t) * N + lane] : -1;
    const unsigned present = __ballot_sync(0xffffffffu, p >= 0);
    const int n_src = __popc(present);
    const int4* rows[kMaxSrc];
    int slot[kMaxSrc];
#pragma unroll
    for (int j = 0; j < kMaxSrc; ++j) {
        rows[j] = nullptr;
        slot[j] = 0;
    }
    unsigned m = present;
#pragma unroll
    for (int j = 0; j < kMaxSrc; ++j) {
        if (m == 0) break;
        const int r = __ffs(m) - 1;
        m &= m - 1;
        const int pr = __shfl_sync(0xffffffffu, p, r);
        slot[j] = r * c.max_tokens + pr;
        rows[j] = reinterpret_cast<const int4*>(comb + static_cast<int64_t>(slot[j]) * c.comb_stride);
    }
    int4* dst = reinterpret_cast<int4*>(out + static_cast<int64_t>(t) * c.hidden);
    for (int v0 = lane; v0 < nvec; v0 += kUnroll * kWarp) {
        int4 buf[kUnroll][kMaxSrc];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
            for (int j = 0; j < kMaxSrc; ++j)
                if (j < n_src && v0 + u * kWarp < nvec) buf[u][j] = ld_v4<1>(rows[j] + v0 + u * kWarp);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (v0 + u * kWarp >= nvec) break;
            float acc[kPer];
#pragma unroll
            for (int e = 0; e < kPer; ++e) acc[e] = 0.f;
#pragma unroll
            for (int j = 0; j < kMaxSrc; ++j)
                if (j < n_src) Vec<T>::add(acc, buf[u][j]);
            st_na_v4(dst + v0 + u * kWarp, Vec<T>::pack(acc));
        }
    }
    if (with_weights && lane < K) {
        float sum = 0.f;
        for (int j = 0; j < n_src; ++j) sum += comb_w[static_cast<int64_t>(slot[j]) * K + lane];
        out_w[static_cast<int64_t>(t) * K + lane] = sum;
    }
}

template <typename T>
__global__ void __launch_bounds__(kReduceThreads) combine_reduce_kernel(NormalCtx c, T* out, float* out_w,
                                                                        const int* send_pos, int num_tokens,
                                                                        int with_weights) {
    const int N = c.num_ranks;
    const int64_t seq = c.seq[kSeqCombine] + 1;
    const bool ok = block_wait_flags(flags_of(c.base, c) + kFlagCombReady * N, N, seq, c.timeout_ns, c.err,
                                     kOpCombineReduce);
    if (ok) {
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
        for (int t = blockIdx.x * kReduceWarps + warp; t < num_tokens; t += gridDim.x * kReduceWarps)
            reduce_token(c, out, out_w, send_pos, t, with_weights, lane);
    }
    // Every block has read its slots: each pusher may write into my buffer again.
    if (last_block(c.block_counter + 2)) {
        if (static_cast<int>(threadIdx.x) < N)
            st_release_sys(flags_of(peer(c, threadIdx.x), c) + kFlagCombFree * N + c.rank, seq);
        if (threadIdx.x == 0) c.seq[kSeqCombine] = seq;
    }
}


// ---- combine, push and reduction overlapped (LARGEEP_TUNE fused=1) ------------------------------------------
// Blocks [0, push_blocks) push rows as combine_push_kernel does, and after each row add 1 to the source's arrival
// counter of that token (`arrive` int32 [max_tokens] in the source's symmetric memory; a system-scope atomic after
// a system fence, so the row is visible before the count). The other blocks reduce: a token is summed as soon as
// its counter reaches the number of ranks that received it (known from send_pos), then the counter is reset to 0
// for the next round. Pushers write into a source only after it raised kFlagCombFree for the previous round,
// which it does after every counter of that round was reset. Needs every block resident at once (few SMs).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) combine_fused_kernel(NormalCtx c, const uint8_t* y, int y_elem,
                                                                       const float* y_w, const int* recv_src,
                                                                       const int* recv_off, int num_rows, T* out,
                                                                       float* out_w, const int* send_pos,
                                                                       int num_tokens, int with_weights,
                                                                       int push_blocks) {
    const int N = c.num_ranks, me = c.rank;
    const int64_t seq = c.seq[kSeqCombine] + 1;
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    __shared__ int off[33];
    if (static_cast<int>(blockIdx.x) < push_blocks) {
        const bool ok = block_wait_flags(flags_of(c.base, c) + kFlagCombFree * N, N, seq - 1, c.timeout_ns,
                                         c.err, kOpCombine);
        if (threadIdx.x <= static_cast<unsigned>(N)) off[threadIdx.x] = recv_off[threadIdx.x];
        __syncthreads();
        if (ok) {
            const int R = min(off[N], num_rows);
            const int64_t y_bytes = static_cast<int64_t>(c.hidden) * y_elem;
            for (int i = blockIdx.x * kReduceWarps + warp; i < R; i += push_blocks * kReduceWarps) {
                const int s = push_combine_row(c, y, y_bytes, y_w, recv_src, off, i, lane);
                __threadfence_system();  // every lane's part of the row before the count
                __syncwarp();
                if (lane == 0)
                    atomicAdd_system(reinterpret_cast<int*>(peer(c, s) + c.off_arrive) +
                                         recv_src[2 * static_cast<int64_t>(i) + 1],
                                     1);
            }
        }
    } else {
        __shared__ volatile int failed;
        if (threadIdx.x == 0) failed = has_error(c.err) ? 1 : 0;
        __syncthreads();
        int* arrive = reinterpret_cast<int*>(c.base + c.off_arrive);
        const int reduce_blocks = gridDim.x - push_blocks;
        for (int t = (blockIdx.x - push_blocks) * kReduceWarps + warp; t < num_tokens && !failed;
             t += reduce_blocks * kReduceWarps) {
            const int p = lane < N ? send_pos[static_cast<int64_t>(t) * N + lane] : -1;
            const int expected = __popc(__ballot_sync(0xffffffffu, p >= 0));
            int ok = 1;
            if (lane == 0 && expected > 0) {
                const uint64_t start = globaltimer_ns();
                while (ld_acquire_sys_s32(arrive + t) < expected) {
                    if (globaltimer_ns() - start > c.timeout_ns || has_error(c.err)) {
                        report_error(c.err, kOpCombineReduce, -1);
                        ok = 0;
                        break;
                    }
                }
            }
            ok = __shfl_sync(0xffffffffu, ok, 0);
            __syncwarp();  // lane 0's acquire orders the whole warp's reads of the rows
            if (!ok) {
                if (lane == 0) failed = 1;
                break;
            }
            reduce_token(c, out, out_w, send_pos, t, with_weights, lane);
            __syncwarp();
            if (lane == 0) arrive[t] = 0;
        }
    }
    // Every row of this round was read and every counter reset: each pusher may write into my buffer again.
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
    l.recv_off_scales = align16(static_cast<int64_t>(H) * 4);
    l.recv_off_idx = l.recv_off_scales + align16(static_cast<int64_t>(H / 128) * 4);
    l.recv_off_w = l.recv_off_idx + align16(static_cast<int64_t>(K) * 8);
    l.recv_off_src = l.recv_off_w + align16(static_cast<int64_t>(K) * 4);
    l.recv_off_tag = l.recv_off_src + 8;
    l.recv_stride = l.recv_off_src + 16;
    l.comb_stride = align16(static_cast<int64_t>(H) * 4);
    l.off_flags = take(8ll * kNumFlagKinds * N);
    l.off_in_counts = take(4ll * N * row);
    l.off_out_counts = take(4ll * N * row);
    l.off_matrix = take(4ll * N * N);
    l.off_recv = take(l.recv_stride * N * T);
    l.off_comb = take(l.comb_stride * N * T);
    l.off_comb_w = take(4ll * N * T * K);
    l.off_arrive = take(4ll * T);
    l.total_bytes = off;
    return l;
}

void launch_dispatch_prepare(const NormalCtx& ctx, const int64_t* topk_idx, int num_tokens, int* send_pos,
                             cudaStream_t stream) {
    HOST_ASSERT(ctx.num_topk <= kWarp, "num_topk must be <= 32");
    const size_t smem = sizeof(int) * (ctx.num_experts / ctx.num_ranks);
    HOST_ASSERT(smem <= 48 * 1024, "too many experts per rank");
    dispatch_prepare_kernel<<<ctx.num_ranks, kThreads, smem, stream>>>(ctx, topk_idx, num_tokens, send_pos);
    LAUNCH_CHECK();
}

void launch_dispatch_notify(const NormalCtx& ctx, int* recv_off, int* send_off, bool report, cudaStream_t stream) {
    HOST_ASSERT(ctx.num_ranks <= 32, "the intranode kernels support at most 32 ranks");
    dispatch_notify_kernel<<<1, kThreads, 0, stream>>>(ctx, recv_off, send_off, report ? 1 : 0);
    LAUNCH_CHECK();
}

void launch_dispatch_push(const NormalCtx& ctx, const void* x, int x_elem_bytes, const float* x_scales,
                          const int64_t* topk_idx, const float* topk_weights, int num_tokens, const int* send_pos,
                          const int* send_off, int num_sms, cudaStream_t stream) {
    HOST_ASSERT((static_cast<int64_t>(ctx.hidden) * x_elem_bytes) % 16 == 0,
                "hidden * element size must be a multiple of 16");
    dispatch_push_kernel<<<std::max(1, num_sms), ctx.threads, 0, stream>>>(
        ctx, static_cast<const uint8_t*>(x), x_elem_bytes, x_scales, topk_idx, topk_weights, num_tokens, send_pos,
        send_off);
    LAUNCH_CHECK();
}

void launch_dispatch_copyout(const NormalCtx& ctx, void* out_x, int x_elem_bytes, float* out_scales,
                             int64_t* out_idx, float* out_w, int* recv_src, const int* recv_off, int num_rows,
                             bool cached, int num_sms, cudaStream_t stream) {
    dispatch_copyout_kernel<<<std::max(1, num_sms), ctx.threads, 0, stream>>>(
        ctx, static_cast<uint8_t*>(out_x), x_elem_bytes, out_scales, out_idx, out_w, recv_src, recv_off, num_rows,
        cached ? 1 : 0);
    LAUNCH_CHECK();
}

void launch_combine_push(const NormalCtx& ctx, const void* y, int y_elem_bytes, const float* y_w,
                         const int* recv_src, const int* recv_off, int num_rows, int num_sms, cudaStream_t stream) {
    HOST_ASSERT((static_cast<int64_t>(ctx.hidden) * y_elem_bytes) % 16 == 0, "hidden * element size must be a multiple of 16");
    combine_push_kernel<<<std::max(1, num_sms), ctx.threads, 0, stream>>>(
        ctx, static_cast<const uint8_t*>(y), y_elem_bytes, y_w, recv_src, recv_off, num_rows);
    LAUNCH_CHECK();
}

void launch_combine_reduce(const NormalCtx& ctx, void* out, int out_elem_bytes, float* out_w, const int* send_pos,
                           int num_tokens, bool with_weights, int num_sms, cudaStream_t stream) {
    HOST_ASSERT(ctx.num_ranks <= 8, "combine supports at most 8 ranks per node");
    const int grid = std::max(1, num_sms);
    if (out_elem_bytes == 2) {
        combine_reduce_kernel<__nv_bfloat16><<<grid, kReduceThreads, 0, stream>>>(
            ctx, static_cast<__nv_bfloat16*>(out), out_w, send_pos, num_tokens, with_weights ? 1 : 0);
    } else {
        HOST_ASSERT(out_elem_bytes == 4, "combine output must be bf16 or float32");
        combine_reduce_kernel<float><<<grid, kReduceThreads, 0, stream>>>(ctx, static_cast<float*>(out), out_w, send_pos,
                                                                    num_tokens, with_weights ? 1 : 0);
    }
    LAUNCH_CHECK();
}

void launch_dispatch_fused(const NormalCtx& ctx, const void* x, int x_elem_bytes, const float* x_scales,
                           const int64_t* topk_idx, const float* topk_weights, int num_tokens, const int* send_pos,
                           const int* send_off, void* out_x, float* out_scales, int64_t* out_idx, float* out_w,
                           int* recv_src, const int* recv_off, int num_rows, bool cached, int num_sms,
                           cudaStream_t stream) {
    HOST_ASSERT(num_sms >= 2, "the fused dispatch needs at least 2 SMs (push and copy-out)");
    HOST_ASSERT((static_cast<int64_t>(ctx.hidden) * x_elem_bytes) % 16 == 0,
                "hidden * element size must be a multiple of 16");
    dispatch_fused_kernel<<<num_sms, ctx.threads, 0, stream>>>(
        ctx, static_cast<const uint8_t*>(x), x_elem_bytes, x_scales, topk_idx, topk_weights, num_tokens, send_pos,
        send_off, static_cast<uint8_t*>(out_x), out_scales, out_idx, out_w, recv_src, recv_off, num_rows,
        cached ? 1 : 0, num_sms / 2);
    LAUNCH_CHECK();
}

void launch_combine_fused(const NormalCtx& ctx, const void* y, int y_elem_bytes, const float* y_w,
                          const int* recv_src, const int* recv_off, int num_rows, void* out, float* out_w,
                          const int* send_pos, int num_tokens, bool with_weights, int num_sms, cudaStream_t stream) {
    HOST_ASSERT(ctx.num_ranks <= 8, "combine supports at most 8 ranks per node");
    HOST_ASSERT(num_sms >= 2, "the fused combine needs at least 2 SMs (push and reduce)");
    HOST_ASSERT((static_cast<int64_t>(ctx.hidden) * y_elem_bytes) % 16 == 0,
                "hidden * element size must be a multiple of 16");
    const int push_blocks = num_sms / 2;
    const auto* yb = static_cast<const uint8_t*>(y);
    if (y_elem_bytes == 2) {
        combine_fused_kernel<__nv_bfloat16><<<num_sms, kReduceThreads, 0, stream>>>(
            ctx, yb, y_elem_bytes, y_w, recv_src, recv_off, num_rows, static_cast<__nv_bfloat16*>(out), out_w,
            send_pos, num_tokens, with_weights ? 1 : 0, push_blocks);
    } else {
        HOST_ASSERT(y_elem_bytes == 4, "combine input must be bf16 or float32");
        combine_fused_kernel<float><<<num_sms, kReduceThreads, 0, stream>>>(
            ctx, yb, y_elem_bytes, y_w, recv_src, recv_off, num_rows, static_cast<float*>(out), out_w, send_pos,
            num_tokens, with_weights ? 1 : 0, push_blocks);
    }
    LAUNCH_CHECK();
}

}  // namespace largeep
