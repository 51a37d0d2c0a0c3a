// Shared device helpers: bounded waits on flags, setting a peer's flag, block-wide scans, vectorised row copies.
#pragma once

#include <cuda_bf16.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>

#include "api.cuh"
#include "exception.cuh"
#include "ptx.cuh"
#include "vec.cuh"

namespace largeep {

constexpr int kWarp = 32;

// Records the first error (op, waited rank): in the device word, and the winner copies it to the host-mapped
// status area.
__device__ __forceinline__ void report_error(ErrorWord err, int op, int rank) {
    const unsigned long long code =
        static_cast<unsigned long long>(op) * 65536ull + static_cast<unsigned long long>(rank + 1);
    if (atomicCAS(reinterpret_cast<unsigned long long*>(err.dev), 0ull, code) == 0ull) {
        reinterpret_cast<volatile int64_t*>(err.host)[kError] = static_cast<int64_t>(code);
        __threadfence_system();
    }
}

// True once any kernel of this Buffer reported an error: later kernels then skip their work so that a stuck
// peer costs one timeout, not one per kernel. Reads device memory only.
__device__ __forceinline__ bool has_error(ErrorWord err) { return ld_volatile(err.dev) != 0; }
// ... other than one of the op codes with their bit set in `tolerated` (bit op; op codes below 32)
__device__ __forceinline__ bool has_error_except(ErrorWord err, unsigned tolerated) {
    const int64_t v = ld_volatile(err.dev);
    return v != 0 && ((tolerated >> ((v / 65536) & 31)) & 1u) == 0;
}

// An expert id outside [-1, E) goes into lo_hi (shared or global memory, by atomics): [0] the lowest id below -1,
// [1] the highest id >= E (both start at 0: none).
__device__ __forceinline__ void note_bad_id(long long* lo_hi, int64_t e, int E) {
    if (e < -1) atomicMin(lo_hi, static_cast<long long>(e));
    else if (e >= E) atomicMax(lo_hi + 1, static_cast<long long>(e));
}

// Hands the result of an expert-id range check to the host, which waits for host[0] to reach `token`: host[1]
// gets the lowest id below -1 and host[2] the highest id >= E (0 for none), visible before the token.
__device__ __forceinline__ void publish_id_check(int64_t* host_words, int64_t lowest, int64_t highest,
                                                 int64_t token) {
    volatile int64_t* host = host_words;
    host[1] = lowest;
    host[2] = highest;
    __threadfence_system();
    host[0] = token;
}

// Spins until *flag >= target (the value it read into *seen, if given). Gives up after timeout_ns, reports (op,
// rank) and returns false; gives up at once once this Buffer reported an error (but those of the ops in
// `tolerated`, see has_error_except).
__device__ __forceinline__ bool wait_flag(const int64_t* flag, int64_t target, uint64_t timeout_ns, ErrorWord err,
                                          int op, int rank, int64_t* seen = nullptr, unsigned tolerated = 0) {
    int64_t v = ld_acquire_sys(flag);
    if (v >= target) {
        if (seen != nullptr) *seen = v;
        return true;
    }
    const uint64_t start = globaltimer_ns();
    while (true) {
        v = ld_acquire_sys(flag);
        if (v >= target) {
            if (seen != nullptr) *seen = v;
            return true;
        }
        if (globaltimer_ns() - start > timeout_ns || has_error_except(err, tolerated)) {
            report_error(err, op, rank);
            return false;
        }
    }
}

// Thread i < count waits for flags[first + i * stride] >= target (the flag of rank first + i * stride), except the
// flag of rank `skip` (-1: none); returns (to every thread) whether all arrived. count <= blockDim.x (one thread per
// rank, no loop: the normal-mode kernels compiled with more spills around a loop here). `accept(r, value)` judges
// each flag that arrived (the value read; it reports what it refuses): a refused one counts as not arrived.
// `tolerated`: as wait_flag's.
template <typename Accept>
__device__ __forceinline__ bool block_wait_ranks(const int64_t* flags, int first, int count, int stride, int skip,
                                                 int64_t target, uint64_t timeout_ns, ErrorWord err, int op,
                                                 Accept accept, unsigned tolerated = 0) {
    __shared__ int ok_all;
    if (threadIdx.x == 0) ok_all = has_error_except(err, tolerated) ? 0 : 1;
    __syncthreads();
    const int r = first + static_cast<int>(threadIdx.x) * stride;
    if (ok_all && static_cast<int>(threadIdx.x) < count && r != skip) {
        int64_t seen = 0;
        if (!wait_flag(flags + r, target, timeout_ns, err, op, r, &seen, tolerated) || !accept(r, seen))
            atomicAnd(&ok_all, 0);
    }
    __syncthreads();
    const bool ok = ok_all != 0;
    __syncthreads();  // every thread has read ok_all before a following call's thread 0 rewrites it
    return ok;
}

// Sets the int64 flag at byte offset `off` of rank pe's symmetric allocation to v: a release store through `peer`
// (pe's allocation as mapped on this GPU, for ranks of this node), else an NVSHMEM signal to the same offset of
// `mine` (this rank's allocation: the symmetric address). Whatever this thread wrote to pe before (stores after a
// system fence, or puts completed by nvshmem_quiet) is visible first. The signal takes a system fence of its own:
// over NVSHMEM's P2P transport it is a plain store, and the puts it announces may be other blocks' (quieted before
// a barrier this thread passed), which only the release of the NVLink branch would otherwise order.
__device__ __forceinline__ void set_peer_flag(uint8_t* peer, uint8_t* mine, int64_t off, int64_t v, int pe) {
    if (peer != nullptr) {
        st_release_sys(reinterpret_cast<int64_t*>(peer + off), v);
    } else {
        __threadfence_system();
        nvshmemx_signal_op(reinterpret_cast<uint64_t*>(mine + off), static_cast<uint64_t>(v), NVSHMEM_SIGNAL_SET, pe);
    }
}

// Exclusive prefix sum of one int per thread over the block (blockDim.x <= 1024); *total gets the sum.
__device__ __forceinline__ int block_exclusive_scan(int v, int* total) {
    __shared__ int warp_sums[32];
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = (blockDim.x + kWarp - 1) / kWarp;
    int incl = v;
#pragma unroll
    for (int d = 1; d < kWarp; d *= 2) {
        int o = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += o;
    }
    if (lane == kWarp - 1) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int s = lane < nwarps ? warp_sums[lane] : 0;
#pragma unroll
        for (int d = 1; d < kWarp; d *= 2) {
            int o = __shfl_up_sync(0xffffffffu, s, d);
            if (lane >= d) s += o;
        }
        if (lane < nwarps) warp_sums[lane] = s;  // inclusive over warps
    }
    __syncthreads();
    const int before = (warp > 0 ? warp_sums[warp - 1] : 0) + incl - v;
    *total = warp_sums[nwarps - 1];
    __syncthreads();
    return before;
}

// 16-byte loads, by kind: 0 = non-coherent path without L1 allocation (data fixed during the kernel),
// 1 = weak global load without L1 allocation, 2 = volatile (always from L2 or the peer).
template <int kLoad>
__device__ __forceinline__ int4 ld_v4(const int4* p) {
    if constexpr (kLoad == 0) {
        return ld_nc_v4(p);
    } else if constexpr (kLoad == 1) {
        int4 v;
        asm volatile("ld.global.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p));
        return v;
    } else {
        return ld_volatile_v4(p);
    }
}

// Copies `bytes` (a multiple of 16) from src to dst with one warp, 16 bytes per lane per step, kUnroll steps in
// flight so that NVLink latency is hidden. src may be a peer's memory (NVLink) that stays unchanged during this
// kernel; dst may be a peer's memory too (the stores are posted and need no round trip).
template <int kLoad, int kUnroll>
__device__ __forceinline__ void warp_copy(int4* dst, const int4* src, int64_t bytes, int lane) {
    const int n = static_cast<int>(bytes / 16);
    int i = lane;
    for (; i + (kUnroll - 1) * kWarp < n; i += kUnroll * kWarp) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = ld_v4<kLoad>(src + i + u * kWarp);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) st_na_v4(dst + i + u * kWarp, v[u]);
    }
    for (; i < n; i += kWarp) st_na_v4(dst + i, ld_v4<kLoad>(src + i));
}

// warp_copy with the unroll chosen at run time (NormalCtx::unroll). The load kind is the call site's, which knows
// its source: the caller's tensors take non-coherent loads (0), rows that peers wrote during the call weak ones (1).
__device__ __forceinline__ void warp_copy_rt(int4* dst, const int4* src, int64_t bytes, int lane, int load_mode,
                                             int unroll) {
    if (unroll >= 8) {
        if (load_mode == 0) warp_copy<0, 8>(dst, src, bytes, lane);
        else if (load_mode == 1) warp_copy<1, 8>(dst, src, bytes, lane);
        else warp_copy<2, 8>(dst, src, bytes, lane);
    } else {
        if (load_mode == 0) warp_copy<0, 4>(dst, src, bytes, lane);
        else if (load_mode == 1) warp_copy<1, 4>(dst, src, bytes, lane);
        else warp_copy<2, 4>(dst, src, bytes, lane);
    }
}

// Last block of a grid to call this gets true (all others have passed the same point). Resets the counter.
__device__ __forceinline__ bool last_block(int* counter) {
    __shared__ int is_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        const int old = atomicAdd(counter, 1);
        is_last = (old == static_cast<int>(gridDim.x) - 1);
        if (is_last) {
            *counter = 0;
            __threadfence();  // acquire side: the block's later reads come after every other block's arrival
        }
    }
    __syncthreads();
    return is_last != 0;
}

// Development aid, compiled in only with CUDAFLAGS=-DLARGEEP_TRACE at build time: a kernel marks the ends of its
// phases with trace_mark(i) (thread 0's SM clock; a phase that ends in a barrier includes the block's work) and
// trace_print makes thread 0 print each phase's cycles since the mark before, and the block's wall time since mark 0.
#ifdef LARGEEP_TRACE
}  // namespace largeep
#include <cstdio>
namespace largeep {
constexpr int kTraceMarks = 10;
__device__ __forceinline__ long long* trace_slots() {
    __shared__ long long t[kTraceMarks + 1];  // [kTraceMarks]: globaltimer at mark 0
    return t;
}
__device__ __forceinline__ void trace_mark(int i) {
    if (threadIdx.x != 0) return;
    trace_slots()[i] = clock64();
    if (i == 0) trace_slots()[kTraceMarks] = static_cast<long long>(globaltimer_ns());
}
__device__ __forceinline__ void trace_print(const char* kernel, int marks, int rank, int tokens) {
    if (threadIdx.x != 0) return;
    const long long* t = trace_slots();
    long long d[kTraceMarks - 1];
    for (int i = 0; i < kTraceMarks - 1; ++i) d[i] = i + 1 < marks ? t[i + 1] - t[i] : 0;
    printf("trace %s rank %d tokens %d block %d/%d ns %lld cycles %lld %lld %lld %lld %lld %lld %lld %lld %lld\n",
           kernel, rank, tokens, static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x),
           static_cast<long long>(globaltimer_ns()) - t[kTraceMarks], d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7],
           d[8]);
}
#else
__device__ __forceinline__ void trace_mark(int) {}
__device__ __forceinline__ void trace_print(const char*, int, int, int) {}
#endif

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }
inline int64_t align16(int64_t v) { return (v + 15) / 16 * 16; }

}  // namespace largeep
