// Process-level NVSHMEM state: bootstrap from a unique id, the symmetric heap, peer pointers, host-mapped memory,
// teardown. One owner (the functions below keep a single process-wide state), created and destroyed explicitly.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace largeep::runtime {

// 128-byte NVSHMEM unique id, created by one rank and shared by the caller (Python, over torch.distributed).
std::string unique_id();
// Joins NVSHMEM as `rank` of `num_ranks` on CUDA device `device`. Calling it again with the same numbers is a
// no-op; with different numbers it throws (NVSHMEM hosts one world per process).
void init(const std::string& uid, int rank, int num_ranks, int device);
bool initialized();
int rank();
int num_ranks();
// Collective: every rank allocates the same size. The memory is zeroed and every rank has zeroed it on return.
// Every collective here first checks, bounded by timeout_s, that every rank has arrived (NVSHMEM's own barriers
// have no timeout); a missing rank makes it throw, and NVSHMEM is then unusable in this process.
uintptr_t alloc(size_t bytes, double timeout_s);
// Collective: frees a symmetric allocation after a barrier (no peer may still be reading it), unless some rank
// passes keep = true (it still holds views of the memory): then every rank keeps it allocated (NVSHMEM frees it at
// finalisation). Returns whether it was freed, the same on every rank.
// The caller waits for the device first, bounded (free's own device synchronisation has no bound).
bool free(uintptr_t ptr, double timeout_s, bool keep);
// The address of `ptr` on rank `pe` as seen from this GPU (NVLink), or 0 when `pe` is not reachable that way.
uintptr_t peer_ptr(uintptr_t ptr, int pe);
// (No barrier or finalize: nothing called them, and both waited for the device without a bound. NVSHMEM is left
// running until the process ends.)

// Pinned host memory mapped into the device address space: {host pointer, device pointer}.
std::vector<uintptr_t> host_alloc(size_t bytes);
// cudaFreeHost: waits, without a bound, for the device's work (the caller makes sure it is idle first).
void host_free(uintptr_t host_ptr);
// Spins (GIL released by the caller) until words[index] >= target or words[error_index] != 0 or timeout, or
// `stream` (the cudaStream_t of the kernel that writes the word) reports a CUDA error (asked once a millisecond
// after the first: a faulted kernel never writes the word).
// Returns 0 when the target was reached, 1 on a device-reported error, 2 on timeout, and minus the cudaError_t on
// a CUDA error (cuda_error_name names it).
int wait_host_word(uintptr_t host_ptr, int index, int64_t target, int error_index, double timeout_s,
                   uintptr_t stream);
// "cudaErrorName (its description)" of a cudaError_t.
std::string cuda_error_name(int error);

}  // namespace largeep::runtime
