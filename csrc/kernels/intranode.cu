// Normal (high-throughput) mode: the kernels every group runs, whether its ranks share one node or several.
//
// Dispatch pushes: each source reads a token's row once from the caller's tensor and writes it over NVLink into
// the receive buffer (symmetric memory) of every rank of its node that needs it, at its final row in SPEC order
// (sources ascending, then tokens; offsets come from the count exchange). The receiver then copies its buffer into
// the output tensors (local traffic only). A rank's rows for itself skip the receive buffer: the copy-out reads
// them from the caller's tensors (one copy instead of two), and in combine the reduction reads them from y. NVLink
// writes are posted, so no round trip limits them; NVLink reads measured about 1.7x slower here, which is why an
// earlier pull design was dropped. Rows for ranks of other nodes travel through internode.cu (one RDMA copy per
// destination node, forwarded over NVLink there) and land in the same receive buffers at the same rows, so the
// copy-out is the same.
//
// Combine pushes: each receiver writes row i of y into its source's `comb` buffer (slot [l][j], l = the receiver's
// position in its node, j = the row's position in the source->me list); the source then sums the slots of each
// token in float32. Rows whose source is on another node go to this node's forwarder for that source instead
// (internode.cu), which sums them and sends one float32 partial per token home; the source adds those partials in
// the same reduction.
//
// Rounds are numbered by device-side sequence counters (NormalCtx::seq), so kernels captured in a CUDA graph
// keep working on replay. Every wait is bounded by timeout_ns; on a timeout the kernel records (op, rank) in the
// ErrorWord (a device word, copied to the host-mapped status area) and skips the rest of its work, and later
// kernels of the Buffer skip theirs.
#include "normal.cuh"

namespace largeep {

using namespace normal;

namespace {

// ---- prepare ------------------------------------------------------------------------------------------------
// Targets: rank r < N, and (groups of several nodes) node m as target N + m. Target r: send_pos[:, r] (position of
// each token in the list of rows for rank r, -1 if none) and the count row for r (rows, rows naming each of r's
// experts, rows for r's node) into out_counts[r]. Target N + m: node_pos[:, m] (position of each token among the
// tokens that go to node m, -1 if none) and the node field of the count row of every rank of node m. Target `me`
// also writes self_token (the token of each of my rows for myself: the copy-out reads those rows straight from the
// caller's tensors). Local work only. Ids outside [-1, E) name no rank here (they are never a hit). With `check`
// (the host's expert-id range check, instead of a separate min/max reduction and its device copy): target 0, which
// reads every id, puts the lowest id below -1 and the highest id >= E (0 for none) into host-mapped words
// check.host[1..2], then writes check.token into check.host[0]; it also stores in seq[kRoundVoid] whether this rank
// refuses the round (a checked id out of range): the notify kernel tells every rank, so that the round moves no row
// anywhere and every rank's host raises after the count exchange (no host wait of its own for the check).
//
// `chunks` blocks per target (launch_dispatch_prepare: one, or several for long calls when the SM budget allows).
// One block per target scans every token, kThreads at a time. With several, each block takes the next chunk of
// consecutive tokens by ticket (so it only ever waits for chunks whose blocks have started), scans it locally,
// publishes its total (prep.rows, then this launch's number in prep.agg), adds up the totals of the chunks before
// it, and adds that prefix to its positions; the block of the last chunk sums the chunks' histograms (prep.hist)
// into the count row, and for target 0 the chunks' bad ids (prep.bad) into the check. The grid's last block resets
// the tickets and advances the launch number (session 31: 11.5 against 20.3 us at 4096 tokens, top-8, one or two
// ranks; bench/micro/prepare_bench.cu). A ticket past the last chunk (two launches at once) or a wait past the
// timeout reports kOpPrepare.
__global__ void __launch_bounds__(kThreads) dispatch_prepare_kernel(NormalCtx c, const int64_t* idx, int T,
                                                                    int* send_pos, int* node_pos, int* self_token,
                                                                    IdCheck check, int chunks) {
    const int N = c.num_ranks, K = c.num_topk, epr = c.num_experts / N, P = c.ranks_per_node, M = N / P;
    const int row_len = 3 + epr;
    extern __shared__ int hist[];  // [E/N]: rows naming each of r's experts
    __shared__ long long bad[2];  // the lowest id below -1, the highest >= E (note_bad_id)
    __shared__ int chunk_s, prefix_s;
    __shared__ int64_t tag_s;
    const int target = static_cast<int>(blockIdx.x) / chunks;
    const bool checking = check.host != nullptr && target == 0;
    const bool node_block = target >= N;
    const int r = node_block ? target - N : target;  // rank or node
    const bool many = chunks > 1;
    PrepScratch& ps = c.prep;
    if (threadIdx.x == 0) {
        if (checking) bad[0] = bad[1] = 0;
        chunk_s = many ? atomicAdd(ps.ticket + target, 1) : 0;
        tag_s = many ? ld_volatile(ps.gen) + 1 : 0;
        prefix_s = 0;
    }
    const int64_t lo = node_block ? static_cast<int64_t>(r) * P * epr : static_cast<int64_t>(r) * epr;
    const int64_t hi = lo + (node_block ? static_cast<int64_t>(P) * epr : epr);
    for (int i = threadIdx.x; i < epr; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const int chunk = chunk_s;
    const int64_t tag = tag_s;
    // A ticket past the last chunk: two launches of this kernel overlap (two dispatches of one Buffer at once, e.g.
    // a CUDA graph replayed beside an eager call). Reported; this block then touches no scratch and no output.
    const bool stray = chunk >= chunks;
    if (stray && threadIdx.x == 0) report_error(c.err, kOpPrepare, c.rank);
    const int per = ((T + chunks - 1) / chunks + kWarp - 1) / kWarp * kWarp;  // tokens per chunk
    const int t_lo = stray ? T : min(T, chunk * per), t_hi = stray ? T : min(T, t_lo + per);
    int* pos_of = node_block ? node_pos : send_pos;  // [T, width] column r
    const int width = node_block ? M : N;
    int base = 0;
    for (int start = t_lo; start < t_hi; start += blockDim.x) {
        const int t = start + threadIdx.x;
        int hit = 0;
        if (t < t_hi) {
            const int64_t* row = idx + static_cast<int64_t>(t) * K;
            // kChunk ids loaded at once (independent loads in flight), then checked from registers
            constexpr int kChunk = 8;
            for (int k0 = 0; k0 < K; k0 += kChunk) {
                int64_t ev[kChunk];
#pragma unroll
                for (int u = 0; u < kChunk; ++u) ev[u] = k0 + u < K ? row[k0 + u] : -1;
#pragma unroll
                for (int u = 0; u < kChunk; ++u) {
                    const int64_t e = ev[u];
                    if (checking && k0 + u < K) note_bad_id(bad, e, c.num_experts);
                    if (k0 + u >= K || e < lo || e >= hi) continue;
                    hit = 1;
                    if (node_block) continue;
                    bool seen = false;  // count an expert named twice in a row once
#pragma unroll
                    for (int j = 0; j < u; ++j) seen |= (ev[j] == e);
                    for (int j = 0; j < k0; ++j) seen |= (row[j] == e);
                    if (!seen) atomicAdd(&hist[e - lo], 1);
                }
            }
        }
        int total;
        const int pos = base + block_exclusive_scan(hit, &total);
        if (t < t_hi) {
            pos_of[static_cast<int64_t>(t) * width + r] = hit ? pos : -1;
            if (!many && !node_block && r == c.rank && hit) self_token[pos] = t;
        }
        base += total;
    }
    int prefix = 0;
    if (many && !stray) {
        // my chunk's histogram and bad ids, then its total (released: they are visible to whoever reads it)
        if (!node_block)
            for (int i = threadIdx.x; i < epr; i += blockDim.x)
                ps.hist[(static_cast<int64_t>(r) * kPrepMaxChunks + chunk) * epr + i] = hist[i];
        __syncthreads();
        if (threadIdx.x == 0) {
            if (checking) {
                if (bad[0] != 0) atomicMin(reinterpret_cast<long long*>(ps.bad), bad[0]);
                if (bad[1] != 0) atomicMax(reinterpret_cast<long long*>(ps.bad) + 1, bad[1]);
            }
            const int64_t at = static_cast<int64_t>(target) * kPrepMaxChunks + chunk;
            ps.rows[at] = base;
            __threadfence();
            st_release_sys(ps.agg + at, tag);  // (the launch number alone: it only grows, int64)
        }
        // the totals of the chunks before mine (their blocks took earlier tickets: they have started)
        if (static_cast<int>(threadIdx.x) < chunk) {
            const int64_t at = static_cast<int64_t>(target) * kPrepMaxChunks + threadIdx.x;
            if (wait_flag(ps.agg + at, tag, c.timeout_ns, c.err, kOpPrepare, c.rank))
                atomicAdd(&prefix_s, *reinterpret_cast<volatile int*>(ps.rows + at));
        }
        __syncthreads();
        prefix = prefix_s;
        for (int t = t_lo + threadIdx.x; t < t_hi; t += blockDim.x) {
            int* at = pos_of + static_cast<int64_t>(t) * width + r;
            const int p = *at;
            if (p < 0) continue;
            if (prefix != 0) *at = p + prefix;
            if (!node_block && r == c.rank) self_token[p + prefix] = t;
        }
    }
    if (chunk == chunks - 1) {  // the last chunk: every chunk before it has published (waited for above)
        const int rows = prefix + base;
        if (checking && threadIdx.x == 0) {
            long long lowest = bad[0], highest = bad[1];
            if (many) {  // every chunk's, and the scratch left zero for the next call
                lowest = atomicExch(reinterpret_cast<unsigned long long*>(ps.bad), 0ull);
                highest = atomicExch(reinterpret_cast<unsigned long long*>(ps.bad) + 1, 0ull);
                lowest = min(lowest, bad[0]);
                highest = max(highest, bad[1]);
            }
            publish_id_check(check.host, lowest, highest, check.token);
            c.seq[kRoundVoid] = lowest != 0 || highest != 0 ? 1 : 0;
        } else if (target == 0 && threadIdx.x == 0) {
            c.seq[kRoundVoid] = 0;
        }
        int* out = reinterpret_cast<int*>(c.base + c.off_out_counts);
        if (node_block) {
            for (int i = threadIdx.x; i < P; i += blockDim.x) out[static_cast<int64_t>(r * P + i) * row_len + 1 + epr] = rows;
        } else {
            out += static_cast<int64_t>(r) * row_len;
            if (threadIdx.x == 0) {
                out[0] = rows;
                if (M == 1) out[1 + epr] = rows;
            }
            for (int i = threadIdx.x; i < epr; i += blockDim.x) {
                int v = hist[i];
                for (int j = 0; j < chunks - 1; ++j) v += ps.hist[(static_cast<int64_t>(r) * kPrepMaxChunks + j) * epr + i];
                out[1 + i] = v;
            }
        }
    }
    if (many && last_block(c.block_counter + 7)) {  // every block has taken its ticket and read the launch number
        if (threadIdx.x == 0) *ps.gen = tag;
        for (int i = threadIdx.x; i < static_cast<int>(gridDim.x) / chunks; i += blockDim.x) ps.ticket[i] = 0;
    }
}

// ---- notify -------------------------------------------------------------------------------------------------
// Waits until every receiver has consumed the previous round (its counts and its copy slot), then sends every
// peer my count row for it (with my receive slot for this round) and my row of the [N, N] count matrix (stores on
// this node, NVSHMEM puts to other nodes), raises kFlagCounts and waits for every peer's. Then computes this rank's
// recv_off [N + 1] (receive rows per source, prefix), send_off [N] (where my rows start in each receiver's slot)
// and send_slot [N] (the byte offset of each receiver's slot) into the handle; with
// several nodes also fwd_count [M] (rows this rank forwards from its RDMA peer on node m) and fwd_off [M, P] (where
// that peer's rows start in the buffer of each rank of this node); with `report`, the totals for the host and
// the rows per local expert rounded up to `alignment` into per_expert [E/N] (device).
// A rank whose prepare refused the round (seq[kRoundVoid]) sets kRefusedSlot in the slot field of its count rows;
// a round with any such rank is void on every rank: all offsets and counts 0 (so the sends move nothing and the
// copy-out waits only for the flags), seq[kRoundVoid] set for the sending kernels, and the refusing ranks in
// status[kRefused] (their number) and status[kRefusedRanks + r] (see api.cuh) for the host, with the ranks that ran it
// without a host wait (num_worst_tokens): those cannot raise, so their notify reports the error kOpPeerRefused
// instead, which leaves their Buffer unusable. Each count row's slot field also carries the kind of rows its rank
// sends (row_kind, bits kKindShift..): a round whose ranks' kinds differ is void the same way (kRanksDisagree in
// status[kRefused], kOpRanksDisagree without a host wait).
__global__ void __launch_bounds__(kThreads) dispatch_notify_kernel(NormalCtx c, int* recv_off, int* send_off,
                                                                   int64_t* send_slot, int* fwd_off, int* fwd_count,
                                                                   int my_slot, int report, int* per_expert,
                                                                   int alignment, int row_kind, int* tag) {
    const int N = c.num_ranks, epr = c.num_experts / N, me = c.rank, row = 3 + epr, P = c.ranks_per_node;
    const int64_t seq = c.seq[kSeqDispatch] + 1;
    if (threadIdx.x == 0) *tag = static_cast<int>(seq & kTagMask);  // (the handle's: its fresh round)
    if (!wait_all(c, kFlagRecvFree, seq - 1, kOpDispatch)) return;
    int* out = reinterpret_cast<int*>(c.base + c.off_out_counts);
    int* my_matrix = reinterpret_cast<int*>(c.base + c.off_matrix);
    const bool i_refuse = c.seq[kRoundVoid] != 0;  // (prepare's, before this kernel overwrites it below)
    for (int j = threadIdx.x; j < N; j += blockDim.x) {
        my_matrix[me * N + j] = out[j * row];
        out[j * row + 2 + epr] =
            my_slot | (i_refuse ? kRefusedSlot : 0) | (report ? 0 : kNoWaitSlot) | (row_kind << kKindShift);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < N * row; i += blockDim.x) {
        const int r = i / row, j = i % row;
        if (is_local(c, r)) reinterpret_cast<int*>(peer(c, r) + c.off_in_counts)[me * row + j] = out[i];
    }
    for (int i = threadIdx.x; i < N * N; i += blockDim.x) {
        const int r = i / N, j = i % N;  // to rank r: matrix[me][j] = rows I send to j
        if (is_local(c, r)) reinterpret_cast<int*>(peer(c, r) + c.off_matrix)[me * N + j] = my_matrix[me * N + j];
    }
    // (one thread per rank: N <= kMaxRanks <= blockDim.x)
    const int r_mine = threadIdx.x;
    if (r_mine < N && !is_local(c, r_mine)) {
        nvshmem_int_put_nbi(reinterpret_cast<int*>(c.base + c.off_in_counts) + me * row, out + r_mine * row, row,
                            r_mine);
        nvshmem_int_put_nbi(my_matrix + me * N, my_matrix + me * N, N, r_mine);
        nvshmem_quiet();
    }
    __threadfence_system();  // counts before the flag
    __syncthreads();
    if (r_mine < N) set_flag(c, r_mine, kFlagCounts, me, seq);
    if (!wait_all(c, kFlagCounts, seq, kOpDispatchNotify)) return;
    const int* in = reinterpret_cast<const int*>(c.base + c.off_in_counts);
    const int* matrix = reinterpret_cast<const int*>(c.base + c.off_matrix);
    __shared__ int num_refusers, first_refuser, first_other_kind;
    if (threadIdx.x == 0) {
        num_refusers = 0;
        first_refuser = N;
        first_other_kind = N;
    }
    __syncthreads();
    // rank r_mine's refusal (bit 0), whether it runs the round without a host wait (bit 1), and its kind of rows
    const int word = r_mine < N ? in[r_mine * row + 2 + epr] : 0;
    const int kind = (word & kKindSlotMask) >> kKindShift;
    const int refusal = r_mine < N ? ((word & kRefusedSlot) ? 1 : 0) | ((word & kNoWaitSlot) ? 2 : 0) | (kind << 2)
                                   : 0;
    if (refusal & 1) {
        atomicAdd(&num_refusers, 1);
        atomicMin(&first_refuser, r_mine);
    }
    if (r_mine < N && kind != row_kind) atomicMin(&first_other_kind, r_mine);
    __syncthreads();
    // a void round counts nothing: every count below is multiplied by it (every rank sees the same words, so every
    // rank voids it or none does)
    const int live = num_refusers == 0 && first_other_kind == N ? 1 : 0;
    if (threadIdx.x == 0) {
        c.seq[kRoundVoid] = live ? 0 : 1;
        int acc = 0;
        for (int s = 0; s < N; ++s) {
            recv_off[s] = acc;
            acc += live * in[s * row];
        }
        recv_off[N] = acc;
    }
    if (r_mine < N) {
        int acc = 0;
        for (int s = 0; s < me; ++s) acc += live * matrix[s * N + r_mine];
        send_off[r_mine] = acc;
        send_slot[r_mine] = slot_offset(c, word & ~(kRefusedSlot | kNoWaitSlot | kKindSlotMask));
    }
    if (fwd_count != nullptr) {
        const int M = N / P, node = me / P;
        for (int i = threadIdx.x; i < M * P; i += blockDim.x) {
            const int m = i / P, l = i % P;
            const int s = m * P + me % P, d = node * P + l;  // my RDMA peer on node m, a rank of my node
            int acc = 0;
            for (int s2 = 0; s2 < s; ++s2) acc += live * matrix[s2 * N + d];
            fwd_off[i] = acc;
            if (l == 0) fwd_count[m] = m == node ? 0 : live * in[s * row + 1 + epr];
        }
    }
    if (!report) {
        if (!live && threadIdx.x == 0)
            report_error(c.err, num_refusers ? kOpPeerRefused : kOpRanksDisagree,
                         num_refusers ? first_refuser : first_other_kind);
        return;
    }
    volatile int64_t* st = c.status;
    for (int e = threadIdx.x; e < epr; e += blockDim.x) {
        int64_t s = 0;
        for (int src = 0; src < N; ++src) s += live * in[src * row + 1 + e];
        st[kPerExpert + e] = s;
        per_expert[e] = static_cast<int>((s + alignment - 1) / alignment * alignment);
    }
    if (threadIdx.x == 0) {
        int64_t total = 0;
        for (int src = 0; src < N; ++src) total += live * in[src * row];
        st[kNumRecv] = total;
        st[kRefused] = num_refusers + (first_other_kind < N ? kRanksDisagree : 0);
    }
    if (!live && r_mine < N) st[kRefusedRanks(epr) + r_mine] = refusal;
    if (r_mine < N) st[kRecvCounts(epr, N) + r_mine] = live * in[r_mine * row];
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) st[kReadySeq] = seq;
}

// ---- push ---------------------------------------------------------------------------------------------------
// One warp per token: the token's x row is read once from the caller's tensor and written over NVLink into the
// receive slot of every other rank of this node that needs it, at row send_off[r] + send_pos[t, r] of the slot at
// send_slot[r] (the copy slot when send_slot is nullptr), followed by its scales, its expert ids made local to r
// (-1 elsewhere), weights, and the token index. Stores are posted: no round trip. Ranks of other nodes get the
// token through internode.cu. My rows for myself go into my own zero-copy slot with the others' (include_self:
// local stores, hidden behind the NVLink-bound pushes), or are not staged at all (the copy-out reads them from the
// caller's tensors).
__global__ void __launch_bounds__(kThreads) dispatch_push_kernel(NormalCtx c, const uint8_t* x, int x_elem,
                                                                 const float* scales, const int64_t* idx,
                                                                 const float* w, int T, const int* send_pos,
                                                                 const int* send_off, const int64_t* send_slot,
                                                                 int include_self, int has_scales,
                                                                 const int* tag) {
    const int N = c.num_ranks, me = c.rank, K = c.num_topk;
    const int64_t seq = c.seq[kSeqDispatch] + 1;
    const int P = c.ranks_per_node, r0 = first_local(c);
    // Receivers must have consumed the previous round (the notify kernel checked it for non-cached calls). A void
    // fresh round (send_slot given) that a rank refused moves no row; its flags still go up.
    const bool ok = wait_local(c, kFlagRecvFree, seq - 1, kOpDispatch) && !void_round(c, send_slot != nullptr);
    if (ok) {
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, kWarps = blockDim.x / kWarp;
        const int64_t x_bytes = static_cast<int64_t>(c.hidden) * x_elem;
        const int num_scales = c.hidden / 128;
        // lane l < P: rank r0 + l of my node
        const int base = lane < P ? send_off[r0 + lane] : 0;
        __shared__ uint8_t* slots[kMaxLocal];  // the slot of each rank of my node this round, as seen from here
        if (static_cast<int>(threadIdx.x) < P) {
            const int r = r0 + threadIdx.x;
            slots[threadIdx.x] = peer(c, r) + (send_slot != nullptr ? send_slot[r] : c.off_recv);
        }
        __syncthreads();
        const bool to_lane = lane < P && (r0 + lane != me || include_self);
        const int* lane_pos = send_pos + r0 + lane;
        for (int t = blockIdx.x * kWarps + warp; t < T; t += gridDim.x * kWarps) {
            const int p = to_lane ? lane_pos[static_cast<int64_t>(t) * N] : -1;
            const unsigned dests = __ballot_sync(0xffffffffu, p >= 0);
            push_row<0>(c, x + t * x_bytes, x_bytes, scales ? scales + static_cast<int64_t>(t) * num_scales : nullptr,
                     idx ? idx + static_cast<int64_t>(t) * K : nullptr, w ? w + static_cast<int64_t>(t) * K : nullptr,
                     t, dests, p, base, slots, lane);
        }
    }
    __threadfence_system();  // this thread's remote stores before the flag
    if (last_block(c.block_counter + 0) &&
        block_raises_data_flags(c, void_round(c, send_slot != nullptr))) {
        if (static_cast<int>(threadIdx.x) < P)
            set_flag(c, r0 + threadIdx.x, kFlagRows, me,
                     data_flag(seq, dispatch_sig(x_elem, has_scales != 0, tag)));
    }
}

// ---- copy-out -----------------------------------------------------------------------------------------------
// recv_src[i] = (source of row i by the offsets off [N + 1], token t): the first s with off[s + 1] > i.
__device__ __forceinline__ void write_recv_src(int* recv_src, const int* off, int N, int i, int t) {
    int s = 0, hi = N - 1;
    while (s < hi) {
        const int mid = (s + hi) / 2;
        if (off[mid + 1] > i) hi = mid;
        else s = mid + 1;
    }
    recv_src[2 * static_cast<int64_t>(i)] = s;
    recv_src[2 * static_cast<int64_t>(i) + 1] = t;
}

// One warp copies copy-slot row i into the outputs (local memory only); rows in [R, num_rows) (the
// num_worst_tokens tail) get topk_idx -1 and weight 0.
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
    const uint8_t* slot = c.base + c.off_recv;
    const int64_t ii = i;
    warp_copy_rt(reinterpret_cast<int4*>(out_x + ii * x_bytes),
                 reinterpret_cast<const int4*>(slot + c.pl_x + ii * x_bytes), x_bytes, lane, 1, c.unroll);
    if (out_s != nullptr)
        for (int q = lane; q < num_scales; q += kWarp)
            out_s[ii * num_scales + q] = reinterpret_cast<const float*>(slot + c.pl_scales)[ii * num_scales + q];
    if (cached) return;
    if (lane < K) {
        out_idx[ii * K + lane] = reinterpret_cast<const int64_t*>(slot + c.pl_idx)[ii * K + lane];
        out_w[ii * K + lane] = reinterpret_cast<const float*>(slot + c.pl_w)[ii * K + lane];
    }
    if (lane == 0) write_recv_src(recv_src, off, c.num_ranks, i, reinterpret_cast<const int*>(slot)[ii]);
}

// My row i (from myself: token t) straight from the caller's tensors into the outputs, with the expert ids made
// local to me (-1 elsewhere) as push_row makes them for other ranks.
__device__ __forceinline__ void copy_self_row(const NormalCtx& c, const uint8_t* x, int64_t x_bytes,
                                              const float* scales, const int64_t* idx, const float* w, int t,
                                              uint8_t* out_x, float* out_s, int64_t* out_idx, float* out_w,
                                              int* recv_src, int i, int cached, int lane) {
    const int K = c.num_topk, epr = c.num_experts / c.num_ranks;
    const int num_scales = c.hidden / 128;
    warp_copy_rt(reinterpret_cast<int4*>(out_x + i * x_bytes), reinterpret_cast<const int4*>(x + t * x_bytes),
                 x_bytes, lane, 0, c.unroll);
    if (out_s != nullptr)
        for (int q = lane; q < num_scales; q += kWarp)
            out_s[static_cast<int64_t>(i) * num_scales + q] = scales[static_cast<int64_t>(t) * num_scales + q];
    if (cached) return;
    if (lane < K) {
        const int64_t le = local_expert(idx[static_cast<int64_t>(t) * K + lane], c.rank, epr);
        out_idx[static_cast<int64_t>(i) * K + lane] = le;
        out_w[static_cast<int64_t>(i) * K + lane] = le >= 0 ? w[static_cast<int64_t>(t) * K + lane] : 0.f;
    }
    if (lane == 0) {
        recv_src[2 * static_cast<int64_t>(i)] = c.rank;
        recv_src[2 * static_cast<int64_t>(i) + 1] = t;
    }
}

// Copies my rows for myself from the caller's tensors (x, scales, idx, w: the dispatch's inputs; self_token from
// prepare) at once, then waits for every other source's rows (pushed by the source itself on this node, by this
// node's forwarder of it otherwise) and copies copy-slot rows [0, R) except mine into the caller-visible outputs
// (local memory only); then tells every rank that my copy slot and counts (and my RDMA receive buffer, forwarded
// before this kernel) are free again. Zero-copy (my_slot >= 1: every row, mine included, was pushed into that
// slot, whose planes are the outputs): waits for the rows and writes recv_src only. num_rows < 0 drains the round
// (its outputs could not be made): waits for the rows, copies nothing and frees the round as any copy-out does.
__global__ void __launch_bounds__(kThreads) dispatch_copyout_kernel(NormalCtx c, uint8_t* out_x, int x_elem,
                                                                    float* out_s, int64_t* out_idx, float* out_w,
                                                                    int* recv_src, const int* recv_off,
                                                                    int num_rows, int cached, const uint8_t* x,
                                                                    const float* scales, const int64_t* idx,
                                                                    const float* w, const int* self_token,
                                                                    int my_slot, int has_scales, const int* tag) {
    const int N = c.num_ranks, me = c.rank;
    const int64_t seq = c.seq[kSeqDispatch] + 1;
    __shared__ int off[kMaxRanks + 1];
    __shared__ int failed;
    const bool drain = num_rows < 0;
    if (threadIdx.x == 0) failed = has_error(c.err) ? 1 : 0;  // recv_off is only valid if no kernel failed
    if (static_cast<int>(threadIdx.x) <= N) off[threadIdx.x] = recv_off[threadIdx.x];
    __syncthreads();
    // More rows than a num_worst_tokens output holds: copy nothing (every block sees the same offsets) and report
    // it; the Buffer's later kernels then skip their work and its next call raises.
    if (threadIdx.x == 0 && !failed && !drain && off[N] > num_rows) {
        failed = 1;
        if (blockIdx.x == 0) report_error(c.err, kOpWorstTooSmall, -1);
    }
    __syncthreads();
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, kWarps = blockDim.x / kWarp;
    const int64_t x_bytes = static_cast<int64_t>(c.hidden) * x_elem;
    if (!failed && !drain && my_slot == 0) {
        for (int j = blockIdx.x * kWarps + warp; j < off[me + 1] - off[me]; j += gridDim.x * kWarps)
            copy_self_row(c, x, x_bytes, scales, idx, w, self_token[j], out_x, out_s, out_idx, out_w, recv_src,
                          off[me] + j, cached, lane);
    }
    // (the rows' signature is checked unless the round is void, where kinds may differ and no row moved, or drained)
    const int sig = void_round(c, !cached) || drain ? kAnySig : dispatch_sig(x_elem, has_scales != 0, tag);
    const bool ok = wait_all(c, kFlagRows, seq, kOpDispatchRows, sig) && !failed && !drain;
    if (!ok && !cached && out_idx != nullptr) {
        // A failed round (a timeout, a refusal that a num_worst_tokens call cannot raise, too many rows) leaves
        // rows that name no expert: the host's next call raises, and until then the ids are safe to index with.
        // (After a timeout, blocks may disagree on `ok` and a late copy_self_row may overwrite some of this: those
        // rows then hold real local ids, which are as safe.)
        const int64_t n = static_cast<int64_t>(num_rows) * c.num_topk;
        for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
             i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
            out_idx[i] = -1;
            out_w[i] = 0.f;
        }
    }
    if (ok && my_slot != 0) {
        const int* token = reinterpret_cast<const int*>(c.base + slot_offset(c, my_slot));
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < off[N]; i += gridDim.x * blockDim.x)
            write_recv_src(recv_src, off, N, i, token[i]);
    } else if (ok) {
        const int R = off[N], mine = off[me + 1] - off[me];
        // rows [0, num_rows) without my own block [off[me], off[me + 1])
        for (int j = blockIdx.x * kWarps + warp; j < num_rows - mine; j += gridDim.x * kWarps) {
            const int i = j < off[me] ? j : j + mine;
            copy_out_row(c, out_x, x_bytes, out_s, out_idx, out_w, recv_src, off, R, i, cached, lane);
        }
    }
    if (last_block(c.block_counter + 3)) {
        if (static_cast<int>(threadIdx.x) < N) set_flag(c, threadIdx.x, kFlagRecvFree, me, seq);
        if (threadIdx.x == 0) {
            c.seq[kSeqDispatch] = seq;
            c.seq[kRoundVoid] = 0;  // (a void round ends here; a cached round after it moves its rows)
        }
    }
}

// ---- combine ------------------------------------------------------------------------------------------------
// Row i of y goes back towards its source s (one warp): on this node into slot [my local index][i - off[s]] of s's
// comb buffer; for s on node m elsewhere into slot [my local index][m][i - off[s]] of the fwd_comb buffer of this
// node's forwarder for s (the rank with s's local index), with the weights after the row.
__device__ __forceinline__ void push_combine_row(const NormalCtx& c, const uint8_t* y, int64_t y_bytes,
                                                 const float* y_w, const int* recv_src, const int* off, int i,
                                                 int lane) {
    const int K = c.num_topk, P = c.ranks_per_node;
    const int s = recv_src[2 * static_cast<int64_t>(i)];
    const int p = i - off[s];
    const int4* src = reinterpret_cast<const int4*>(y + i * y_bytes);
    if (is_local(c, s)) {
        const int64_t slot = static_cast<int64_t>(c.rank - c.first_local) * c.max_tokens + p;
        uint8_t* dst = peer(c, s) + c.off_comb + slot * c.comb_stride;
        warp_copy_rt(reinterpret_cast<int4*>(dst), src, y_bytes, lane, 0, c.unroll);
        if (y_w != nullptr && lane < K)
            reinterpret_cast<float*>(peer(c, s) + c.off_comb_w)[slot * K + lane] = y_w[static_cast<int64_t>(i) * K + lane];
    } else {
        const int fwd = node_of(c, c.rank) * P + s % P;
        const int64_t slot = (static_cast<int64_t>(c.rank % P) * num_nodes(c) + node_of(c, s)) * c.max_tokens + p;
        uint8_t* dst = peer(c, fwd) + c.off_fwd_comb + slot * c.pcomb_stride;
        warp_copy_rt(reinterpret_cast<int4*>(dst), src, y_bytes, lane, 0, c.unroll);
        if (y_w != nullptr && lane < K)
            reinterpret_cast<float*>(dst + c.comb_stride)[lane] = y_w[static_cast<int64_t>(i) * K + lane];
    }
}

__global__ void __launch_bounds__(kThreads) combine_push_kernel(NormalCtx c, const uint8_t* y, int y_elem,
                                                                const float* y_w, const int* recv_src,
                                                                const int* recv_off, int num_rows, int with_weights,
                                                                int part_bf16, const int* tag) {
    const int N = c.num_ranks, me = c.rank;
    const int64_t seq = c.seq[kSeqCombine] + 1;
    __shared__ int off[kMaxRanks + 1];
    // Every rank must have finished reducing the previous round before its buffers are overwritten (forwarders
    // finish their partial sums before their own reduction).
    const bool ok = wait_all(c, kFlagCombFree, seq - 1, kOpCombine);
    if (threadIdx.x <= static_cast<unsigned>(N)) off[threadIdx.x] = recv_off[threadIdx.x];
    __syncthreads();
    if (ok) {
        const int R = min(off[N], num_rows);
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, kWarps = blockDim.x / kWarp;
        const int64_t y_bytes = static_cast<int64_t>(c.hidden) * y_elem;
        // my rows from myself stay in y: the reduction reads them there
        const int lo = min(off[me], R), mine = min(off[me + 1], R) - lo;
        for (int j = blockIdx.x * kWarps + warp; j < R - mine; j += gridDim.x * kWarps)
            push_combine_row(c, y, y_bytes, y_w, recv_src, off, j < lo ? j : j + mine, lane);
    }
    __threadfence_system();  // this thread's remote stores before the flag
    if (last_block(c.block_counter + 1) && block_raises_data_flags(c, false)) {
        if (static_cast<int>(threadIdx.x) < c.ranks_per_node)
            set_flag(c, first_local(c) + threadIdx.x, kFlagCombReady, me,
                     data_flag(seq, combine_sig(y_elem, with_weights != 0, part_bf16 != 0, tag)));
    }
}

// A pointer held by lane `src`, to every lane.
template <typename V>
__device__ __forceinline__ V* shfl_ptr(V* v, int src) {
    return reinterpret_cast<V*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(v), src));
}

// reduce_token's sum for nodes of more than kSrc ranks or groups of more than 32 nodes (see there; p and present as
// it computes them): lane j < n_src keeps the row (and weights) of the j-th source of `present` (bit l: rank
// first_local + l, or rank l of the fused combine's one node), and each vector step reads the sources kSrc at a
// time, their rows shuffled from those lanes; lane l keeps node ch * 32 + l's position of t (qs[ch]) for the other
// nodes' partials, 32 nodes a chunk.
template <typename T, int kSrc, int kUnroll, bool kChunked, bool kPartBf16>
__device__ __forceinline__ bool reduce_token_many(const NormalCtx& c, T* out, float* out_w, const int* node_pos,
                                                  const T* y, const float* y_w, int self_row0, int t,
                                                  int with_weights, int lane, int p, unsigned present) {
    constexpr int kPer = Vec<T>::kPer;
    const int K = c.num_topk, nvec = c.hidden / kPer, n_src = __popc(present);
    const int M = num_nodes(c), node = node_of(c, c.rank);
    const uint8_t* partials = c.base + c.off_comb_rdma;
    const int64_t pw = part_w_off(c, kPartBf16);  // (the partials' summed weights)
    int qs[kNodeChunks];
    unsigned remote[kNodeChunks];
#pragma unroll
    for (int ch = 0; ch < kNodeChunks; ++ch) {
        const int m = ch * kWarp + lane;
        qs[ch] = node_pos != nullptr && m < M && m != node ? node_pos[static_cast<int64_t>(t) * M + m] : -1;
        remote[ch] = __ballot_sync(0xffffffffu, qs[ch] >= 0);
    }
    // lane j: the j-th set bit l of `present` (__fns counts from 1), its slot position and its row
    const int l = lane < n_src ? static_cast<int>(__fns(present, 0, lane + 1)) : 0;
    const int pr = __shfl_sync(0xffffffffu, p, l);
    const int r = kChunked ? l : first_local(c) + l;
    const int4* my_row = nullptr;
    const float* my_w = nullptr;
    if (lane < n_src) {
        if (r == c.rank) {
            const int64_t i = static_cast<int64_t>(self_row0) + pr;
            my_row = reinterpret_cast<const int4*>(y + i * c.hidden);
            my_w = y_w != nullptr ? y_w + i * K : nullptr;
        } else {
            const int64_t slot = static_cast<int64_t>(l) * c.max_tokens + pr;
            my_row = reinterpret_cast<const int4*>(c.base + c.off_comb + slot * c.comb_stride);
            my_w = reinterpret_cast<const float*>(c.base + c.off_comb_w) + slot * K;
        }
    }
    int4* dst = reinterpret_cast<int4*>(out + static_cast<int64_t>(t) * c.hidden);
    for (int step = 0; step < nvec; step += kUnroll * kWarp) {
        const int v0 = step + lane;
        float acc[kUnroll][kPer];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
            for (int e = 0; e < kPer; ++e) acc[u][e] = 0.f;
        for (int b = 0; b < n_src; b += kSrc) {
            const int4* rows[kSrc];
#pragma unroll
            for (int j = 0; j < kSrc; ++j) rows[j] = shfl_ptr(my_row, (b + j) % kWarp);
            int4 buf[kUnroll][kSrc];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
#pragma unroll
                for (int j = 0; j < kSrc; ++j)
                    if (b + j < n_src && v0 + u * kWarp < nvec)
                        buf[u][j] = ld_v4<kChunked ? 2 : 1>(rows[j] + v0 + u * kWarp);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
#pragma unroll
                for (int j = 0; j < kSrc; ++j)
                    if (b + j < n_src && v0 + u * kWarp < nvec) Vec<T>::add(acc[u], buf[u][j]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const bool valid = v0 + u * kWarp < nvec;
#pragma unroll
            for (int ch = 0; ch < kNodeChunks; ++ch)
                for (unsigned rm = remote[ch]; rm; rm &= rm - 1) {
                    const int n = __ffs(rm) - 1;  // node ch * kWarp + n
                    const int qr = __shfl_sync(0xffffffffu, qs[ch], n);
                    const int64_t at = (static_cast<int64_t>(ch * kWarp + n) * c.max_tokens + qr) * c.pcomb_stride;
                    if (valid) add_partial<T, kPartBf16>(acc[u], partials + at, v0 + u * kWarp);
                }
            if (valid) st_na_v4(dst + v0 + u * kWarp, Vec<T>::pack(acc[u]));
        }
    }
    if (with_weights) {
        float sum = 0.f;
        for (int j = 0; j < n_src; ++j) {
            const float* w = shfl_ptr(my_w, j);
            if (lane < K) sum += kChunked ? *reinterpret_cast<const volatile float*>(w + lane) : w[lane];
        }
#pragma unroll
        for (int ch = 0; ch < kNodeChunks; ++ch)
            for (unsigned rm = remote[ch]; rm; rm &= rm - 1) {
                const int n = __ffs(rm) - 1;
                const int qr = __shfl_sync(0xffffffffu, qs[ch], n);
                const int64_t at = (static_cast<int64_t>(ch * kWarp + n) * c.max_tokens + qr) * c.pcomb_stride;
                if (lane < K) sum += reinterpret_cast<const float*>(partials + at + pw)[lane];
            }
        if (lane < K) out_w[static_cast<int64_t>(t) * K + lane] = sum;
    }
    return true;
}

// out[t] = sum over ranks r = first_local + l of this node with send_pos[t, r] >= 0 of comb[l][send_pos[t, r]] (for
// r = me: row self_row0 + send_pos[t, me] of y, the combine's input, which never left this rank), plus (several
// nodes) the float32 partial comb_rdma[m][node_pos[t, m]] of every other node m the token went to, in float32 (one
// warp).
// kSrc >= ranks per node, or kMany: more ranks per node than kSrc, whose rows are read kSrc sources at a time (lane
// j keeps the j-th source's row); kUnroll * kSrc 16-byte loads are in flight per lane (16: one kernel per node size
// keeps the registers of one loop shape only). kChunked (the fused combine): each peer's row is read once the flag
// of its chunk (chunk_flags[r][slot / kCombChunk], nchunks per rank) holds round `seq` (a data flag, of this call's
// signature `sig`, else sig_matches reports it); false if a wait gave up or a signature differed.
template <typename T, int kSrc, int kUnroll, bool kChunked, bool kMany, bool kPartBf16 = false>
__device__ __forceinline__ bool reduce_token(const NormalCtx& c, T* out, float* out_w, const int* send_pos,
                                             const int* node_pos, const T* y, const float* y_w, int self_row0, int t,
                                             int with_weights, int lane,
                                             const int64_t* chunk_flags = nullptr, int nchunks = 0, int64_t seq = 0,
                                             int sig = 0) {
    constexpr int kPer = Vec<T>::kPer;
    const int N = c.num_ranks, K = c.num_topk, M = num_nodes(c), node = node_of(c, c.rank), nvec = c.hidden / kPer;
    const int r0 = first_local(c);
    // lane l < P reads send_pos[t, r0 + l] (rank r0 + l of my node); the warp shares the list of slots holding t's
    // rows. The fused combine (kChunked) is for one node: lane = rank there, tested against the mask of my node's
    // ranks as before session 18 (always true for lane < N on one node; this form measured 3.5 us faster at one
    // rank and SPEC's size than `lane < P`, and `lane < N` alone 1 us: session 18, r7-r8).
    // (kChunked only: one node, so the shift is 0; elsewhere it could reach 32 bits)
    const unsigned one_node = kChunked ? (c.ranks_per_node >= 32 ? ~0u : ((1u << c.ranks_per_node) - 1u))
                                             << (node_of(c, c.rank) * c.ranks_per_node)
                                       : 0u;
    const int p = kChunked ? (lane < N && ((one_node >> lane) & 1u) ? send_pos[static_cast<int64_t>(t) * N + lane] : -1)
                           : (lane < c.ranks_per_node ? send_pos[static_cast<int64_t>(t) * N + r0 + lane] : -1);
    if constexpr (kChunked) {
        bool ok = true;
        if (p >= 0 && lane != c.rank) {
            int64_t seen = 0;
            ok = wait_flag(chunk_flags + static_cast<int64_t>(lane) * nchunks + p / kCombChunk, data_flag(seq, 0),
                           c.timeout_ns, c.err, kOpCombineReduce, lane, &seen);
            // (the equality tested here first, then again in sig_matches: so the hot loop's code stays as measured)
            if (ok && seen != data_flag(seq, sig)) ok = sig_matches(c, false, seen, seq, sig, lane);
        }
        if (!__all_sync(0xffffffffu, ok)) return false;
        __syncwarp();  // lane r's acquire, then this barrier (memory ordering among the warp), then every lane's loads
    }
    const unsigned present = __ballot_sync(0xffffffffu, p >= 0);
    if constexpr (kMany)
        return reduce_token_many<T, kSrc, kUnroll, kChunked, kPartBf16>(c, out, out_w, node_pos, y, y_w, self_row0, t,
                                                                        with_weights, lane, p, present);
    const int n_src = __popc(present);
    const int q = node_pos != nullptr && lane < M && lane != node ? node_pos[static_cast<int64_t>(t) * M + lane] : -1;
    const unsigned remote = __ballot_sync(0xffffffffu, q >= 0);
    const uint8_t* comb = c.base + c.off_comb;
    const float* comb_w = reinterpret_cast<const float*>(c.base + c.off_comb_w);
    const int4* rows[kSrc];
    const float* wrows[kSrc];
    unsigned m = present;
#pragma unroll
    for (int j = 0; j < kSrc; ++j) {
        rows[j] = nullptr;
        wrows[j] = nullptr;
        if (m == 0) continue;
        const int l = __ffs(m) - 1;
        m &= m - 1;
        const int pr = __shfl_sync(0xffffffffu, p, l);
        const int r = kChunked ? l : r0 + l;
        if (r == c.rank) {
            const int64_t i = static_cast<int64_t>(self_row0) + pr;
            rows[j] = reinterpret_cast<const int4*>(y + i * c.hidden);
            wrows[j] = y_w != nullptr ? y_w + i * K : nullptr;
        } else {
            const int64_t slot = static_cast<int64_t>(l) * c.max_tokens + pr;
            rows[j] = reinterpret_cast<const int4*>(comb + slot * c.comb_stride);
            wrows[j] = comb_w + slot * K;
        }
    }
    const uint8_t* partials = c.base + c.off_comb_rdma;
    const int64_t pw = part_w_off(c, kPartBf16);  // (the partials' summed weights)
    int4* dst = reinterpret_cast<int4*>(out + static_cast<int64_t>(t) * c.hidden);
    // Every lane runs every iteration (the shuffles below need the whole warp); loads and stores are guarded.
    for (int step = 0; step < nvec; step += kUnroll * kWarp) {
        const int v0 = step + lane;
        int4 buf[kUnroll][kSrc];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
            for (int j = 0; j < kSrc; ++j)
                if (j < n_src && v0 + u * kWarp < nvec) buf[u][j] = ld_v4<kChunked ? 2 : 1>(rows[j] + v0 + u * kWarp);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const bool valid = v0 + u * kWarp < nvec;
            float acc[kPer];
#pragma unroll
            for (int e = 0; e < kPer; ++e) acc[e] = 0.f;
#pragma unroll
            for (int j = 0; j < kSrc; ++j)
                if (j < n_src && valid) Vec<T>::add(acc, buf[u][j]);
            for (unsigned rm = remote; rm; rm &= rm - 1) {
                const int src_node = __ffs(rm) - 1;
                const int qr = __shfl_sync(0xffffffffu, q, src_node);
                const int64_t at = (static_cast<int64_t>(src_node) * c.max_tokens + qr) * c.pcomb_stride;
                if (valid) add_partial<T, kPartBf16>(acc, partials + at, v0 + u * kWarp);
            }
            if (valid) st_na_v4(dst + v0 + u * kWarp, Vec<T>::pack(acc));
        }
    }
    if (with_weights) {
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kSrc; ++j)
            if (j < n_src && lane < K) sum += kChunked ? *reinterpret_cast<const volatile float*>(wrows[j] + lane)
                                                       : wrows[j][lane];
        for (unsigned rm = remote; rm; rm &= rm - 1) {
            const int src_node = __ffs(rm) - 1;
            const int qr = __shfl_sync(0xffffffffu, q, src_node);
            if (lane < K)
                sum += reinterpret_cast<const float*>(partials + (static_cast<int64_t>(src_node) * c.max_tokens + qr) *
                                                                     c.pcomb_stride + pw)[lane];
        }
        if (lane < K) out_w[static_cast<int64_t>(t) * K + lane] = sum;
    }
    return true;
}


// kPartBf16: the other nodes' partial sums are bf16 (bf16 rows only; a template argument, so that the kernels
// without them keep their code: a runtime flag cost the one-node reduce 2 us of 91 at 4096 tokens, session 41 r1).
template <typename T, int kSrc, int kUnroll, bool kMany, bool kPartBf16>
__global__ void __launch_bounds__(kReduceThreads) combine_reduce_kernel(NormalCtx c, T* out, float* out_w,
                                                                        const int* send_pos, const int* node_pos,
                                                                        int num_tokens, int with_weights,
                                                                        const T* y, const float* y_w,
                                                                        const int* recv_off, const int* tag) {
    const int N = c.num_ranks;
    const int64_t seq = c.seq[kSeqCombine] + 1;
    const int sig = combine_sig(sizeof(T), with_weights != 0, kPartBf16, tag);
    bool ok = wait_local(c, kFlagCombReady, seq, kOpCombineReduce, sig);
    // every RDMA peer's partials, even with no tokens here (node_pos may then be null): the round must be complete
    // before kFlagCombFree below lets anyone write into my buffers again
    if (ok && c.ranks_per_node < N) ok = wait_rdma_peers(c, kFlagCombRdma, seq, kOpCombineReduce, sig);
    if (ok) {
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
        const int self_row0 = recv_off[c.rank];
        for (int t = blockIdx.x * kReduceWarps + warp; t < num_tokens; t += gridDim.x * kReduceWarps)
            reduce_token<T, kSrc, kUnroll, false, kMany, kPartBf16>(c, out, out_w, send_pos, node_pos, y, y_w,
                                                                    self_row0, t, with_weights, lane);
    }
    // Every block has read its slots: each pusher may write into my buffers again.
    if (last_block(c.block_counter + 2)) {
        if (static_cast<int>(threadIdx.x) < N) set_flag(c, threadIdx.x, kFlagCombFree, c.rank, seq);
        if (threadIdx.x == 0) c.seq[kSeqCombine] = seq;
    }
}

// The fused combine of one node (see launch_combine_fused). Push blocks: warp g takes chunk g / (N - 1) of the
// rows for source (me + 1 + g % (N - 1)) % N (the sources in turn, so that no rank's links take everyone's first
// rows), writes its rows, then raises the chunk's flag in that source's comb_flags. Reduce blocks: one warp per
// token, in token order, each peer's row read once its chunk's flag holds this round. Rows are in token order
// within each source's list, so the reduction follows the pushes closely.
template <typename T, int kSrc, int kUnroll, bool kMany>
__global__ void __launch_bounds__(kReduceThreads) combine_fused_kernel(NormalCtx c, T* out, float* out_w,
                                                                       const int* send_pos, int num_tokens,
                                                                       int with_weights, const T* y, const float* y_w,
                                                                       const int* recv_src, const int* recv_off,
                                                                       int num_rows, int push_blocks,
                                                                       const int* tag) {
    const int N = c.num_ranks, me = c.rank;
    const int64_t seq = c.seq[kSeqCombine] + 1;
    const int sig = combine_sig(sizeof(T), with_weights != 0, false, tag);  // (one node: no partial sums)
    const int nchunks = (c.max_tokens + kCombChunk - 1) / kCombChunk;
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
    if (static_cast<int>(blockIdx.x) < push_blocks) {
        __shared__ int off[kMaxLocal + 1];  // (one node)
        // every rank must have finished reducing the previous round before its buffers are overwritten. (An error
        // of this call's signature check, reported meanwhile by this kernel's reduce blocks, does not stop the
        // pushes: the peers check these rows' signature themselves, and without them they would time out.)
        const bool ok = wait_all(c, kFlagCombFree, seq - 1, kOpCombine, kPlainFlag,
                                 (1u << kOpCombineKinds) | (1u << kOpCombineHandles));
        if (threadIdx.x <= static_cast<unsigned>(N)) off[threadIdx.x] = recv_off[threadIdx.x];
        __syncthreads();
        if (ok && N > 1) {
            const int R = min(off[N], num_rows), S = N - 1;
            const int64_t y_bytes = static_cast<int64_t>(c.hidden) * sizeof(T);
            int most = 0;
            for (int s = 0; s < N; ++s) most = max(most, min(off[s + 1], R) - min(off[s], R));
            const int per_source = (most + kCombChunk - 1) / kCombChunk;
            for (int g = blockIdx.x * warps + warp; g < per_source * S; g += push_blocks * warps) {
                const int ch = g / S, s = (me + 1 + g % S) % N;
                const int lo = min(off[s], R), cnt = min(off[s + 1], R) - lo;
                const int first = ch * kCombChunk, last = min(cnt, first + kCombChunk);
                if (first >= last) continue;
                for (int i = first; i < last; ++i)
                    push_combine_row(c, reinterpret_cast<const uint8_t*>(y), y_bytes, y_w, recv_src, off, lo + i,
                                     lane);
                __threadfence_system();  // this lane's stores of the chunk before its flag
                __syncwarp();
                if (lane == 0)
                    st_release_sys(reinterpret_cast<int64_t*>(peer(c, s) + c.off_comb_flags) +
                                       static_cast<int64_t>(me) * nchunks + ch,
                                   data_flag(seq, sig));
            }
        }
    } else {
        __shared__ int failed;  // read once per block: the warps' collectives below need uniform control flow
        if (threadIdx.x == 0) failed = has_error(c.err) ? 1 : 0;
        __syncthreads();
        const int64_t* flags = reinterpret_cast<const int64_t*>(c.base + c.off_comb_flags);
        const int self_row0 = recv_off[me];
        const int rb = static_cast<int>(blockIdx.x) - push_blocks, nrb = static_cast<int>(gridDim.x) - push_blocks;
        for (int t = rb * warps + warp; !failed && t < num_tokens; t += nrb * warps)
            if (!reduce_token<T, kSrc, kUnroll, true, kMany>(c, out, out_w, send_pos, nullptr, y, y_w, self_row0, t,
                                                             with_weights, lane, flags, nchunks, seq, sig))
                break;
    }
    // Every block has read its slots: each pusher may write into my buffers again.
    if (last_block(c.block_counter + 2)) {
        if (static_cast<int>(threadIdx.x) < N) set_flag(c, threadIdx.x, kFlagCombFree, me, seq);
        if (threadIdx.x == 0) c.seq[kSeqCombine] = seq;
    }
}

// The copy-engine combine's prologue (one block): waits, as the push blocks do, for every rank to have finished
// reducing the previous round, then writes the flag words the copy streams copy after each piece of rows:
// ce_flags[0, nchunks) zeros (copied over a source's chunk flags before any row, so that no reduction still
// reading the previous round's rows, more than LARGEEP_TIMEOUT_S late, takes the rows copied next as those), then
// [nchunks, 2 nchunks) this round's data flag, or zeros where this rank cannot raise flags (the wait gave up, or the
// Buffer has reported an error: as block_raises_data_flags; its peers then time out naming it). The copies are
// queued by the host whatever the wait found, so this kernel decides only what the flags say.
__global__ void __launch_bounds__(kReduceThreads) combine_ce_prologue_kernel(NormalCtx c, int64_t* ce_flags,
                                                                             int nchunks, int y_elem,
                                                                             int with_weights, const int* tag) {
    const int64_t seq = c.seq[kSeqCombine] + 1;
    const bool ok = wait_all(c, kFlagCombFree, seq - 1, kOpCombine);
    const bool raise = block_raises_data_flags(c, false) && ok;
    const int64_t v = raise ? data_flag(seq, combine_sig(y_elem, with_weights != 0, false, tag)) : 0;
    for (int i = threadIdx.x; i < nchunks; i += blockDim.x) {
        ce_flags[i] = 0;
        ce_flags[nchunks + i] = v;
    }
}

}  // namespace

NormalLayout normal_layout(int N, int E, int K, int H, int T, int P, int num_zc_slots) {
    HOST_ASSERT(N > 0 && P > 0 && N % P == 0 && E % N == 0, "bad normal layout sizes (ranks " << N << ", per node "
                << P << ", experts " << E << ")");
    NormalLayout l{};
    const int64_t row = 3 + E / N;
    const int64_t M = N / P;
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
    l.recv_stride = l.recv_off_src + 16;
    l.rdma_off_pos = l.recv_stride;
    l.rdma_stride = l.rdma_off_pos + align16(4ll * P);
    l.comb_stride = align16(static_cast<int64_t>(H) * 4);
    l.pcomb_stride = l.comb_stride + align16(4ll * K);
    l.off_flags = take(8ll * kNumFlagKinds * N);
    l.off_in_counts = take(4ll * N * row);
    l.off_out_counts = take(4ll * N * row);
    l.off_matrix = take(4ll * N * N);
    // receive slots: planes of N*T rows, token | ids | weights | scales | x (256-byte aligned); the copy slot's x
    // rows hold any input dtype (4 bytes an element), a zero-copy slot's 2-byte (bf16) or 1-byte (e4m3) rows
    const int64_t rows = static_cast<int64_t>(N) * T;
    auto plane = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
    l.pl_idx = plane(4 * rows);
    l.pl_w = l.pl_idx + plane(8 * rows * K);
    l.pl_scales = l.pl_w + plane(4 * rows * K);
    l.pl_x = l.pl_scales + plane(4 * rows * (H / 128));
    l.off_recv = take(l.pl_x + 4 * rows * H);
    l.num_zc_slots = num_zc_slots;
    l.zc_slot_bytes = plane(l.pl_x + 2 * rows * H);
    l.off_zc = take(l.zc_slot_bytes * num_zc_slots);
    l.off_comb = take(l.comb_stride * P * T);  // written by the ranks of my node only
    l.off_comb_w = take(4ll * P * T * K);
    l.off_comb_flags = take(8ll * N * ((T + kCombChunk - 1) / kCombChunk));
    // Several nodes only: RDMA staging and receive rows [M][T], forwarded combine rows [P][M][T], partial sums
    // staged and received [M][T].
    const bool multi = M > 1;
    l.off_rdma_send = take(multi ? l.rdma_stride * M * T : 0);
    l.off_rdma_recv = take(multi ? l.rdma_stride * M * T : 0);
    l.off_fwd_comb = take(multi ? l.pcomb_stride * P * M * T : 0);
    l.off_comb_send = take(multi ? l.pcomb_stride * M * T : 0);
    l.off_comb_rdma = take(multi ? l.pcomb_stride * M * T : 0);
    l.total_bytes = off;
    return l;
}

namespace {
// The reduction's loop shape by element type and ranks per node: kUnroll * kSrc = 16 loads in flight per lane;
// nodes of more than kReduceSrc ranks, and groups of more than 32 nodes, take reduce_token_many (kMany): sources in
// batches of kReduceSrc, 8 loads in flight (the registers of 16 and of the batch loop spill), nodes 32 at a time.
template <typename T, int S, int U, bool Many = false>
struct ReduceShape {
    using type = T;
    static constexpr int kSrc = S, kUnroll = U;
    static constexpr bool kMany = Many;
};
template <typename F>
void with_reduce_shape(int elem_bytes, int ranks_per_node, int nodes, F&& f) {
    HOST_ASSERT(elem_bytes == 2 || elem_bytes == 4, "combine output must be bf16 or float32");
    const int P = ranks_per_node;
    const bool many = P > kReduceSrc || nodes > kWarp;
    if (elem_bytes == 2) {
        using B = __nv_bfloat16;
        if (many) f(ReduceShape<B, kReduceSrc, 1, true>{});
        else if (P <= 2) f(ReduceShape<B, 2, 8>{});
        else if (P <= 4) f(ReduceShape<B, 4, 4>{});
        else f(ReduceShape<B, kReduceSrc, 2>{});
    } else {
        if (many) f(ReduceShape<float, kReduceSrc, 1, true>{});
        else if (P <= 2) f(ReduceShape<float, 2, 8>{});
        else if (P <= 4) f(ReduceShape<float, 4, 4>{});
        else f(ReduceShape<float, kReduceSrc, 2>{});
    }
}
}  // namespace

void launch_dispatch_prepare(const NormalCtx& ctx, const int64_t* topk_idx, int num_tokens, int* send_pos,
                             int* node_pos, int* self_token, IdCheck check, int num_sms, cudaStream_t stream) {
    HOST_ASSERT(ctx.num_topk <= kWarp, "num_topk must be <= 32");
    HOST_ASSERT(check.host == nullptr || num_tokens > 0, "an id check needs tokens (the host skips it)");
    const size_t smem = sizeof(int) * (ctx.num_experts / ctx.num_ranks);
    HOST_ASSERT(smem <= 48 * 1024, "too many experts per rank");
    const int nodes = ctx.num_ranks / ctx.ranks_per_node;
    HOST_ASSERT(nodes == 1 || node_pos != nullptr || num_tokens == 0, "node_pos missing");
    const int targets = ctx.num_ranks + (nodes > 1 ? nodes : 0);
    // Calls of more than kThreads tokens take several blocks per target (at most ceil(T / kThreads) of them) where
    // the dispatch's SM budget holds them all and the scratch has room.
    int chunks = 1;
    if (ctx.prep.gen != nullptr && targets <= kPrepMaxTargets)
        chunks = std::max(1, std::min({ceil_div(num_tokens, kThreads), num_sms / targets, kPrepMaxChunks}));
    dispatch_prepare_kernel<<<targets * chunks, kThreads, smem, stream>>>(ctx, topk_idx, num_tokens, send_pos,
                                                                          node_pos, self_token, check, chunks);
    LAUNCH_CHECK();
}

void launch_dispatch_notify(const NormalCtx& ctx, int* recv_off, int* send_off, int64_t* send_slot, int* fwd_off,
                            int* fwd_count, int my_slot, bool report, int* per_expert, int alignment, int row_kind,
                            int* tag, cudaStream_t stream) {
    HOST_ASSERT(tag != nullptr, "the handle's tag word is missing");
    HOST_ASSERT(my_slot >= 0 && my_slot <= ctx.num_zc_slots, "bad receive slot " << my_slot);
    HOST_ASSERT(!report || (per_expert != nullptr && alignment >= 1), "a reporting notify needs per_expert");
    HOST_ASSERT(my_slot == 0 || ctx.ranks_per_node == ctx.num_ranks, "zero-copy slots are for one node only");
    HOST_ASSERT(row_kind >= 0 && row_kind < 8, "bad row kind " << row_kind);
    dispatch_notify_kernel<<<1, kThreads, 0, stream>>>(ctx, recv_off, send_off, send_slot, fwd_off, fwd_count,
                                                       my_slot, report ? 1 : 0, per_expert, alignment, row_kind, tag);
    LAUNCH_CHECK();
}

void launch_dispatch_push(const NormalCtx& ctx, const void* x, int x_elem_bytes, const float* x_scales,
                          bool has_scales, const int64_t* topk_idx, const float* topk_weights, int num_tokens,
                          const int* send_pos, const int* send_off, const int64_t* send_slot, bool include_self,
                          int num_sms, const int* tag, cudaStream_t stream) {
    HOST_ASSERT(tag != nullptr, "the handle's tag word is missing");
    HOST_ASSERT((static_cast<int64_t>(ctx.hidden) * x_elem_bytes) % 16 == 0,
                "hidden * element size must be a multiple of 16");
    HOST_ASSERT(!include_self || (send_slot != nullptr && x_elem_bytes <= 2),
                "only a fresh dispatch of 1- or 2-byte rows fills a zero-copy slot");
    dispatch_push_kernel<<<std::max(1, num_sms), ctx.threads, 0, stream>>>(
        ctx, static_cast<const uint8_t*>(x), x_elem_bytes, x_scales, topk_idx, topk_weights, num_tokens, send_pos,
        send_off, send_slot, include_self ? 1 : 0, has_scales ? 1 : 0, tag);
    LAUNCH_CHECK();
}

void launch_dispatch_copyout(const NormalCtx& ctx, void* out_x, int x_elem_bytes, float* out_scales,
                             bool has_scales, int64_t* out_idx, float* out_w, int* recv_src, const int* recv_off,
                             int num_rows, bool cached, const void* x, const float* x_scales, const int64_t* topk_idx,
                             const float* topk_weights, const int* self_token, int my_slot, int num_sms,
                             const int* tag, cudaStream_t stream) {
    HOST_ASSERT(tag != nullptr, "the handle's tag word is missing");
    HOST_ASSERT(my_slot == 0 || !cached, "a cached dispatch uses the copy slot");
    dispatch_copyout_kernel<<<std::max(1, num_sms), ctx.threads, 0, stream>>>(
        ctx, static_cast<uint8_t*>(out_x), x_elem_bytes, out_scales, out_idx, out_w, recv_src, recv_off, num_rows,
        cached ? 1 : 0, static_cast<const uint8_t*>(x), x_scales, topk_idx, topk_weights, self_token, my_slot,
        has_scales ? 1 : 0, tag);
    LAUNCH_CHECK();
}

void launch_combine_push(const NormalCtx& ctx, const void* y, int y_elem_bytes, const float* y_w,
                         bool with_weights, bool part_bf16, const int* recv_src, const int* recv_off, int num_rows,
                         int num_sms, const int* tag, cudaStream_t stream) {
    HOST_ASSERT(tag != nullptr, "the handle's tag word is missing");
    HOST_ASSERT((static_cast<int64_t>(ctx.hidden) * y_elem_bytes) % 16 == 0,
                "hidden * element size must be a multiple of 16");
    HOST_ASSERT(!part_bf16 || y_elem_bytes == 2, "bf16 partial sums are for bf16 combines");
    combine_push_kernel<<<std::max(1, num_sms), ctx.threads, 0, stream>>>(
        ctx, static_cast<const uint8_t*>(y), y_elem_bytes, y_w, recv_src, recv_off, num_rows, with_weights ? 1 : 0,
        part_bf16 ? 1 : 0, tag);
    LAUNCH_CHECK();
}

void launch_combine_reduce(const NormalCtx& ctx, void* out, int out_elem_bytes, float* out_w, const int* send_pos,
                           const int* node_pos, int num_tokens, bool with_weights, bool part_bf16, const void* y,
                           const float* y_w, const int* recv_off, int num_sms, const int* tag, cudaStream_t stream) {
    HOST_ASSERT(tag != nullptr, "the handle's tag word is missing");
    HOST_ASSERT(!part_bf16 || out_elem_bytes == 2, "bf16 partial sums are for bf16 combines");
    HOST_ASSERT(ctx.ranks_per_node == ctx.num_ranks || node_pos != nullptr || num_tokens == 0, "node_pos missing");
    const int wi = with_weights ? 1 : 0;
    with_reduce_shape(out_elem_bytes, ctx.ranks_per_node, ctx.num_ranks / ctx.ranks_per_node, [&](auto shape) {
        using S = decltype(shape);
        using T = typename S::type;
        const dim3 grid(std::max(1, num_sms));
        if constexpr (sizeof(T) == 2) {
            if (part_bf16) {
                combine_reduce_kernel<T, S::kSrc, S::kUnroll, S::kMany, true><<<grid, kReduceThreads, 0, stream>>>(
                    ctx, static_cast<T*>(out), out_w, send_pos, node_pos, num_tokens, wi, static_cast<const T*>(y),
                    y_w, recv_off, tag);
                return;
            }
        }
        combine_reduce_kernel<T, S::kSrc, S::kUnroll, S::kMany, false><<<grid, kReduceThreads, 0, stream>>>(
            ctx, static_cast<T*>(out), out_w, send_pos, node_pos, num_tokens, wi, static_cast<const T*>(y), y_w,
            recv_off, tag);
    });
    LAUNCH_CHECK();
}

namespace {
// The fused kernel with push_blocks of its grid blocks pushing (0: none, the rows come by the copy engines).
void fused_grid(const NormalCtx& ctx, void* out, int out_elem_bytes, float* out_w, const int* send_pos,
                int num_tokens, bool with_weights, const void* y, const float* y_w, const int* recv_src,
                const int* recv_off, int num_rows, int grid, int push_blocks, const int* tag, cudaStream_t stream) {
    const int wi = with_weights ? 1 : 0;
    with_reduce_shape(out_elem_bytes, ctx.ranks_per_node, 1, [&](auto shape) {
        using S = decltype(shape);
        using T = typename S::type;
        combine_fused_kernel<T, S::kSrc, S::kUnroll, S::kMany><<<grid, kReduceThreads, 0, stream>>>(
            ctx, static_cast<T*>(out), out_w, send_pos, num_tokens, wi, static_cast<const T*>(y), y_w, recv_src,
            recv_off, num_rows, push_blocks, tag);
    });
    LAUNCH_CHECK();
}
}  // namespace

void launch_combine_fused(const NormalCtx& ctx, void* out, int out_elem_bytes, float* out_w, const int* send_pos,
                          int num_tokens, bool with_weights, const void* y, const float* y_w, const int* recv_src,
                          const int* recv_off, int num_rows, int num_sms, int push_eighths, const int* tag,
                          cudaStream_t stream) {
    HOST_ASSERT(tag != nullptr, "the handle's tag word is missing");
    HOST_ASSERT(ctx.ranks_per_node == ctx.num_ranks, "the fused combine is for groups of one node");
    HOST_ASSERT(push_eighths >= 1 && push_eighths <= 7, "push_eighths must be in [1, 7]");
    const int grid = std::max(2, num_sms);
    const int push_blocks = std::min(grid - 1, std::max(1, (grid * push_eighths + 4) / 8));
    fused_grid(ctx, out, out_elem_bytes, out_w, send_pos, num_tokens, with_weights, y, y_w, recv_src, recv_off,
               num_rows, grid, push_blocks, tag, stream);
}

void launch_combine_ce(const NormalCtx& ctx, const CopyLanes& lanes, const uint64_t* peers, int64_t* ce_flags,
                       void* out, int out_elem_bytes, float* out_w, const int* send_pos, int num_tokens,
                       bool with_weights, const void* y, const float* y_w, const int* recv_off,
                       const int* recv_counts, int num_sms, const int* tag, cudaStream_t stream) {
    const int N = ctx.num_ranks, me = ctx.rank, K = ctx.num_topk;
    HOST_ASSERT(tag != nullptr, "the handle's tag word is missing");
    HOST_ASSERT(ctx.ranks_per_node == N, "the copy-engine combine is for groups of one node");
    HOST_ASSERT(lanes.count >= N - 1 && ce_flags != nullptr, "the copy-engine combine's streams are not set up");
    HOST_ASSERT(out_elem_bytes == 2 || out_elem_bytes == 4, "combine output must be bf16 or float32");
    const int nchunks = (ctx.max_tokens + kCombChunk - 1) / kCombChunk;
    int64_t first[kMaxLocal + 1];
    first[0] = 0;
    for (int s = 0; s < N; ++s) {
        HOST_ASSERT(recv_counts[s] >= 0 && recv_counts[s] <= ctx.max_tokens, "bad row count " << recv_counts[s]
                    << " from rank " << s);
        first[s + 1] = first[s] + recv_counts[s];
    }
    HOST_ASSERT(!with_weights || first[N] == 0 || y_w != nullptr, "the combine's weights are missing");
    combine_ce_prologue_kernel<<<1, kReduceThreads, 0, stream>>>(ctx, ce_flags, nchunks, out_elem_bytes,
                                                                   with_weights ? 1 : 0, tag);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaEventRecord(lanes.fork, stream));
    // The reduction first: it sums each token once its pieces have come, beside the copies, which start as the
    // host queues them (the host takes a few microseconds per copy).
    fused_grid(ctx, out, out_elem_bytes, out_w, send_pos, num_tokens, with_weights, y, y_w, nullptr, recv_off, 0,
               std::max(1, num_sms), 0, tag, stream);
    const int64_t y_bytes = static_cast<int64_t>(ctx.hidden) * out_elem_bytes;
    const uint8_t* y8 = static_cast<const uint8_t*>(y);
    bool started[kMaxLocal] = {};
    // The call's stream waits for every copy stream it started, also when queueing failed half way (y must not be
    // reused while a copy still reads it); errors here are the first one's to report.
    // (every started stream is joined before an error of the join itself is raised)
    auto join = [&](bool checked) {
        cudaError_t first_error = cudaSuccess;
        for (int k = 1; k < N; ++k) {
            if (!started[k - 1]) continue;
            const cudaError_t e1 = cudaEventRecord(lanes.joins[k - 1], lanes.streams[k - 1]);
            const cudaError_t e2 = e1 == cudaSuccess ? cudaStreamWaitEvent(stream, lanes.joins[k - 1], 0) : e1;
            if (first_error == cudaSuccess) first_error = e2;
        }
        if (checked) CUDA_CHECK(first_error);
    };
    // Each source's rows in about kCePieces pieces of whole chunks: a piece's flags follow it, so the reduction
    // starts after the first piece rather than after every row. A piece costs the host about 12 us to queue (two
    // copies; three with weights) and the copy engine about 4 us to start (bench/micro/ce_copy_bench.cu, session
    // 44: 8 pieces of 4096 rows were host-bound), so the pieces are few and at least kCeMinRows rows.
    constexpr int kCePieces = 4, kCeMinRows = 256;
    try {
        // Every peer's zero flags first, then the pieces in turn over the peers (piece 0 to each, then piece 1, ...),
        // so that every copy stream has work as soon as the host has queued a few copies, not one after another.
        uint8_t* base[kMaxLocal] = {};
        int64_t* flags[kMaxLocal] = {};
        int piece[kMaxLocal] = {};
        const int64_t slot0 = static_cast<int64_t>(me - ctx.first_local) * ctx.max_tokens;
        for (int k = 1; k < N; ++k) {
            const int s = (me + k) % N;  // (every rank starts with another source)
            const int count = recv_counts[s];
            if (count == 0) continue;  // (s's reduction waits for no chunk of mine)
            base[k - 1] = reinterpret_cast<uint8_t*>(peers[s]);
            HOST_ASSERT(base[k - 1] != nullptr, "rank " << s << " is not mapped here");
            const cudaStream_t cs = lanes.streams[k - 1];
            CUDA_CHECK(cudaStreamWaitEvent(cs, lanes.fork, 0));
            started[k - 1] = true;
            flags[k - 1] = reinterpret_cast<int64_t*>(base[k - 1] + ctx.off_comb_flags) +
                           static_cast<int64_t>(me) * nchunks;
            const int used = (count + kCombChunk - 1) / kCombChunk;
            CUDA_CHECK(cudaMemcpyAsync(flags[k - 1], ce_flags, 8ll * used, cudaMemcpyDeviceToDevice, cs));
            const int rows = std::max(kCeMinRows, (count + kCePieces - 1) / kCePieces);
            piece[k - 1] = (rows + kCombChunk - 1) / kCombChunk * kCombChunk;  // (ceil(count / piece) <= kCePieces)
        }
        for (int i = 0; i < kCePieces; ++i) {
            for (int k = 1; k < N; ++k) {
                const int s = (me + k) % N, count = recv_counts[s];
                const int p = i * piece[k - 1];
                if (!started[k - 1] || p >= count) continue;
                const cudaStream_t cs = lanes.streams[k - 1];
                const int rows = std::min(piece[k - 1], count - p);
                const int64_t row0 = first[s] + p;
                CUDA_CHECK(cudaMemcpy2DAsync(base[k - 1] + ctx.off_comb + (slot0 + p) * ctx.comb_stride,
                                             ctx.comb_stride, y8 + row0 * y_bytes, y_bytes, y_bytes, rows,
                                             cudaMemcpyDeviceToDevice, cs));
                if (with_weights)
                    CUDA_CHECK(cudaMemcpyAsync(base[k - 1] + ctx.off_comb_w + (slot0 + p) * K * 4, y_w + row0 * K,
                                               4ll * rows * K, cudaMemcpyDeviceToDevice, cs));
                // (a copy starts once the one before it on its stream has completed, its writes visible to every
                // GPU, as for a peer that waits on an event recorded after it: the flags land after their rows)
                const int c0 = p / kCombChunk, c1 = (p + rows + kCombChunk - 1) / kCombChunk;
                CUDA_CHECK(cudaMemcpyAsync(flags[k - 1] + c0, ce_flags + nchunks + c0, 8ll * (c1 - c0),
                                           cudaMemcpyDeviceToDevice, cs));
            }
        }
    } catch (...) {
        join(false);
        throw;
    }
    join(true);
}

}  // namespace largeep
