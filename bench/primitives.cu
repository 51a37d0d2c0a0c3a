// Costs of the primitives the low-latency kernels are built from, on two GPUs joined by NVLink (standalone: CUDA
// runtime only, no NVSHMEM, no torch). Each kernel variant is launched `reps` times inside one CUDA graph and the
// replay is timed with events; the table gives microseconds per launch, and "extra" the difference to the empty
// kernel of the same grid (launch and drain included there). Peer memory is GPU 1's, mapped on GPU 0 by peer access.
// The "rows" variants give the NVLink store rate from that many warps (7424-byte rows: a low-latency FP8 row);
// "rows by TMA" moves the same rows with the bulk-copy engine (one copy per warp) instead of the warps' stores.
//
// build and run (on the GPU machine):
//   nvcc -O3 -std=c++17 -arch=sm_90 -I csrc/kernels bench/primitives.cu -o /tmp/primitives && /tmp/primitives
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "ptx.cuh"

#define CK(x)                                                                                        \
    do {                                                                                             \
        cudaError_t e_ = (x);                                                                        \
        if (e_ != cudaSuccess) {                                                                     \
            std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            std::exit(1);                                                                            \
        }                                                                                            \
    } while (0)

using namespace largeep;

enum Variant {
    kEmpty,          // nothing
    kFenceSys,       // every thread: __threadfence_system()
    kFenceGpu,       // every thread: __threadfence()
    kReleaseFlags,   // threads < 288: st.release.sys of a flag in peer memory
    kRelaxedFlags,   // threads < 288: st.volatile of a flag in peer memory, one fence.sys first (thread 0, barrier)
    kAcquireLocal,   // threads < 2: ld.acquire.sys of a local word (already set)
    kLastBlockAll,   // every thread fence.sys, then the last-block atomic (the LL kernels' ending)
    kLastBlockOne,   // barrier, thread 0 fence.sys + the last-block atomic
    kRows,           // each warp stores one 7424-byte row into peer memory (16-byte stores), then fence.sys
    kRowsNoFence,    // the same rows without the fence
    kRowsTma,        // the same rows from shared memory by one bulk copy per warp (TMA, cp.async.bulk), then fence.sys
    kCount
};
const char* kNames[kCount] = {"empty",           "fence.sys/thread", "fence.gpu/thread", "288 release.sys flags",
                              "288 relaxed flags", "acquire.sys local", "last block (fence/thread)",
                              "last block (one fence)", "rows + fence.sys", "rows, no fence", "rows by TMA + fence.sys"};

__global__ void probe(int variant, int64_t* peer, int64_t* local, int* counter, int4* peer_rows, int row_vecs) {
    const int t = threadIdx.x;
    switch (variant) {
        case kFenceSys: __threadfence_system(); break;
        case kFenceGpu: __threadfence(); break;
        case kReleaseFlags:
            for (int i = t; i < 288; i += blockDim.x) st_release_sys(peer + i, 1);
            break;
        case kRelaxedFlags:
            __syncthreads();
            if (t == 0) __threadfence_system();
            __syncthreads();
            for (int i = t; i < 288; i += blockDim.x) *reinterpret_cast<volatile int64_t*>(peer + i) = 1;
            break;
        case kAcquireLocal:
            if (t < 2) local[64 + t] = ld_acquire_sys(local + t);
            break;
        case kLastBlockAll:
        case kLastBlockOne: {
            __shared__ int last;
            if (variant == kLastBlockAll) __threadfence_system();
            __syncthreads();
            if (t == 0) {
                __threadfence_system();
                const int old = atomicAdd(counter, 1);
                last = old == static_cast<int>(gridDim.x) - 1;
                if (last) *counter = 0;
            }
            __syncthreads();
            break;
        }
        case kRows:
        case kRowsNoFence: {
            const int warp = (blockIdx.x * blockDim.x + t) / 32, lane = t % 32;
            int4* dst = peer_rows + static_cast<int64_t>(warp) * row_vecs;
            for (int v = lane; v < row_vecs; v += 32) dst[v] = make_int4(v, warp, 0, 0);
            if (variant == kRows) __threadfence_system();
            break;
        }
        default: break;
    }
}

// kRowsTma: each warp fills its row in shared memory, then lane 0 hands the row to the bulk-copy engine (TMA) with
// the peer address as destination, waits for the copy and fences; dynamic shared memory: one row per warp.
__global__ void probe_tma(int4* peer_rows, int row_vecs) {
    extern __shared__ int4 rows[];
    const int t = threadIdx.x, warp_in_block = t / 32, lane = t % 32;
    const int warp = (blockIdx.x * blockDim.x + t) / 32;
    int4* mine = rows + static_cast<int64_t>(warp_in_block) * row_vecs;
    for (int v = lane; v < row_vecs; v += 32) mine[v] = make_int4(v, warp, 0, 0);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the generic stores before the bulk copy reads
    __syncwarp();
    if (lane == 0) {
        const uint32_t src = static_cast<uint32_t>(__cvta_generic_to_shared(mine));
        int4* dst = peer_rows + static_cast<int64_t>(warp) * row_vecs;
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(src),
                     "r"(row_vecs * 16)
                     : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
        __threadfence_system();
    }
    __syncwarp();
}

int main(int argc, char** argv) {
    const int reps = argc > 1 ? std::atoi(argv[1]) : 200;
    int n = 0;
    CK(cudaGetDeviceCount(&n));
    if (n < 2) {
        std::fprintf(stderr, "needs 2 GPUs\n");
        return 1;
    }
    int can = 0;
    CK(cudaDeviceCanAccessPeer(&can, 0, 1));
    if (!can) {
        std::fprintf(stderr, "no peer access 0 -> 1\n");
        return 1;
    }
    const int row_vecs = 7424 / 16;
    const int64_t rows_bytes = 132ll * 16 * row_vecs * 16;
    int64_t* peer = nullptr;
    int4* peer_rows = nullptr;
    CK(cudaSetDevice(1));
    CK(cudaMalloc(&peer, 4096));
    CK(cudaMalloc(&peer_rows, rows_bytes));
    CK(cudaSetDevice(0));
    CK(cudaDeviceEnablePeerAccess(1, 0));
    int64_t* local = nullptr;
    int* counter = nullptr;
    CK(cudaMalloc(&local, 4096));
    CK(cudaMemset(local, 1, 4096));
    CK(cudaMalloc(&counter, 4));
    CK(cudaMemset(counter, 0, 4));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    struct Shape {
        int grid, threads;
    };
    const Shape shapes[] = {{1, 256}, {8, 512}, {132, 512}};
    const size_t tma_smem = static_cast<size_t>(512 / 32) * row_vecs * 16;
    CK(cudaFuncSetAttribute(probe_tma, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(tma_smem)));
    std::printf("%-28s %6s %7s %10s %10s\n", "variant", "grid", "threads", "us/launch", "extra us");
    for (const Shape& sh : shapes) {
        float base = 0.f;
        for (int v = 0; v < kCount; ++v) {
            if ((v == kRows || v == kRowsNoFence || v == kRowsTma) &&
                sh.grid * sh.threads / 32 * int64_t(row_vecs) * 16 > rows_bytes)
                continue;
            cudaGraph_t g;
            cudaGraphExec_t ge;
            CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
            for (int r = 0; r < reps; ++r) {
                if (v == kRowsTma)
                    probe_tma<<<sh.grid, sh.threads, tma_smem, s>>>(peer_rows, row_vecs);
                else
                    probe<<<sh.grid, sh.threads, 0, s>>>(v, peer, local, counter, peer_rows, row_vecs);
            }
            CK(cudaStreamEndCapture(s, &g));
            CK(cudaGraphInstantiate(&ge, g, 0));
            float best = 1e30f;
            for (int trial = 0; trial < 5; ++trial) {
                cudaEvent_t a, b;
                CK(cudaEventCreate(&a));
                CK(cudaEventCreate(&b));
                CK(cudaEventRecord(a, s));
                CK(cudaGraphLaunch(ge, s));
                CK(cudaEventRecord(b, s));
                CK(cudaEventSynchronize(b));
                float ms = 0.f;
                CK(cudaEventElapsedTime(&ms, a, b));
                if (trial > 0 && ms < best) best = ms;  // the first replay warms up
                CK(cudaEventDestroy(a));
                CK(cudaEventDestroy(b));
            }
            const float us = best * 1000.f / reps;
            if (v == kEmpty) base = us;
            std::printf("%-28s %6d %7d %10.2f %10.2f\n", kNames[v], sh.grid, sh.threads, us, us - base);
            CK(cudaGraphExecDestroy(ge));
            CK(cudaGraphDestroy(g));
        }
    }
    CK(cudaGetLastError());
    return 0;
}
