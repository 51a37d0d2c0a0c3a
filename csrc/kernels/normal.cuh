// Device helpers shared by the normal-mode kernels (intranode.cu, internode.cu).
//
// Ranks are grouped into nodes of NormalCtx::ranks_per_node (P) consecutive ranks. Ranks of this rank's node are
// written with plain stores through NVLink peer pointers; ranks of other nodes only through NVSHMEM's standard
// device API (puts from symmetric staging, quiet, signal_op), so any transport NVSHMEM supports carries them.
// With P == N every rank is local and the inter-node kernels are never launched.
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include "launch.cuh"

namespace largeep {
namespace normal {

// Copy kernels run up to 1024 threads (32 warps) per SM so that enough NVLink traffic is in flight; the reductions
// keep 512 threads for the registers their unrolled loads need.
constexpr int kThreads = 1024;  // the most threads a copy kernel may be launched with (NormalCtx::threads)
constexpr int kReduceThreads = 512;
constexpr int kReduceWarps = kReduceThreads / kWarp;
constexpr int kMaxLocal = 8;  // ranks per node the combine reduction handles

__device__ __forceinline__ int64_t* flags_of(uint8_t* base, const NormalCtx& c) {
    return reinterpret_cast<int64_t*>(base + c.off_flags);
}
__device__ __forceinline__ uint8_t* peer(const NormalCtx& c, int r) {
    return reinterpret_cast<uint8_t*>(c.peer_base[r]);
}
__device__ __forceinline__ int node_of(const NormalCtx& c, int r) { return r / c.ranks_per_node; }
__device__ __forceinline__ bool is_local(const NormalCtx& c, int r) { return node_of(c, r) == node_of(c, c.rank); }
__device__ __forceinline__ int num_nodes(const NormalCtx& c) { return c.num_ranks / c.ranks_per_node; }
// Bit r set for every rank r of this rank's node.
__device__ __forceinline__ unsigned local_mask(const NormalCtx& c) {
    return all_mask(c.ranks_per_node) << (node_of(c, c.rank) * c.ranks_per_node);
}
// Bit r set for the rank of every other node with this rank's local index (its RDMA peers).
__device__ __forceinline__ unsigned rdma_peer_mask(const NormalCtx& c) {
    unsigned m = 0;
    const int me_local = c.rank % c.ranks_per_node;
    for (int n = 0; n < num_nodes(c); ++n)
        if (n != node_of(c, c.rank)) m |= 1u << (n * c.ranks_per_node + me_local);
    return m;
}
// Sets flag word [kind][index] of rank r to v: a release store over NVLink on this node, an NVSHMEM signal
// elsewhere. Whatever this thread wrote to r before (stores after a system fence, or puts completed by
// nvshmem_quiet) is visible first.
__device__ __forceinline__ void set_flag(const NormalCtx& c, int r, int kind, int index, int64_t v) {
    const int64_t word = static_cast<int64_t>(kind) * c.num_ranks + index;
    set_peer_flag(is_local(c, r) ? peer(c, r) : nullptr, c.base, c.off_flags + 8 * word, v, r);
}

// Threads [0, N) whose bit is set in `mask` wait for flag words [kind][i] >= target; returns (to every thread)
// whether all arrived. With remote ranks in the mask, a system fence after the wait also orders reads of data
// that an NVSHMEM transport (not an NVLink store) delivered.
__device__ __forceinline__ bool wait_flags(const NormalCtx& c, int kind, unsigned mask, int64_t target, int op) {
    const bool ok = block_wait_flags(flags_of(c.base, c) + static_cast<int64_t>(kind) * c.num_ranks,
                                     mask & all_mask(c.num_ranks), target, c.timeout_ns, c.err, op);
    if (ok && (mask & ~local_mask(c))) __threadfence_system();
    return ok;
}

// The id of global expert e on rank r (-1 if e is not there, or is -1), as a dispatch row for r carries it.
__device__ __forceinline__ int64_t local_expert(int64_t e, int r, int epr) {
    const int64_t le = e - static_cast<int64_t>(r) * epr;
    return e >= 0 && le >= 0 && le < epr ? le : -1;
}

// Set in the slot field of a rank's count rows when it refuses the round, and when it runs the round without a host
// wait (num_worst_tokens: it cannot raise then; see the notify kernel); slot numbers are far below them.
constexpr int kRefusedSlot = 1 << 20;
constexpr int kNoWaitSlot = 1 << 21;

// Byte offset of receive slot s in every rank's allocation (0: the copy slot; see NormalCtx).
__device__ __forceinline__ int64_t slot_offset(const NormalCtx& c, int s) {
    return s == 0 ? c.off_recv : c.off_zc + static_cast<int64_t>(s - 1) * c.zc_slot_bytes;
}

// Writes one dispatched row into the receive slot of every rank r in `dests` (a warp-uniform rank mask), at
// row base_r + p_r of the slot at slots[r] (r's slot as seen from here, in shared memory), where lane r holds p_r
// and base_r: the x row (read
// once, in register chunks; rows of x_bytes in the x plane), then its scales, its expert ids made local to r (-1
// elsewhere; ids are global), weights and the token index into their planes. idx_row == nullptr (cached dispatch)
// skips ids, weights and token. Every r must be on this rank's node. kLoad: see ld_v4 (0 for rows that no one
// writes during the kernel, 1 for rows a peer delivered during it).
template <int kLoad>
__device__ __forceinline__ void push_row(const NormalCtx& c, const uint8_t* x_row, int64_t x_bytes,
                                         const float* scales_row, const int64_t* idx_row, const float* w_row,
                                         int token, unsigned dests, int p, int base, uint8_t* const* slots,
                                         int lane) {
    const int K = c.num_topk, epr = c.num_experts / c.num_ranks;
    const int num_scales = c.hidden / 128;
    const int4* src = reinterpret_cast<const int4*>(x_row);
    const int nvec = static_cast<int>(x_bytes / 16);
    constexpr int kChunk = 8;
    for (int v0 = 0; v0 < nvec; v0 += kChunk * kWarp) {
        int4 buf[kChunk];
#pragma unroll
        for (int u = 0; u < kChunk; ++u) {
            const int v = v0 + u * kWarp + lane;
            if (v < nvec) buf[u] = ld_v4<kLoad>(src + v);
        }
        unsigned m = dests;
        while (m) {
            const int r = __ffs(m) - 1;
            m &= m - 1;
            const int row = __shfl_sync(0xffffffffu, base + p, r);
            int4* dst = reinterpret_cast<int4*>(slots[r] + c.pl_x + static_cast<int64_t>(row) * x_bytes);
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
        const int64_t row = __shfl_sync(0xffffffffu, base + p, r);
        uint8_t* dst = slots[r];
        if (scales_row != nullptr)
            for (int q = lane; q < num_scales; q += kWarp)
                reinterpret_cast<float*>(dst + c.pl_scales)[row * num_scales + q] = scales_row[q];
        if (idx_row != nullptr) {
            if (lane < K) {
                const int64_t le = local_expert(idx_row[lane], r, epr);
                reinterpret_cast<int64_t*>(dst + c.pl_idx)[row * K + lane] = le;
                reinterpret_cast<float*>(dst + c.pl_w)[row * K + lane] = le >= 0 ? w_row[lane] : 0.f;
            }
            if (lane == 0) reinterpret_cast<int*>(dst)[row] = token;
        }
    }
}

// acc[0, kPer) += the kPer float32 values at row + v * kPer (a float32 partial row; 16-byte loads).
template <int kPer>
__device__ __forceinline__ void add_f32(float* acc, const uint8_t* row, int v) {
    const int4* p = reinterpret_cast<const int4*>(row) + v * (kPer / 4);
#pragma unroll
    for (int i = 0; i < kPer / 4; ++i) {
        const int4 q = ld_v4<1>(p + i);
        const float* f = reinterpret_cast<const float*>(&q);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[4 * i + e] += f[e];
    }
}

}  // namespace normal
}  // namespace largeep
