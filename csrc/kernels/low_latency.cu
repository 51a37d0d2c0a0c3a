// Low-latency mode (decoding): NVLink stores to the peers of this rank's node, NVSHMEM puts to the others.
//
// Dispatch send: one block per token. Warp 0 takes, for every copy k, a row among those this rank sends to that
// expert (a local atomic per (rank, expert)), and for every destination rank one receive row (a local atomic per
// rank): a token goes to a rank once, however many of its experts live there. The block quantises the token to FP8
// once (or keeps BF16) and stores it into each destination rank's receive buffer at [slot buffer][me][row], with the
// token and its list of (local expert, copy k, expert row) entries. The last block then publishes, for every
// (rank, local expert), the expert's row count (plain stores), and then for every rank the number of rows sent
// there (a release store, the word the receiver waits for), each tagged with the round (ll_round_word).
// Dispatch receive: the grid waits for every source's rows word, reads the counts it published before it, and fans
// every received row out to the output rows of its entries (experts ascending, sources ascending inside an expert),
// with src_info and the combine metadata. The output has one row per (token, expert) copy; only the transport is
// per (token, rank).
// Combine send: each valid output row goes back to its source's buffer at [token][k]. A source that gave its
// weights to the dispatch (they travel in the row's metadata) gets one sum per (token, rank) instead wherever the
// token has two or more experts on the rank: the weighted sum in float32, sent as two BF16 rows (its rounding and
// the remainder's) into the slots of the rank's first two copies, or, when the source asked for bf16 partial sums,
// as its rounding alone into the first copy's slot.
// Combine receive: weighted sum in float32 (weight 1 for such a sum's rows) over the k whose copy the dispatch sent
// (its send keeps the ids it sent, in the handle) and the combine's ids still name (with weights sent: every k sent,
// a sum made on an expert's rank being past masking).
//
// Peers on this rank's node (ranks_per_node) are written with plain stores through NVLink peer pointers; a flag
// raised after a block barrier and one thread's system fence (last_block) orders every thread's stores before it
// (the PTX memory model's cumulativity), so threads do not fence one by one. Peers on
// other nodes take NVSHMEM's standard device API instead, so any transport NVSHMEM supports carries them: the row is
// built in a local symmetric staging buffer, sent with nvshmemx_putmem_nbi_warp, every sending thread calls
// nvshmem_quiet, and only then are the round's flags raised with nvshmemx_signal_op. Flags are read with acquire
// loads in bounded loops.
//
// Two slot buffers (round parity) let two calls be in flight. A sender waits until the receiver freed the slot
// buffer of round seq - 2. The round a receive belongs to travels in the handle (a device tensor), so kernels
// captured in a CUDA graph replay correctly. Every wait is bounded (errors go to the ErrorWord, as in normal mode).
#include <cuda_fp8.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include "fp8.cuh"
#include "launch.cuh"

namespace largeep {

namespace {

constexpr int kLLThreads = 512;  // (at least 2 warps: ll_unpack's second prefix sum runs on warp 1)
constexpr int kLLWarps = kLLThreads / kWarp;
constexpr size_t kLLMaxDynSmem = 40 * 1024;  // the spread kernels' count words (48 KiB less the static share)
constexpr int kLLMaxTopk = 8;  // the combine receive keeps this many copies' loads in flight (larger K: one by one)
// Ranks of a low-latency group: the rendezvous kernel's one block (csrc/runtime) bounds NVSHMEM groups at 1024; the
// kernels here loop over ranks wherever a thread per rank would not fit a block.
constexpr int kLLMaxRanks = 1024;

__device__ __forceinline__ uint8_t* ll_peer(const LowLatencyCtx& c, int r) {
    return reinterpret_cast<uint8_t*>(c.peer_base[r]);
}
__device__ __forceinline__ int64_t* ll_flags(uint8_t* base, const LowLatencyCtx& c) {
    return reinterpret_cast<int64_t*>(base + c.off_flags);
}
// Flag words: [kind][slot][index], index = local expert * N + source for counts, else rank (kLLRows: the source).
__device__ __forceinline__ int64_t ll_flag_index(const LowLatencyCtx& c, int kind, int slot, int i) {
    const int64_t per_slot = static_cast<int64_t>(c.num_experts / c.num_ranks) * c.num_ranks;  // >= N
    return (static_cast<int64_t>(kind) * 2 + slot) * per_slot + i;
}
enum LLFlag { kLLCounts = 0, kLLDispatchFree = 1, kLLCombineDone = 2, kLLCombineFree = 3, kLLRows = 4 };
constexpr int kLLFlagKinds = 5;
// A combine's done flag: its round times kLLTagSpan plus the tag of the handle whose rows the sender sent (the round
// of that handle's dispatch modulo kLLTagSpan), so that a rank that combines another dispatch's handle than its
// peers is told (kOpLowLatencyHandles) instead of summing rows of another dispatch's tokens as its own. Handles of
// dispatches a multiple of kLLTagSpan rounds apart are not told apart. (Rounds below 2^51 fit.)
constexpr int64_t kLLTagSpan = 4096;
__device__ __forceinline__ int64_t ll_handle_tag(const int64_t* dispatch_seq) {
    return *dispatch_seq & (kLLTagSpan - 1);
}

__device__ __forceinline__ bool same_node(const LowLatencyCtx& c, int r) {
    return r / c.ranks_per_node == c.rank / c.ranks_per_node;
}

// Sets flag word `index` of rank r to v: a release store over NVLink on this node, an NVSHMEM signal elsewhere.
// Everything this thread (and, through the caller's barrier and quiet, its grid) wrote to r comes first.
__device__ __forceinline__ void ll_set_flag(const LowLatencyCtx& c, int r, int64_t index, int64_t v) {
    set_peer_flag(same_node(c, r) ? ll_peer(c, r) : nullptr, c.base, c.off_flags + 8 * index, v, r);
}

// A count or rows word: round seq >= 1 and a count 0 <= n <= max_tokens in one int64, seq * (max_tokens + 1) + n,
// which grows with the round whatever the counts, so that a wait for round seq is a wait for the word to reach
// ll_round_word(c, seq, 0) (a word from an earlier round, or the zeroed word of none, stays below it). The Python
// side bounds max_tokens to 2^20: more than 2^43 rounds fit (years of calls every microsecond).
__device__ __forceinline__ int64_t ll_round_word(const LowLatencyCtx& c, int64_t seq, int n) {
    return seq * (static_cast<int64_t>(c.max_tokens) + 1) + n;
}
__device__ __forceinline__ int64_t ll_word_round(const LowLatencyCtx& c, int64_t v) {
    return v / (static_cast<int64_t>(c.max_tokens) + 1);
}
__device__ __forceinline__ int ll_word_count(const LowLatencyCtx& c, int64_t v) {
    return static_cast<int>(v % (static_cast<int64_t>(c.max_tokens) + 1));
}

// Receive row `row` of the rows source s sent in slot buffer `slot`.
__device__ __forceinline__ uint8_t* ll_recv_row(uint8_t* base, const LowLatencyCtx& c, int slot, int s, int row) {
    return base + c.off_recv + ((static_cast<int64_t>(slot) * c.num_ranks + s) * c.max_tokens + row) * c.recv_stride;
}

// The block's threads wait for flag words [kind][slot][0, N) to reach target, thread i for words i, i + blockDim.x,
// ... (any number of ranks); returns to every thread whether all arrived. The last thread also reads the error word
// (with fewer ranks than threads it has no flag, so that load is in flight with the flag loads): once the Buffer
// reported an error (or a word of this wait gave up) the call goes no further, and a wait for a flag that has not
// come ends at its first look at the error word. tag >= 0: each word must also hold it (word % kLLTagSpan, a
// combine's done flags), else the wait reports kOpLowLatencyHandles naming the sender and fails; only once every
// word has come, this rank's own among them, so that a fused combine's blocks never keep its last block from
// raising this rank's flags (a peer waiting for them would time out instead of finding the tags differ). Each
// waiting thread's acquire load orders its later reads after its flags, and the barrier (one that also ANDs the
// threads' results) the block's; with puts in use, a system fence also covers words that an NVSHMEM transport (not
// an NVLink store) delivered. (The normal mode's block_wait_ranks gives each of at most 512 ranks a thread of its
// own; written as this loop, its kernels compiled with more spills, so the two stay apart.)
__device__ __forceinline__ bool ll_block_wait(const LowLatencyCtx& c, int kind, int slot, int64_t target, int op,
                                              int64_t tag = -1) {
    bool ok = !(threadIdx.x == blockDim.x - 1 && has_error(c.err));
    const int64_t* flags = ll_flags(c.base, c) + ll_flag_index(c, kind, slot, 0);
    int other = -1;  // a rank whose word holds another tag
    for (int r = threadIdx.x; r < c.num_ranks; r += blockDim.x) {
        int64_t seen = 0;
        if (ok && !wait_flag(flags + r, target, c.timeout_ns, c.err, op, r, &seen)) ok = false;
        if (ok && tag >= 0 && other < 0 && seen % kLLTagSpan != tag) other = r;
    }
    bool all = __syncthreads_and(ok) != 0;
    if (all && tag >= 0) {  // (block-uniform)
        if (other >= 0) report_error(c.err, kOpLowLatencyHandles, other);
        all = __syncthreads_and(other < 0) != 0;
    }
    if (all && c.ranks_per_node < c.num_ranks) __threadfence_system();
    return all;
}

// FP8 e4m3 of the 8 bf16 values in `raw` (this lane's 16 bytes of a group of 128 channels held by its half-warp):
// returns the 8 bytes and, in *scale, the group's scale (amax / 448 over the half-warp, rounded up to a power of
// two with round_scale). Every lane of the warp calls it (shuffles); lanes with valid == false add 0 to the amax.
// Bit for bit as largeep.fp8.quantize (fp8.cuh): a NaN in the group makes its scale and every value NaN; an infinity
// makes the scale infinite (each value then dequantises to NaN); finite values past +-448 saturate.
__device__ __forceinline__ uint2 quantize_e4m3x8(int4 raw, bool valid, int round_scale, float* scale) {
    float f[8];
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 p = __bfloat1622float2(h[i]);
        f[2 * i] = valid ? p.x : 0.f;
        f[2 * i + 1] = valid ? p.y : 0.f;
    }
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = max_keep_nan(amax, fabsf(f[i]));
#pragma unroll
    for (int d = 8; d >= 1; d /= 2) amax = max_keep_nan(amax, __shfl_xor_sync(0xffffffffu, amax, d));
    const float s = fp8_group_scale(amax, round_scale != 0);
    *scale = s;
    const float inv = 1.f / s;
    const bool finite_s = isfinite(s);
    uint32_t packed[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        uint32_t word = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            // (the e4m3 code of x / s correctly rounded, as SPEC and largeep.fp8 divide: x * (1 / s) alone lands on
            // the neighbouring code for about one value in a thousand of bf16 inputs)
            word |= static_cast<uint32_t>(fp8_e4m3_code(fp8_div_by_scale(f[4 * i + b], s, inv, finite_s))) << (8 * b);
        }
        packed[i] = word;
    }
    return make_uint2(packed[0], packed[1]);
}

// End of a dispatch send, every thread of every block: its puts completed (put path), then the last block publishes,
// for every (rank, local expert), this round's row count tagged with the round, and then for every rank the number
// of receive rows sent there, the word a receiver waits for (ll_round_word). The count words are plain stores
// (puts elsewhere, completed before the barrier); the rows word is a release store (signal), so a receiver that has
// acquired it sees the counts and, through last_block's barrier and fence, every block's rows. Clears the counters,
// and advances the round. Nothing is published once any kernel of the Buffer reported an error (a block that gave
// up waiting skipped its sends): the peers then time out and say so, instead of taking the counts of rows that
// never came.
__device__ __forceinline__ void ll_publish_counts(const LowLatencyCtx& c, int* counter, int slot_buf, int64_t seq,
                                                  bool ok_all, int64_t* handle_seq) {
    const int N = c.num_ranks, epr = c.num_experts / N;
    const bool puts = c.ranks_per_node < N;
    if (puts) nvshmem_quiet();  // this thread's puts have landed
    trace_mark(6);
    if (last_block(c.block_counter + 0)) {  // (block-uniform branch; its barrier and fence order every block's rows)
        trace_mark(7);
        __shared__ int s_publish;  // read once, so that the block publishes every count or none
        if (threadIdx.x == 0) s_publish = ok_all && !has_error(c.err);
        __syncthreads();
        const bool publish = s_publish != 0;
        trace_mark(8);
        // counter: [N * E/N] rows per (rank, expert), then [N] receive rows per rank
        for (int i = threadIdx.x; i < N * epr; i += blockDim.x) {
            const int n = min(counter[i], c.max_tokens);
            counter[i] = 0;
            if (!publish) continue;
            const int r = i / epr, le = i % epr;
            const int64_t off = c.off_flags + 8 * ll_flag_index(c, kLLCounts, slot_buf, le * N + c.rank);
            const int64_t v = ll_round_word(c, seq, n);
            if (same_node(c, r)) st_volatile(reinterpret_cast<int64_t*>(ll_peer(c, r) + off), v);
            else nvshmemx_signal_op(reinterpret_cast<uint64_t*>(c.base + off), static_cast<uint64_t>(v),
                                    NVSHMEM_SIGNAL_SET, r);
        }
        if (puts && publish) nvshmem_quiet();  // the count words put elsewhere have landed
        __syncthreads();  // every count word before any rows word
        for (int r = threadIdx.x; r < N; r += blockDim.x) {
            int* rows_to = counter + N * epr;
            const int n = min(rows_to[r], c.max_tokens);
            rows_to[r] = 0;
            if (publish) ll_set_flag(c, r, ll_flag_index(c, kLLRows, slot_buf, c.rank), ll_round_word(c, seq, n));
        }
        if (threadIdx.x == 0) {
            c.seq[kSeqLowLatency] = seq;
            *handle_seq = seq;
        }
        trace_mark(9);
        trace_print("dispatch_send", 10, c.rank, -1);
    }
}

// Receive-row metadata (int32 at off_meta_in_row): [0] token, [1] number of entries n (| kLLWeighted | kLLSumOne |
// kLLFp8), then n pairs (local expert * 32 + k, row of the copy among this source's rows for that expert) at
// [2, 2 + 2n), and with kLLWeighted each entry's weight (float bits; the sum over every k naming its expert) at
// [2 + 2K, 2 + 2K + n).
constexpr int kLLMetaHead = 2;
constexpr int kLLWeighted = 1 << 16;  // the source sent its weights: the combine sums the token's rows here
constexpr int kLLSumOne = 1 << 17;    // (with kLLWeighted) and sends such a sum as one bf16 row, not two
constexpr int kLLFp8 = 1 << 18;       // the row is FP8 with scales (else BF16): the receiver's use_fp8 must agree
constexpr int kLLPre = 4;  // 16-byte vectors of a token row each thread loads ahead (the rest as it goes)

// Thread's vectors [i0, i0 + kLLPre) of row src (vector i of a thread: threadIdx.x + i * blockDim.x), 0 past nvec.
__device__ __forceinline__ void ll_load_row(const int4* src, int nvec, int i0, int4 (&v)[kLLPre]) {
#pragma unroll
    for (int u = 0; u < kLLPre; ++u) {
        const int at = static_cast<int>(threadIdx.x) + (i0 + u) * static_cast<int>(blockDim.x);
        v[u] = at < nvec ? ld_nc_v4(src + at) : make_int4(0, 0, 0, 0);
    }
}

// The send of blocks [0, blocks) of blockDim.x / 32 warps: one token per block at a time. Each block first waits
// until the receivers freed the slot buffer (round seq - 2), with its first token's ids and its first vectors of
// the row already loading. Warp 0 takes the rows of the token's copies and of its destination ranks and writes the
// row's metadata; then every thread quantises its vectors of the row once (FP8: a half-warp per group of 128
// channels) and stores them into each destination rank's row. Copies for peers on other nodes are built in staging
// (at row t * K + k of the rank's first copy k) and put whole once the block has written them. A token sends each
// expert it names once, however many of its k name it. With weights w [T, K] (else null) each entry carries the
// sum of the weights of the k naming its expert, and w_keep [T, K] gets a copy of w (the weights this rank's
// combine applies: those the experts' ranks got); sum_one asks the experts' ranks for their sums as one bf16 row.
// ids_keep int32 [T, K] gets the ids as sent (-1 for an id outside [0, E), which sends nothing): this rank's combine
// learns from them which copies came back and which k's slot holds each, whatever ids it is given itself.
// Returns (to every thread) whether the wait succeeded.
// (kWeights: w given; a template argument, so that the send without weights compiles to the code it had before)
template <bool kWeights>
__device__ __forceinline__ bool ll_send_tokens(const LowLatencyCtx& c, const __nv_bfloat16* x, const int64_t* idx,
                                               const float* w, float* w_keep, int* ids_keep, int T, int use_fp8,
                                               int round_scale, int sum_one, int slot_buf, int64_t seq, int* counter,
                                               int blocks) {
    const int N = c.num_ranks, K = c.num_topk, epr = c.num_experts / N, me = c.rank, H = c.hidden;
    int* rows_to = counter + N * epr;  // receive rows per destination rank
    // the token's destination ranks, one entry each (in the order of their first copies), s_nd of them:
    __shared__ uint8_t* s_dst[kWarp];  // the rank's row (peer buffer, or staging for the put path)
    __shared__ int s_put[kWarp];       // the rank when it takes the put path, else -1
    __shared__ int s_row[kWarp];       // the row's index among the rows this rank sends there
    __shared__ int s_nd;
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
    const int nvec = H / 8;  // 16-byte vectors of 8 bf16
    const int per_thread = (nvec + static_cast<int>(blockDim.x) - 1) / static_cast<int>(blockDim.x);
    int4 pre[kLLPre];
    int64_t e = -1;  // warp 0, lane k < K: the token's id k
    float wv = 0.f;  // and its weight k (with w)
    // token tok's ids (weights) and first vectors, loading while the block does something else
    auto load_ahead = [&](int tok) {
        e = -1;
        if (tok >= T) return;
        if (warp == 0 && lane < K) {
            e = idx[static_cast<int64_t>(tok) * K + lane];
            if (kWeights) wv = w[static_cast<int64_t>(tok) * K + lane];
        }
        ll_load_row(reinterpret_cast<const int4*>(x + static_cast<int64_t>(tok) * H), nvec, 0, pre);
    };
    int t = static_cast<int>(blockIdx.x);
    load_ahead(t);
    // The receivers must have unpacked round seq - 2, which used the same slot buffer.
    const bool ok_all = ll_block_wait(c, kLLDispatchFree, slot_buf, seq - 2, kOpLowLatencyDispatch);
    trace_mark(1);
    if (!ok_all) return false;
    for (; t < T; t += blocks) {
        if (warp == 0) {
            int r = -1, le = 0;
            if (e >= 0 && e < c.num_experts) {
                r = static_cast<int>(e / epr);
                le = static_cast<int>(e % epr);
            }
            if (lane < K) ids_keep[static_cast<int64_t>(t) * K + lane] = r >= 0 ? static_cast<int>(e) : -1;
            // a token naming an expert more than once sends it once (SPEC: once per expert): the first k naming it
            // owns the copy, and the combine reads that copy's row for every k naming the expert
            const unsigned twins = __match_any_sync(0xffffffffu, static_cast<unsigned long long>(e));
            if (lane != __ffs(twins) - 1) r = -1;
            float ws = 0.f;  // the copy's weight: every k naming its expert (lanes past K: no twin of a valid id)
            if (kWeights) {
                if (lane < K) w_keep[static_cast<int64_t>(t) * K + lane] = wv;
                for (int b = 0; b < K; ++b) {
                    const float wb = __shfl_sync(0xffffffffu, wv, b);
                    if ((twins >> b) & 1u) ws += wb;
                }
            }
            const unsigned valid = __ballot_sync(0xffffffffu, r >= 0);
            const unsigned same = __match_any_sync(0xffffffffu, r) & valid;  // copies that go to my copy's rank
            const int first = same != 0 ? __ffs(same) - 1 : lane;            // the rank's first copy
            // both atomics in flight at once: the copy's row for its expert, the first copy's row for its rank
            int j = 0, row = 0;
            if (r >= 0) j = atomicAdd(counter + r * epr + le, 1);
            if (r >= 0 && lane == first) row = atomicAdd(rows_to + r, 1);  // < T <= max_tokens
            row = __shfl_sync(0xffffffffu, row, first);
            // (a row past max_tokens, a rank counter not cleared: broken, reported, and that rank's copies dropped
            // rather than written past its block of the peer's slot)
            if (r >= 0 && row >= c.max_tokens) {
                if (lane == first) report_error(c.err, kOpLowLatencyCounter, r);
                r = -1;
            }
            // (j < T <= max_tokens, a token sending each expert once; bounded all the same: a copy past it would
            // be dropped, not corrupting)
            const bool keep = r >= 0 && j < c.max_tokens;
            if (r >= 0 && !keep) report_error(c.err, kOpLowLatencyCounter, r);  // (a counter not cleared: broken)
            const unsigned kept = __ballot_sync(0xffffffffu, keep) & same;
            uint8_t* dst = nullptr;
            int put = -1;
            if (r >= 0) {
                if (same_node(c, r)) {
                    dst = ll_recv_row(ll_peer(c, r), c, slot_buf, me, row);
                } else {
                    dst = c.base + c.off_send + (static_cast<int64_t>(t) * K + first) * c.recv_stride;
                    put = r;
                }
                int* m = reinterpret_cast<int*>(dst + c.off_meta_in_row);
                if (keep) {
                    const int p = __popc(kept & ((1u << lane) - 1u));  // my entry among the rank's kept copies
                    m[kLLMetaHead + 2 * p] = le * kWarp + lane;
                    m[kLLMetaHead + 2 * p + 1] = j;
                    if (kWeights) m[kLLMetaHead + 2 * K + p] = __float_as_int(ws);
                }
                if (lane == first) {
                    m[0] = t;
                    m[1] = __popc(kept) | (kWeights ? kLLWeighted | (sum_one ? kLLSumOne : 0) : 0) |
                           (use_fp8 ? kLLFp8 : 0);
                }
            }
            const bool lead = r >= 0 && lane == first;  // (lanes >= K: r < 0)
            const unsigned leads = __ballot_sync(0xffffffffu, lead);
            if (lead) {
                const int p = __popc(leads & ((1u << lane) - 1u));
                s_dst[p] = dst;
                s_put[p] = put;
                s_row[p] = row;
            }
            if (lane == 0) s_nd = __popc(leads);
        }
        __syncthreads();
        trace_mark(2);
        // the first kLLMaxTopk destinations' rows in registers (read from shared memory once per token, not once
        // per vector: a store through a generic pointer may alias it), the rest from shared memory
        const int nd = s_nd;
        uint8_t* dsts[kLLMaxTopk];
#pragma unroll
        for (int i = 0; i < kLLMaxTopk; ++i) dsts[i] = i < nd ? s_dst[i] : nullptr;
        const int4* src = reinterpret_cast<const int4*>(x + static_cast<int64_t>(t) * H);
        for (int i0 = 0; i0 < per_thread; i0 += kLLPre) {
            if (i0 > 0) ll_load_row(src, nvec, i0, pre);
#pragma unroll
            for (int u = 0; u < kLLPre; ++u) {
                const int v = static_cast<int>(threadIdx.x) + (i0 + u) * static_cast<int>(blockDim.x);
                if (use_fp8) {
                    // a half-warp per group of 128 channels (H % 128 == 0: a half-warp is wholly in or out); the
                    // whole warp shuffles, so the test is on the warp's first vector
                    if (v - lane >= nvec) continue;
                    float scale;
                    const uint2 out = quantize_e4m3x8(pre[u], v < nvec, round_scale, &scale);
                    if (v >= nvec) continue;
                    auto store = [&](uint8_t* dst) {
                        reinterpret_cast<uint2*>(dst)[v] = out;
                        if ((lane & 15) == 0) reinterpret_cast<float*>(dst + c.off_scales_in_row)[v / 16] = scale;
                    };
#pragma unroll
                    for (int i = 0; i < kLLMaxTopk; ++i)
                        if (i < nd) store(dsts[i]);
                    for (int i = kLLMaxTopk; i < nd; ++i) store(s_dst[i]);
                } else {
                    if (v >= nvec) continue;
#pragma unroll
                    for (int i = 0; i < kLLMaxTopk; ++i)
                        if (i < nd) st_na_v4(reinterpret_cast<int4*>(dsts[i]) + v, pre[u]);
                    for (int i = kLLMaxTopk; i < nd; ++i) st_na_v4(reinterpret_cast<int4*>(s_dst[i]) + v, pre[u]);
                }
            }
        }
        trace_mark(3);
        if (c.ranks_per_node < N) __threadfence();  // every writer's staged slices before the puts below
        __syncthreads();  // every row complete (staged ones before their put); s_* free for the next token
        trace_mark(4);
        load_ahead(t + blocks);  // while this token's puts go out
        for (int i = warp; i < nd; i += warps) {
            if (s_put[i] < 0) continue;
            uint8_t* remote = ll_recv_row(c.base, c, slot_buf, me, s_row[i]);
            if (use_fp8) {  // the row's x area holds 2H bytes (BF16) of which FP8 fills H: the rest is not sent
                nvshmemx_putmem_nbi_warp(remote, s_dst[i], H, s_put[i]);
                nvshmemx_putmem_nbi_warp(remote + c.off_scales_in_row, s_dst[i] + c.off_scales_in_row,
                                         c.recv_stride - c.off_scales_in_row, s_put[i]);
            } else {
                nvshmemx_putmem_nbi_warp(remote, s_dst[i], c.recv_stride, s_put[i]);
            }
        }
        __syncthreads();
        trace_mark(5);
    }
    return true;
}

constexpr int kTokWarps = 8;  // the send kernel's warps per block (one token per block at a time)
constexpr int kTokThreads = kTokWarps * kWarp;

template <bool kWeights>
__global__ void __launch_bounds__(kTokThreads) ll_dispatch_send_kernel(LowLatencyCtx c, const __nv_bfloat16* x,
                                                                      const int64_t* idx, const float* w,
                                                                      float* w_keep, int* ids_keep, int T,
                                                                      int use_fp8, int round_scale, int sum_one,
                                                                      int64_t* handle_seq) {
    trace_mark(0);
    const int64_t seq = c.seq[kSeqLowLatency] + 1;
    const int slot_buf = static_cast<int>(seq & 1);
    int* counter = reinterpret_cast<int*>(c.base + c.off_counter);  // zero between rounds
    const bool ok_all = ll_send_tokens<kWeights>(c, x, idx, w, w_keep, ids_keep, T, use_fp8, round_scale, sum_one,
                                                 slot_buf, seq, counter, static_cast<int>(gridDim.x));
    ll_publish_counts(c, counter, slot_buf, seq, ok_all, handle_seq);
}

// a[0, n) becomes its inclusive prefix sum (one warp, in chunks of 32; a in shared memory).
__device__ __forceinline__ void warp_prefix_inplace(int* a, int n, int lane) {
    int carry = 0;
    for (int b = 0; b < n; b += kWarp) {
        int v = b + lane < n ? a[b + lane] : 0;
#pragma unroll
        for (int d = 1; d < kWarp; d *= 2) {
            const int u = __shfl_up_sync(0xffffffffu, v, d);
            if (lane >= d) v += u;
        }
        if (b + lane < n) a[b + lane] = carry + v;
        carry += __shfl_sync(0xffffffffu, v, kWarp - 1);
    }
}

// The segment k of pref (pref[k] <= row < pref[k + 1]) among n segments (binary search; pref[0] = 0 <= row).
__device__ __forceinline__ int segment_of(const int* pref, int n, int row) {
    int lo = 0, hi = n;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (pref[mid] <= row) lo = mid;
        else hi = mid;
    }
    return lo;
}

constexpr int kFanU = 4;  // 16-byte vectors per lane that a fan-out step reads before storing them

// One warp, one step of a fan-out: vectors [b, b + kFanU * 32) of `in`, below v_hi.
__device__ __forceinline__ void ll_fan_load(const int4* in, int b, int v_hi, int lane, int4 (&val)[kFanU]) {
#pragma unroll
    for (int u = 0; u < kFanU; ++u)
        if (b + u * kWarp + lane < v_hi) val[u] = ld_v4<1>(in + b + u * kWarp + lane);
}

// One warp: what ll_fan_out_row takes preloaded for the slice [v_lo, v_hi) of received row `src`: the first step's
// vectors, and with v_lo == 0 (FP8) the row's first 64 scales (lane q: scales q and q + 32).
__device__ __forceinline__ void ll_fan_prefetch(const LowLatencyCtx& c, const uint8_t* src, int v_lo, int v_hi,
                                                int use_fp8, int lane, int4 (&val)[kFanU], float (&sc)[2]) {
    ll_fan_load(reinterpret_cast<const int4*>(src), v_lo, v_hi, lane, val);
    if (use_fp8 && v_lo == 0) {
        const float* scales = reinterpret_cast<const float*>(src + c.off_scales_in_row);
        if (lane < c.hidden / 128) sc[0] = scales[lane];
        if (lane + kWarp < c.hidden / 128) sc[1] = scales[lane + kWarp];
    }
}

// Where the combine finds a received row's entries (handle tensors of the dispatch, written by its receive):
// lead int32 [E/N * N*M] per output row: -1 it goes home alone; entry e of a weighted received row g of n >= 2
// entries: g * 32 + e (the row's sum is cut into n pieces, entry e's warps make piece e); rowmap int32 [N*M][S][4]
// with S = min(K, E/N) (a received row names distinct local experts): entry e of received row g: (output row, weight
// bits, n, 1 if the source asked for the sum as one bf16 row else 0).
struct LLRowMap {
    int* lead;
    int* rowmap;
};
__device__ __forceinline__ int ll_rowmap_stride(const LowLatencyCtx& c) {
    return min(c.num_topk, c.num_experts / c.num_ranks);
}

// One warp: 16-byte vectors [v_lo, v_hi) of received row `src` go to output row o of each of the row's n entries
// (lane e holds entry e's o, -1 for an entry this block does not write); read once, stored n times; val and sc from
// ll_fan_prefetch. With v_lo == 0 also each entry's scales, src_info and combine metadata, and (received row g,
// flags: the row's kLLWeighted (the source sent weights, lane e's weight bits wbits) and kLLSumOne) the entry's place
// in map.
__device__ __forceinline__ void ll_fan_out_row(const LowLatencyCtx& c, const uint8_t* src, int s, int t, int k,
                                               int64_t o, int n, uint8_t* out_x, float* out_scales, int* src_info,
                                               int* meta, int64_t x_bytes, int use_fp8, int v_lo, int v_hi,
                                               int lane, int4 (&val)[kFanU], const float (&sc)[2], int g,
                                               int flags, int wbits, const LLRowMap& map) {
    const int4* in = reinterpret_cast<const int4*>(src);
    for (int b = v_lo; b < v_hi; b += kFanU * kWarp) {  // (warp-uniform bounds: the shuffles below)
        if (b != v_lo) ll_fan_load(in, b, v_hi, lane, val);
        for (int e = 0; e < n; ++e) {
            const int64_t oe = __shfl_sync(0xffffffffu, o, e);
            if (oe < 0) continue;
            int4* dst = reinterpret_cast<int4*>(out_x + oe * x_bytes);
#pragma unroll
            for (int u = 0; u < kFanU; ++u)
                if (b + u * kWarp + lane < v_hi) st_na_v4(dst + b + u * kWarp + lane, val[u]);
        }
    }
    if (v_lo != 0) return;
    const int num_scales = c.hidden / 128;
    if (use_fp8) {
        const float* scales = reinterpret_cast<const float*>(src + c.off_scales_in_row);
        for (int e = 0; e < n; ++e) {
            const int64_t oe = __shfl_sync(0xffffffffu, o, e);
            if (oe < 0) continue;
            float* dst = out_scales + oe * num_scales;
            if (lane < num_scales) dst[lane] = sc[0];
            if (lane + kWarp < num_scales) dst[lane + kWarp] = sc[1];
            for (int q = lane + 2 * kWarp; q < num_scales; q += kWarp) dst[q] = scales[q];
        }
    }
    if (o >= 0) {
        src_info[2 * o] = s;
        src_info[2 * o + 1] = t;
        meta[o] = s * (c.max_tokens * c.num_topk) + t * c.num_topk + k;
        const int stride = ll_rowmap_stride(c);
        // (more entries than local experts: a broken peer)
        const bool merge = (flags & kLLWeighted) && n >= 2 && n <= stride;
        map.lead[o] = merge ? g * kWarp + lane : -1;
        if (merge) reinterpret_cast<int4*>(map.rowmap)[static_cast<int64_t>(g) * stride + lane] =
            make_int4(static_cast<int>(o), wbits, n, (flags & kLLSumOne) ? 1 : 0);
    }
}

// Dispatch receive. Spread (default): every block reads all E/N * N count words and the N row counts into `cnt`
// (dynamic shared memory, E/N * N + N + 2 ints), turns them into prefix sums, and the grid's warps share the
// received rows, each cut into `parts` column slices. Packed (LARGEEP_TUNE ll_spread=0, or too many count words for
// shared memory): block le writes local expert le only (N count words); its warps read every received row's
// entries and copy the rows that have one for le (a row without one is not read). Output rows past an expert's
// count get src_info and meta -1. A count wait that gives up (reported in the error word; the call raises) leaves
// the outputs undefined: blocks decide on their own waits.
// (the body, for round seq: the receive kernel, or the fused dispatch after its sends; cnt: dynamic shared memory)
__device__ __forceinline__ void ll_unpack(const LowLatencyCtx& c, uint8_t* out_x, float* out_scales, int* out_count,
                                          int* src_info, int* meta, const LLRowMap& map, int use_fp8, int64_t seq,
                                          int* cnt) {
    const int N = c.num_ranks, me = c.rank, M = c.max_tokens, epr = c.num_experts / N;
    const int slot_buf = static_cast<int>(seq & 1);
    const int nle = c.spread ? epr : 1;  // local experts this block writes: [le0, le0 + nle)
    const int segs = nle * N;            // their count words: (expert, source) pairs
    const int le0 = c.spread ? 0 : static_cast<int>(blockIdx.x);
    int* rpref = cnt + segs + 1;  // [N + 1]: receive rows per source, as a prefix sum
    trace_mark(0);
    // each source's rows word, released after its count words: acquired, they are all there
    const bool arrived = ll_block_wait(c, kLLRows, slot_buf, ll_round_word(c, seq, 0), kOpLowLatencyDispatch);
    __shared__ int ok_all;
    if (threadIdx.x == 0) ok_all = arrived ? 1 : 0;
    for (int s = threadIdx.x; s < N; s += blockDim.x) {
        const int64_t v = arrived ? ld_acquire_sys(ll_flags(c.base, c) + ll_flag_index(c, kLLRows, slot_buf, s)) : 0;
        rpref[s + 1] = ll_word_round(c, v) == seq ? ll_word_count(c, v) : 0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < segs; i += blockDim.x) {
        const int64_t v = ok_all ? ld_volatile(ll_flags(c.base, c) + ll_flag_index(c, kLLCounts, slot_buf, le0 * N + i))
                                 : 0;
        // (a count word of another round under this round's rows word: a broken peer; reported, nothing read)
        if (ok_all && ll_word_round(c, v) != seq) {
            report_error(c.err, kOpLowLatencyRound, i % N);
            atomicAnd(&ok_all, 0);
        }
        cnt[i + 1] = ll_word_round(c, v) == seq ? ll_word_count(c, v) : 0;
    }
    __syncthreads();
    trace_mark(1);
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    if (warp == 0) {
        warp_prefix_inplace(cnt + 1, segs, lane);
        if (lane == 0) cnt[0] = 0;
    } else if (warp == 1) {
        warp_prefix_inplace(rpref + 1, N, lane);
        if (lane == 0) rpref[0] = 0;
    }
    __syncthreads();
    trace_mark(2);
    const int rows = N * M;
    const int total = ok_all ? rpref[N] : 0;  // received rows
    // rows of expert le: [cnt[le * N], cnt[(le + 1) * N]) in this block's numbering
    if (c.spread ? blockIdx.x == 0 : threadIdx.x == 0)
        for (int le = threadIdx.x; le < nle; le += blockDim.x)
            out_count[le0 + le] = ok_all ? cnt[(le + 1) * N] - cnt[le * N] : 0;
    const int64_t x_bytes = static_cast<int64_t>(c.hidden) * (use_fp8 ? 1 : 2);
    const int nvec = static_cast<int>(x_bytes / 16);
    const int warps = c.spread ? static_cast<int>(gridDim.x) * kLLWarps : kLLWarps;
    // a received row is written once per entry (about K / N times): up to 16 slices per row keep every warp busy
    const int parts = c.spread ? max(1, min(16, warps / max(1, total))) : 1;
    const int per = (nvec + parts - 1) / parts;
    const int gw = c.spread ? static_cast<int>(blockIdx.x) * kLLWarps + warp : warp;
    for (int g = gw; g < total * parts; g += warps) {
        const int row = g / parts, part = g % parts;
        const int s = segment_of(rpref, N, row);
        const uint8_t* src = ll_recv_row(c.base, c, slot_buf, s, row - rpref[s]);
        const int* m = reinterpret_cast<const int*>(src + c.off_meta_in_row);
        const int v_lo = part * per, v_hi = min(nvec, (part + 1) * per);
        // spread: every row read here has an entry for this block, so its first vectors and scales load together
        // with its metadata (one round trip, not three one after the other)
        int4 val[kFanU];
        float sc[2] = {0.f, 0.f};
        if (c.spread && v_lo < nvec) ll_fan_prefetch(c, src, v_lo, v_hi, use_fp8, lane, val, sc);
        const int2 head = *reinterpret_cast<const int2*>(m);  // token, number of entries (| kLLWeighted | kLLSumOne)
        const int2 entry = lane < c.num_topk ? reinterpret_cast<const int2*>(m + kLLMetaHead)[lane] : make_int2(-1, -1);
        const int flags = head.y & (kLLWeighted | kLLSumOne);
        // (a source that sent the other kind of row: its bytes would be decoded as garbage; reported, not read)
        if (((head.y & kLLFp8) != 0) != (use_fp8 != 0)) {
            if (lane == 0) report_error(c.err, kOpLowLatencyKinds, s);
            continue;
        }
        // (inside the row whether or not sent: loaded with the entries, used only when weighted)
        const int wbits = lane < c.num_topk ? m[kLLMetaHead + 2 * c.num_topk + lane] : 0;
        const int t = head.x;
        const int n = t >= 0 && t < c.max_tokens ? min(head.y & (kLLWeighted - 1), c.num_topk) : 0;  // (bounded)
        int64_t o = -1;  // lane e < n: the output row of entry e, if this block writes its expert
        int k = 0;
        if (lane < n) {
            const int a = entry.x, j = entry.y;
            const int le = a / kWarp;
            k = a % kWarp;
            if (a >= 0 && le >= le0 && le < le0 + nle && k < c.num_topk) {
                const int seg = (le - le0) * N;
                // (a row past its (expert, source) count would be another's: never written, whatever a peer sent)
                if (j >= 0 && j < cnt[seg + s + 1] - cnt[seg + s])
                    o = static_cast<int64_t>(le) * rows + (cnt[seg + s] - cnt[seg]) + j;
            }
        }
        // packed: most rows have no entry for this block's expert; they are not read (a warp-uniform test)
        if (!__any_sync(0xffffffffu, o >= 0)) continue;
        if (v_lo < nvec) {
            if (!c.spread) ll_fan_prefetch(c, src, v_lo, v_hi, use_fp8, lane, val, sc);
            ll_fan_out_row(c, src, s, t, k, o, n, out_x, out_scales, src_info, meta, x_bytes, use_fp8, v_lo, v_hi,
                           lane, val, sc, row, flags, wbits, map);
        }
    }
    trace_mark(3);
    // padding: output rows past each expert's count (one thread per row of this block's share)
    const int pad_rows = nle * rows;
    const int tid = c.spread ? static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x) : static_cast<int>(threadIdx.x);
    const int threads = c.spread ? static_cast<int>(gridDim.x * blockDim.x) : static_cast<int>(blockDim.x);
    for (int r = tid; r < pad_rows; r += threads) {
        const int le = r / rows, i = r % rows;
        if (ok_all && i < cnt[(le + 1) * N] - cnt[le * N]) continue;
        const int64_t o = static_cast<int64_t>(le0 + le) * rows + i;
        src_info[2 * o] = -1;
        src_info[2 * o + 1] = -1;
        meta[o] = -1;
    }
    trace_mark(4);
    // Every block has read its rows: the slot buffer of this round is free for every source.
    if (last_block(c.block_counter + 1)) {
        trace_mark(5);
        for (int r = threadIdx.x; r < N; r += blockDim.x)
            ll_set_flag(c, r, ll_flag_index(c, kLLDispatchFree, slot_buf, me), seq);
        trace_mark(6);
        trace_print("dispatch_recv", 7, c.rank, total);
    }
}

__global__ void __launch_bounds__(kLLThreads) ll_dispatch_recv_kernel(LowLatencyCtx c, uint8_t* out_x,
                                                                      float* out_scales, int* out_count,
                                                                      int* src_info, int* meta, LLRowMap map,
                                                                      int use_fp8, const int64_t* handle_seq) {
    extern __shared__ int cnt[];
    ll_unpack(c, out_x, out_scales, out_count, src_info, meta, map, use_fp8, *handle_seq, cnt);
}

// Dispatch without a receive hook in one kernel (LARGEEP_TUNE ll_fuse=1; spread receive only): blocks [0,
// send_blocks) send as ll_dispatch_send_kernel, the last block to finish sending publishes the counts, then every
// block unpacks as the spread ll_dispatch_recv_kernel -- no kernel boundary between the two (the unpacking starts
// once this rank's counts are out, that is once every block has sent). The unpacking blocks wait for this grid's
// own last block, so the grid is launched cooperatively (all its blocks resident at once, or none started).
template <bool kWeights>
__global__ void __launch_bounds__(kLLThreads) ll_dispatch_fused_kernel(LowLatencyCtx c, const __nv_bfloat16* x,
                                                                       const int64_t* idx, const float* w,
                                                                       float* w_keep, int* ids_keep, int T,
                                                                       int use_fp8, int round_scale, int sum_one,
                                                                       int64_t* handle_seq,
                                                                       uint8_t* out_x, float* out_scales,
                                                                       int* out_count, int* src_info, int* meta,
                                                                       LLRowMap map, int send_blocks) {
    extern __shared__ int cnt[];
    const int64_t seq = c.seq[kSeqLowLatency] + 1;  // read by every block before the last one advances it
    const int slot_buf = static_cast<int>(seq & 1);
    int* counter = reinterpret_cast<int*>(c.base + c.off_counter);
    // (blocks past send_blocks have no token: they only wait for the slot buffer, as every block does)
    const bool ok_all = ll_send_tokens<kWeights>(c, x, idx, w, w_keep, ids_keep,
                                                 static_cast<int>(blockIdx.x) < send_blocks ? T : 0, use_fp8,
                                                 round_scale, sum_one, slot_buf, seq, counter, send_blocks);
    ll_publish_counts(c, counter, slot_buf, seq, ok_all, handle_seq);
    ll_unpack(c, out_x, out_scales, out_count, src_info, meta, map, use_fp8, seq, cnt);
}

// One warp, for entry `me` of received row g (rowmap: its n entries): piece `me` of n (over NVLink; for a put the
// whole of it, by entry 0) of the 16-byte vectors [v_lo, v_hi) of the weighted sum (float32) of the entries' rows,
// as two bf16 rows (rounding, remainder) into the source's combine buffer at [token][k0] and [token][k1], the slots
// of entries 0 and 1 (output rows o0, o1), or (the source asked for bf16 partial sums) as its rounding alone at
// [token][k0]: NVLink stores on this node, else staged in symmetric memory at o0's and o1's rows and put. Every load
// of a vector is issued before any is added (up to kLLMaxTopk entries at once).
// Entries naming no output row of this rank (a broken peer's data) add nothing; a row whose first two entries are
// not one token's copies (of a source rank: the handle of a dispatch captured in a CUDA graph and not yet replayed
// holds whatever its memory held) is not sent.
__device__ __forceinline__ void ll_combine_sum_row(const LowLatencyCtx& c, const __nv_bfloat16* y, const int* meta,
                                                   const int* rowmap, int slot_buf, int g, int me, int v_lo,
                                                   int v_hi, int lane) {
    const int N = c.num_ranks, H = c.hidden, M = c.max_tokens, K = c.num_topk;
    const int64_t rows = static_cast<int64_t>(c.num_experts / N) * N * M;
    const int stride = ll_rowmap_stride(c);
    const int4 ent = lane < stride ? reinterpret_cast<const int4*>(rowmap)[static_cast<int64_t>(g) * stride + lane]
                                   : make_int4(-1, 0, 0, 0);
    const int n = min(__shfl_sync(0xffffffffu, ent.z, 0), stride);
    const bool one = __shfl_sync(0xffffffffu, ent.w, 0) != 0;  // one bf16 row: the rounding alone
    const bool valid = lane < n && ent.x >= 0 && ent.x < rows;
    const int64_t o0 = __shfl_sync(0xffffffffu, valid ? ent.x : -1, 0);
    const int64_t o1 = __shfl_sync(0xffffffffu, valid ? ent.x : -1, 1);
    if (n < 2 || me >= n || o0 < 0 || o1 < 0) return;
    const int m0 = meta[o0], m1 = meta[o1];
    if (m0 < 0 || m1 < 0 || m0 / K != m1 / K || m0 / (M * K) >= N) return;
    const int s = m0 / (M * K);
    const bool near = same_node(c, s);
    // over NVLink the n entries' warps share the sum; a put goes whole (fewer, larger messages): entry 0 alone
    const int pieces = near ? n : 1;
    if (me >= pieces) return;
    const int p_lo = v_lo + static_cast<int>(static_cast<int64_t>(v_hi - v_lo) * me / pieces);
    const int p_hi = v_lo + static_cast<int>(static_cast<int64_t>(v_hi - v_lo) * (me + 1) / pieces);
    if (p_lo >= p_hi) return;
    const int64_t at0 = c.off_comb + (static_cast<int64_t>(slot_buf) * M * K + m0 % (M * K)) * c.comb_stride;
    const int64_t at1 = c.off_comb + (static_cast<int64_t>(slot_buf) * M * K + m1 % (M * K)) * c.comb_stride;
    uint8_t* dst0 = near ? ll_peer(c, s) + at0 : c.base + c.off_comb_send + o0 * c.comb_stride;
    uint8_t* dst1 = near ? ll_peer(c, s) + at1 : c.base + c.off_comb_send + o1 * c.comb_stride;
    const float wl = valid ? __int_as_float(ent.y) : 0.f;
    const int64_t ol = valid ? ent.x : o0;  // (an invalid entry reads row o0 with weight 0)
    for (int b = p_lo; b < p_hi; b += kWarp) {  // (warp-uniform bounds: the shuffles below)
        const int v = b + lane;
        const bool act = v < p_hi;
        float acc[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = 0.f;
        for (int e0 = 0; e0 < n; e0 += kLLMaxTopk) {
            int4 raw[kLLMaxTopk];
            float we[kLLMaxTopk];
#pragma unroll
            for (int u = 0; u < kLLMaxTopk; ++u) {
                const int e = e0 + u;
                const int64_t oe = __shfl_sync(0xffffffffu, ol, e & (kWarp - 1));
                we[u] = __shfl_sync(0xffffffffu, wl, e & (kWarp - 1));
                raw[u] = act && e < n ? ld_v4<1>(reinterpret_cast<const int4*>(y + oe * H) + v) : make_int4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < kLLMaxTopk; ++u)
                if (e0 + u < n) fma_bf16x8(acc, we[u], raw[u]);
        }
        if (!act) continue;
        if (one) {
            st_na_v4(reinterpret_cast<int4*>(dst0) + v, pack_bf16x8(acc));
            continue;
        }
        int4 hi, lo;
        split_bf16x8(acc, &hi, &lo);
        st_na_v4(reinterpret_cast<int4*>(dst0) + v, hi);
        st_na_v4(reinterpret_cast<int4*>(dst1) + v, lo);
    }
    if (near) return;
    __threadfence();
    __syncwarp();
    const int64_t bytes = 16ll * (p_hi - p_lo);
    nvshmemx_putmem_nbi_warp(c.base + at0 + 16ll * p_lo, dst0 + 16ll * p_lo, bytes, s);
    if (!one) nvshmemx_putmem_nbi_warp(c.base + at1 + 16ll * p_lo, dst1 + 16ll * p_lo, bytes, s);
}

// Row i of local expert le, 16-byte vectors [v_lo, v_hi), goes back to its source's combine buffer at [token][k]
// (one warp): an NVLink store on this node, else staged in symmetric memory and put. A row whose received row is
// summed here (map.lead) makes its piece of that sum instead.
__device__ __forceinline__ void ll_combine_row(const LowLatencyCtx& c, const __nv_bfloat16* y, const int* meta,
                                               const LLRowMap& map, int slot_buf, int le, int i, int v_lo, int v_hi,
                                               int lane) {
    const int N = c.num_ranks, H = c.hidden, M = c.max_tokens, K = c.num_topk;
    const int64_t o = static_cast<int64_t>(le) * N * M + i;
    const int m = meta[o];
    const int s = m / (M * K), tk = m % (M * K);
    if (m < 0 || s >= N) return;  // (bounded: no real row of a source; only a receive that went wrong leaves one)
    const int lead = map.lead[o];
    // (bounded: a receive that gave up leaves lead undefined)
    if (lead >= 0 && lead / kWarp < N * M && lead % kWarp < K) {
        ll_combine_sum_row(c, y, meta, map.rowmap, slot_buf, lead / kWarp, lead % kWarp, v_lo, v_hi, lane);
        return;
    }
    const int64_t at = c.off_comb + (static_cast<int64_t>(slot_buf) * M * K + tk) * c.comb_stride + 16ll * v_lo;
    const int4* src = reinterpret_cast<const int4*>(y + o * H) + v_lo;
    const int64_t bytes = 16ll * (v_hi - v_lo);
    if (same_node(c, s)) {
        warp_copy<0, 4>(reinterpret_cast<int4*>(ll_peer(c, s) + at), src, bytes, lane);
    } else {
        uint8_t* staged = c.base + c.off_comb_send + o * c.comb_stride + 16ll * v_lo;
        warp_copy<0, 4>(reinterpret_cast<int4*>(staged), src, bytes, lane);
        __threadfence();
        __syncwarp();
        nvshmemx_putmem_nbi_warp(c.base + at, staged, bytes, s);
    }
}

// Combine send. Packed (LARGEEP_TUNE ll_spread=0): block le sends the rows of local expert le, one warp per row.
// Spread (default): every block lays the rows of all local experts end to end (a prefix sum of the counts in shared
// memory, `pref`, E/N + 1 ints) and cuts each row into `parts` column slices, so that every warp of the grid takes
// an equal share however the rows fall on the experts.
// Each expert's count is bounded by its N*M output rows: count is a tensor of the handle, which the caller may have
// changed in place, or which a dispatch captured in a CUDA graph and not yet replayed never wrote.
// (the body, for round seq: the send kernel, or the fused combine before its sums; pref: dynamic shared memory)
__device__ __forceinline__ void ll_combine_send_body(const LowLatencyCtx& c, const __nv_bfloat16* y, const int* count,
                                                     const int* meta, const LLRowMap& map, int64_t* handle_seq,
                                                     const int64_t* dispatch_seq, int64_t seq, int* pref) {
    const int N = c.num_ranks, me = c.rank, epr = c.num_experts / N, nvec = c.hidden / 8;
    const int rows = N * c.max_tokens;  // an expert's output rows
    const int slot_buf = static_cast<int>(seq & 1);
    trace_mark(0);
    const bool ok_all = ll_block_wait(c, kLLCombineFree, slot_buf, seq - 2, kOpLowLatencyCombine);
    trace_mark(1);
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    if (ok_all && !c.spread) {
        const int le = blockIdx.x, n = min(max(count[le], 0), rows);
        for (int i = warp; i < n; i += kLLWarps) ll_combine_row(c, y, meta, map, slot_buf, le, i, 0, nvec, lane);
    } else if (ok_all) {
        for (int i = threadIdx.x; i < epr; i += blockDim.x) pref[i + 1] = min(max(count[i], 0), rows);
        __syncthreads();
        if (warp == 0) {
            warp_prefix_inplace(pref + 1, epr, lane);
            if (lane == 0) pref[0] = 0;
        }
        __syncthreads();
        trace_mark(2);
        const int total = pref[epr], warps = static_cast<int>(gridDim.x) * kLLWarps;
        const int parts = max(1, min(4, warps / max(1, total)));
        const int per = (nvec + parts - 1) / parts;
        for (int g = blockIdx.x * kLLWarps + warp; g < total * parts; g += warps) {
            const int row = g / parts, part = g % parts;
            const int lo = segment_of(pref, epr, row);  // the expert whose rows hold `row`
            const int v_lo = part * per;
            if (v_lo < nvec)
                ll_combine_row(c, y, meta, map, slot_buf, lo, row - pref[lo], v_lo, min(nvec, v_lo + per), lane);
        }
    }
    trace_mark(3);
    if (c.ranks_per_node < N) nvshmem_quiet();  // this thread's puts have landed
    trace_mark(4);
    // (block-uniform branch; last_block's barrier and fence order every block's rows before the done flags)
    if (last_block(c.block_counter + 2)) {
        trace_mark(5);
        // no done flags once an error was reported (a block that gave up skipped its rows): peers time out instead
        // of summing what the slot held before; read once, so that every peer gets its flag or none does
        __shared__ int s_done;
        if (threadIdx.x == 0) s_done = !has_error(c.err);
        __syncthreads();
        const int64_t done = seq * kLLTagSpan + ll_handle_tag(dispatch_seq);
        for (int r = threadIdx.x; r < N && s_done; r += blockDim.x)
            ll_set_flag(c, r, ll_flag_index(c, kLLCombineDone, slot_buf, me), done);
        if (threadIdx.x == 0) {
            c.seq[kSeqLowLatency + 1] = seq;
            *handle_seq = seq;
        }
        trace_mark(6);
        trace_print("combine_send", 7, c.rank, -1);
    }
}

__global__ void __launch_bounds__(kLLThreads) ll_combine_send_kernel(LowLatencyCtx c, const __nv_bfloat16* y,
                                                                     const int* count, const int* meta, LLRowMap map,
                                                                     int64_t* handle_seq, const int64_t* dispatch_seq) {
    extern __shared__ int pref[];
    ll_combine_send_body(c, y, count, meta, map, handle_seq, dispatch_seq, c.seq[kSeqLowLatency + 1] + 1, pref);
}

// One warp per token: out[t] = sum_k w[t, k] * comb[t][k'] over the k that the dispatch sent (ids_sent [T, K], the ids
// its send kept: in [0, E)) and that idx[t, k] (the combine's ids) still names (in [0, E)), in float32, where k' is
// the first k whose sent id is the same expert (the copy the dispatch sent; equal to k for distinct ids). Which
// copies exist comes from the dispatch alone: a k the combine names but the dispatch did not send has no row this
// round (its slot holds an earlier round's), and the combine's ids only mask. kMerged (this rank's dispatch sent its
// weights; 1: sums as two rows, 2: as one bf16 row): where t has two or more experts on one rank, that rank sent
// their weighted sum in the rows of its first two copies (2: of its first copy), each added with weight 1, and its
// other k add nothing; such a sum cannot be masked, so idx is not read (the Buffer refuses ids other than the
// dispatch's) and the sum is over every k sent.
// One warp per (token, slice of the hidden dimension): `slices` warps share a token so that enough loads are in
// flight when there are few tokens. (The body, for round seq: the receive kernel, or the fused combine.)
template <int kMerged>
__device__ __forceinline__ void ll_combine_sum(const LowLatencyCtx& c, const int* ids_sent, const int64_t* idx,
                                               const float* w, __nv_bfloat16* out, int T, int slices, int64_t seq,
                                               int64_t tag) {
    const int N = c.num_ranks, me = c.rank, H = c.hidden, M = c.max_tokens, K = c.num_topk;
    const int slot_buf = static_cast<int>(seq & 1);
    trace_mark(0);
    const bool ok_all = ll_block_wait(c, kLLCombineDone, slot_buf, seq * kLLTagSpan, kOpLowLatencyCombine, tag);
    trace_mark(1);
    if (ok_all) {
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
        const int nvec = H / 8;
        const uint8_t* comb = c.base + c.off_comb + static_cast<int64_t>(slot_buf) * M * K * c.comb_stride;
        for (int g = blockIdx.x * kLLWarps + warp; g < T * slices; g += gridDim.x * kLLWarps) {
            const int t = g / slices, v0 = (g % slices) * kWarp + lane, step = slices * kWarp;
            // lane k < K holds (expert id sent, weight) of copy k; the warp shares which copies exist
            const int e = lane < K ? ids_sent[static_cast<int64_t>(t) * K + lane] : -1;
            float wl = lane < K ? w[static_cast<int64_t>(t) * K + lane] : 0.f;
            // (bounded: the kept ids of a dispatch captured in a CUDA graph and not yet replayed were never written)
            unsigned present = __ballot_sync(0xffffffffu, e >= 0 && e < c.num_experts);
            // the copy holding this k's expert output: the first k naming the same expert
            int from = __ffs(__match_any_sync(0xffffffffu, e)) - 1;
            if (!kMerged) {
                // (an id the combine names >= E adds nothing, as in the torch backend)
                const int64_t ec = lane < K ? idx[static_cast<int64_t>(t) * K + lane] : -1;
                present &= __ballot_sync(0xffffffffu, ec >= 0 && ec < c.num_experts);
            } else {
                int r = (present >> lane) & 1u ? e / (c.num_experts / N) : -1;
                // the copies sent (the first k of each expert) to this k's rank
                const unsigned sent = __ballot_sync(0xffffffffu, r >= 0 && from == lane);
                const unsigned same = __match_any_sync(0xffffffffu, r) & sent;
                if (r >= 0 && __popc(same) >= 2) {
                    const int k0 = __ffs(same) - 1, k1 = __ffs(same & (same - 1)) - 1;
                    wl = 1.f;
                    from = lane;
                    if (lane != k0 && (kMerged == 2 || lane != k1)) r = -1;  // in the sum
                }
                present &= __ballot_sync(0xffffffffu, r >= 0);
            }
            const uint8_t* rows = comb + static_cast<int64_t>(t) * K * c.comb_stride;
            int4* dst = reinterpret_cast<int4*>(out + static_cast<int64_t>(t) * H);
            if (K <= kLLMaxTopk) {
                // every copy's 16 bytes are loaded before any is added: K loads in flight per lane
                float wk[kLLMaxTopk];
                int fk[kLLMaxTopk];
#pragma unroll
                for (int k = 0; k < kLLMaxTopk; ++k) {
                    wk[k] = __shfl_sync(0xffffffffu, wl, k);
                    fk[k] = __shfl_sync(0xffffffffu, from, k);
                }
                for (int v = v0; v < nvec; v += step) {
                    int4 raw[kLLMaxTopk];
#pragma unroll
                    for (int k = 0; k < kLLMaxTopk; ++k)
                        if ((present >> k) & 1u)
                            raw[k] = ld_v4<1>(
                                reinterpret_cast<const int4*>(rows + static_cast<int64_t>(fk[k]) * c.comb_stride) + v);
                    float acc[8];
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
#pragma unroll
                    for (int k = 0; k < kLLMaxTopk; ++k)
                        if ((present >> k) & 1u) fma_bf16x8(acc, wk[k], raw[k]);
                    dst[v] = pack_bf16x8(acc);
                }
            } else {
                for (int v = v0; v < nvec; v += step) {
                    float acc[8];
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
                    for (int k = 0; k < K; ++k) {
                        const int fk = __shfl_sync(0xffffffffu, from, k);  // (every lane: before the branch)
                        const float wk = __shfl_sync(0xffffffffu, wl, k);
                        if (!((present >> k) & 1u)) continue;
                        const int4* src =
                            reinterpret_cast<const int4*>(rows + static_cast<int64_t>(fk) * c.comb_stride);
                        fma_bf16x8(acc, wk, ld_v4<1>(src + v));
                    }
                    dst[v] = pack_bf16x8(acc);
                }
            }
        }
    }
    trace_mark(2);
    if (last_block(c.block_counter + 3)) {
        trace_mark(3);
        for (int r = threadIdx.x; r < N; r += blockDim.x)
            ll_set_flag(c, r, ll_flag_index(c, kLLCombineFree, slot_buf, me), seq);
        trace_mark(4);
        trace_print("combine_recv", 5, c.rank, T);
    }
}

template <int kMerged>
__global__ void __launch_bounds__(kLLThreads) ll_combine_recv_kernel(LowLatencyCtx c, const int* ids_sent,
                                                                     const int64_t* idx, const float* w,
                                                                     __nv_bfloat16* out, int T, int slices,
                                                                     const int64_t* handle_seq,
                                                                     const int64_t* dispatch_seq) {
    ll_combine_sum<kMerged>(c, ids_sent, idx, w, out, T, slices, *handle_seq, ll_handle_tag(dispatch_seq));
}

// Combine without a receive hook in one kernel (LARGEEP_TUNE ll_fuse=1; spread send only): every block sends as the
// spread ll_combine_send_kernel, the last one raises the done flags, then every block sums as
// ll_combine_recv_kernel. Launched cooperatively, as the fused dispatch.
template <int kMerged>
__global__ void __launch_bounds__(kLLThreads) ll_combine_fused_kernel(LowLatencyCtx c, const __nv_bfloat16* y,
                                                                      const int* count, const int* meta,
                                                                      LLRowMap map, int64_t* handle_seq,
                                                                      const int64_t* dispatch_seq,
                                                                      const int* ids_sent, const int64_t* idx,
                                                                      const float* w, __nv_bfloat16* out, int T,
                                                                      int slices) {
    extern __shared__ int pref[];
    const int64_t seq = c.seq[kSeqLowLatency + 1] + 1;  // read by every block before the last one advances it
    ll_combine_send_body(c, y, count, meta, map, handle_seq, dispatch_seq, seq, pref);
    ll_combine_sum<kMerged>(c, ids_sent, idx, w, out, T, slices, seq, ll_handle_tag(dispatch_seq));
}

}  // namespace

LowLatencyLayout low_latency_layout(int N, int E, int K, int H, int M, int P) {
    HOST_ASSERT(N > 0 && P > 0 && E % N == 0, "bad low-latency layout sizes (ranks " << N << ", per node " << P
                << ", experts " << E << ")");
    LowLatencyLayout l{};
    int64_t off = 0;
    auto take = [&off](int64_t bytes) {
        const int64_t at = off;
        off += (bytes + 255) / 256 * 256;
        return at;
    };
    const int epr = E / N;
    l.off_scales_in_row = align16(static_cast<int64_t>(H) * 2);
    l.off_meta_in_row = l.off_scales_in_row + align16(static_cast<int64_t>(H / 128) * 4);
    // token, n, n entries (n <= K), n weights
    l.recv_stride = l.off_meta_in_row + align16(4ll * (kLLMetaHead + 3 * K));
    l.comb_stride = align16(static_cast<int64_t>(H) * 2);
    l.off_flags = take(8ll * kLLFlagKinds * 2 * static_cast<int64_t>(epr) * N);
    l.off_counter = take(4ll * (N * epr + N));
    l.off_recv = take(l.recv_stride * 2 * static_cast<int64_t>(N) * M);
    l.off_comb = take(l.comb_stride * 2 * static_cast<int64_t>(M) * K);
    // Staging for the put path, only when some peers are on other nodes: dispatch rows [M * K], combine rows
    // [E/N * N * M] (the source of a put must be symmetric memory for every transport).
    const bool puts = P < N;
    l.off_send = take(puts ? l.recv_stride * static_cast<int64_t>(M) * K : 0);
    l.off_comb_send = take(puts ? l.comb_stride * epr * static_cast<int64_t>(N) * M : 0);
    l.total_bytes = off;
    return l;
}

namespace {
// Launch geometry shared by the two-kernel and the fused paths.
int ll_epr(const LowLatencyCtx& c) { return c.num_experts / c.num_ranks; }
// Blocks of the spread dispatch receive and combine send: enough for every (token, expert) copy a rank can hold
// (N * M * K at most), two slices each, at most one wave.
int spread_blocks(const LowLatencyCtx& c) {
    return std::min(c.device_sms,
                    std::max(1, ceil_div(2ll * c.num_ranks * c.max_tokens * c.num_topk, kLLWarps)));
}
// Dynamic shared memory of the dispatch receive (spread: every (expert, source) count word; packed: one expert's N)
// and the N row counts, and of the combine send (every expert's count), each a prefix sum of that many ints + 1.
size_t unpack_smem(const LowLatencyCtx& c, bool spread) {
    return sizeof(int) * ((spread ? static_cast<size_t>(ll_epr(c)) : 1) * c.num_ranks + 1 + c.num_ranks + 1);
}
size_t combine_send_smem(const LowLatencyCtx& c) { return sizeof(int) * (static_cast<size_t>(ll_epr(c)) + 1); }
// The combine receive's warps per token: about 1024 warps in all when tokens are few (spread: every warp of one
// wave), at most 8 (16) per token; and its blocks.
int combine_slices(const LowLatencyCtx& c, int num_tokens) {
    return c.spread ? std::max(1, std::min(16, ceil_div(c.device_sms * kLLWarps, std::max(1, num_tokens))))
                    : std::max(1, std::min(8, 1024 / std::max(1, num_tokens)));
}
int sum_blocks(const LowLatencyCtx& c, int num_tokens, int slices) {
    return std::min(std::max(1, ceil_div(static_cast<int64_t>(num_tokens) * slices, kLLWarps)), c.device_sms);
}
void check_rowmap(const int* rowmap) {
    HOST_ASSERT(reinterpret_cast<uintptr_t>(rowmap) % 16 == 0, "the handle's rowmap must be 16-byte aligned");
}
void check_send(const LowLatencyCtx& c, bool use_fp8, const float* topk_weights, const float* weights_kept,
                const int* ids_kept, int num_tokens) {
    HOST_ASSERT(c.hidden % 128 == 0 || !use_fp8, "FP8 needs hidden % 128 == 0");
    HOST_ASSERT(topk_weights == nullptr || weights_kept != nullptr, "weights sent need their copy");
    HOST_ASSERT(num_tokens == 0 || ids_kept != nullptr, "the ids sent need their copy");
    HOST_ASSERT(c.hidden % 8 == 0, "hidden must be a multiple of 8");
    HOST_ASSERT(c.num_ranks <= kLLMaxRanks, "at most " << kLLMaxRanks << " ranks in low-latency mode");
    HOST_ASSERT(c.num_topk <= kWarp, "num_topk must be <= 32");
}

// Launches `kernel` cooperatively (every block resident at once, or the launch waits; capturable in a CUDA graph)
// when `grid` blocks of kLLThreads threads and `smem` bytes fit the GPU at once; false, launching nothing, otherwise,
// and also when the driver refuses the launch as too large although the occupancy says it fits (under MPS a
// process may get fewer SMs than the device has): the caller then takes its two-kernel path.
template <typename... Params, typename... Args>
bool launch_resident(void (*kernel)(Params...), int grid, int sms, size_t smem, cudaStream_t stream, Args... args) {
    int per_sm = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kLLThreads, smem));
    if (grid > per_sm * sms) return false;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(kLLThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
    if (err == cudaErrorCooperativeLaunchTooLarge) {
        (void)cudaGetLastError();  // (the refused launch set the last error: the next LAUNCH_CHECK would take it)
        return false;
    }
    CUDA_CHECK(err);
    return true;
}
}  // namespace

void launch_ll_dispatch_send(const LowLatencyCtx& c, const void* x, const int64_t* topk_idx,
                             const float* topk_weights, float* weights_kept, int* ids_kept, int num_tokens,
                             bool use_fp8, bool round_scale, bool sum_one, int64_t* handle_seq, cudaStream_t stream) {
    check_send(c, use_fp8, topk_weights, weights_kept, ids_kept, num_tokens);
    const int grid = std::min(std::max(1, num_tokens), 2 * c.device_sms);  // one token per block at a time
    auto* kernel = topk_weights != nullptr ? ll_dispatch_send_kernel<true> : ll_dispatch_send_kernel<false>;
    kernel<<<grid, kTokThreads, 0, stream>>>(c, static_cast<const __nv_bfloat16*>(x), topk_idx, topk_weights,
                                             weights_kept, ids_kept, num_tokens, use_fp8 ? 1 : 0,
                                             round_scale ? 1 : 0, sum_one ? 1 : 0, handle_seq);
    LAUNCH_CHECK();
}

bool launch_ll_dispatch_fused(const LowLatencyCtx& c, const void* x, const int64_t* topk_idx,
                              const float* topk_weights, float* weights_kept, int* ids_kept, int num_tokens,
                              bool use_fp8, bool round_scale, bool sum_one, int64_t* handle_seq, void* out_x,
                              float* out_scales, int* out_count, int* src_info, int* meta, int* lead, int* rowmap,
                              cudaStream_t stream) {
    check_rowmap(rowmap);
    // the caller sends, then receives: the per-expert receive, or too many count words
    const size_t smem = unpack_smem(c, true);
    if (!c.spread || smem > kLLMaxDynSmem) return false;
    check_send(c, use_fp8, topk_weights, weights_kept, ids_kept, num_tokens);
    const int send_blocks = std::min(std::max(1, num_tokens), c.device_sms);
    auto* kernel = topk_weights != nullptr ? ll_dispatch_fused_kernel<true> : ll_dispatch_fused_kernel<false>;
    return launch_resident(kernel, std::max(send_blocks, spread_blocks(c)), c.device_sms, smem,
                           stream, c, static_cast<const __nv_bfloat16*>(x), topk_idx, topk_weights, weights_kept,
                           ids_kept, num_tokens, use_fp8 ? 1 : 0, round_scale ? 1 : 0, sum_one ? 1 : 0, handle_seq,
                           static_cast<uint8_t*>(out_x), out_scales, out_count, src_info, meta,
                           LLRowMap{lead, rowmap}, send_blocks);
}

void launch_ll_dispatch_recv(const LowLatencyCtx& c, void* out_x, float* out_scales, int* out_count, int* src_info,
                             int* meta, int* lead, int* rowmap, bool use_fp8, const int64_t* handle_seq,
                             cudaStream_t stream) {
    check_rowmap(rowmap);
    // spread: one wave of blocks (at most one per SM) sharing every expert's rows, while the count words of every
    // (expert, source) fit in shared memory; packed: one block per expert
    LowLatencyCtx k = c;
    k.spread = c.spread && unpack_smem(c, true) <= kLLMaxDynSmem;
    const size_t smem = unpack_smem(c, k.spread != 0);
    ll_dispatch_recv_kernel<<<k.spread ? spread_blocks(c) : ll_epr(c), kLLThreads, smem, stream>>>(
        k, static_cast<uint8_t*>(out_x), out_scales, out_count, src_info, meta, LLRowMap{lead, rowmap},
        use_fp8 ? 1 : 0, handle_seq);
    LAUNCH_CHECK();
}

void launch_ll_combine_send(const LowLatencyCtx& c, const void* y, const int* count, const int* meta,
                            const int* lead, const int* rowmap, int64_t* handle_seq, const int64_t* dispatch_seq,
                            cudaStream_t stream) {
    check_rowmap(rowmap);
    // spread while the per-expert counts fit in shared memory; packed: one block per expert
    LowLatencyCtx k = c;
    k.spread = c.spread && combine_send_smem(c) <= kLLMaxDynSmem;
    ll_combine_send_kernel<<<k.spread ? spread_blocks(c) : ll_epr(c), kLLThreads,
                             k.spread ? combine_send_smem(c) : 0, stream>>>(
        k, static_cast<const __nv_bfloat16*>(y), count, meta,
        LLRowMap{const_cast<int*>(lead), const_cast<int*>(rowmap)}, handle_seq, dispatch_seq);
    LAUNCH_CHECK();
}

bool launch_ll_combine_fused(const LowLatencyCtx& c, const void* y, const int* count, const int* meta,
                             const int* lead, const int* rowmap, int64_t* handle_seq, const int64_t* dispatch_seq,
                             const int* ids_sent, const int64_t* topk_idx, const float* topk_weights, void* out,
                             int num_tokens, int merged, cudaStream_t stream) {
    check_rowmap(rowmap);
    HOST_ASSERT(num_tokens == 0 || ids_sent != nullptr, "the combine needs the ids its dispatch sent");
    const size_t smem = combine_send_smem(c);
    if (!c.spread || smem > kLLMaxDynSmem) return false;  // the caller sends, then sums
    const int slices = combine_slices(c, num_tokens);
    auto* kernel = merged == 2 ? ll_combine_fused_kernel<2>
                   : merged == 1 ? ll_combine_fused_kernel<1> : ll_combine_fused_kernel<0>;
    return launch_resident(kernel, std::max(spread_blocks(c), sum_blocks(c, num_tokens, slices)), c.device_sms, smem,
                           stream, c, static_cast<const __nv_bfloat16*>(y), count, meta,
                           LLRowMap{const_cast<int*>(lead), const_cast<int*>(rowmap)}, handle_seq, dispatch_seq,
                           ids_sent, topk_idx, topk_weights, static_cast<__nv_bfloat16*>(out), num_tokens, slices);
}

void launch_ll_combine_recv(const LowLatencyCtx& c, const int* ids_sent, const int64_t* topk_idx,
                            const float* topk_weights, void* out, int num_tokens, int merged,
                            const int64_t* handle_seq, const int64_t* dispatch_seq, cudaStream_t stream) {
    HOST_ASSERT(num_tokens == 0 || ids_sent != nullptr, "the combine needs the ids its dispatch sent");
    const int slices = combine_slices(c, num_tokens);
    auto* kernel = merged == 2 ? ll_combine_recv_kernel<2>
                   : merged == 1 ? ll_combine_recv_kernel<1> : ll_combine_recv_kernel<0>;
    kernel<<<sum_blocks(c, num_tokens, slices), kLLThreads, 0, stream>>>(
        c, ids_sent, topk_idx, topk_weights, static_cast<__nv_bfloat16*>(out), num_tokens, slices, handle_seq,
        dispatch_seq);
    LAUNCH_CHECK();
}

}  // namespace largeep
