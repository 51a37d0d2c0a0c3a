// Normal mode across nodes: the legs that cross between nodes. Used with intranode.cu's kernels when the group
// spans several nodes (NormalCtx::ranks_per_node < num_ranks); only NVSHMEM's standard device API crosses nodes.
//
// Dispatch: a token crosses the network at most once per destination node. Its source stages one row per
// destination node (x, scales, global expert ids, weights, token, and its position in the list of every rank of
// that node, -1 where it is not sent) and puts it to its RDMA peer there: the rank with the source's local index
// (dispatch_rdma_send). That forwarder writes the row over NVLink into the receive buffer of every rank of its node
// that needs it, at the very row the intranode push would have used (dispatch_forward), and raises kFlagRows for
// the source on each of them; the copy-out is intranode.cu's.
//
// Combine: the reverse. Rows whose source is on another node go over NVLink to this node's forwarder for that
// source (intranode.cu's combine push); the forwarder sums them per token in float32 and puts one float32 partial
// row (with the summed weights) home (combine_forward), where intranode.cu's reduction adds the partials of every
// node to the rows of its own node. Partials stay float32 by default: however the ranks are split into nodes, the
// result is accumulated in float32 and rounded once (the order of its sums, and so its last bits, depend on the
// split). A bf16 combine may ask for bf16 partials instead (part_bf16): half the bytes between nodes, one more
// bf16 rounding of each other node's partial sum; the summed weights stay float32 either way.
//
// Every row is staged in symmetric memory before its put (a put's source must be symmetric for every transport);
// every thread of a sending kernel calls nvshmem_quiet, then the last block raises the round's signals (not once
// this Buffer has reported an error, but in a void round: block_raises_data_flags).
#include "normal.cuh"

namespace largeep {

using namespace normal;

namespace {

// First-row prefix over the M source nodes of the rows this rank forwards (counts from the handle).
__device__ __forceinline__ void node_prefix(const int* fwd_count, int M, int* prefix) {
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int m = 0; m < M; ++m) {
            prefix[m] = acc;
            acc += fwd_count[m];
        }
        prefix[M] = acc;
    }
    __syncthreads();
}

__device__ __forceinline__ int node_of_row(const int* prefix, int g) {
    int m = 0;
    while (prefix[m + 1] <= g) ++m;
    return m;
}

// ---- dispatch: RDMA leg -------------------------------------------------------------------------------------
// One warp per token: for every other node m the token goes to (node_pos[t, m] >= 0), the row is staged at
// rdma_send[m][node_pos] and put to rdma_recv[my node][node_pos] of my RDMA peer on node m (x, then the
// metadata from the scales on, as two puts: the padding between them does not travel, the metadata block travels
// whole, its scales and ids/weights too where the call has none). Lane l looks at node m0 + l: one pass of m0 = 0
// for groups of at most 32 nodes, passes of 32 nodes otherwise (kManyNodes).
template <bool kManyNodes>
__global__ void __launch_bounds__(kThreads) dispatch_rdma_send_kernel(NormalCtx c, const uint8_t* x, int x_elem,
                                                                      const float* scales, const int64_t* idx,
                                                                      const float* w, int T, const int* send_pos,
                                                                      const int* node_pos, int cached,
                                                                      int has_scales, const int* tag) {
    const int N = c.num_ranks, P = c.ranks_per_node, M = N / P, node = c.rank / P, me_local = c.rank % P;
    const int K = c.num_topk, num_scales = c.hidden / 128;
    const int64_t seq = c.seq[kSeqDispatch] + 1;
    // My RDMA peers must have forwarded the previous round out of their RDMA receive buffers. A void fresh round
    // (a rank refused it, or the ranks' kinds of rows differ) puts nothing; its flags still go up.
    const bool ok = wait_rdma_peers(c, kFlagRecvFree, seq - 1, kOpDispatch) && !void_round(c, !cached);
    if (ok) {
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, kWarps = blockDim.x / kWarp;
        const int64_t x_bytes = static_cast<int64_t>(c.hidden) * x_elem;
        const int64_t meta_bytes = c.rdma_stride - c.recv_off_scales;
        for (int t = blockIdx.x * kWarps + warp; t < T; t += gridDim.x * kWarps) {
            for (int m0 = 0; m0 < (kManyNodes ? M : 1); m0 += kWarp) {
                const int mm = m0 + lane;
                const int q = mm < M && mm != node ? node_pos[static_cast<int64_t>(t) * M + mm] : -1;
                for (unsigned dests = __ballot_sync(0xffffffffu, q >= 0); dests; dests &= dests - 1) {
                    const int m = m0 + __ffs(dests) - 1;
                    const int qm = __shfl_sync(0xffffffffu, q, m - m0);
                    const int64_t at = (static_cast<int64_t>(m) * c.max_tokens + qm) * c.rdma_stride;
                    uint8_t* row = c.base + c.off_rdma_send + at;
                    warp_copy<0, 4>(reinterpret_cast<int4*>(row), reinterpret_cast<const int4*>(x + t * x_bytes),
                                    x_bytes, lane);
                    if (scales != nullptr)
                        for (int i = lane; i < num_scales; i += kWarp)
                            reinterpret_cast<float*>(row + c.recv_off_scales)[i] =
                                scales[static_cast<int64_t>(t) * num_scales + i];
                    if (!cached && lane < K) {
                        reinterpret_cast<int64_t*>(row + c.recv_off_idx)[lane] =
                            idx[static_cast<int64_t>(t) * K + lane];
                        reinterpret_cast<float*>(row + c.recv_off_w)[lane] = w[static_cast<int64_t>(t) * K + lane];
                    }
                    if (lane == 0) reinterpret_cast<int*>(row + c.recv_off_src)[0] = t;
                    if (lane < P)
                        reinterpret_cast<int*>(row + c.rdma_off_pos)[lane] =
                            send_pos[static_cast<int64_t>(t) * N + m * P + lane];
                    __threadfence();  // the staged row is complete before the transport reads it
                    __syncwarp();
                    const int64_t dst =
                        c.off_rdma_recv + (static_cast<int64_t>(node) * c.max_tokens + qm) * c.rdma_stride;
                    const int pe = m * P + me_local;
                    nvshmemx_putmem_nbi_warp(c.base + dst, row, x_bytes, pe);
                    nvshmemx_putmem_nbi_warp(c.base + dst + c.recv_off_scales, row + c.recv_off_scales, meta_bytes,
                                             pe);
                }
            }
        }
    }
    nvshmem_quiet();  // this thread's puts have landed
    __threadfence_system();
    if (last_block(c.block_counter + 4) && block_raises_data_flags(c, void_round(c, !cached))) {
        if (static_cast<int>(threadIdx.x) < M && static_cast<int>(threadIdx.x) != node)
            set_flag(c, threadIdx.x * P + me_local, kFlagRdmaRows, c.rank,
                     data_flag(seq, dispatch_sig(x_elem, has_scales != 0, tag)));
    }
}

// ---- dispatch: forward over NVLink --------------------------------------------------------------------------
// Waits for the rows of my RDMA peer on every other node, then one warp per row writes it into the copy slot of
// every rank d of my node it names (row fwd_off[m][d] + pos; groups of several nodes never use zero-copy slots),
// records the positions in fwd_pos [M, max_tokens, P] (the handle keeps them for the combine), and raises kFlagRows
// for that peer on every rank of my node.
__global__ void __launch_bounds__(kThreads) dispatch_forward_kernel(NormalCtx c, int x_elem, int has_scales,
                                                                    int cached, const int* fwd_off,
                                                                    const int* fwd_count, int* fwd_pos,
                                                                    const int* tag) {
    const int N = c.num_ranks, P = c.ranks_per_node, M = N / P, node = c.rank / P, me_local = c.rank % P;
    const int64_t seq = c.seq[kSeqDispatch] + 1;
    __shared__ int prefix[kMaxNodes + 1];
    // (a void round's kinds may differ; it moves no row)
    const bool is_void = void_round(c, !cached);
    const int sig = dispatch_sig(x_elem, has_scales != 0, tag);
    const bool ok = wait_rdma_peers(c, kFlagRdmaRows, seq, kOpDispatch, is_void ? kAnySig : sig);
    node_prefix(fwd_count, M, prefix);
    if (ok) {
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, kWarps = blockDim.x / kWarp;
        const int64_t x_bytes = static_cast<int64_t>(c.hidden) * x_elem;
        __shared__ uint8_t* slots[kMaxLocal];  // the copy slot of each rank of my node, as seen from here
        if (static_cast<int>(threadIdx.x) < P) slots[threadIdx.x] = peer(c, node * P + threadIdx.x) + c.off_recv;
        __syncthreads();
        for (int g = blockIdx.x * kWarps + warp; g < prefix[M]; g += gridDim.x * kWarps) {
            const int m = node_of_row(prefix, g), j = g - prefix[m];
            const uint8_t* row = c.base + c.off_rdma_recv + (static_cast<int64_t>(m) * c.max_tokens + j) * c.rdma_stride;
            const int* pos = reinterpret_cast<const int*>(row + c.rdma_off_pos);
            // (a cached dispatch leaves the handle's positions as its fresh dispatch wrote them)
            if (lane < P && !cached) fwd_pos[(static_cast<int64_t>(m) * c.max_tokens + j) * P + lane] = pos[lane];
            // lane l < P: rank node * P + l of my node
            const int p = lane < P ? pos[lane] : -1;
            const int base = lane < P ? fwd_off[m * P + lane] : 0;
            const unsigned dests = __ballot_sync(0xffffffffu, p >= 0);
            push_row<1>(c, row, x_bytes, has_scales ? reinterpret_cast<const float*>(row + c.recv_off_scales) : nullptr,
                        cached ? nullptr : reinterpret_cast<const int64_t*>(row + c.recv_off_idx),
                        reinterpret_cast<const float*>(row + c.recv_off_w),
                        reinterpret_cast<const int*>(row + c.recv_off_src)[0], dests, p, base, slots, lane);
        }
    }
    __threadfence_system();  // this thread's NVLink stores before the flags
    if (last_block(c.block_counter + 5)) {
        const int fk = block_forward_sig(c, is_void, sig, true);
        for (int i = threadIdx.x; fk >= 0 && i < P * M; i += blockDim.x) {
            const int l = i / M, m = i % M;
            if (m != node) set_flag(c, node * P + l, kFlagRows, m * P + me_local, data_flag(seq, fk));
        }
    }
}

// ---- combine: partial sums and RDMA leg ---------------------------------------------------------------------
// Waits for every rank of my node to have pushed its combine rows, then one warp per forwarded row (j of node m)
// sums the rows of my node's ranks for that token (fwd_comb[l][m][fwd_pos[m][j][l]]) in float32, stages the
// partial (and the summed weights) at comb_send[m][j] and puts it to comb_rdma[my node][j] of my RDMA peer on
// node m, which raised kFlagCombFree for the previous round before this round's combine push began. kPartBf16
// (bf16 rows only): the partial is staged and put as bf16, its weights right after it (part_w_off).
template <typename T, bool kPartBf16>
__global__ void __launch_bounds__(kReduceThreads) combine_forward_kernel(NormalCtx c, int with_weights,
                                                                         const int* fwd_count, const int* fwd_pos,
                                                                         const int* tag) {
    constexpr int kPer = Vec<T>::kPer;
    const int N = c.num_ranks, P = c.ranks_per_node, M = N / P, node = c.rank / P, me_local = c.rank % P;
    const int K = c.num_topk;
    const int64_t seq = c.seq[kSeqCombine] + 1;
    __shared__ int prefix[kMaxNodes + 1];
    const int sig = combine_sig(sizeof(T), with_weights != 0, kPartBf16, tag);
    const int64_t pw = part_w_off(c, kPartBf16);  // (where the staged partial keeps its summed weights)
    const bool ok = wait_local(c, kFlagCombReady, seq, kOpCombine, sig);
    node_prefix(fwd_count, M, prefix);
    if (ok) {
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
        const int nvec = c.hidden / kPer;
        const uint8_t* fwd = c.base + c.off_fwd_comb;
        for (int g = blockIdx.x * kReduceWarps + warp; g < prefix[M]; g += gridDim.x * kReduceWarps) {
            const int m = node_of_row(prefix, g), j = g - prefix[m];
            const int q = lane < P ? fwd_pos[(static_cast<int64_t>(m) * c.max_tokens + j) * P + lane] : -1;
            const unsigned present = __ballot_sync(0xffffffffu, q >= 0);
            uint8_t* staged = c.base + c.off_comb_send + (static_cast<int64_t>(m) * c.max_tokens + j) * c.pcomb_stride;
            const uint8_t* rows[kMaxLocal];
            int n = 0;
            for (unsigned rm = present; rm; rm &= rm - 1) {  // warp-uniform: every lane takes part in the shuffle
                const int l = __ffs(rm) - 1;
                const int ql = __shfl_sync(0xffffffffu, q, l);
                rows[n++] = fwd + ((static_cast<int64_t>(l) * M + m) * c.max_tokens + ql) * c.pcomb_stride;
            }
            for (int v = lane; v < nvec; v += kWarp) {
                float acc[kPer];
#pragma unroll
                for (int e = 0; e < kPer; ++e) acc[e] = 0.f;
                for (int i = 0; i < n; ++i) Vec<T>::add(acc, ld_v4<1>(reinterpret_cast<const int4*>(rows[i]) + v));
                if constexpr (kPartBf16) {
                    static_assert(kPer == 8, "bf16 partials of bf16 rows");
                    reinterpret_cast<int4*>(staged)[v] = pack_bf16x8(acc);
                } else {
                    int4* out = reinterpret_cast<int4*>(staged) + v * (kPer / 4);
#pragma unroll
                    for (int i = 0; i < kPer / 4; ++i) out[i] = Vec<float>::pack(acc + 4 * i);
                }
            }
            if (with_weights && lane < K) {
                float sum = 0.f;
                for (int i = 0; i < n; ++i) sum += reinterpret_cast<const float*>(rows[i] + c.comb_stride)[lane];
                reinterpret_cast<float*>(staged + pw)[lane] = sum;
            }
            __threadfence();  // the staged partial is complete before the transport reads it
            __syncwarp();
            const int64_t dst = c.off_comb_rdma + (static_cast<int64_t>(node) * c.max_tokens + j) * c.pcomb_stride;
            nvshmemx_putmem_nbi_warp(c.base + dst, staged,
                                     with_weights ? pw + 4ll * K : static_cast<int64_t>(c.hidden) * (kPartBf16 ? 2 : 4),
                                     m * P + me_local);
        }
    }
    nvshmem_quiet();
    __threadfence_system();
    if (last_block(c.block_counter + 6)) {
        const int fk = block_forward_sig(c, false, sig, false);
        if (fk >= 0 && static_cast<int>(threadIdx.x) < M && static_cast<int>(threadIdx.x) != node)
            set_flag(c, threadIdx.x * P + me_local, kFlagCombRdma, c.rank, data_flag(seq, fk));
    }
}

}  // namespace

void launch_dispatch_rdma_send(const NormalCtx& ctx, const void* x, int x_elem_bytes, const float* x_scales,
                               bool has_scales, const int64_t* topk_idx, const float* topk_weights, int num_tokens,
                               const int* send_pos, const int* node_pos, bool cached, int num_sms,
                               const int* tag, cudaStream_t stream) {
    HOST_ASSERT(tag != nullptr, "the handle's tag word is missing");
    HOST_ASSERT(ctx.ranks_per_node < ctx.num_ranks, "the RDMA leg is for groups of several nodes");
    HOST_ASSERT((static_cast<int64_t>(ctx.hidden) * x_elem_bytes) % 16 == 0,
                "hidden * element size must be a multiple of 16");
    auto kernel = ctx.num_ranks / ctx.ranks_per_node > kWarp ? dispatch_rdma_send_kernel<true>
                                                             : dispatch_rdma_send_kernel<false>;
    kernel<<<std::max(1, num_sms), ctx.threads, 0, stream>>>(ctx, static_cast<const uint8_t*>(x), x_elem_bytes,
                                                            x_scales, topk_idx, topk_weights, num_tokens, send_pos,
                                                            node_pos, cached ? 1 : 0, has_scales ? 1 : 0, tag);
    LAUNCH_CHECK();
}

void launch_dispatch_forward(const NormalCtx& ctx, int x_elem_bytes, bool has_scales, bool cached,
                             const int* fwd_off, const int* fwd_count, int* fwd_pos, int num_sms,
                             const int* tag, cudaStream_t stream) {
    HOST_ASSERT(tag != nullptr, "the handle's tag word is missing");
    HOST_ASSERT(ctx.ranks_per_node < ctx.num_ranks, "the forward leg is for groups of several nodes");
    dispatch_forward_kernel<<<std::max(1, num_sms), ctx.threads, 0, stream>>>(
        ctx, x_elem_bytes, has_scales ? 1 : 0, cached ? 1 : 0, fwd_off, fwd_count, fwd_pos, tag);
    LAUNCH_CHECK();
}

void launch_combine_forward(const NormalCtx& ctx, int y_elem_bytes, bool with_weights, bool part_bf16,
                            const int* fwd_count, const int* fwd_pos, int num_sms, const int* tag,
                            cudaStream_t stream) {
    HOST_ASSERT(tag != nullptr, "the handle's tag word is missing");
    HOST_ASSERT(ctx.ranks_per_node < ctx.num_ranks, "the forward leg is for groups of several nodes");
    HOST_ASSERT(!part_bf16 || y_elem_bytes == 2, "bf16 partial sums are for bf16 combines");
    const int grid = std::max(1, num_sms);
    const int wi = with_weights ? 1 : 0;
    if (y_elem_bytes == 2 && part_bf16) {
        combine_forward_kernel<__nv_bfloat16, true><<<grid, kReduceThreads, 0, stream>>>(ctx, wi, fwd_count, fwd_pos,
                                                                                         tag);
    } else if (y_elem_bytes == 2) {
        combine_forward_kernel<__nv_bfloat16, false><<<grid, kReduceThreads, 0, stream>>>(ctx, wi, fwd_count,
                                                                                          fwd_pos, tag);
    } else {
        HOST_ASSERT(y_elem_bytes == 4, "combine input must be bf16 or float32");
        combine_forward_kernel<float, false><<<grid, kReduceThreads, 0, stream>>>(ctx, wi, fwd_count, fwd_pos, tag);
    }
    LAUNCH_CHECK();
}

}  // namespace largeep
