// Microbenchmark of the copy-engine combine's transfers (launch_combine_ce in csrc/kernels/intranode.cu): one
// source's rows, y rows of H bf16 values, go into comb slots comb_stride = 4 H bytes apart (a strided copy), in
// `pieces` pieces, each followed by a copy of its chunk flags (8 bytes per 4 rows), all on one stream; with several
// destinations, one stream per destination, the copies to all of them at once. Destinations: this GPU's own memory
// (dest "local"), or with 2 or more GPUs the other GPUs (dest "peer": peer access enabled, as NVSHMEM maps them).
// Device events around each repetition; the median of `reps`. Checks the bytes that arrived (first and last row of
// each piece, and the flags) once.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/ce_copy_bench bench/micro/ce_copy_bench.cu && /tmp/ce_copy_bench
//
// Prints one line per (dest, destinations, rows, pieces): time in us and GB/s of row bytes moved (all
// destinations), and the host's time to issue them (median, us); pieces "flat": the same rows as one contiguous
// copy per destination, for comparison.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "micro.cuh"

namespace {

constexpr int kHidden = 7168;
constexpr int64_t kRowBytes = 2ll * kHidden;     // a bf16 row
constexpr int64_t kStride = 4ll * kHidden;       // the comb slots' stride (room for float32 rows)
constexpr int kChunk = 4;                        // rows per chunk flag
constexpr int kReps = 20;

struct Dest {
    int device;
    uint8_t* comb;     // [rows][kStride]
    int64_t* flags;    // [rows / kChunk]
    cudaStream_t stream;
};

// One repetition: every destination's rows in `pieces` pieces (0: one contiguous copy of the rows, no flags).
void issue(const std::vector<Dest>& dests, const uint8_t* y, const int64_t* flag_src, int rows, int pieces,
           cudaStream_t main, cudaEvent_t fork, const std::vector<cudaEvent_t>& joins) {
    CK(cudaEventRecord(fork, main));
    for (size_t d = 0; d < dests.size(); ++d) {
        const Dest& t = dests[d];
        CK(cudaStreamWaitEvent(t.stream, fork, 0));
        if (pieces == 0) {
            CK(cudaMemcpyAsync(t.comb, y, kRowBytes * rows, cudaMemcpyDeviceToDevice, t.stream));
        } else {
            int piece = (rows + pieces - 1) / pieces;
            piece = (piece + kChunk - 1) / kChunk * kChunk;
            for (int p = 0; p < rows; p += piece) {
                const int n = std::min(piece, rows - p);
                CK(cudaMemcpy2DAsync(t.comb + p * kStride, kStride, y + p * kRowBytes, kRowBytes, kRowBytes, n,
                                     cudaMemcpyDeviceToDevice, t.stream));
                const int c0 = p / kChunk, c1 = (p + n + kChunk - 1) / kChunk;
                CK(cudaMemcpyAsync(t.flags + c0, flag_src + c0, 8ll * (c1 - c0), cudaMemcpyDeviceToDevice,
                                   t.stream));
            }
        }
        CK(cudaEventRecord(joins[d], t.stream));
        CK(cudaStreamWaitEvent(main, joins[d], 0));
    }
}

bool check(const std::vector<Dest>& dests, const std::vector<uint8_t>& host_y, int rows) {
    std::vector<uint8_t> row(kRowBytes);
    for (const Dest& t : dests) {
        for (int r : {0, rows / 2, rows - 1}) {
            CK(cudaMemcpy(row.data(), t.comb + r * kStride, kRowBytes, cudaMemcpyDeviceToHost));
            if (std::memcmp(row.data(), host_y.data() + r * kRowBytes, kRowBytes) != 0) return false;
        }
        int64_t f = 0;
        CK(cudaMemcpy(&f, t.flags + (rows - 1) / kChunk, 8, cudaMemcpyDeviceToHost));
        if (f != 12345) return false;
    }
    return true;
}

}  // namespace

int main() {
    int ngpu = 0;
    CK(cudaGetDeviceCount(&ngpu));
    const int max_rows = 8192;
    CK(cudaSetDevice(0));
    std::vector<uint8_t> host_y(kRowBytes * max_rows);
    for (size_t i = 0; i < host_y.size(); ++i) host_y[i] = static_cast<uint8_t>(i * 2654435761u >> 13);
    uint8_t* y = nullptr;
    int64_t* flag_src = nullptr;
    CK(cudaMalloc(&y, host_y.size()));
    CK(cudaMemcpy(y, host_y.data(), host_y.size(), cudaMemcpyHostToDevice));
    std::vector<int64_t> host_flags(max_rows / kChunk, 12345);
    CK(cudaMalloc(&flag_src, 8 * host_flags.size()));
    CK(cudaMemcpy(flag_src, host_flags.data(), 8 * host_flags.size(), cudaMemcpyHostToDevice));
    cudaStream_t main_stream;
    CK(cudaStreamCreateWithFlags(&main_stream, cudaStreamNonBlocking));
    cudaEvent_t fork, t0, t1;
    CK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    CK(cudaEventCreate(&t0));
    CK(cudaEventCreate(&t1));
    std::printf("dest  dests  rows  pieces  us_median  GB/s  host_us  (rows of %lld B into slots %lld B apart)\n",
                static_cast<long long>(kRowBytes), static_cast<long long>(kStride));
    for (const char* kind : {"local", "peer"}) {
        const bool peer = std::strcmp(kind, "peer") == 0;
        if (peer && ngpu < 2) {
            std::printf("peer: skipped (%d GPU visible)\n", ngpu);
            continue;
        }
        const int most = peer ? ngpu - 1 : 3;
        for (int ndest = 1; ndest <= most; ndest = ndest == most ? most + 1 : std::min(most, ndest * 3)) {
            std::vector<Dest> dests(ndest);
            std::vector<cudaEvent_t> joins(ndest);
            for (int d = 0; d < ndest; ++d) {
                Dest& t = dests[d];
                t.device = peer ? d + 1 : 0;
                if (peer) {
                    int can = 0;
                    CK(cudaDeviceCanAccessPeer(&can, 0, t.device));
                    if (!can) {
                        std::printf("peer: GPU 0 cannot access GPU %d\n", t.device);
                        return 1;
                    }
                    cudaError_t e = cudaDeviceEnablePeerAccess(t.device, 0);
                    if (e == cudaErrorPeerAccessAlreadyEnabled) (void)cudaGetLastError();
                    else CK(e);
                    CK(cudaSetDevice(t.device));
                }
                CK(cudaMalloc(&t.comb, kStride * max_rows));
                CK(cudaMalloc(&t.flags, 8ll * max_rows / kChunk));
                CK(cudaSetDevice(0));
                CK(cudaStreamCreateWithFlags(&t.stream, cudaStreamNonBlocking));
                CK(cudaEventCreateWithFlags(&joins[d], cudaEventDisableTiming));
            }
            for (int rows : {1024, 4096, 8192}) {
                for (int pieces : {0, 1, 4, 8, 16}) {
                    std::vector<float> times, host;
                    for (int rep = 0; rep < kReps + 3; ++rep) {
                        CK(cudaEventRecord(t0, main_stream));
                        const auto h0 = std::chrono::steady_clock::now();
                        issue(dests, y, flag_src, rows, pieces, main_stream, fork, joins);
                        const auto h1 = std::chrono::steady_clock::now();
                        CK(cudaEventRecord(t1, main_stream));
                        if (rep >= 3) host.push_back(std::chrono::duration<float, std::micro>(h1 - h0).count());
                        CK(cudaEventSynchronize(t1));
                        float ms = 0;
                        CK(cudaEventElapsedTime(&ms, t0, t1));
                        if (rep >= 3) times.push_back(ms * 1000.f);
                    }
                    if (pieces > 0 && !check(dests, host_y, rows)) {
                        std::printf("%s: wrong bytes at %d rows, %d pieces\n", kind, rows, pieces);
                        return 1;
                    }
                    std::sort(times.begin(), times.end());
                    std::sort(host.begin(), host.end());
                    const float us = times[times.size() / 2];
                    const double bytes = static_cast<double>(kRowBytes) * rows * ndest;
                    std::printf("%-5s %5d %5d %7s %10.1f %6.1f %8.1f\n", kind, ndest, rows,
                                pieces ? std::to_string(pieces).c_str() : "flat", us, bytes / us / 1e3,
                                host[host.size() / 2]);
                }
            }
            for (Dest& t : dests) {
                CK(cudaFree(t.comb));
                CK(cudaFree(t.flags));
                CK(cudaStreamDestroy(t.stream));
            }
            for (cudaEvent_t e : joins) CK(cudaEventDestroy(e));
        }
    }
    std::printf("ok\n");
    return 0;
}
