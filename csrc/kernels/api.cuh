// Launchers of every kernel family. Plain types only: pointers, sizes, a context struct, a cudaStream_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace largeep {

// ---- status area: host-mapped int64 words, one area per Buffer ------------------------------------------------
// [0] ready sequence (the notify kernel stores the dispatch sequence once counts are in)
// [1] error: 0, or op * 65536 + (waited rank + 1); first error wins
// [2] rows this rank receives (normal dispatch)
// [3] how many ranks refused this round's normal dispatch (their prepare found an expert id outside [-1, E)), plus
//     kRanksDisagree if the ranks sent rows of different kinds (see kRowKind); written by a reporting notify before
//     [0]; nonzero means the round was void on every rank
// [4 .. 4 + E/N) rows naming each local expert (normal dispatch)
// [4 + E/N .. + kLayoutCheckWords) the expert-id check's report (see publish_id_check)
// [kRefusedRanks(E/N) + r], r < N: written for every rank r in a void round, before [0]: bit 0 set if r refused it,
//     bit 1 if r ran it without a host wait (num_worst_tokens), so that r's Buffer is unusable now; bits 2-4 the
//     kind of rows r sent (kRowKind)
// [kRecvCounts(E/N, N) + s], s < N: rows from source s this round (a reporting notify, before [0])
enum StatusWord { kReadySeq = 0, kError = 1, kNumRecv = 2, kRefused = 3, kPerExpert = 4 };
constexpr int kRanksDisagree = 1 << 20;
// The kind of rows a fresh normal dispatch sends, which every rank must share: bits 0-1 the element size (0: 1
// byte, 1: 2 bytes, 2: 4 bytes), bit 2 set for rows with FP8 scales.
__host__ __device__ constexpr int kRowKind(int x_elem_bytes, bool has_scales) {
    return (x_elem_bytes == 1 ? 0 : x_elem_bytes == 2 ? 1 : 2) | (has_scales ? 4 : 0);
}
constexpr int kLayoutCheckWords = 3;
__host__ __device__ constexpr int kRefusedRanks(int experts_per_rank) {
    return kPerExpert + experts_per_rank + kLayoutCheckWords;
}
// [kRecvCounts(E/N, N) + s], s < N: rows this rank receives from source s (a reporting notify, before [0]), which
// the copy-engine combine sizes its copies with
__host__ __device__ constexpr int kRecvCounts(int experts_per_rank, int num_ranks) {
    return kRefusedRanks(experts_per_rank) + num_ranks;
}
enum Op {
    kOpLayout = 1,  // (no longer reported: an unchecked layout counts an id out of range nowhere)
    kOpDispatch = 2,
    kOpDispatchNotify = 3,
    kOpCombine = 4,
    kOpCombineReduce = 5,
    kOpLowLatencyDispatch = 6,
    kOpLowLatencyCombine = 7,
    kOpWorstTooSmall = 8,  // a num_worst_tokens dispatch received more rows than its output holds (not a timeout)
    kOpPeerRefused = 9,    // a rank refused the round of a num_worst_tokens dispatch, which has no host wait to raise
                           // from (rank field: the lowest refusing rank; not a timeout)
    kOpRanksDisagree = 10,  // the ranks sent rows of different kinds in a round this rank ran with num_worst_tokens
                            // (rank field: the lowest rank whose kind differs from this rank's; not a timeout)
    kOpLowLatencyKinds = 11,  // a low-latency dispatch received rows of the other kind (FP8 or BF16: use_fp8) than
                              // this rank's (rank field: a source that sent them; not a timeout)
    kOpLowLatencyCounter = 12,  // a low-latency dispatch send found a row counter at max_tokens already: not cleared
                                // after the dispatch before it (rank field: the destination; not a timeout)
    kOpLowLatencyRound = 13,  // a low-latency dispatch receive found, under a source's rows word of this round, a
                              // count word of another round (rank field: that source; not a timeout)
    kOpPrepare = 14,  // the blocks of one dispatch's prepare kernel did not meet: two dispatches of the Buffer ran at
                      // once, or a block waited past the timeout for another (rank field: this rank)
    kOpDispatchRows = 15,  // a dispatch's copy-out waited past the timeout for a source's rows (rank field: the
                           // source; a source on another node sends them through its RDMA peer on this node)
    // (16: the host's, for a call that left its round open)
    kOpDispatchKinds = 17,  // a dispatch received rows of another kind (kRowKind) than this rank's: ranks that differ
                            // in a cached dispatch, which has no count exchange (rank field: the sender, whose kind
                            // a forwarder passes on only where it is its own; not a timeout)
    kOpCombineKinds = 18,   // a combine received rows of another kind (y's dtype, weights or not, bf16 partials or
                            // not) than this rank's
                            // (rank field: the sender; not a timeout)
    kOpDispatchForwardKinds = 19,  // the rank of this node that forwards a source's rows found rows of another kind,
                                   // or another handle's, than its own in this dispatch (rank field: the source; not a
                                   // timeout)
    kOpCombineForwardKinds = 20,   // the rank of another node that sums its node's rows for this rank found rows of
                                   // another kind, or another handle's, there (rank field: that rank; not a timeout)
    kOpDispatchHandles = 21,  // a cached dispatch received rows sent with the handle of another dispatch than this
                              // rank's (the handles' tags differ: see launch_dispatch_notify) (rank field: the
                              // sender; not a timeout)
    kOpCombineHandles = 22,   // ... a combine (rank field: the sender; not a timeout)
    kOpLowLatencyHandles = 23,  // a low-latency combine got rows a peer sent with the handle of another dispatch than
                                // this rank's (the done flag's tag: low_latency.cu) (rank field: the sender; not a
                                // timeout)
};

// ---- flags: int64 words in the symmetric heap, [kind][rank] --------------------------------------------------
enum FlagKind {
    kFlagCounts = 0,     // rank s -> me: its count rows for this dispatch round are in my in_counts / matrix
    // (the data flags kFlagRows, kFlagCombReady, kFlagRdmaRows and kFlagCombRdma hold the round and the sender's
    // call signature, its kind of rows and its handle's tag: normal.cuh's data_flag)
    kFlagRows = 1,       // [s] all rows of source s of round `seq` are in my receive buffer (set by s, or by the
                         //     rank of my node that forwards s's rows when s is on another node)
    kFlagRecvFree = 2,   // rank r -> me: r copied out round `seq`; its counts and receive buffers may be reused
    kFlagCombReady = 3,  // rank r of my node -> me: r finished pushing its combine rows of round `seq` to me
    kFlagCombFree = 4,   // rank s -> me: s finished reducing round `seq`; I may write into s's buffers again
    kFlagRdmaRows = 5,   // RDMA peer s -> me: its rows of round `seq` for my node are in my rdma_recv
    kFlagCombRdma = 6,   // RDMA peer f -> me: its partial sums of round `seq` are in my comb_rdma
    kNumFlagKinds = 7,
};

// Where kernels record the first error (op * 65536 + waited rank + 1): `dev`, a word in device memory that every
// wait loop polls (cheap), then the host-mapped status area (`host`, status[kError]) for the host to read. Polling
// the host-mapped word instead costs a PCIe round trip per read, which serialises across blocks.
struct ErrorWord {
    int64_t* dev;
    int64_t* host;  // the status area (device pointer of the host mapping)
};

// Device-side sequence counters (cudaMalloc'd int64 [5]); each op reads seq+1 and its last kernel stores it.
// [kRoundVoid] (normal mode) is not a counter: nonzero while the fresh dispatch round in progress is void because
// a rank refused its expert ids, or the ranks' kinds of rows differ. Prepare stores whether I refuse, notify
// whether the round is void (from the count exchange); the sending kernels then move no row, and the copy-out
// clears it.
enum SeqKind { kSeqDispatch = 0, kSeqCombine = 1, kSeqLowLatency = 2, kRoundVoid = 4 };

// Everything a normal-mode kernel needs to find its buffers. Ranks form nodes of P = ranks_per_node consecutive
// ranks (M = N / P nodes); a rank's RDMA peers are the ranks of other nodes with its local index. Regions of the
// symmetric allocation (per rank):
//   flags      int64 [kNumFlagKinds][N]        written by peers (release / signal), read here (acquire)
//   in_counts  int32 [N][3 + E/N]              row s written by rank s: rows s->me, rows per local expert, rows
//                                              s->my node (tokens counted once per node), the receive slot s
//                                              takes this round
//   out_counts int32 [N][3 + E/N]              my count row for each destination (prepare and notify kernels)
//   matrix     int32 [N][N]                    row s written by rank s: rows s sends to each rank
//   recv       slot 0: the copy slot           rows for me, in SPEC order, as planes of rows [N*max_tokens]:
//                                              token int32 | local expert ids int64 [K] | weights float [K] |
//                                              scales float [H/128] | x (H * 4 bytes a row, any input dtype)
//   comb       bytes [P][max_tokens][comb_stride]  combine rows pushed by rank l of my node for its j-th row from me
//   comb_w     float [P][max_tokens][K]        combine weights, same indexing
//   zc         slots 1..num_zc_slots           zero-copy receive slots: the copy slot's planes with 2-byte x rows;
//                                              the dispatch outputs are views of them (no copy-out), and a slot
//                                              stays the caller's until those tensors die (bindings.cpp: Lease)
// Several nodes only:
//   rdma_send  bytes [M][max_tokens][rdma_stride]  staged rows for node m: x | scales | global expert ids |
//                                              weights | token (at recv_off_*; recv_stride bytes) | positions
//                                              int32 [P] in the list of each rank of node m (-1: not sent)
//   rdma_recv  bytes [M][max_tokens][rdma_stride]  rows from my RDMA peer on node m, to forward
//   fwd_comb   bytes [P][M][max_tokens][pcomb_stride]  combine rows of my node's rank l for tokens of my RDMA peer on
//                                              node m: row (y dtype) | weights float [K] at comb_stride
//   comb_send  bytes [M][max_tokens][pcomb_stride]  staged partial sums for my RDMA peer on node m: float32 row |
//                                              weights at comb_stride, or (bf16 partials) bf16 row | weights
//                                              right after it (normal.cuh's part_w_off)
//   comb_rdma  bytes [M][max_tokens][pcomb_stride]  partial sums from my RDMA peer on node m, as in comb_send
// Normal-mode group sizes (MAX_RANKS_NORMAL, MAX_NODES_NORMAL, MAX_RANKS_PER_NODE_NORMAL in the Python backend):
// a thread per rank in the waits and the count exchange (so a copy kernel's NormalCtx::threads must exceed the
// rank count; the reductions have 512, the notify 1024), a lane per node in the per-token loops over nodes (groups
// of more than 32 nodes take them 32 at a time), and a lane per rank of the node in the per-token loops over those
// (the pushes, the forward, the reductions).
constexpr int kNormalMaxRanks = 512;
constexpr int kNormalMaxNodes = 64;
constexpr int kNormalMaxLocal = 32;

// Device scratch of the normal dispatch's prepare kernel when it runs several blocks per target (intranode.cu):
// zero when the Buffer is made; every call leaves ticket and bad zero (gen, the last launch's number, only grows;
// agg, rows and hist keep the last launch's values, which a later launch's numbers tell apart).
constexpr int kPrepMaxTargets = 128;  // ranks, plus nodes in groups of several nodes
constexpr int kPrepMaxChunks = 32;    // blocks per target
struct PrepScratch {
    int64_t* gen;     // [1]
    int64_t* bad;     // [2]: the id check's lowest id below -1 and highest id >= E over the chunks
    int* ticket;      // [kPrepMaxTargets]: chunks taken
    int64_t* agg;     // [kPrepMaxTargets][kPrepMaxChunks]: the launch whose chunk total is in rows (released)
    int* rows;        // [kPrepMaxTargets][kPrepMaxChunks]: the chunk's rows
    int* hist;        // [N][kPrepMaxChunks][E/N]: each chunk's rows per expert
};
// The int64 words a PrepScratch needs (prep_scratch lays them out in this order).
inline int64_t prep_scratch_words(int num_experts) {
    return 1 + 2 + kPrepMaxTargets / 2 + static_cast<int64_t>(kPrepMaxTargets) * kPrepMaxChunks +
           static_cast<int64_t>(kPrepMaxTargets) * kPrepMaxChunks / 2 +
           (static_cast<int64_t>(num_experts) * kPrepMaxChunks + 1) / 2;
}
inline PrepScratch prep_scratch(int64_t* words) {
    PrepScratch p{};
    if (words == nullptr) return p;
    p.gen = words;
    p.bad = words + 1;
    p.ticket = reinterpret_cast<int*>(words + 3);
    p.agg = words + 3 + kPrepMaxTargets / 2;
    p.rows = reinterpret_cast<int*>(p.agg + static_cast<int64_t>(kPrepMaxTargets) * kPrepMaxChunks);
    p.hist = p.rows + static_cast<int64_t>(kPrepMaxTargets) * kPrepMaxChunks;
    return p;
}

struct NormalCtx {
    int rank, num_ranks, num_experts, num_topk, hidden, max_tokens, ranks_per_node;
    int first_local;  // the first rank of this rank's node (rank - rank % ranks_per_node)
    int64_t off_flags, off_in_counts, off_out_counts, off_matrix, off_recv, off_comb, off_comb_w;
    int64_t off_rdma_send, off_rdma_recv, off_fwd_comb, off_comb_send, off_comb_rdma;
    int64_t recv_stride, recv_off_scales, recv_off_idx, recv_off_w, recv_off_src;
    int64_t rdma_off_pos, rdma_stride, comb_stride, pcomb_stride;
    int64_t off_comb_flags;  // int64 [N][ceil(T / kCombChunk)]: chunk c of rank r's combine rows for me has arrived
    // receive slots: slot 0 at off_recv, slot s >= 1 at off_zc + (s - 1) * zc_slot_bytes; plane offsets inside a
    // slot (the token plane at 0)
    int64_t off_zc, zc_slot_bytes, pl_idx, pl_w, pl_scales, pl_x;
    int num_zc_slots;
    uint8_t* base;              // my symmetric allocation
    const uint64_t* peer_base;  // device array [N]: every rank's allocation as seen from this GPU (NVLink); 0 for
                                // ranks of other nodes
    int64_t* seq;               // device counters, SeqKind
    int* block_counter;         // device ints [8], for last-block detection
    int64_t* status;            // host-mapped status area (device pointer)
    ErrorWord err;              // first error: device word, copied into status[kError]
    uint64_t timeout_ns;
    // Tuning (LARGEEP_TUNE): threads per block of the copy kernels and 16-byte loads in flight per lane (the kind
    // of load is each call site's: see warp_copy_rt).
    int threads, unroll;
    PrepScratch prep;  // (gen nullptr: the prepare kernel runs one block per target)
};

// Region offsets and strides for a normal-mode buffer, and its total bytes.
struct NormalLayout {
    int64_t off_flags, off_in_counts, off_out_counts, off_matrix, off_recv, off_comb, off_comb_w;
    int64_t off_rdma_send, off_rdma_recv, off_fwd_comb, off_comb_send, off_comb_rdma;
    int64_t recv_stride, recv_off_scales, recv_off_idx, recv_off_w, recv_off_src;
    int64_t rdma_off_pos, rdma_stride, comb_stride, pcomb_stride, total_bytes, off_comb_flags;
    int64_t off_zc, zc_slot_bytes, pl_idx, pl_w, pl_scales, pl_x;
    int num_zc_slots;
};
// num_zc_slots: zero-copy receive slots (0: every dispatch copies its rows out of the copy slot).
NormalLayout normal_layout(int num_ranks, int num_experts, int num_topk, int hidden, int max_tokens,
                           int ranks_per_node, int num_zc_slots);

// ---- layout.cu -------------------------------------------------------------------------------------------------
// topk_idx int64 [T, K] -> per_rank int32 [N], per_node int32 [N/P], per_expert int32 [E], in_rank bool [T, N].
// Ids outside [-1, E) are counted nowhere (as -1, which is what the dispatch kernels and the torch backend do with
// them), and with `check` also reported: host[1] gets the lowest id below -1 (else 0), host[2] the highest id >= E
// (else 0), and host[0] is set to `token` when the kernel is done (num_tokens > 0). Tokens increase from call to
// call, so a host waiting for its own token never takes an earlier call's words (one that timed out on the host and
// finished later).
// scratch: device int64 [3], zero before the first call (each checked call leaves it zero).
struct LayoutCheck {
    int64_t* scratch;
    int64_t* host;  // host-mapped words [3], device pointer
    int64_t token;
};
void launch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_ranks, int num_experts,
                   int ranks_per_node, int* per_rank, int* per_node, int* per_expert, bool* in_rank,
                   LayoutCheck check, cudaStream_t stream);
// The id range check alone (the low-latency dispatch's): ids int64 [n], n > 0; reports as the layout's check.
void launch_id_check(const int64_t* ids, int64_t n, int num_experts, LayoutCheck check, cudaStream_t stream);
// The dispatch's id check (in its prepare kernel, one block: no scratch): host as LayoutCheck's; nullptr: none.
struct IdCheck {
    int64_t* host;
    int64_t token;
};

// ---- intranode.cu (normal mode: every group; NVLink inside a node) -----------------------------------------
// Prepare: send_pos int32 [T, N] (position of token t among the rows for rank r, -1 if none) and count rows; with
// several nodes also node_pos int32 [T, M] (position among the tokens for node m).
// With check.host (host-mapped int64 [3]): the expert-id range check, reported as the kernel's comment says.
// num_sms: the dispatch's SM budget (long calls run several prepare blocks per target within it).
void launch_dispatch_prepare(const NormalCtx& ctx, const int64_t* topk_idx, int num_tokens, int* send_pos,
                             int* node_pos, int* self_token, IdCheck check, int num_sms, cudaStream_t stream);
// Notify: count exchange, publishing my receive slot `my_slot` for this round (0: the copy slot); writes recv_off
// int32 [N + 1], send_off int32 [N] and send_slot int64 [N] (byte offset of each receiver's slot); with several
// nodes fwd_off int32 [M, P] and fwd_count int32 [M] (rows forwarded from each node's RDMA peer); with `report`,
// totals into the status area and then status[kReadySeq] = seq for the host to wait on, and the rows per local
// expert rounded up to `alignment` into per_expert int32 [E/N] (device). Only one reporting notify is ever in
// flight: the host waits for each before launching the next. A round that some rank's prepare refused (its ids,
// seq[kRoundVoid]) is void on every rank: the counts are exchanged, every offset and count comes out 0, and
// status[kRefused] names the refusing ranks (a notify without `report` reports kOpPeerRefused instead). So is a
// round whose ranks send rows of different kinds (row_kind: kRowKind of this rank's; kRanksDisagree in
// status[kRefused], or kOpRanksDisagree reported without `report`). `tag` (one int32 of the handle): the round's
// number modulo 2**12, the handle's tag. Every later kernel of the round, and those of the cached dispatches and
// combines that use the handle, take its tag and put it, with their kind of rows, into their data flags
// (normal.cuh's call_sig), for the receivers to compare with theirs.
void launch_dispatch_notify(const NormalCtx& ctx, int* recv_off, int* send_off, int64_t* send_slot, int* fwd_off,
                            int* fwd_count, int my_slot, bool report, int* per_expert, int alignment, int row_kind,
                            int* tag, cudaStream_t stream);
// Push: every token's row (and, when topk_idx is given, ids, weights, token index) into the receive slot of each
// other receiver on this node (send_slot; nullptr: the copy slot, as cached dispatches use); with include_self
// (this rank receives into a zero-copy slot) also into my own slot, else the copy-out copies my rows from the
// inputs.
void launch_dispatch_push(const NormalCtx& ctx, const void* x, int x_elem_bytes, const float* x_scales,
                          bool has_scales, const int64_t* topk_idx, const float* topk_weights, int num_tokens,
                          const int* send_pos, const int* send_off, const int64_t* send_slot, bool include_self,
                          int num_sms, const int* tag, cudaStream_t stream);
// Copy-out: my rows for myself from the dispatch's inputs (x, x_scales, topk_idx, topk_weights; self_token from
// prepare), the others from the copy slot -> outputs; recv_src int32 [rows, 2] (source rank, token) written
// when not cached. my_slot >= 1 (zero-copy: the outputs are that slot's planes, every row already there): only
// waits for the rows and writes recv_src. num_rows < 0 drains the round (a void one, or one whose outputs could
// not be made): waits for the rows, copies nothing; every copy-out then frees the round for every peer.
void launch_dispatch_copyout(const NormalCtx& ctx, void* out_x, int x_elem_bytes, float* out_scales,
                             bool has_scales, int64_t* out_idx, float* out_w, int* recv_src, const int* recv_off,
                             int num_rows, bool cached, const void* x, const float* x_scales, const int64_t* topk_idx,
                             const float* topk_weights, const int* self_token, int my_slot, int num_sms,
                             const int* tag, cudaStream_t stream);
// Combine push: row i of y goes towards its source over NVLink (its `comb` buffer, or this node's forwarder for
// it), except rows whose source is this rank; raises kFlagCombReady on every rank of this node (unless this
// Buffer has reported an error: block_raises_data_flags). part_bf16 (bf16 y, several nodes): the forwarders send
// their partial sums home as bf16 (part of the call's signature, so every kernel of the combine takes it).
void launch_combine_push(const NormalCtx& ctx, const void* y, int y_elem_bytes, const float* y_w,
                         bool with_weights, bool part_bf16, const int* recv_src, const int* recv_off, int num_rows,
                         int num_sms, const int* tag, cudaStream_t stream);
// Combine reduce: out[t] = sum over ranks r of this node with send_pos[t, r] >= 0 of comb[r][send_pos[t, r]] (for
// r = this rank: row recv_off[rank] + send_pos[t, rank] of y, the combine's input, and of y_w), plus (node_pos
// given) the partial of every other node the token went to (float32, or bf16 with part_bf16), in float32. y has
// out's element type.
void launch_combine_reduce(const NormalCtx& ctx, void* out, int out_elem_bytes, float* out_w, const int* send_pos,
                           const int* node_pos, int num_tokens, bool with_weights, bool part_bf16, const void* y,
                           const float* y_w, const int* recv_off, int num_sms, const int* tag, cudaStream_t stream);

// Combine in one kernel, for groups of one node: push blocks (push_eighths / 8 of max(2, num_sms) blocks, at
// least one of each kind) write the rows back to their sources in chunks of kCombChunk rows, each chunk raising
// its flag in the source's comb_flags; the other blocks sum each token as soon as the chunks holding its rows have
// arrived, so the reduction runs beside the NVLink traffic instead of after it. Same result as push + reduce.
constexpr int kCombChunk = 4;
void launch_combine_fused(const NormalCtx& ctx, void* out, int out_elem_bytes, float* out_w, const int* send_pos,
                          int num_tokens, bool with_weights, const void* y, const float* y_w, const int* recv_src,
                          const int* recv_off, int num_rows, int num_sms, int push_eighths, const int* tag,
                          cudaStream_t stream);

// Combine with the copy engines, for groups of one node and handles of variable-size dispatches (LARGEEP_TUNE
// comb=8). This rank's rows for source s are rows recv_off[s] .. recv_off[s + 1] of y, in the order of s's list, and
// they go to slots [my index][0 .. count) of s's comb buffer: one strided copy per source moves them (and one the
// weights) with the GPU's copy engines, holding no SM, in pieces of whole kCombChunk chunks, each followed by a copy
// of its chunk flags. Every block of a max(1, num_sms)-block reduction (the fused kernel's, without push blocks)
// sums the tokens as their chunks arrive. recv_counts: host int [N], the rows from each source (the dispatch's
// count exchange). peers: host [N], every rank's allocation as mapped here. lanes: N - 1 streams (one per peer,
// made to wait for the prologue), a fork event and N - 1 join events: the call's stream waits for every copy before
// it goes on, so y may be reused after the call as after any other. ce_flags: device int64 [2 * nchunks], nchunks =
// ceil(max_tokens / kCombChunk) (written by the prologue kernel: zeros, then this round's flag value, or zeros
// where it cannot raise flags).
struct CopyLanes {
    const cudaStream_t* streams;
    cudaEvent_t fork;
    const cudaEvent_t* joins;
    int count;
};
void launch_combine_ce(const NormalCtx& ctx, const CopyLanes& lanes, const uint64_t* peers, int64_t* ce_flags,
                       void* out, int out_elem_bytes, float* out_w, const int* send_pos, int num_tokens,
                       bool with_weights, const void* y, const float* y_w, const int* recv_off,
                       const int* recv_counts, int num_sms, const int* tag, cudaStream_t stream);

// ---- internode.cu (normal mode, groups of several nodes: the legs between nodes) ----------------------------
// RDMA leg of dispatch: each token, once per other node it goes to, put to my RDMA peer there. After notify.
// cached: no ids or weights are staged (their bytes travel unread; a fresh dispatch of no tokens may have null
// ones as well).
void launch_dispatch_rdma_send(const NormalCtx& ctx, const void* x, int x_elem_bytes, const float* x_scales,
                               bool has_scales, const int64_t* topk_idx, const float* topk_weights, int num_tokens,
                               const int* send_pos, const int* node_pos, bool cached, int num_sms,
                               const int* tag, cudaStream_t stream);
// Forward leg: rows from my RDMA peers into the receive buffers of my node's ranks; fwd_pos int32 [M, T, P] out.
void launch_dispatch_forward(const NormalCtx& ctx, int x_elem_bytes, bool has_scales, bool cached,
                             const int* fwd_off, const int* fwd_count, int* fwd_pos, int num_sms,
                             const int* tag, cudaStream_t stream);
// Combine: partial sums of my node's rows for my RDMA peers' tokens, put home (float32, or bf16 with part_bf16).
// Between push and reduce.
void launch_combine_forward(const NormalCtx& ctx, int y_elem_bytes, bool with_weights, bool part_bf16,
                            const int* fwd_count, const int* fwd_pos, int num_sms, const int* tag,
                            cudaStream_t stream);

// ---- rows.cu (expert side, no communication) ------------------------------------------------------------------
// y [rows, hidden] = per row r, the sum over k < num_topk with pos[r, k] != pad, 0 <= pos[r, k] < src_rows and
// pos[r, k] < *count of w[r, k] * src[pos[r, k]] (float32 accumulation, one rounding; count: int32 on the device, or
// null for no limit; a skipped entry's source row and weight are not read); src and y bf16 (elem_bytes 2) or
// float32 (4); pos int64, w float32 [rows, K].
void launch_weighted_row_sum(const void* src, int64_t src_rows, int elem_bytes, const int64_t* pos, const float* w,
                             void* y, int64_t rows, int num_topk, int hidden, int64_t pad, const int* count,
                             cudaStream_t stream);
// The experts' gated activation: a [rows, ffn] = act(h[:, :ffn] + bias[e], h[:, ffn:] + bias'[e]) of h [rows,
// 2 * ffn] whose rows are sorted by expert (offs int32 [num_experts], inclusive ends, on the device; e: the row's
// expert; bias [num_experts, 2 * ffn] or null); rows at or past offs[num_experts - 1] are zeros and their h unread.
// kind 0: silu(g) * u; 1: (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'), g' = min(g, limit). bf16
// (elem_bytes 2) or float32 (4), float32 math; pointers 16-byte aligned, ffn * elem_bytes a multiple of 16. The
// backward writes dh [rows, 2 * ffn] from da [rows, ffn] (zeros at or past the end row). No sync.
// y [rows, cols] = x + bias[e] for each row of expert e (rows sorted by expert as above; bias [num_experts, cols]);
// rows at or past offs[num_experts - 1] written as zeros (x's not read). bf16 or float32, 16-byte aligned.
void launch_row_bias_add(const void* x, const void* bias, const int* offs, int num_experts, void* y, int64_t rows,
                         int cols, int elem_bytes, cudaStream_t stream);
// out [num_experts, cols] = per expert, the float32 sum (one rounding) of its rows of g [*, cols] (sorted by expert as
// above; rows past offs[num_experts - 1] not read), the same bits on every call. bf16 or float32, 16-byte aligned.
void launch_segment_row_sum(const void* g, const int* offs, int num_experts, void* out, int cols, int elem_bytes,
                            cudaStream_t stream);
void launch_expert_act(const void* h, const void* bias, const int* offs, int num_experts, void* a, int64_t rows,
                       int ffn, int elem_bytes, int kind, float alpha, float limit, cudaStream_t stream);
void launch_expert_act_backward(const void* da, const void* h, const void* bias, const int* offs, int num_experts,
                                void* dh, int64_t rows, int ffn, int elem_bytes, int kind, float alpha, float limit,
                                cudaStream_t stream);
// out [rows][row_bytes] = x [x_rows][row_bytes] at src[i] for the rows i < min(*count, rows) (count: int32 on the
// device, e.g. an expert order's offs[-1]; the host never reads it); rows at or past it are not written and their
// src entries not read. row_bytes a multiple of 16, x and out 16-byte aligned; a src entry outside [0, x_rows) traps.
// Grid-stride, num_blocks blocks at most (gather_rows_default_blocks: enough warps to fill num_sms SMs). No sync.
int gather_rows_default_blocks(int num_sms);
void launch_gather_rows(const void* x, int64_t x_rows, int64_t row_bytes, const int64_t* src, const int* count,
                        void* out, int64_t rows, int num_blocks, cudaStream_t stream);
// FP8 rows as largeep.fp8 makes them, bit for bit, over `groups` groups of 128 consecutive values (a [T, H] tensor
// with H % 128 == 0 is T * H / 128 of them): quantize x (bf16: elem_bytes 2, or float32: 4) into e4m3 codes q and
// one float32 scale per group s (the power of two at or above with round_scale); dequantize q * s into y (bf16 or
// float32). x, y and q 16-byte aligned. No sync.
void launch_fp8_quantize(const void* x, int elem_bytes, uint8_t* q, float* s, int64_t groups, bool round_scale,
                         cudaStream_t stream);
void launch_fp8_dequantize(const uint8_t* q, const float* s, void* y, int elem_bytes, int64_t groups,
                           cudaStream_t stream);
// The (row, k) entries of idx int64 [rows, num_topk] (local expert ids; an id outside [0, num_experts) names none)
// in a stable order by expert, entries naming none last -- what a stable argsort of the keys gives: offs int32
// [num_experts] inclusive end of each expert's entries; pos int64 [rows * num_topk] each entry's position, or pad
// for an entry naming none when pad >= 0; src int64 [src_len] the row of the entry at each position (src[pad] = 0
// when pad >= 0). work: int32 [expert_order_chunks(rows * num_topk) * (num_experts + 1)] (at most 2048 chunks of
// expert_order_chunk entries). Three kernels, no sync.
constexpr int kExpertOrderMaxExperts = 1024;
int64_t expert_order_chunk(int64_t entries);
int64_t expert_order_chunks(int64_t entries);
void launch_expert_order(const int64_t* idx, int64_t rows, int num_topk, int num_experts, int* offs, int* work,
                         int64_t* pos, int64_t* src, int64_t src_len, int64_t pad, cudaStream_t stream);

// ---- low_latency.cu (decoding; NVLink stores on this rank's node, NVSHMEM puts to other nodes) ---------------
// Regions of the symmetric allocation (per rank):
//   flags   int64 [5 kinds][2 slot buffers][E/N * N]   counts tagged with the round, and free/done flags
//   counter int32 [N][E/N] + [N]                       copies this rank sends per (rank, expert), then rows per
//                                                      rank; zero between rounds
//   recv    bytes [2][N][M][recv_stride]               row j from source s at [s][j] (one per token and rank):
//                                                      x (H fp8 or 2H bf16) | scales [H/128] | int32 metadata:
//                                                      token, n (| flags), n x (local expert * 32 + k, the copy's
//                                                      row for that expert) at [2, 2 + 2n), n weights at
//                                                      [2 + 2K, 2 + 2K + n) (a dispatch given its weights)
//   comb    bytes [2][M * K][comb_stride]              combine rows returned for my (token, k)
//   send    bytes [M * K][recv_stride]                 put path only (peers on other nodes): staged dispatch rows
//   comb_send bytes [E/N * N * M][comb_stride]         put path only: staged combine rows
struct LowLatencyCtx {
    int rank, num_ranks, num_experts, num_topk, hidden, max_tokens, ranks_per_node;
    int64_t off_flags, off_counter, off_recv, off_comb, off_send, off_comb_send;
    int64_t recv_stride, off_scales_in_row, off_meta_in_row, comb_stride;
    uint8_t* base;
    const uint64_t* peer_base;
    int64_t* seq;        // device counters: [kSeqLowLatency] dispatch rounds, [kSeqLowLatency + 1] combine rounds
    int* block_counter;  // device ints [4]
    int64_t* status;
    ErrorWord err;
    uint64_t timeout_ns;
    int device_sms;  // SMs of the Buffer's GPU: the grids' cap (one wave of blocks, one block per SM)
    int spread;     // LARGEEP_TUNE=ll_spread: 1 (default) the dispatch receive, the combine send and the combine
                    // receive share their rows over one wave of blocks; 0 one block per local expert (dispatch
                    // receive, combine send) and at most 8 warps per token (combine receive)
};
struct LowLatencyLayout {
    int64_t off_flags, off_counter, off_recv, off_comb, off_send, off_comb_send;
    int64_t recv_stride, off_scales_in_row, off_meta_in_row, comb_stride, total_bytes;
};
LowLatencyLayout low_latency_layout(int num_ranks, int num_experts, int num_topk, int hidden, int max_tokens,
                                    int ranks_per_node);
// Send phase of dispatch: x bf16 [T, H], topk_idx [T, K], topk_weights float [T, K] or null (given: they travel
// with the tokens, the combine sums each token's outputs on the experts' rank, and weights_kept [T, K] gets a copy:
// the weights this rank's combine then applies; sum_one: the experts' ranks send each such sum as one bf16 row, not
// two); ids_kept int32 [T, K] gets the ids sent (-1 where none: outside [0, E)), from which the combine knows which
// copies come back; writes the round into *handle_seq (device).
void launch_ll_dispatch_send(const LowLatencyCtx& c, const void* x, const int64_t* topk_idx,
                             const float* topk_weights, float* weights_kept, int* ids_kept, int num_tokens,
                             bool use_fp8, bool round_scale, bool sum_one, int64_t* handle_seq, cudaStream_t stream);
// Send and receive phases in one kernel (LARGEEP_TUNE ll_fuse=1, decided by the caller) where that can run: the
// spread receive, the grid resident at once; returns false, launching nothing, otherwise.
bool launch_ll_dispatch_fused(const LowLatencyCtx& c, const void* x, const int64_t* topk_idx,
                              const float* topk_weights, float* weights_kept, int* ids_kept, int num_tokens,
                              bool use_fp8, bool round_scale, bool sum_one, int64_t* handle_seq, void* out_x,
                              float* out_scales, int* out_count, int* src_info, int* meta, int* lead, int* rowmap,
                              cudaStream_t stream);
// Receive phase: out_x [E/N, N*M, H] (e4m3 or bf16), out_scales float [E/N, N*M, H/128], out_count int32 [E/N],
// src_info int32 [E/N, N*M, 2], meta int32 [E/N, N*M] (source * M*K + token*K + k, for combine), lead int32
// [E/N, N*M] and rowmap int32 [N*M, min(K, E/N), 4] (where the combine finds the rows it sums; low_latency.cu).
void launch_ll_dispatch_recv(const LowLatencyCtx& c, void* out_x, float* out_scales, int* out_count, int* src_info,
                             int* meta, int* lead, int* rowmap, bool use_fp8, const int64_t* handle_seq,
                             cudaStream_t stream);
// dispatch_seq: the handle's dispatch's round (its send kernel's handle_seq), whose tag the done flags carry.
void launch_ll_combine_send(const LowLatencyCtx& c, const void* y, const int* count, const int* meta,
                            const int* lead, const int* rowmap, int64_t* handle_seq, const int64_t* dispatch_seq,
                            cudaStream_t stream);
// Send and weighted sum in one kernel (LARGEEP_TUNE ll_fuse=1, decided by the caller) where that can run: the
// spread send, the grid resident at once; returns false, launching nothing, otherwise.
bool launch_ll_combine_fused(const LowLatencyCtx& c, const void* y, const int* count, const int* meta,
                             const int* lead, const int* rowmap, int64_t* handle_seq, const int64_t* dispatch_seq,
                             const int* ids_sent, const int64_t* topk_idx, const float* topk_weights, void* out,
                             int num_tokens, int merged, cudaStream_t stream);
// Weighted sum: ids_sent int32 [T, K] is the handle's dispatch's ids_kept (which copies came back, and from which k's
// slot); topk_idx [T, K] (the combine's) masks them: k adds where both name an expert. merged: 0, or this rank's
// dispatch of the handle sent its weights (the experts' ranks summed the rows; topk_weights is then that dispatch's
// weights_kept, and topk_idx is not read: such a sum cannot be masked): 1 with each sum in two bf16 rows, 2 in one
// (the dispatch's sum_one).
void launch_ll_combine_recv(const LowLatencyCtx& c, const int* ids_sent, const int64_t* topk_idx,
                            const float* topk_weights, void* out, int num_tokens, int merged,
                            const int64_t* handle_seq, const int64_t* dispatch_seq, cudaStream_t stream);

}  // namespace largeep
