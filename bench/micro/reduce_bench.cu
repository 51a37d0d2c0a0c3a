// Microbenchmark of the normal combine's reduction (reduce_token in csrc/kernels/intranode.cu, the reduce blocks of
// the fused combine inside one node): out[t] = sum over the ranks r of the node holding a row of token t (send_pos[t,
// r] >= 0) of that row, in float32, rounded to bf16. Rank 0 is "me": its rows are read from y (row send_pos[t, 0]),
// every other rank's from its combine slots (comb[r][send_pos[t, r]], rows comb_stride bytes apart), as the library
// lays them out. No flags (the rows are all there before the launch): this times the reading and summing alone, the
// part that the SM budget limits. Variants of the same output, each checked against a host reference, timed one
// launch at a time (device events; L2 flushed before each launch).
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/reduce_bench bench/micro/reduce_bench.cu && /tmp/reduce_bench
//   (COPY_ONLY=1 /tmp/reduce_bench: plain row copies instead, the per-SM ceiling; see copy_bench)
//
// v0: reduce_token's loop as of session 31: one warp per token, kUnroll x kSrc 16-byte volatile loads in flight per
//     lane, 16 warps a block.
// v0w: v0 with weak loads (ld.global.L1::no_allocate) instead of volatile ones.
// v1: v0w, each warp loading its next token's positions before it reads this token's rows ("unroll 12": 12 x 2 or
//     6 x 4 loads in flight a lane).
// v2<ring>: one block per SM, warp 0 fetches rows into a ring of `ring` row slots in shared memory with bulk async
//     copies (cp.async.bulk, completion on an mbarrier per slot), the other 15 warps sum each token's slots and
//     store the result; tokens strided over the blocks as in v0.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../../csrc/kernels/ptx.cuh"  // ld_volatile_v4, st_na_v4 (no NVSHMEM)
#include "../../csrc/kernels/vec.cuh"  // pack_bf16x8, Vec (no NVSHMEM)

using largeep::ld_volatile_v4;
using largeep::pack_bf16x8;
using largeep::st_na_v4;
using largeep::Vec;

#include "micro.cuh"  // CK

constexpr int kWarp = 32;
constexpr int kThreads = 512;

struct Args {
    const __nv_bfloat16* y;  // [rows, H]: my own rows
    const uint8_t* comb;     // [P][T] slots of comb_stride bytes: the rows pushed back to me
    const int* send_pos;     // [T, P]
    __nv_bfloat16* out;      // [T, H]
    int T, H, P;
    int64_t comb_stride;
};

// weak 16-byte load without L1 allocation (the library's ld_v4<1>, whose header needs NVSHMEM)
__device__ __forceinline__ int4 ld_weak_v4(const int4* p) {
    int4 v;
    asm volatile("ld.global.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
__device__ __forceinline__ void add_bf16x8(float* acc, int4 v) { Vec<__nv_bfloat16>::add(acc, v); }
__device__ __forceinline__ const int4* row_of(const Args& a, int r, int pr) {
    return r == 0 ? reinterpret_cast<const int4*>(a.y + static_cast<int64_t>(pr) * a.H)
                  : reinterpret_cast<const int4*>(a.comb + (static_cast<int64_t>(r) * a.T + pr) * a.comb_stride);
}

// ---- v0 / v0w / v1 (kPrefetch) ----
template <int kSrc, int kUnroll, bool kVolatile, bool kPrefetch = false>
__global__ void __launch_bounds__(kThreads) reduce_v0(Args a) {
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
    const int nvec = a.H / 8, stride = gridDim.x * warps;
    auto positions = [&](int t) { return t < a.T && lane < a.P ? a.send_pos[static_cast<int64_t>(t) * a.P + lane] : -1; };
    int p_next = kPrefetch ? positions(blockIdx.x * warps + warp) : -1;
    for (int t = blockIdx.x * warps + warp; t < a.T; t += stride) {
        int p = p_next;
        if constexpr (kPrefetch) p_next = positions(t + stride);
        else p = positions(t);
        const unsigned present = __ballot_sync(0xffffffffu, p >= 0);
        const int n_src = __popc(present);
        const int4* rows[kSrc];
        unsigned m = present;
#pragma unroll
        for (int j = 0; j < kSrc; ++j) {
            rows[j] = nullptr;
            if (m == 0) continue;
            const int l = __ffs(m) - 1;
            m &= m - 1;
            rows[j] = row_of(a, l, __shfl_sync(0xffffffffu, p, l));
        }
        int4* dst = reinterpret_cast<int4*>(a.out + static_cast<int64_t>(t) * a.H);
        for (int step = 0; step < nvec; step += kUnroll * kWarp) {
            const int v0 = step + lane;
            int4 buf[kUnroll][kSrc];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
#pragma unroll
                for (int j = 0; j < kSrc; ++j)
                    if (j < n_src && v0 + u * kWarp < nvec)
                        buf[u][j] = kVolatile ? ld_volatile_v4(rows[j] + v0 + u * kWarp)
                                              : ld_weak_v4(rows[j] + v0 + u * kWarp);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                float acc[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[e] = 0.f;
#pragma unroll
                for (int j = 0; j < kSrc; ++j)
                    if (j < n_src && v0 + u * kWarp < nvec) add_bf16x8(acc, buf[u][j]);
                if (v0 + u * kWarp < nvec) st_na_v4(dst + v0 + u * kWarp, pack_bf16x8(acc));
            }
        }
    }
}

// ---- v2: bulk async copies into a ring of row slots ----
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
    uint32_t ok;
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(ok)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    return ok != 0;
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    while (!mbar_try_wait(bar, parity)) {
    }
}
__device__ __forceinline__ void bulk_load(void* dst_smem, const void* src, uint32_t bytes, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            smem_addr(dst_smem)),
        "l"(src), "r"(bytes), "r"(smem_addr(bar))
        : "memory");
}

// Bytes before the first row slot of the copy kernels' shared memory (their mbarriers, 128-byte aligned).
__host__ __device__ constexpr int copy_ring_head(int ring) { return 128 * ((ring * 8 + 127) / 128); }

// A row store from shared memory into global memory, in the current bulk group, and the group's commit.
__device__ __forceinline__ void bulk_store(void* dst, const void* src_smem, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_addr(src_smem)),
                 "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// The copy kernels' shared memory: `ring` mbarriers (one arrival each, initialised by the calling thread), then the
// row slots, 128-byte aligned; returns the first slot.
__device__ __forceinline__ uint8_t* copy_ring(uint8_t* smem, int ring) {
    uint64_t* full = reinterpret_cast<uint64_t*>(smem);
    for (int i = 0; i < ring; ++i) mbar_init(full + i, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    return smem + copy_ring_head(ring);
}

// Shared memory: full[ring], empty[ring] (mbarriers), meta[ring] (token, rows of that token), then the row slots.
__global__ void __launch_bounds__(kThreads) reduce_v2(Args a, int ring, int pieces, int skip_sum) {
    extern __shared__ __align__(128) uint8_t smem[];
    uint64_t* full = reinterpret_cast<uint64_t*>(smem);
    uint64_t* empty = full + ring;
    int2* meta = reinterpret_cast<int2*>(empty + ring);
    const int head = (ring * 24 + 127) / 128 * 128;
    uint8_t* slots = smem + head;
    const uint32_t row_bytes = static_cast<uint32_t>(a.H) * 2;
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int consumers = blockDim.x / kWarp - 1;
    if (threadIdx.x == 0) {
        for (int i = 0; i < ring; ++i) {
            mbar_init(full + i, 1);
            mbar_init(empty + i, consumers);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    const int stride = gridDim.x;
    if (warp == 0) {
        uint32_t seq = 0;  // slots taken so far
        for (int base = blockIdx.x; base < a.T; base += stride * kWarp) {
            // lane j: the positions of token base + j * stride (one load latency for 32 tokens)
            const int tj = base + lane * stride;
            int pos[8];
#pragma unroll
            for (int r = 0; r < 8; ++r) pos[r] = (tj < a.T && r < a.P) ? a.send_pos[static_cast<int64_t>(tj) * a.P + r] : -1;
            for (int j = 0; j < kWarp; ++j) {
                const int t = base + j * stride;
                if (t >= a.T) break;
                int pj[8];
                int n = 0;
#pragma unroll
                for (int r = 0; r < 8; ++r) {
                    pj[r] = __shfl_sync(0xffffffffu, pos[r], j);
                    n += pj[r] >= 0;
                }
                if (lane == 0) {
                    if (n == 0) {
                        const int s = seq % ring;
                        mbar_wait(empty + s, ((seq / ring) & 1) ^ 1);
                        meta[s] = make_int2(t, 0);
                        mbar_arrive(full + s);
                        ++seq;
                    }
#pragma unroll
                    for (int r = 0; r < 8; ++r) {
                        if (pj[r] < 0) continue;
                        const int s = seq % ring;
                        mbar_wait(empty + s, ((seq / ring) & 1) ^ 1);
                        meta[s] = make_int2(t, n);
                        mbar_arrive_expect_tx(full + s, row_bytes);
                        const uint32_t piece = row_bytes / pieces;  // pieces divides H / 8
                        for (int q = 0; q < pieces; ++q)
                            bulk_load(slots + static_cast<int64_t>(s) * row_bytes + q * piece,
                                      reinterpret_cast<const uint8_t*>(row_of(a, r, pj[r])) + q * piece, piece,
                                      full + s);
                        ++seq;
                    }
                }
            }
        }
    } else {
        const int c = threadIdx.x - kWarp, nc = blockDim.x - kWarp, nvec = a.H / 8;
        uint32_t seq = 0;
        for (int t = blockIdx.x; t < a.T; t += stride) {
            const int s0 = seq % ring;
            mbar_wait(full + s0, (seq / ring) & 1);
            const int n = meta[s0].y;
            for (int k = 1; k < n; ++k) mbar_wait(full + (seq + k) % ring, ((seq + k) / ring) & 1);
            int4* dst = reinterpret_cast<int4*>(a.out + static_cast<int64_t>(t) * a.H);
            for (int v = c; !skip_sum && v < nvec; v += nc) {
                float acc[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[e] = 0.f;
                for (int k = 0; k < n; ++k)
                    add_bf16x8(acc, reinterpret_cast<const int4*>(slots + static_cast<int64_t>((seq + k) % ring) *
                                                                              row_bytes)[v]);
                st_na_v4(dst + v, pack_bf16x8(acc));
            }
            __syncwarp();
            if (lane == 0)
                for (int k = 0; k < (n > 0 ? n : 1); ++k) mbar_arrive(empty + (seq + k) % ring);
            seq += n > 0 ? n : 1;
        }
    }
}

// ---- copies: the per-SM ceiling of reading and writing rows (no sum) ----
// c<kThr, kIn>: block b copies rows b, b + grid, ... (H bf16 each) from src to dst, kIn 16-byte loads in flight per
// lane, a warp per row.
template <int kThr, int kIn>
__global__ void __launch_bounds__(kThr) copy_regs(const int4* src, int4* dst, int rows, int nvec) {
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = kThr / kWarp;
    for (int r = blockIdx.x * warps + warp; r < rows; r += gridDim.x * warps) {
        const int4* s = src + static_cast<int64_t>(r) * nvec;
        int4* d = dst + static_cast<int64_t>(r) * nvec;
        for (int v0 = lane; v0 < nvec; v0 += kIn * kWarp) {
            int4 buf[kIn];
#pragma unroll
            for (int u = 0; u < kIn; ++u)
                if (v0 + u * kWarp < nvec) buf[u] = ld_weak_v4(s + v0 + u * kWarp);
#pragma unroll
            for (int u = 0; u < kIn; ++u)
                if (v0 + u * kWarp < nvec) st_na_v4(d + v0 + u * kWarp, buf[u]);
        }
    }
}

// t: one thread per block moves rows through a ring of `ring` row slots in shared memory: a bulk load into the slot
// (mbarrier completion), then a bulk store from it (bulk group); a slot is reloaded once its store has read it.
__global__ void copy_tma(const uint8_t* src, uint8_t* dst, int rows, int row_bytes, int ring) {
    extern __shared__ __align__(128) uint8_t smem[];
    uint64_t* full = reinterpret_cast<uint64_t*>(smem);
    if (threadIdx.x != 0) return;
    uint8_t* slots = copy_ring(smem, ring);
    int n = 0;  // rows of this block so far
    for (int r = blockIdx.x; r < rows; r += gridDim.x, ++n) {
        const int s = n % ring;
        if (n >= ring) {
            // the store that read slot s (ring rows ago) has finished reading it: at most ring - 1 newer pending
            asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(0) : "memory");
        }
        mbar_arrive_expect_tx(full + s, row_bytes);
        bulk_load(slots + static_cast<int64_t>(s) * row_bytes, src + static_cast<int64_t>(r) * row_bytes, row_bytes,
                  full + s);
        // wait for this row, then store it
        mbar_wait(full + s, (n / ring) & 1);
        bulk_store(dst + static_cast<int64_t>(r) * row_bytes, slots + static_cast<int64_t>(s) * row_bytes, row_bytes);
        bulk_commit();
    }
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// t2: as t, but the loads run `ring - 1` rows ahead of the stores (a pipeline rather than load, wait, store).
__global__ void copy_tma2(const uint8_t* src, uint8_t* dst, int rows, int row_bytes, int ring) {
    extern __shared__ __align__(128) uint8_t smem[];
    uint64_t* full = reinterpret_cast<uint64_t*>(smem);
    if (threadIdx.x != 0) return;
    uint8_t* slots = copy_ring(smem, ring);
    const int mine = rows > static_cast<int>(blockIdx.x) ? (rows - 1 - blockIdx.x) / gridDim.x + 1 : 0;
    const int ahead = ring - 1;
    auto load = [&](int n) {
        const int s = n % ring, r = blockIdx.x + n * gridDim.x;
        mbar_arrive_expect_tx(full + s, row_bytes);
        bulk_load(slots + static_cast<int64_t>(s) * row_bytes, src + static_cast<int64_t>(r) * row_bytes, row_bytes,
                  full + s);
    };
    for (int n = 0; n < min(ahead, mine); ++n) load(n);
    for (int n = 0; n < mine; ++n) {
        const int s = n % ring, r = blockIdx.x + n * gridDim.x;
        mbar_wait(full + s, (n / ring) & 1);
        bulk_store(dst + static_cast<int64_t>(r) * row_bytes, slots + static_cast<int64_t>(s) * row_bytes, row_bytes);
        bulk_commit();
        if (n + ahead < mine) {
            // slot (n + ahead) % ring last held row n - 1, whose store is the newest but one: let it finish reading
            asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(1) : "memory");
            load(n + ahead);
        }
    }
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// `iters` launches, each alone and after an L2 flush, timed with events: their times in us, sorted.
template <typename F>
static std::vector<float> time_launches(F&& launch, int iters, cudaEvent_t e0, cudaEvent_t e1, int* flush,
                                        size_t flush_bytes) {
    std::vector<float> ts;
    for (int it = 0; it < iters; ++it) {
        CK(cudaMemsetAsync(flush, it, flush_bytes));
        CK(cudaEventRecord(e0));
        launch();
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        ts.push_back(ms * 1000.f);
    }
    std::sort(ts.begin(), ts.end());
    return ts;
}

static void copy_bench(cudaEvent_t e0, cudaEvent_t e1, int* flush, size_t flush_bytes) {
    const int rows = 8192, H = 7168, row_bytes = H * 2, nvec = row_bytes / 16;
    uint8_t *src, *dst;
    CK(cudaMalloc(&src, static_cast<size_t>(rows) * row_bytes));
    CK(cudaMalloc(&dst, static_cast<size_t>(rows) * row_bytes));
    std::vector<uint8_t> h(static_cast<size_t>(rows) * row_bytes);
    for (size_t i = 0; i < h.size(); ++i) h[i] = static_cast<uint8_t>(i * 2654435761u >> 13);
    CK(cudaMemcpy(src, h.data(), h.size(), cudaMemcpyHostToDevice));
    for (auto f : {copy_tma, copy_tma2})
        CK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
    const int max_ring = (227 * 1024 - 1024) / row_bytes;
    std::printf("\ncopy of %d rows of %d bytes (read + write counted)\n", rows, row_bytes);
    std::printf("%-6s %-22s %10s %10s %10s %9s %10s %s\n", "blocks", "variant", "us_median", "us_p10", "us_p90",
                "GB/s", "GB/s/SM", "check");
    struct C {
        const char* name;
        int kind;  // 0..3 registers, 4 tma, 5 tma2
        int ring;
    };
    const std::vector<C> cs = {{"regs 512 thr x 8", 0, 0},   {"regs 512 thr x 16", 1, 0},
                               {"regs 1024 thr x 8", 2, 0},  {"regs 256 thr x 16", 3, 0},
                               {"tma ring max", 4, max_ring}, {"tma2 ring 4", 5, 4},
                               {"tma2 ring 8", 5, 8},        {"tma2 ring max", 5, max_ring}};
    for (int blocks : {1, 5, 15, 132}) {
        for (const C& c : cs) {
            auto launch = [&]() {
                const size_t sm = copy_ring_head(c.ring) + static_cast<size_t>(c.ring) * row_bytes;
                const int4* s4 = reinterpret_cast<const int4*>(src);
                int4* d4 = reinterpret_cast<int4*>(dst);
                switch (c.kind) {
                    case 0: copy_regs<512, 8><<<blocks, 512>>>(s4, d4, rows, nvec); break;
                    case 1: copy_regs<512, 16><<<blocks, 512>>>(s4, d4, rows, nvec); break;
                    case 2: copy_regs<1024, 8><<<blocks, 1024>>>(s4, d4, rows, nvec); break;
                    case 3: copy_regs<256, 16><<<blocks, 256>>>(s4, d4, rows, nvec); break;
                    case 4: copy_tma<<<blocks, 32, sm>>>(src, dst, rows, row_bytes, c.ring); break;
                    default: copy_tma2<<<blocks, 32, sm>>>(src, dst, rows, row_bytes, c.ring); break;
                }
                CK(cudaGetLastError());
            };
            CK(cudaMemset(dst, 0, h.size()));
            launch();
            CK(cudaDeviceSynchronize());
            std::vector<uint8_t> got(h.size());
            CK(cudaMemcpy(got.data(), dst, got.size(), cudaMemcpyDeviceToHost));
            const bool ok = got == h;
            const std::vector<float> ts = time_launches(launch, blocks == 1 ? 5 : 20, e0, e1, flush, flush_bytes);
            const float med = ts[ts.size() / 2];
            const double bytes = 2.0 * rows * row_bytes;
            std::printf("%-6d %-22s %10.1f %10.1f %10.1f %9.0f %10.1f %s\n", blocks, c.name, med, ts[ts.size() / 10],
                        ts[ts.size() * 9 / 10], bytes / med / 1e3, bytes / med / 1e3 / blocks, ok ? "ok" : "MISMATCH");
        }
    }
    CK(cudaFree(src));
    CK(cudaFree(dst));
}

static uint16_t f2bf(float f) {  // round to nearest even
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);
    return static_cast<uint16_t>(u >> 16);
}
static float bf2f(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

int main() {
    const int T = 4096, H = 7168, K = 8, E = 256;
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    CK(cudaFuncSetAttribute(reduce_v2, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
    int* flush = nullptr;
    const size_t flush_bytes = size_t(512) << 20;
    CK(cudaMalloc(&flush, flush_bytes));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    if (std::getenv("COPY_ONLY") != nullptr) {
        copy_bench(e0, e1, flush, flush_bytes);
        return 0;
    }
    std::mt19937 rng(7);
    std::printf("%-3s %-6s %-14s %10s %10s %10s %9s %10s %s\n", "P", "blocks", "variant", "us_median", "us_p10",
                "us_p90", "GB/s", "GB/s/SM", "check");
    for (int P : {1, 2, 4}) {
        // routing: top-K distinct experts of E, experts E/P a rank; send_pos[t, r] = t's position among r's tokens
        std::vector<int> send_pos(static_cast<size_t>(T) * P, -1), cnt(P, 0);
        for (int t = 0; t < T; ++t) {
            std::vector<int> ex(E);
            for (int e = 0; e < E; ++e) ex[e] = e;
            std::vector<char> hit(P, 0);
            for (int k = 0; k < K; ++k) {
                std::swap(ex[k], ex[k + rng() % (E - k)]);
                hit[ex[k] / (E / P)] = 1;
            }
            for (int r = 0; r < P; ++r)
                if (hit[r]) send_pos[static_cast<size_t>(t) * P + r] = cnt[r]++;
        }
        const int64_t comb_stride = static_cast<int64_t>(H) * 4;
        std::vector<uint16_t> y(static_cast<size_t>(std::max(cnt[0], 1)) * H);
        std::vector<uint8_t> comb(static_cast<size_t>(P) * T * comb_stride, 0);
        std::uniform_real_distribution<float> u(-1.f, 1.f);
        for (auto& v : y) v = f2bf(u(rng));
        for (int r = 1; r < P; ++r)
            for (int i = 0; i < cnt[r]; ++i) {
                uint16_t* row = reinterpret_cast<uint16_t*>(comb.data() + (static_cast<size_t>(r) * T + i) * comb_stride);
                for (int h = 0; h < H; ++h) row[h] = f2bf(u(rng));
            }
        std::vector<uint16_t> ref(static_cast<size_t>(T) * H);
        int64_t bytes = 0;
        for (int t = 0; t < T; ++t) {
            std::vector<float> acc(H, 0.f);
            for (int r = 0; r < P; ++r) {
                const int p = send_pos[static_cast<size_t>(t) * P + r];
                if (p < 0) continue;
                bytes += 2ll * H;
                const uint16_t* row = r == 0 ? y.data() + static_cast<size_t>(p) * H
                                             : reinterpret_cast<const uint16_t*>(
                                                   comb.data() + (static_cast<size_t>(r) * T + p) * comb_stride);
                for (int h = 0; h < H; ++h) acc[h] += bf2f(row[h]);
            }
            for (int h = 0; h < H; ++h) ref[static_cast<size_t>(t) * H + h] = f2bf(acc[h]);
            bytes += 2ll * H;
        }
        Args a{};
        __nv_bfloat16 *dy, *dout;
        uint8_t* dcomb;
        int* dpos;
        CK(cudaMalloc(&dy, y.size() * 2));
        CK(cudaMalloc(&dout, ref.size() * 2));
        CK(cudaMalloc(&dcomb, comb.size()));
        CK(cudaMalloc(&dpos, send_pos.size() * 4));
        CK(cudaMemcpy(dy, y.data(), y.size() * 2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dcomb, comb.data(), comb.size(), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dpos, send_pos.data(), send_pos.size() * 4, cudaMemcpyHostToDevice));
        a.y = dy;
        a.comb = dcomb;
        a.send_pos = dpos;
        a.out = dout;
        a.T = T;
        a.H = H;
        a.P = P;
        a.comb_stride = comb_stride;
        struct V {
            const char* name;
            int ring;  // 0: v0 family (-1: v1)
            bool vol;
            int pieces = 1, skip_sum = 0;
        };
        const int max_ring = (227 * 1024 - 1024) / (H * 2);
        std::vector<V> vs = {{"v0", 0, true}, {"v0w", 0, false}, {"v1", -1, false}, {"v1 unroll 12", -2, false},
                             {"v2 ring max", max_ring, false},
                             {"v2 7 pieces", max_ring, false, 7}, {"v2 no sum", max_ring, false, 1, 1},
                             {"v2 7p no sum", max_ring, false, 7, 1}};
        for (int blocks : {5, 10, 15}) {
            for (const V& v : vs) {
                auto launch = [&]() {
                    if (v.ring == -1) {
                        if (P <= 2) reduce_v0<2, 8, false, true><<<blocks, kThreads>>>(a);
                        else reduce_v0<4, 4, false, true><<<blocks, kThreads>>>(a);
                    } else if (v.ring == -2) {
                        if (P <= 2) reduce_v0<2, 12, false, true><<<blocks, kThreads>>>(a);
                        else reduce_v0<4, 6, false, true><<<blocks, kThreads>>>(a);
                    } else if (v.ring == 0) {
                        if (P <= 2) {
                            if (v.vol) reduce_v0<2, 8, true><<<blocks, kThreads>>>(a);
                            else reduce_v0<2, 8, false><<<blocks, kThreads>>>(a);
                        } else {
                            if (v.vol) reduce_v0<4, 4, true><<<blocks, kThreads>>>(a);
                            else reduce_v0<4, 4, false><<<blocks, kThreads>>>(a);
                        }
                    } else {
                        const int head = (v.ring * 24 + 127) / 128 * 128;
                        reduce_v2<<<blocks, kThreads, head + static_cast<size_t>(v.ring) * H * 2>>>(a, v.ring, v.pieces,
                                                                                          v.skip_sum);
                    }
                    CK(cudaGetLastError());
                };
                CK(cudaMemset(dout, 0xff, ref.size() * 2));
                launch();
                CK(cudaDeviceSynchronize());
                std::vector<uint16_t> got(ref.size());
                CK(cudaMemcpy(got.data(), dout, got.size() * 2, cudaMemcpyDeviceToHost));
                size_t bad = 0;
                for (size_t i = 0; i < got.size(); ++i) bad += got[i] != ref[i];
                const std::vector<float> ts = time_launches(launch, 30, e0, e1, flush, flush_bytes);
                const float med = ts[ts.size() / 2];
                std::printf("%-3d %-6d %-14s %10.1f %10.1f %10.1f %9.0f %10.1f %s\n", P, blocks, v.name, med,
                            ts[ts.size() / 10], ts[ts.size() * 9 / 10], bytes / med / 1e3, bytes / med / 1e3 / blocks,
                            v.skip_sum ? "(timing only)" : bad ? "MISMATCH" : "ok");
                if (bad && !v.skip_sum) std::printf("  %zu of %zu outputs differ from the host reference\n", bad, got.size());
            }
        }
        CK(cudaFree(dy));
        CK(cudaFree(dout));
        CK(cudaFree(dcomb));
        CK(cudaFree(dpos));
    }
    return 0;
}
