#include <nvshmem.h>
#include <nvshmemx.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "../kernels/exception.cuh"
#include "../kernels/ptx.cuh"
#include "runtime.hpp"

namespace largeep::runtime {

namespace {
struct State {
    bool initialized = false;
    bool init_failed = false;         // init failed after NVSHMEM started: it cannot be started again here
    bool poisoned = false;            // a rendezvous timed out: a peer may be gone, NVSHMEM is no longer safe to use
    int rank = -1;
    int num_ranks = 0;
    int device = -1;
    uint64_t* words = nullptr;        // symmetric [2 * num_ranks]: arrived[r], then verdict[r] (see rendezvous_kernel)
    uint64_t epoch = 0;               // rendezvous so far (every rank calls them in the same order)
    int* result = nullptr;            // device int[3]: a rank that did not arrive (or -1), a rank that gave up (or -1),
                                      // whether some rank voted (0/1)
    cudaStream_t stream = nullptr;
};
State g;

// Two phases, thread r talking to rank r (NVSHMEM signals: any transport).
// 1. arrived[me] := 2 * epoch + vote on every rank; wait, bounded, until every rank's arrived word reaches
//    2 * epoch. (A peer cannot have gone on to the next epoch meanwhile, as it waits for this rank's verdict, so the
//    word read is this epoch's and its low bit that rank's vote: result[2] says whether any rank voted.)
// 2. verdict[me] := 2 * epoch if every rank arrived in phase 1, else 2 * epoch + 1 (I give up); then wait, bounded,
//    for every rank's verdict of this epoch. Only if every verdict is "arrived" does this rank go on.
// A one-phase rendezvous lets a rank give up while another, which saw everyone arrive, goes on into NVSHMEM's
// barrier and waits there forever. Here a rank goes on only if every rank saw every rank arrive; the window left is
// a rank dying between the phases, which the second bounded wait catches.
__global__ void rendezvous_kernel(uint64_t* words, int me, int n, uint64_t epoch, int vote, uint64_t timeout_ns,
                                  int* result) {
    __shared__ int all_arrived;
    const int r = threadIdx.x;
    uint64_t* arrived = words;
    uint64_t* verdict = words + n;
    if (r == 0) all_arrived = 1;
    __syncthreads();
    if (r < n) {
        nvshmemx_signal_op(arrived + me, 2 * epoch + (vote ? 1 : 0), NVSHMEM_SIGNAL_SET, r);
        const uint64_t start = largeep::globaltimer_ns();
        uint64_t v;
        while ((v = static_cast<uint64_t>(largeep::ld_acquire_sys(reinterpret_cast<const int64_t*>(arrived + r)))) <
               2 * epoch) {
            if (largeep::globaltimer_ns() - start > timeout_ns) {
                atomicCAS(result, -1, r);
                atomicExch(&all_arrived, 0);
                break;
            }
        }
        if (v == 2 * epoch + 1) atomicExch(result + 2, 1);
    }
    __syncthreads();
    const bool go = all_arrived != 0;
    if (r >= n) return;
    nvshmemx_signal_op(verdict + me, 2 * epoch + (go ? 0 : 1), NVSHMEM_SIGNAL_SET, r);
    if (!go) return;  // this rank gives up; the others learn it from its verdict
    const uint64_t start = largeep::globaltimer_ns();
    uint64_t v;
    while ((v = static_cast<uint64_t>(largeep::ld_acquire_sys(reinterpret_cast<const int64_t*>(verdict + r)))) <
           2 * epoch) {
        if (largeep::globaltimer_ns() - start > timeout_ns) {
            atomicCAS(result, -1, r);
            return;
        }
    }
    if (v == 2 * epoch + 1) atomicCAS(result + 1, -1, r);  // rank r gave up (a later epoch means it went on)
}

// Every rank must get here within timeout_s; throws naming a rank that did not (or that gave up), and poisons
// NVSHMEM for this process (the collective that follows could never complete). Guards NVSHMEM's own barriers (in
// malloc, free and barrier_all), which have no timeout. Returns whether any rank passed vote = true (every rank
// returns the same).
bool rendezvous(double timeout_s, const char* what, bool vote = false) {
    HOST_ASSERT(!g.poisoned, what << ": an earlier rendezvous of this process timed out (a peer was missing); NVSHMEM "
                "cannot be used safely in this process any more");
    ++g.epoch;
    const int init[3] = {-1, -1, 0};
    CUDA_CHECK(cudaMemcpyAsync(g.result, init, sizeof(init), cudaMemcpyHostToDevice, g.stream));
    const int threads = (g.num_ranks + 31) / 32 * 32;
    rendezvous_kernel<<<1, threads, 0, g.stream>>>(g.words, g.rank, g.num_ranks, g.epoch, vote ? 1 : 0,
                                                   static_cast<uint64_t>(timeout_s * 1e9), g.result);
    LAUNCH_CHECK();
    int res[3] = {-1, -1, 0};
    CUDA_CHECK(cudaMemcpyAsync(res, g.result, sizeof(res), cudaMemcpyDeviceToHost, g.stream));
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
    if (res[0] >= 0 || res[1] >= 0) {
        g.poisoned = true;
        const int missing = res[0] >= 0 ? res[0] : res[1];
        HOST_FAIL(what << ": rank " << missing
                    << (res[0] >= 0 ? " did not arrive within " : " gave up waiting for another rank within ")
                    << timeout_s << " s (LARGEEP_TIMEOUT_S); NVSHMEM's collective was not entered, so this "
                    "process's symmetric memory of the operation stays allocated and NVSHMEM cannot be used in "
                    "this process any more");
    }
    return res[2] != 0;
}
}  // namespace

std::string unique_id() {
    nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
    HOST_ASSERT(nvshmemx_get_uniqueid(&id) == 0, "nvshmemx_get_uniqueid failed");
    return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

void init(const std::string& uid, int rank, int num_ranks, int device) {
    HOST_ASSERT(!g.init_failed, "an earlier initialisation of NVSHMEM in this process failed after NVSHMEM started; "
                "it cannot be initialised again in this process");
    if (g.initialized) {
        HOST_ASSERT(g.rank == rank && g.num_ranks == num_ranks && g.device == device,
                    "NVSHMEM is already initialised in this process as rank " << g.rank << " of " << g.num_ranks
                    << " on device " << g.device << "; a Buffer on a different group (rank " << rank << " of "
                    << num_ranks << ", device " << device << ") cannot share it");
        return;
    }
    nvshmemx_uniqueid_t id;
    HOST_ASSERT(uid.size() == sizeof(id), "bad NVSHMEM unique id size " << uid.size());
    std::memcpy(&id, uid.data(), sizeof(id));
    HOST_ASSERT(num_ranks > 0 && num_ranks <= 1024 && rank >= 0 && rank < num_ranks,
                "bad NVSHMEM rank " << rank << " of " << num_ranks << " (at most 1024 ranks)");
    CUDA_CHECK(cudaSetDevice(device));
    nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
    HOST_ASSERT(nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr) == 0,
                "nvshmemx_set_attr_uniqueid_args failed");
    // From here NVSHMEM may be running: a failure below leaves this process unable to use it (init_failed), never
    // half initialised (initialized is set last: alloc and free never see a state without its words and stream).
    g.init_failed = true;
    // nvshmemx_init_attr() would exit() on failure; call the function it wraps and check its status.
    int provided = 0;
    nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                  NVSHMEM_VENDOR_PATCH_VERSION};
    const int status = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr,
                                            version);
    HOST_ASSERT(status == 0, "NVSHMEM initialisation failed with status " << status
                << " (set NVSHMEM_DEBUG=INFO for details)");
    HOST_ASSERT(nvshmem_my_pe() == rank && nvshmem_n_pes() == num_ranks,
                "NVSHMEM rank mismatch: got " << nvshmem_my_pe() << "/" << nvshmem_n_pes());
    g.rank = rank;
    g.num_ranks = num_ranks;
    g.device = device;
    try {
        // Rendezvous words: every rank is present during initialisation, so NVSHMEM's own barrier is safe here.
        g.words = static_cast<uint64_t*>(nvshmem_malloc(sizeof(uint64_t) * 2 * num_ranks));
        HOST_ASSERT(g.words != nullptr, "nvshmem_malloc of the rendezvous words failed");
        CUDA_CHECK(cudaMemset(g.words, 0, sizeof(uint64_t) * 2 * num_ranks));
        CUDA_CHECK(cudaMalloc(&g.result, 3 * sizeof(int)));
        CUDA_CHECK(cudaStreamCreateWithFlags(&g.stream, cudaStreamNonBlocking));
        CUDA_CHECK(cudaDeviceSynchronize());
    } catch (...) {
        // The local allocations go back; the rendezvous words stay: nvshmem_free is collective (a barrier), and
        // the peers, which did not fail here, are in the barrier below, not in a free.
        if (g.stream != nullptr) (void)cudaStreamDestroy(g.stream);
        if (g.result != nullptr) (void)cudaFree(g.result);
        (void)cudaGetLastError();  // (not left for a later launch check to report against its kernel)
        g.stream = nullptr;
        g.result = nullptr;
        g.words = nullptr;
        throw;
    }
    nvshmem_barrier_all();
    g.init_failed = false;
    g.initialized = true;
}

bool initialized() { return g.initialized; }
int rank() { return g.rank; }
int num_ranks() { return g.num_ranks; }

// The runtime's calls run on NVSHMEM's device, whatever device the caller has current (restored after).
struct OnDevice {
    int before = -1;
    OnDevice() {
        CUDA_CHECK(cudaGetDevice(&before));
        if (before != g.device) CUDA_CHECK(cudaSetDevice(g.device));
    }
    ~OnDevice() {
        if (before >= 0 && before != g.device) cudaSetDevice(before);
    }
    OnDevice(const OnDevice&) = delete;
    OnDevice& operator=(const OnDevice&) = delete;
};

uintptr_t alloc(size_t bytes, double timeout_s) {
    HOST_ASSERT(g.initialized, "NVSHMEM is not initialised");
    OnDevice on;
    rendezvous(timeout_s, "Buffer creation (symmetric allocation)");
    void* p = nvshmem_malloc(bytes);
    HOST_ASSERT(p != nullptr || bytes == 0, "nvshmem_malloc of " << bytes << " bytes failed: the symmetric heap is too small "
                "(raise NVSHMEM_SYMMETRIC_SIZE before the first Buffer is created)");
    // (on the runtime's own stream, not the device: work of the caller's that never ends must not hang creation)
    CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, g.stream));
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
    // Every rank's memory is zeroed before any rank goes on to write into a peer's: a second bounded rendezvous,
    // not NVSHMEM's barrier, which would wait forever for a rank that failed just above (and threw)
    rendezvous(timeout_s, "Buffer creation (after the symmetric allocation)");
    return reinterpret_cast<uintptr_t>(p);
}

bool free(uintptr_t ptr, double timeout_s, bool keep) {
    HOST_ASSERT(g.initialized, "NVSHMEM is not initialised");
    OnDevice on;
    // (unbounded: every caller first waits for the device with a bound (Python's _synchronize_bounded), so this
    // waits only for work queued since, by another thread)
    CUDA_CHECK(cudaDeviceSynchronize());
    if (rendezvous(timeout_s, "Buffer.destroy (symmetric free)", keep)) return false;
    nvshmem_barrier_all();
    nvshmem_free(reinterpret_cast<void*>(ptr));
    return true;
}

uintptr_t peer_ptr(uintptr_t ptr, int pe) {
    HOST_ASSERT(g.initialized, "NVSHMEM is not initialised");
    HOST_ASSERT(pe >= 0 && pe < g.num_ranks, "bad rank " << pe);
    return reinterpret_cast<uintptr_t>(nvshmem_ptr(reinterpret_cast<void*>(ptr), pe));
}

std::vector<uintptr_t> host_alloc(size_t bytes) {
    void* h = nullptr;
    CUDA_CHECK(cudaHostAlloc(&h, bytes, cudaHostAllocMapped));
    std::memset(h, 0, bytes);
    void* d = nullptr;
    const cudaError_t e = cudaHostGetDevicePointer(&d, h, 0);
    if (e != cudaSuccess) cudaFreeHost(h);  // (not kept: the caller gets no pointer to free)
    CUDA_CHECK(e);
    return {reinterpret_cast<uintptr_t>(h), reinterpret_cast<uintptr_t>(d)};
}

void host_free(uintptr_t host_ptr) { CUDA_CHECK(cudaFreeHost(reinterpret_cast<void*>(host_ptr))); }

namespace {
// The CUDA error a kernel on `stream` (or queued before it) met, as a positive cudaError_t; 0 while it runs or
// after it ended well. `capturing` caches whether the stream captures a CUDA graph (-1: not asked yet): a query then
// would invalidate the capture, so none is made (nothing captured runs while the host waits anyway).
int stream_fault(cudaStream_t stream, int& capturing) {
    if (capturing < 0) {
        cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
        const cudaError_t e = cudaStreamIsCapturing(stream, &status);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();  // (a non-sticky error is not left for the next launch check)
            return static_cast<int>(e);
        }
        capturing = status != cudaStreamCaptureStatusNone ? 1 : 0;
    }
    if (capturing) return 0;
    // (relaxed for this thread: where another thread captures a graph in the global mode, torch.cuda.graph's
    // default, a query in this thread's default mode would be refused and invalidate that capture)
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    (void)cudaThreadExchangeStreamCaptureMode(&mode);
    const cudaError_t e = cudaStreamQuery(stream);
    (void)cudaThreadExchangeStreamCaptureMode(&mode);
    if (e == cudaSuccess) return 0;
    (void)cudaGetLastError();  // (cudaErrorNotReady too: not left for the next launch check to report)
    return e == cudaErrorNotReady ? 0 : static_cast<int>(e);
}
}  // namespace

int wait_host_word(uintptr_t host_ptr, int index, int64_t target, int error_index, double timeout_s,
                   uintptr_t stream) {
    volatile int64_t* w = reinterpret_cast<volatile int64_t*>(host_ptr);
    const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    const auto start = std::chrono::steady_clock::now();
    double queried = 0.0;  // when the stream was last queried, in seconds since start
    int capturing = -1;
    for (uint64_t spin = 0;; ++spin) {
        // (acquire: what the GPU wrote before the word, e.g. a check's result words, is read after it, on hosts
        // whose loads may be reordered as well as on x86)
        if (w[index] >= target) {
            std::atomic_thread_fence(std::memory_order_acquire);
            return 0;
        }
        if (w[error_index] != 0) {
            std::atomic_thread_fence(std::memory_order_acquire);
            return 1;
        }
        if ((spin & 1023) == 0) {
            const double waited =
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            if (waited > timeout_s) return 2;
            if (waited > 1e-3) {
                // A kernel that faulted never writes the word: the stream is asked once a millisecond, only past
                // the first (the common wait is microseconds and makes no CUDA call).
                if (waited - queried >= 1e-3) {
                    queried = waited;
                    const int fault = stream_fault(s, capturing);
                    if (fault != 0) return -fault;
                }
                std::this_thread::yield();
            }
        }
    }
}

std::string cuda_error_name(int error) {
    const cudaError_t e = static_cast<cudaError_t>(error);
    return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
}

}  // namespace largeep::runtime
