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
// Group sizes (api.cuh; the NormalKernels constructor enforces them, and threads > ranks)
constexpr int kMaxLocal = kNormalMaxLocal;
constexpr int kMaxRanks = kNormalMaxRanks;
constexpr int kMaxNodes = kNormalMaxNodes;
// Rows a combine reduction keeps in flight per lane and vector step: one per source rank of its node up to this
// many; a node of more ranks has its sources read this many at a time (reduce_token's kMany).
constexpr int kReduceSrc = 8;
// Per-token loops over nodes keep a lane per node, kWarp nodes at a time: at most this many at a time.
constexpr int kNodeChunks = (kMaxNodes + kWarp - 1) / kWarp;
// A thread per rank in the reductions' waits and flag loops, a lane per rank of the node.
static_assert(kMaxRanks <= kReduceThreads && kMaxRanks < kThreads, "a thread per rank in every normal kernel");
static_assert(kMaxLocal <= kWarp, "a lane per rank of the node");

__device__ __forceinline__ int64_t* flags_of(uint8_t* base, const NormalCtx& c) {
    return reinterpret_cast<int64_t*>(base + c.off_flags);
}
__device__ __forceinline__ uint8_t* peer(const NormalCtx& c, int r) {
    return reinterpret_cast<uint8_t*>(c.peer_base[r]);
}
__device__ __forceinline__ int node_of(const NormalCtx& c, int r) { return r / c.ranks_per_node; }
__device__ __forceinline__ bool is_local(const NormalCtx& c, int r) { return node_of(c, r) == node_of(c, c.rank); }
__device__ __forceinline__ int num_nodes(const NormalCtx& c) { return c.num_ranks / c.ranks_per_node; }
// The first rank of this rank's node; ranks first_local(c) + l, l < P, are its node.
__device__ __forceinline__ int first_local(const NormalCtx& c) { return c.first_local; }
// A data flag (kFlagRows, kFlagRdmaRows, kFlagCombReady, kFlagCombRdma, the fused combine's chunk flags) holds the
// round in its high bits and the sender's call signature in its low kSigBits: the kind of rows it sends (low
// kKindBits) and its handle's tag (the round of the fresh dispatch that made the handle, modulo 2**kTagBits). A
// receiver waits for the round, then compares the signature with its own, so that ranks that pass different kinds
// of rows where no count exchange compares them (a cached dispatch's x, a combine's y dtype and weights), or handles
// of different dispatches, are reported (kOpDispatchKinds, kOpCombineKinds, kOpDispatchHandles, kOpCombineHandles)
// rather than read as rows of this rank's call. A forwarder that found another signature raises the flags it
// forwards with kPoisonKind, which no call has: their receivers report it (kOp*ForwardKinds) at once rather than
// time out. Rounds never pass 2**47.
constexpr int kKindBits = 4, kTagBits = 12, kSigBits = kKindBits + kTagBits;
constexpr int kKindMask = (1 << kKindBits) - 1, kTagMask = (1 << kTagBits) - 1;
constexpr int kPoisonKind = kKindMask;
static_assert(kOpCombineHandles < 32, "op codes fit has_error_except's tolerated mask");
__device__ __forceinline__ int64_t data_flag(int64_t seq, int sig) { return seq << kSigBits | sig; }
// A call's signature: its kind of rows and its handle's tag (*tag: the fresh dispatch's round, written by notify)
__device__ __forceinline__ int call_sig(int kind, const int* tag) { return (*tag & kTagMask) << kKindBits | kind; }
// ... of a dispatch: its kind of rows is api.cuh's kRowKind (x's element size, FP8 scales or not; 0..6)
__device__ __forceinline__ int dispatch_sig(int x_elem, bool has_scales, const int* tag) {
    return call_sig(kRowKind(x_elem, has_scales), tag);
}
// ... of a combine: y float32 (kind bit 0; else bf16), weights (bit 1), partial sums between nodes sent as bf16
// (bit 2; bf16 y only)
__device__ __forceinline__ int combine_sig(int y_elem, bool with_weights, bool part_bf16, const int* tag) {
    return call_sig((y_elem == 4 ? 1 : 0) | (with_weights ? 2 : 0) | (part_bf16 ? 4 : 0), tag);
}
// Where a partial-sum row (comb_send, comb_rdma) keeps its summed weights: after its float32 values (comb_stride),
// or right after its bf16 values (part_bf16), so that one put moves the row and its weights either way.
__device__ __forceinline__ int64_t part_w_off(const NormalCtx& c, bool part_bf16) {
    return part_bf16 ? (static_cast<int64_t>(c.hidden) * 2 + 15) / 16 * 16 : c.comb_stride;
}
// The call_sig of a wait (wait_ranks): a plain flag (a round number: kFlagCounts, kFlagRecvFree, kFlagCombFree), a
// data flag of any signature (a void round's, whose kinds may differ), or a data flag of that signature (>= 0).
constexpr int kPlainFlag = -2;
constexpr int kAnySig = -1;
// Whether data flag value `seen` (of rank r, round seq, at least data_flag(seq, 0)) carries this rank's signature
// `mine` (a dispatch's or a combine's; kAnySig takes any); if not, reports what differs: a forwarder's poisoned flag,
// another kind of rows, or another handle.
__device__ __forceinline__ bool sig_matches(const NormalCtx& c, bool dispatch, int64_t seen, int64_t seq, int mine,
                                            int r) {
    if (mine < 0 || seen == data_flag(seq, mine)) return true;
    const int kind = static_cast<int>(seen & kKindMask);
    const int op = kind == kPoisonKind           ? (dispatch ? kOpDispatchForwardKinds : kOpCombineForwardKinds)
                   : kind != (mine & kKindMask) ? (dispatch ? kOpDispatchKinds : kOpCombineKinds)
                                                : (dispatch ? kOpDispatchHandles : kOpCombineHandles);
    report_error(c.err, op, r);
    return false;
}

// Sets flag word [kind][index] of rank r to v: a release store over NVLink on this node, an NVSHMEM signal
// elsewhere. Whatever this thread wrote to r before (stores after a system fence, or puts completed by
// nvshmem_quiet) is visible first.
__device__ __forceinline__ void set_flag(const NormalCtx& c, int r, int kind, int index, int64_t v) {
    const int64_t word = static_cast<int64_t>(kind) * c.num_ranks + index;
    set_peer_flag(is_local(c, r) ? peer(c, r) : nullptr, c.base, c.off_flags + 8 * word, v, r);
}

// Whether a dispatch's round is void (seq[kRoundVoid], set by the notify kernel: a rank refused it, or the ranks'
// kinds of rows differ): it moves no row. Only a fresh dispatch can be; a cached one has no count exchange.
__device__ __forceinline__ bool void_round(const NormalCtx& c, bool fresh) { return fresh && c.seq[kRoundVoid] != 0; }

// A forwarding kernel's last block (dispatch_forward, combine_forward): the signature its data flags carry, or -1 for
// none. As block_raises_data_flags (this call's `sig`), except that where this Buffer's error is a signature
// mismatch of this kind of call (a dispatch's or a combine's) the flags go up poisoned (kPoisonKind): no receiver
// reads rows under them, and the ranks this one forwards for report the mismatch at once instead of timing out.
// (Call it from every thread of the block.)
__device__ __forceinline__ int block_forward_sig(const NormalCtx& c, bool is_void, int sig, bool dispatch) {
    __shared__ int out;
    if (threadIdx.x == 0) {
        const int64_t op = ld_volatile(c.err.dev) / 65536;
        const bool mismatch = dispatch ? op == kOpDispatchKinds || op == kOpDispatchHandles
                                       : op == kOpCombineKinds || op == kOpCombineHandles;
        out = is_void || op == 0 ? sig : mismatch ? kPoisonKind : -1;
    }
    __syncthreads();
    return out;
}

// Whether a sending kernel's last block raises the flags that tell peers its rows (or partial sums) are in place:
// not once this Buffer has reported an error (a kernel that gave up skipped its rows, and the flag would hand a peer
// that comes more than LARGEEP_TIMEOUT_S late whatever its slot held before), unless the round is void (it carries
// no rows, and every rank's copy-out still waits for these flags; a num_worst_tokens rank reports the void round
// as an error). Peers then time out naming this rank, as in the low-latency mode. (A rank whose count wait timed
// out does not know yet that the round is void, so in a void round that also lost a rank, the others time out
// naming it rather than raising the refusal.) Thread 0 reads the error word once for the block, so that every
// peer gets its flag or none does: call it from every thread of the block.
__device__ __forceinline__ bool block_raises_data_flags(const NormalCtx& c, bool is_void) {
    __shared__ int raise;
    if (threadIdx.x == 0) raise = is_void || !has_error(c.err);
    __syncthreads();
    return raise != 0;
}

// The block waits for flag words [kind][r] of the ranks r = first + i * stride (i < count) but `skip` to reach
// round `seq` (call_sig kPlainFlag: the word >= seq; else a data flag of round seq, of signature call_sig unless
// kAnySig: see data_flag); returns (to every thread) whether all arrived. With ranks of other nodes among them
// (`remote`), a system fence after the wait also orders reads of data that an NVSHMEM transport (not an NVLink
// store) delivered.
__device__ __forceinline__ bool wait_ranks(const NormalCtx& c, int kind, int first, int count, int stride, int skip,
                                           bool remote, int64_t seq, int op, int call_sig, unsigned tolerated = 0) {
    const bool data = call_sig != kPlainFlag, dispatch = kind == kFlagRows || kind == kFlagRdmaRows;
    const bool ok = block_wait_ranks(flags_of(c.base, c) + static_cast<int64_t>(kind) * c.num_ranks, first, count,
                                     stride, skip, data ? data_flag(seq, 0) : seq, c.timeout_ns, c.err, op,
                                     [&](int r, int64_t seen) {
                                         return sig_matches(c, dispatch, seen, seq, call_sig, r);
                                     },
                                     tolerated);
    if (ok && remote) __threadfence_system();
    return ok;
}
// ... of every rank of the group
__device__ __forceinline__ bool wait_all(const NormalCtx& c, int kind, int64_t seq, int op,
                                         int call_sig = kPlainFlag, unsigned tolerated = 0) {
    return wait_ranks(c, kind, 0, c.num_ranks, 1, -1, c.ranks_per_node < c.num_ranks, seq, op, call_sig,
                      tolerated);
}
// ... of the ranks of this rank's node
__device__ __forceinline__ bool wait_local(const NormalCtx& c, int kind, int64_t seq, int op,
                                           int call_sig = kPlainFlag) {
    return wait_ranks(c, kind, first_local(c), c.ranks_per_node, 1, -1, false, seq, op, call_sig);
}
// ... of this rank's RDMA peers (the rank with its local index on every other node)
__device__ __forceinline__ bool wait_rdma_peers(const NormalCtx& c, int kind, int64_t seq, int op,
                                                int call_sig = kPlainFlag) {
    return wait_ranks(c, kind, c.rank % c.ranks_per_node, num_nodes(c), c.ranks_per_node, c.rank, true, seq, op,
                      call_sig);
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
// ... and the kind of rows the rank sends (kRowKind), in bits 22-24
constexpr int kKindShift = 22;
constexpr int kKindSlotMask = 7 << kKindShift;

// Byte offset of receive slot s in every rank's allocation (0: the copy slot; see NormalCtx).
__device__ __forceinline__ int64_t slot_offset(const NormalCtx& c, int s) {
    return s == 0 ? c.off_recv : c.off_zc + static_cast<int64_t>(s - 1) * c.zc_slot_bytes;
}

// Writes one dispatched row into the receive slot of every rank first_local(c) + l of this rank's node with bit l
// set in `dests` (warp-uniform), at row base_l + p_l of the slot at slots[l] (its slot as seen from here, in shared
// memory), where lane l holds p_l and base_l: the x row (read once, in register chunks; rows of x_bytes in the x
// plane), then its scales, its expert ids made local to that rank (-1 elsewhere; ids are global), weights and the
// token index into their planes. idx_row == nullptr (cached dispatch) skips ids, weights and token. kLoad: see
// ld_v4 (0 for rows that no one writes during the kernel, 1 for rows a peer delivered during it).
template <int kLoad>
__device__ __forceinline__ void push_row(const NormalCtx& c, const uint8_t* x_row, int64_t x_bytes,
                                         const float* scales_row, const int64_t* idx_row, const float* w_row,
                                         int token, unsigned dests, int p, int base, uint8_t* const* slots,
                                         int lane) {
    const int K = c.num_topk, epr = c.num_experts / c.num_ranks, r0 = first_local(c);
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
            const int l = __ffs(m) - 1;
            m &= m - 1;
            const int row = __shfl_sync(0xffffffffu, base + p, l);
            int4* dst = reinterpret_cast<int4*>(slots[l] + c.pl_x + static_cast<int64_t>(row) * x_bytes);
#pragma unroll
            for (int u = 0; u < kChunk; ++u) {
                const int v = v0 + u * kWarp + lane;
                if (v < nvec) st_na_v4(dst + v, buf[u]);
            }
        }
    }
    unsigned m = dests;
    while (m) {
        const int l = __ffs(m) - 1;
        m &= m - 1;
        const int64_t row = __shfl_sync(0xffffffffu, base + p, l);
        uint8_t* dst = slots[l];
        if (scales_row != nullptr)
            for (int q = lane; q < num_scales; q += kWarp)
                reinterpret_cast<float*>(dst + c.pl_scales)[row * num_scales + q] = scales_row[q];
        if (idx_row != nullptr) {
            if (lane < K) {
                const int64_t le = local_expert(idx_row[lane], r0 + l, epr);
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

// acc[0, kPer) += vector v of a partial-sum row: kPer float32 values, or (kPartBf16, bf16 rows only: kPer == 8)
// kPer bf16 values, one 16-byte load.
template <typename T, bool kPartBf16>
__device__ __forceinline__ void add_partial(float* acc, const uint8_t* row, int v) {
    constexpr int kPer = Vec<T>::kPer;
    if constexpr (kPartBf16) {
        static_assert(kPer == 8, "bf16 partials of bf16 rows");
        Vec<__nv_bfloat16>::add(acc, ld_v4<1>(reinterpret_cast<const int4*>(row) + v));
    } else {
        add_f32<kPer>(acc, row, v);
    }
}

}  // namespace normal
}  // namespace largeep
