// get_dispatch_layout: one thread per token; block-level histograms in shared memory, then one global atomic per
// non-zero bin, into counts the launcher zeroed first (cudaMemsetAsync); a grid of one block (up to 256 tokens, the
// small calls whose cost is the host's) stores its histograms as the counts instead, so that the call is one launch
// rather than five. Each block clears its own tokens' rows of is_token_in_rank before setting them. With a check
// (the host's expert-id range check, done here instead of a separate min/max reduction and copy): the lowest id
// below -1 and the highest id >= E go to device scratch by atomics, and the last block copies them to host-mapped
// words, then writes the call's token into the done word the host waits on (the Buffer is not marked failed: the
// host raises an argument error). The low-latency dispatch runs the same check alone (id_check_kernel), before its
// send.
#include "launch.cuh"

namespace largeep {

namespace {

constexpr int kLayoutThreads = 256;

// Every block, once all its threads have noted their ids: the last block to get here hands the scratch's result
// to the host (and clears the scratch for the next check).
__device__ __forceinline__ void finish_id_check(const LayoutCheck& check) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        auto* sc = reinterpret_cast<unsigned long long*>(check.scratch);
        if (atomicAdd(sc + 2, 1ull) == gridDim.x - 1) {  // the last block: every block's atomics are done
            __threadfence();
            const auto lowest = static_cast<int64_t>(atomicExch(sc, 0ull));
            const auto highest = static_cast<int64_t>(atomicExch(sc + 1, 0ull));
            sc[2] = 0;
            publish_id_check(check.host, lowest, highest, check.token);
        }
    }
}

__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(const int64_t* topk_idx, int T, int K, int N, int E,
                                                                int P, int* per_rank, int* per_node,
                                                                int* per_expert, bool* in_rank, LayoutCheck check) {
    extern __shared__ int hist[];  // [E] experts | [N] ranks | [N/P] nodes
    int* h_rank = hist + E;
    int* h_node = h_rank + N;
    const int nodes = N / P, epr = E / N;
    for (int i = threadIdx.x; i < E + N + nodes; i += blockDim.x) hist[i] = 0;
    {  // this block's rows of in_rank, cleared with consecutive threads on consecutive bytes
        const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x * N;
        const int64_t end = min(static_cast<int64_t>(blockIdx.x + 1) * blockDim.x, static_cast<int64_t>(T)) * N;
        for (int64_t i = first + threadIdx.x; i < end; i += blockDim.x) in_rank[i] = false;
    }
    __syncthreads();  // (a thread sets flags in rows another thread cleared)
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < T) {
        const int64_t* row = topk_idx + static_cast<int64_t>(t) * K;
        for (int k = 0; k < K; ++k) {
            const int64_t e = row[k];
            if (check.scratch != nullptr && (e < -1 || e >= E))
                note_bad_id(reinterpret_cast<long long*>(check.scratch), e, E);
            if (e < 0 || e >= E) continue;  // (unchecked: an id out of range counts nowhere, as -1, like dispatch)
            // count an expert, a rank, a node once per token however many of its choices land there
            bool seen_e = false, seen_r = false, seen_n = false;
            const int r = static_cast<int>(e) / epr, n = r / P;
            for (int j = 0; j < k; ++j) {
                const int64_t f = row[j];
                if (f < 0 || f >= E) continue;
                seen_e |= (f == e);
                seen_r |= (static_cast<int>(f) / epr == r);
                seen_n |= (static_cast<int>(f) / epr / P == n);
            }
            if (!seen_e) atomicAdd(&hist[e], 1);
            if (!seen_r) {
                atomicAdd(&h_rank[r], 1);
                in_rank[static_cast<int64_t>(t) * N + r] = true;
            }
            if (!seen_n) atomicAdd(&h_node[n], 1);
        }
    }
    __syncthreads();
    const bool alone = gridDim.x == 1;  // (the counts were not zeroed: every bin is stored, zeros too)
    for (int i = threadIdx.x; i < E + N + nodes; i += blockDim.x) {
        const int v = hist[i];
        int* to = i < E ? per_expert + i : i < E + N ? per_rank + (i - E) : per_node + (i - E - N);
        if (alone) *to = v;
        else if (v != 0) atomicAdd(to, v);
    }
    if (check.scratch != nullptr) finish_id_check(check);
}

// The expert-id range check alone (the low-latency dispatch's, before its send): one thread per id.
__global__ void __launch_bounds__(kLayoutThreads) id_check_kernel(const int64_t* ids, int64_t n, int E,
                                                                  LayoutCheck check) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) note_bad_id(reinterpret_cast<long long*>(check.scratch), ids[i], E);
    finish_id_check(check);
}

}  // namespace

void launch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_ranks, int num_experts,
                   int ranks_per_node, int* per_rank, int* per_node, int* per_expert, bool* in_rank,
                   LayoutCheck check, cudaStream_t stream) {
    HOST_ASSERT(num_ranks > 0 && ranks_per_node > 0 && num_experts % num_ranks == 0 &&
                num_ranks % ranks_per_node == 0, "bad layout sizes: num_experts " << num_experts << ", num_ranks "
                << num_ranks << ", ranks_per_node " << ranks_per_node);
    HOST_ASSERT((check.scratch == nullptr) == (check.host == nullptr), "a layout check needs scratch and host words");
    HOST_ASSERT(check.scratch == nullptr || num_tokens > 0, "a layout check needs tokens (the host skips it)");
    const int nodes = num_ranks / ranks_per_node, blocks = ceil_div(num_tokens, kLayoutThreads);
    const size_t smem = sizeof(int) * (num_experts + num_ranks + nodes);  // (checked before anything is queued)
    HOST_ASSERT(smem <= 48 * 1024, "too many counters for the layout kernel's 48 KiB of shared memory: num_experts "
                << num_experts << " + num_ranks " << num_ranks << " + nodes " << nodes);
    if (blocks != 1) {  // (one block stores every count itself)
        if (per_node == per_rank + num_ranks && per_expert == per_node + nodes) {  // one allocation, in this order
            CUDA_CHECK(cudaMemsetAsync(per_rank, 0, sizeof(int) * (num_ranks + nodes + num_experts), stream));
        } else {
            CUDA_CHECK(cudaMemsetAsync(per_rank, 0, sizeof(int) * num_ranks, stream));
            CUDA_CHECK(cudaMemsetAsync(per_node, 0, sizeof(int) * nodes, stream));
            CUDA_CHECK(cudaMemsetAsync(per_expert, 0, sizeof(int) * num_experts, stream));
        }
    }
    if (num_tokens == 0) return;
    layout_kernel<<<blocks, kLayoutThreads, smem, stream>>>(
        topk_idx, num_tokens, num_topk, num_ranks, num_experts, ranks_per_node, per_rank, per_node, per_expert,
        in_rank, check);
    LAUNCH_CHECK();
}

void launch_id_check(const int64_t* ids, int64_t n, int num_experts, LayoutCheck check, cudaStream_t stream) {
    HOST_ASSERT(check.scratch != nullptr && check.host != nullptr && n > 0,
                "an id check needs ids, scratch and host words");
    id_check_kernel<<<ceil_div(n, kLayoutThreads), kLayoutThreads, 0, stream>>>(ids, n, num_experts, check);
    LAUNCH_CHECK();
}

}  // namespace largeep
