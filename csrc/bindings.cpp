// pybind11 surface of largeep._C: plain types only (ints for pointers and streams, bytes for the unique id).
// Nothing here depends on torch, so one build serves every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "kernels/api.cuh"
#include "kernels/exception.cuh"
#include "runtime/runtime.hpp"

namespace py = pybind11;
using namespace largeep;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
    return reinterpret_cast<T*>(p);
}
cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Fields every kernel context shares: sizes, this Buffer's memory, counters, status area, error word, timeout.
template <typename Ctx>
void fill_common(Ctx& c, int rank, int num_ranks, int num_experts, int num_topk, int hidden, int max_tokens,
                 uintptr_t base, uintptr_t peer_base, uintptr_t seq, uintptr_t block_counter, uintptr_t status_dev,
                 uintptr_t error_dev, double timeout_s) {
    c.rank = rank;
    c.num_ranks = num_ranks;
    c.num_experts = num_experts;
    c.num_topk = num_topk;
    c.hidden = hidden;
    c.max_tokens = max_tokens;
    c.base = ptr<uint8_t>(base);
    c.peer_base = ptr<const uint64_t>(peer_base);
    c.seq = ptr<int64_t>(seq);
    c.block_counter = ptr<int>(block_counter);
    c.status = ptr<int64_t>(status_dev);
    c.err = ErrorWord{ptr<int64_t>(error_dev), ptr<int64_t>(status_dev)};
    c.timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
}

// ---- zero-copy receive slots ------------------------------------------------------------------------------------
// A fresh dispatch may receive into a zero-copy slot (kernels/api.cuh: NormalCtx): its outputs are then tensors
// over that slot's planes, handed to torch as DLPack capsules, and the slot is busy until every one of them is
// freed. The last one's deleter (any thread, no GIL needed) records an event on the stream the caller was on when
// the dispatch returned, and on every stream added since (zc_add_stream: the record_stream of these tensors), and
// frees the slot; the next dispatch that takes the slot makes its stream wait for those events, so work on the old
// tensors queued on those streams before they died ends before peers write the slot again.
namespace dl {  // the DLPack ABI (unversioned capsules, "dltensor")
struct Device {
    int32_t device_type;  // 2: CUDA
    int32_t device_id;
};
struct DataType {
    uint8_t code;  // 0 int, 1 uint, 2 float
    uint8_t bits;
    uint16_t lanes;
};
struct Tensor {
    void* data;
    Device device;
    int32_t ndim;
    DataType dtype;
    int64_t* shape;
    int64_t* strides;
    uint64_t byte_offset;
};
struct ManagedTensor {
    Tensor dl_tensor;
    void* manager_ctx;
    void (*deleter)(ManagedTensor*);
};
}  // namespace dl

constexpr int kMaxReleaseStreams = 8;
struct Lease;

struct ZcSlots {
    ZcSlots(int n, int dev)
        : busy(new std::atomic<int>[n]), released(n), recorded(n, 0), current(n), device(dev), count(n) {
        for (int i = 0; i < n; ++i) {
            busy[i].store(0);
            released[i].resize(kMaxReleaseStreams);
            for (cudaEvent_t& e : released[i]) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        }
    }
    // Frees slot i (1-based) after recording one event on each of `streams`; nothing once the Buffer is gone.
    void release(int i, const std::vector<cudaStream_t>& streams) {
        std::lock_guard<std::mutex> g(mu);
        if (!alive) return;
        int prev = -1;
        cudaGetDevice(&prev);
        if (prev != device) cudaSetDevice(device);
        bool ok = true;
        for (size_t j = 0; j < streams.size() && ok; ++j) {
            // an event recorded into a CUDA-graph capture could not be waited on by a later dispatch: a slot whose
            // outputs die while one of their streams captures stays taken (later dispatches copy instead)
            cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
            ok = cudaStreamIsCapturing(streams[j], &capturing) == cudaSuccess &&
                 capturing == cudaStreamCaptureStatusNone &&
                 cudaEventRecord(released[i - 1][j], streams[j]) == cudaSuccess;
        }
        if (!ok) (void)cudaGetLastError();  // (not left for the next launch check to report against its kernel)
        if (prev != device && prev >= 0) cudaSetDevice(prev);
        recorded[i - 1] = static_cast<int>(streams.size());
        if (ok) busy[i - 1].store(0, std::memory_order_release);  // else the slot stays busy, never unguarded
    }
    // Makes `stream` wait for the events of slot i's last release.
    cudaError_t wait_released(int i, cudaStream_t stream) {
        std::lock_guard<std::mutex> g(mu);
        for (int j = 0; j < recorded[i - 1]; ++j) {
            const cudaError_t e = cudaStreamWaitEvent(stream, released[i - 1][j], 0);
            if (e != cudaSuccess) return e;
        }
        return cudaSuccess;
    }
    void close() {
        std::lock_guard<std::mutex> g(mu);
        if (!alive) return;
        alive = false;
        for (auto& v : released)
            for (cudaEvent_t e : v) cudaEventDestroy(e);
    }
    std::unique_ptr<std::atomic<int>[]> busy;
    std::vector<std::vector<cudaEvent_t>> released;
    std::vector<int> recorded;
    std::vector<std::weak_ptr<Lease>> current;  // the live lease of each slot (guarded by mu)
    int device, count;
    bool alive = true;
    std::mutex mu;
};

// Frees its slot when destroyed: built in place only (a copy would free the slot twice).
struct Lease {
    Lease(std::shared_ptr<ZcSlots> s, int i, cudaStream_t st) : slots(std::move(s)), slot(i), streams{st} {}
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { slots->release(slot, streams); }
    std::shared_ptr<ZcSlots> slots;
    int slot;
    std::vector<cudaStream_t> streams;  // guarded by slots->mu once the lease is shared
};

struct Plane {
    dl::ManagedTensor mt;
    std::shared_ptr<Lease> lease;
    int64_t shape[2];
};

void plane_deleter(dl::ManagedTensor* mt) { delete static_cast<Plane*>(mt->manager_ctx); }

void capsule_destructor(PyObject* cap) {
    // still named "dltensor": never consumed by a framework, so the deleter is ours to call
    if (PyCapsule_IsValid(cap, "dltensor")) {
        auto* mt = static_cast<dl::ManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
        mt->deleter(mt);
    }
}

py::capsule make_plane(const std::shared_ptr<Lease>& lease, void* data, int64_t rows, int64_t cols, uint8_t code,
                       uint8_t bits) {
    auto* p = new Plane{};
    p->lease = lease;
    p->shape[0] = rows;
    p->shape[1] = cols;
    p->mt.dl_tensor = dl::Tensor{data, dl::Device{2, lease->slots->device}, 2, dl::DataType{code, bits, 1}, p->shape,
                                 nullptr, 0};
    p->mt.manager_ctx = p;
    p->mt.deleter = plane_deleter;
    PyObject* cap = PyCapsule_New(&p->mt, "dltensor", capsule_destructor);
    if (cap == nullptr) {
        delete p;
        throw py::error_already_set();
    }
    return py::reinterpret_steal<py::capsule>(cap);
}

// Normal-mode kernels bound to one Buffer's memory.
class NormalKernels {
   public:
    NormalKernels(int rank, int num_ranks, int num_experts, int num_topk, int hidden, int max_tokens, uintptr_t base,
                  uintptr_t peer_base, uintptr_t seq, uintptr_t block_counter, uintptr_t status_dev,
                  uintptr_t error_dev, double timeout_s, int ranks_per_node, int threads, int unroll, int num_zc_slots,
                  int device, uintptr_t prep_words) {
        HOST_ASSERT(threads % 32 == 0 && threads >= 64 && threads <= 1024, "threads must be a multiple of 32 in [64, 1024]");
        HOST_ASSERT(unroll == 4 || unroll == 8, "unroll must be 4 or 8");
        HOST_ASSERT(ranks_per_node > 0 && num_ranks % ranks_per_node == 0, "bad ranks_per_node " << ranks_per_node);
        HOST_ASSERT(num_ranks <= kNormalMaxRanks && num_ranks / ranks_per_node <= kNormalMaxNodes &&
                        ranks_per_node <= kNormalMaxLocal,
                    "the normal-mode kernels support at most " << kNormalMaxRanks << " ranks, " << kNormalMaxNodes
                                                               << " nodes and " << kNormalMaxLocal
                                                               << " ranks per node");
        // (the copy kernels give each rank a thread in their waits and offsets)
        HOST_ASSERT(threads > num_ranks, "threads (" << threads << ") must exceed the number of ranks (" << num_ranks
                                                      << ")");
        c_.threads = threads;
        c_.unroll = unroll;
        c_.ranks_per_node = ranks_per_node;
        c_.first_local = rank - rank % ranks_per_node;
        fill_common(c_, rank, num_ranks, num_experts, num_topk, hidden, max_tokens, base, peer_base, seq, block_counter,
                    status_dev, error_dev, timeout_s);
        HOST_ASSERT(num_zc_slots >= 0 && (num_zc_slots == 0 || ranks_per_node == num_ranks),
                    "zero-copy slots are for groups of one node");
        HOST_ASSERT(num_zc_slots < 1024, "at most 1023 zero-copy slots (slot numbers share a count word with flags)");
        const NormalLayout l =
            normal_layout(num_ranks, num_experts, num_topk, hidden, max_tokens, ranks_per_node, num_zc_slots);
        c_.off_flags = l.off_flags;
        c_.off_in_counts = l.off_in_counts;
        c_.off_out_counts = l.off_out_counts;
        c_.off_matrix = l.off_matrix;
        c_.off_recv = l.off_recv;
        c_.off_comb = l.off_comb;
        c_.off_comb_w = l.off_comb_w;
        c_.off_rdma_send = l.off_rdma_send;
        c_.off_rdma_recv = l.off_rdma_recv;
        c_.off_fwd_comb = l.off_fwd_comb;
        c_.off_comb_send = l.off_comb_send;
        c_.off_comb_rdma = l.off_comb_rdma;
        c_.recv_stride = l.recv_stride;
        c_.recv_off_scales = l.recv_off_scales;
        c_.recv_off_idx = l.recv_off_idx;
        c_.recv_off_w = l.recv_off_w;
        c_.recv_off_src = l.recv_off_src;
        c_.rdma_off_pos = l.rdma_off_pos;
        c_.rdma_stride = l.rdma_stride;
        c_.comb_stride = l.comb_stride;
        c_.pcomb_stride = l.pcomb_stride;
        c_.off_comb_flags = l.off_comb_flags;
        c_.off_zc = l.off_zc;
        c_.zc_slot_bytes = l.zc_slot_bytes;
        c_.pl_idx = l.pl_idx;
        c_.pl_w = l.pl_w;
        c_.pl_scales = l.pl_scales;
        c_.pl_x = l.pl_x;
        c_.num_zc_slots = l.num_zc_slots;
        // (int64 [prep_scratch_words(E)], zeroed; 0: the prepare kernel runs one block per target)
        c_.prep = prep_scratch(ptr<int64_t>(prep_words));
        zc_ = std::make_shared<ZcSlots>(num_zc_slots, device);
    }
    ~NormalKernels() {
        zc_->close();
        free_copy_lanes();
    }
    // The copy-engine combine's streams and events (LARGEEP_TUNE comb=8; one node): made once, with every rank's
    // allocation as mapped here (peers, N addresses). The current device must be the Buffer's.
    void copy_engines(std::vector<uint64_t> peers) {
        HOST_ASSERT(static_cast<int>(peers.size()) == c_.num_ranks && c_.ranks_per_node == c_.num_ranks,
                    "copy engines need every rank's address, in a group of one node");
        HOST_ASSERT(lane_streams_.empty(), "the copy engines are set up already");
        CUDA_CHECK(cudaGetDevice(&lane_device_));
        peers_ = std::move(peers);
        CUDA_CHECK(cudaEventCreateWithFlags(&lane_fork_, cudaEventDisableTiming));
        for (int i = 0; i + 1 < c_.num_ranks; ++i) {
            cudaStream_t st = nullptr;
            CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
            lane_streams_.push_back(st);
            cudaEvent_t ev = nullptr;
            CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
            lane_joins_.push_back(ev);
        }
    }
    // recv_counts: the rows from each source (the handle's, from the dispatch's count exchange); ce_flags: device
    // int64 [2 * ceil(max_tokens / kCombChunk)], this Buffer's (api.cuh's launch_combine_ce)
    void combine_ce(uintptr_t out, int out_elem, uintptr_t out_w, uintptr_t send_pos, int num_tokens,
                    bool with_weights, uintptr_t y, uintptr_t y_w, uintptr_t recv_off, std::vector<int> recv_counts,
                    uintptr_t ce_flags, uintptr_t tag, int num_sms, uintptr_t stream) {
        HOST_ASSERT(static_cast<int>(recv_counts.size()) == c_.num_ranks, "one row count per rank expected");
        HOST_ASSERT(lane_fork_ != nullptr, "the copy engines are not set up (copy_engines)");
        const CopyLanes lanes{lane_streams_.data(), lane_fork_, lane_joins_.data(),
                              static_cast<int>(lane_streams_.size())};
        launch_combine_ce(c_, lanes, peers_.data(), ptr<int64_t>(ce_flags), ptr<void>(out), out_elem,
                          ptr<float>(out_w), ptr<const int>(send_pos), num_tokens, with_weights, ptr<const void>(y),
                          ptr<const float>(y_w), ptr<const int>(recv_off), recv_counts.data(), num_sms,
                          ptr<const int>(tag), stream_of(stream));
    }
    // The Buffer is being destroyed: later releases of outputs still alive touch nothing.
    void close() { zc_->close(); }

    // A free zero-copy slot (1-based), taken, with `stream` made to wait for its last release; 0 if none is free.
    int zc_acquire(uintptr_t stream) {
        for (int i = 0; i < zc_->count; ++i) {
            int expect = 0;
            if (zc_->busy[i].compare_exchange_strong(expect, 1, std::memory_order_acquire)) {
                const cudaError_t e = zc_->wait_released(i + 1, stream_of(stream));
                if (e != cudaSuccess) {
                    zc_->busy[i].store(0);
                    CUDA_CHECK(e);
                }
                return i + 1;
            }
        }
        return 0;
    }
    // The zero-copy output holding device address `addr` (any byte of its slot) is used on `stream` too: its slot's
    // release waits for that stream as well. Returns false when `addr` is in no taken slot (a copied output).
    bool zc_add_stream(uintptr_t addr, uintptr_t stream) {
        const uintptr_t first = reinterpret_cast<uintptr_t>(c_.base + c_.off_zc);
        const uintptr_t bytes = static_cast<uintptr_t>(c_.zc_slot_bytes);
        if (zc_->count == 0 || addr < first || addr >= first + bytes * zc_->count) return false;
        const int i = static_cast<int>((addr - first) / bytes);
        std::shared_ptr<Lease> lease;  // released after the lock: if it is the last reference, ~Lease takes the lock
        std::lock_guard<std::mutex> g(zc_->mu);
        lease = zc_->current[i].lock();
        if (!lease) return false;
        for (cudaStream_t s : lease->streams)
            if (s == stream_of(stream)) return true;
        HOST_ASSERT(static_cast<int>(lease->streams.size()) < kMaxReleaseStreams,
                    "a dispatch output is used on more than " << kMaxReleaseStreams << " streams");
        lease->streams.push_back(stream_of(stream));
        return true;
    }
    // Gives slot `slot` back (after `stream`'s work so far) when it is taken and no planes of it are alive: a dispatch
    // that took it and ended without outputs (a void round, or outputs that could not be made). A slot whose planes
    // were made goes back when they die. Returns whether it gave the slot back.
    bool zc_give_back(int slot, uintptr_t stream) {
        HOST_ASSERT(slot >= 1 && slot <= zc_->count, "slot " << slot << " out of range");
        {
            std::lock_guard<std::mutex> g(zc_->mu);
            if (zc_->busy[slot - 1].load() == 0 || !zc_->current[slot - 1].expired()) return false;
        }
        {
            const Lease release(zc_, slot, stream_of(stream));  // its destructor records the release, frees the slot
        }
        return true;
    }
    // The slots taken (by outputs alive, or by a dispatch that has not given its slot back).
    int zc_busy() const {
        int n = 0;
        for (int i = 0; i < zc_->count; ++i) n += zc_->busy[i].load() != 0;
        return n;
    }
    // The slots whose outputs (planes) are alive: views of this Buffer's memory, which destroy must not free under
    // them. A slot still taken without outputs (a dispatch that failed before making them, a release that could not
    // record its events) holds no views and is not counted.
    int zc_held() const {
        std::lock_guard<std::mutex> g(zc_->mu);
        int n = 0;
        for (int i = 0; i < zc_->count; ++i) n += !zc_->current[i].expired();
        return n;
    }
    // DLPack capsules over slot `slot`'s planes for `rows` rows: x as uint8 [rows, x_row_bytes], then (when asked)
    // scales float32 [rows, H/128], ids int64 [rows, K], weights float32 [rows, K]. The slot is freed (after an event
    // on release_stream) once every tensor made from them is gone.
    py::list zc_outputs(int slot, int64_t rows, int64_t x_row_bytes, bool with_scales, bool with_meta,
                        uintptr_t release_stream) {
        HOST_ASSERT(slot >= 1 && slot <= zc_->count && zc_->busy[slot - 1].load() != 0,
                    "slot " << slot << " not taken");
        HOST_ASSERT(rows >= 0 && rows <= static_cast<int64_t>(c_.num_ranks) * c_.max_tokens && x_row_bytes >= 0 &&
                        x_row_bytes <= 2ll * c_.hidden,
                    "zero-copy outputs out of range");
        auto lease = std::make_shared<Lease>(zc_, slot, stream_of(release_stream));
        {
            std::lock_guard<std::mutex> g(zc_->mu);
            zc_->current[slot - 1] = lease;
        }
        uint8_t* b = c_.base + c_.off_zc + static_cast<int64_t>(slot - 1) * c_.zc_slot_bytes;
        const int K = c_.num_topk;
        py::list out;
        out.append(make_plane(lease, b + c_.pl_x, rows, x_row_bytes, 1, 8));
        out.append(with_scales ? py::object(make_plane(lease, b + c_.pl_scales, rows, c_.hidden / 128, 2, 32))
                               : py::object(py::none()));
        out.append(with_meta ? py::object(make_plane(lease, b + c_.pl_idx, rows, K, 0, 64)) : py::object(py::none()));
        out.append(with_meta ? py::object(make_plane(lease, b + c_.pl_w, rows, K, 2, 32)) : py::object(py::none()));
        return out;
    }

    // A fresh dispatch's launches in one call from Python (each call through the binding costs host time):
    // prepare, a zero-copy slot when `want_slot` (zc_acquire), notify publishing that slot, then the sends (`send`).
    // Returns the slot (0: the copy slot).
    // check_host: 0, or the device address of 3 host-mapped int64 words for the expert-id check (see the prepare
    // kernel). (node_pos and fwd_pos are 0 in groups of one node, and node_pos also where num_tokens is 0.)
    int start(uintptr_t idx, int num_tokens, uintptr_t send_pos, uintptr_t node_pos, uintptr_t self_token,
              uintptr_t check_host, int64_t check_token, bool want_slot, uintptr_t recv_off, uintptr_t send_off,
              uintptr_t send_slot, uintptr_t fwd_off, uintptr_t fwd_count, uintptr_t fwd_pos, bool report,
              uintptr_t per_expert, int alignment, uintptr_t x, int x_elem, uintptr_t scales, bool has_scales,
              uintptr_t w, uintptr_t tag, int num_sms, uintptr_t stream) {
        const bool nodes = c_.ranks_per_node < c_.num_ranks;
        HOST_ASSERT(!nodes || (fwd_off != 0 && fwd_count != 0 && fwd_pos != 0),
                    "a group of several nodes needs fwd_off, fwd_count and fwd_pos");
        // (the slots and send_pos are sized for max_tokens rows per rank; checked before anything is launched)
        HOST_ASSERT(num_tokens >= 0 && num_tokens <= c_.max_tokens,
                    "dispatch start: num_tokens = " << num_tokens << " outside [0, max_tokens = " << c_.max_tokens
                                                    << "]");
        const cudaStream_t s = stream_of(stream);
        launch_dispatch_prepare(c_, ptr<const int64_t>(idx), num_tokens, ptr<int>(send_pos), ptr<int>(node_pos),
                                ptr<int>(self_token), IdCheck{ptr<int64_t>(check_host), check_token}, num_sms, s);
        const int slot = want_slot ? zc_acquire(stream) : 0;
        try {
            launch_dispatch_notify(c_, ptr<int>(recv_off), ptr<int>(send_off), ptr<int64_t>(send_slot),
                                   ptr<int>(fwd_off), ptr<int>(fwd_count), slot, report, ptr<int>(per_expert),
                                   alignment, kRowKind(x_elem, has_scales), ptr<int>(tag), s);
            send(x, x_elem, scales, has_scales, idx, w, false, num_tokens, send_pos, node_pos, send_off, send_slot,
                 slot > 0, fwd_off, fwd_count, fwd_pos, tag, num_sms, stream);
        } catch (...) {
            // (the caller never learns the slot: give it back here, after what is queued on the stream, rather
            // than leave it taken for good, which would make destroy() keep the memory)
            if (slot > 0) {
                try {
                    zc_give_back(slot, stream);
                } catch (...) {  // (the launch's error is the one to report)
                }
            }
            throw;
        }
        return slot;
    }
    // A dispatch's sends, queued by fresh (start) and cached dispatches alike: the RDMA leg (groups of several
    // nodes), the NVLink push into the slots of this node's ranks, then the forwarding of the rows my RDMA peers
    // sent (several nodes). A fresh one's rows carry ids and weights, into the slots notify published (send_slot;
    // include_self: mine too, into my zero-copy slot); a cached one's (send_slot 0) go into the copy slots, without.
    // has_scales, not the scales pointer, says whether rows carry FP8 scales: an empty tensor's is 0, yet the rows
    // this rank forwards for others have scales. (node_pos and the fwd_* arrays: 0 in groups of one node.)
    void send(uintptr_t x, int x_elem, uintptr_t scales, bool has_scales, uintptr_t idx, uintptr_t w, bool cached,
              int num_tokens, uintptr_t send_pos, uintptr_t node_pos, uintptr_t send_off, uintptr_t send_slot,
              bool include_self, uintptr_t fwd_off, uintptr_t fwd_count, uintptr_t fwd_pos, uintptr_t tag,
              int num_sms, uintptr_t stream) {
        const bool nodes = c_.ranks_per_node < c_.num_ranks;
        HOST_ASSERT(!nodes || (fwd_off != 0 && fwd_count != 0 && fwd_pos != 0),
                    "a group of several nodes needs fwd_off, fwd_count and fwd_pos");
        HOST_ASSERT(!cached || (idx == 0 && w == 0 && send_slot == 0 && !include_self),
                    "a cached dispatch sends no ids or weights, into the copy slots");
        HOST_ASSERT(num_tokens >= 0 && num_tokens <= c_.max_tokens,
                    "dispatch send: num_tokens = " << num_tokens << " outside [0, max_tokens = " << c_.max_tokens
                                                   << "]");
        const cudaStream_t s = stream_of(stream);
        if (nodes)
            launch_dispatch_rdma_send(c_, ptr<const void>(x), x_elem, ptr<const float>(scales), has_scales,
                                      ptr<const int64_t>(idx), ptr<const float>(w), num_tokens,
                                      ptr<const int>(send_pos), ptr<const int>(node_pos), cached, num_sms,
                                      ptr<const int>(tag), s);
        launch_dispatch_push(c_, ptr<const void>(x), x_elem, ptr<const float>(scales), has_scales,
                             ptr<const int64_t>(idx), ptr<const float>(w), num_tokens, ptr<const int>(send_pos),
                             ptr<const int>(send_off), ptr<const int64_t>(send_slot), include_self, num_sms,
                             ptr<const int>(tag), s);
        if (nodes)
            launch_dispatch_forward(c_, x_elem, has_scales, cached, ptr<const int>(fwd_off), ptr<const int>(fwd_count),
                                    ptr<int>(fwd_pos), num_sms, ptr<const int>(tag), s);
    }
    // has_scales: whether this call's rows carry FP8 scales (out_s of no rows may be 0)
    void copyout(uintptr_t out_x, int x_elem, uintptr_t out_s, bool has_scales, uintptr_t out_idx, uintptr_t out_w,
                 uintptr_t recv_src, uintptr_t recv_off, int num_rows, bool cached, uintptr_t x, uintptr_t scales,
                 uintptr_t idx, uintptr_t w, uintptr_t self_token, int my_slot, uintptr_t tag, int num_sms,
                 uintptr_t stream) {
        // (my_slot picks the zero-copy slot this rank's own rows were pushed into: an address in this Buffer)
        HOST_ASSERT(my_slot >= 0 && my_slot <= zc_->count,
                    "dispatch copyout: my_slot = " << my_slot << " outside [0, num_zc_slots = " << zc_->count
                                                   << "]");
        launch_dispatch_copyout(c_, ptr<void>(out_x), x_elem, ptr<float>(out_s), has_scales, ptr<int64_t>(out_idx),
                                ptr<float>(out_w), ptr<int>(recv_src), ptr<const int>(recv_off), num_rows, cached,
                                ptr<const void>(x), ptr<const float>(scales), ptr<const int64_t>(idx),
                                ptr<const float>(w), ptr<const int>(self_token), my_slot, num_sms, ptr<const int>(tag),
                                stream_of(stream));
    }
    // with_weights: whether this call has topk_weights (y_w of no rows may be 0)
    // part_bf16: partial sums between nodes as bf16 (bf16 y; the push, forward and reduce of a call agree on it)
    void combine_push(uintptr_t y, int y_elem, uintptr_t y_w, bool with_weights, bool part_bf16, uintptr_t recv_src,
                      uintptr_t recv_off, int num_rows, uintptr_t tag, int num_sms, uintptr_t stream) {
        launch_combine_push(c_, ptr<const void>(y), y_elem, ptr<const float>(y_w), with_weights, part_bf16,
                            ptr<const int>(recv_src), ptr<const int>(recv_off), num_rows, num_sms, ptr<const int>(tag),
                            stream_of(stream));
    }
    void combine_forward(int y_elem, bool with_weights, bool part_bf16, uintptr_t fwd_count, uintptr_t fwd_pos,
                         uintptr_t tag, int num_sms, uintptr_t stream) {
        launch_combine_forward(c_, y_elem, with_weights, part_bf16, ptr<const int>(fwd_count), ptr<const int>(fwd_pos),
                               num_sms, ptr<const int>(tag), stream_of(stream));
    }
    void combine_fused(uintptr_t out, int out_elem, uintptr_t out_w, uintptr_t send_pos, int num_tokens,
                       bool with_weights, uintptr_t y, uintptr_t y_w, uintptr_t recv_src, uintptr_t recv_off,
                       int num_rows, uintptr_t tag, int num_sms, int push_eighths, uintptr_t stream) {
        launch_combine_fused(c_, ptr<void>(out), out_elem, ptr<float>(out_w), ptr<const int>(send_pos), num_tokens,
                             with_weights, ptr<const void>(y), ptr<const float>(y_w), ptr<const int>(recv_src),
                             ptr<const int>(recv_off), num_rows, num_sms, push_eighths, ptr<const int>(tag),
                             stream_of(stream));
    }
    void combine_reduce(uintptr_t out, int out_elem, uintptr_t out_w, uintptr_t send_pos, uintptr_t node_pos,
                        int num_tokens, bool with_weights, bool part_bf16, uintptr_t y, uintptr_t y_w,
                        uintptr_t recv_off, uintptr_t tag, int num_sms, uintptr_t stream) {
        launch_combine_reduce(c_, ptr<void>(out), out_elem, ptr<float>(out_w), ptr<const int>(send_pos),
                              ptr<const int>(node_pos), num_tokens, with_weights, part_bf16, ptr<const void>(y),
                              ptr<const float>(y_w), ptr<const int>(recv_off), num_sms, ptr<const int>(tag),
                              stream_of(stream));
    }

   private:
    // (a destructor's: errors are not raised, and nothing is waited for: a stream or event destroyed with work
    // still queued is released once that work completes, and a copy stream can wait without a bound, behind a
    // prologue queued after a caller's kernel that never ends; what the copies read or write outlives them: y and
    // the flag words are ordered on the Buffer's stream, which waits for every copy, and the heap is freed only
    // once the device is idle)
    void free_copy_lanes() {
        if (lane_fork_ == nullptr) return;
        int prev = -1;
        cudaGetDevice(&prev);
        if (prev != lane_device_) cudaSetDevice(lane_device_);
        for (cudaStream_t st : lane_streams_) cudaStreamDestroy(st);
        for (cudaEvent_t ev : lane_joins_) cudaEventDestroy(ev);
        cudaEventDestroy(lane_fork_);
        (void)cudaGetLastError();
        if (prev != lane_device_ && prev >= 0) cudaSetDevice(prev);
        lane_streams_.clear();
        lane_joins_.clear();
        lane_fork_ = nullptr;
    }

    NormalCtx c_{};
    std::shared_ptr<ZcSlots> zc_;
    std::vector<uint64_t> peers_;
    std::vector<cudaStream_t> lane_streams_;
    std::vector<cudaEvent_t> lane_joins_;
    cudaEvent_t lane_fork_ = nullptr;
    int lane_device_ = -1;
};

// Low-latency kernels bound to one Buffer's memory.
class LowLatencyKernels {
   public:
    LowLatencyKernels(int rank, int num_ranks, int num_experts, int num_topk, int hidden, int max_tokens,
                      uintptr_t base, uintptr_t peer_base, uintptr_t seq, uintptr_t block_counter,
                      uintptr_t status_dev, uintptr_t error_dev, double timeout_s, int ranks_per_node,
                      int spread) {
        HOST_ASSERT(ranks_per_node > 0 && num_ranks % ranks_per_node == 0, "bad ranks_per_node " << ranks_per_node);
        HOST_ASSERT(spread == 0 || spread == 1, "LARGEEP_TUNE ll_spread must be 0 or 1, got " << spread);
        c_.ranks_per_node = ranks_per_node;
        c_.spread = spread;
        int dev = 0;
        CUDA_CHECK(cudaGetDevice(&dev));  // the Buffer's device is current while its backend is made
        CUDA_CHECK(cudaDeviceGetAttribute(&c_.device_sms, cudaDevAttrMultiProcessorCount, dev));
        fill_common(c_, rank, num_ranks, num_experts, num_topk, hidden, max_tokens, base, peer_base, seq, block_counter,
                    status_dev, error_dev, timeout_s);
        const LowLatencyLayout l =
            low_latency_layout(num_ranks, num_experts, num_topk, hidden, max_tokens, ranks_per_node);
        c_.off_flags = l.off_flags;
        c_.off_counter = l.off_counter;
        c_.off_recv = l.off_recv;
        c_.off_comb = l.off_comb;
        c_.off_send = l.off_send;
        c_.off_comb_send = l.off_comb_send;
        c_.recv_stride = l.recv_stride;
        c_.off_scales_in_row = l.off_scales_in_row;
        c_.off_meta_in_row = l.off_meta_in_row;
        c_.comb_stride = l.comb_stride;
    }
    // w: the dispatch's topk_weights (0: none; given, the combine sums each token's rows on the experts' rank),
    // w_keep: their copy for the combine; ids_keep: int32 [T, K], the ids sent, for the combine; sum_one: such sums
    // come back as one bf16 row each, not two
    void dispatch_send(uintptr_t x, uintptr_t idx, uintptr_t w, uintptr_t w_keep, uintptr_t ids_keep, int num_tokens,
                       bool use_fp8, bool round_scale, bool sum_one, uintptr_t hseq, uintptr_t stream) {
        launch_ll_dispatch_send(c_, ptr<const void>(x), ptr<const int64_t>(idx), ptr<const float>(w),
                                ptr<float>(w_keep), ptr<int>(ids_keep), num_tokens, use_fp8, round_scale, sum_one,
                                ptr<int64_t>(hseq), stream_of(stream));
    }
    // Send and receive in one kernel where that can run (LARGEEP_TUNE ll_fuse=1); false: nothing launched.
    bool dispatch_fused(uintptr_t x, uintptr_t idx, uintptr_t w, uintptr_t w_keep, uintptr_t ids_keep,
                        int num_tokens, bool use_fp8, bool round_scale, bool sum_one, uintptr_t hseq,
                        uintptr_t out_x, uintptr_t out_s, uintptr_t count, uintptr_t src_info, uintptr_t meta,
                        uintptr_t lead, uintptr_t rowmap, uintptr_t stream) {
        return launch_ll_dispatch_fused(c_, ptr<const void>(x), ptr<const int64_t>(idx), ptr<const float>(w),
                                        ptr<float>(w_keep), ptr<int>(ids_keep), num_tokens, use_fp8, round_scale,
                                        sum_one, ptr<int64_t>(hseq), ptr<void>(out_x), ptr<float>(out_s),
                                        ptr<int>(count), ptr<int>(src_info), ptr<int>(meta), ptr<int>(lead),
                                        ptr<int>(rowmap), stream_of(stream));
    }
    void dispatch_recv(uintptr_t out_x, uintptr_t out_s, uintptr_t count, uintptr_t src_info, uintptr_t meta,
                       uintptr_t lead, uintptr_t rowmap, bool use_fp8, uintptr_t hseq, uintptr_t stream) {
        launch_ll_dispatch_recv(c_, ptr<void>(out_x), ptr<float>(out_s), ptr<int>(count), ptr<int>(src_info),
                                ptr<int>(meta), ptr<int>(lead), ptr<int>(rowmap), use_fp8, ptr<const int64_t>(hseq),
                                stream_of(stream));
    }
    // dseq: the handle's dispatch's round (its seq tensor), whose tag the combine's done flags carry, so that
    // ranks combining handles of different dispatches are told (kOpLowLatencyHandles).
    void combine_send(uintptr_t y, uintptr_t count, uintptr_t meta, uintptr_t lead, uintptr_t rowmap, uintptr_t hseq,
                      uintptr_t dseq, uintptr_t stream) {
        launch_ll_combine_send(c_, ptr<const void>(y), ptr<const int>(count), ptr<const int>(meta),
                               ptr<const int>(lead), ptr<const int>(rowmap), ptr<int64_t>(hseq),
                               ptr<const int64_t>(dseq), stream_of(stream));
    }
    // Send and weighted sum in one kernel where that can run (LARGEEP_TUNE ll_fuse=1); false: nothing launched.
    // sent: the handle's dispatch's ids_keep; merged: 0, or the handle's dispatch sent its weights: 1 (sums as two
    // bf16 rows), 2 (as one: sum_one).
    bool combine_fused(uintptr_t y, uintptr_t count, uintptr_t meta, uintptr_t lead, uintptr_t rowmap, uintptr_t hseq,
                       uintptr_t dseq, uintptr_t sent, uintptr_t idx, uintptr_t w, uintptr_t out, int num_tokens,
                       int merged, uintptr_t stream) {
        return launch_ll_combine_fused(c_, ptr<const void>(y), ptr<const int>(count), ptr<const int>(meta),
                                       ptr<const int>(lead), ptr<const int>(rowmap), ptr<int64_t>(hseq),
                                       ptr<const int64_t>(dseq), ptr<const int>(sent), ptr<const int64_t>(idx),
                                       ptr<const float>(w), ptr<void>(out), num_tokens, merged, stream_of(stream));
    }
    void combine_recv(uintptr_t sent, uintptr_t idx, uintptr_t w, uintptr_t out, int num_tokens, int merged,
                      uintptr_t hseq, uintptr_t dseq, uintptr_t stream) {
        launch_ll_combine_recv(c_, ptr<const int>(sent), ptr<const int64_t>(idx), ptr<const float>(w), ptr<void>(out),
                               num_tokens, merged, ptr<const int64_t>(hseq), ptr<const int64_t>(dseq),
                               stream_of(stream));
    }

   private:
    LowLatencyCtx c_{};
};

}  // namespace


namespace {
// Diagnostics (LARGEEP_SEGV_BACKTRACE=1, read by largeep.native when it loads this module): a thread that faults
// prints its native stack (shared object + offset, and the nearest exported symbol) before the default action. For
// machines without gdb.
void segv_handler(int sig, siginfo_t* info, void*) {
    void* frames[64];
    const int n = backtrace(frames, 64);
    char line[512];
    int len = snprintf(line, sizeof(line), "largeep: signal %d at address %p, %d frames\n", sig, info->si_addr, n);
    (void)!write(2, line, len);
    for (int i = 0; i < n; ++i) {
        Dl_info d{};
        if (dladdr(frames[i], &d) && d.dli_fname) {
            len = snprintf(line, sizeof(line), "  #%d %s(+0x%lx) %s\n", i, d.dli_fname,
                           static_cast<unsigned long>(reinterpret_cast<uintptr_t>(frames[i]) -
                                                      reinterpret_cast<uintptr_t>(d.dli_fbase)),
                           d.dli_sname ? d.dli_sname : "?");
        } else {
            len = snprintf(line, sizeof(line), "  #%d %p\n", i, frames[i]);
        }
        (void)!write(2, line, len);
    }
    signal(sig, SIG_DFL);
    raise(sig);
}
}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "largeep native kernels (NVSHMEM)";
    // Bumped whenever a binding's signature, or the meaning of a status word the kernels share with the Python code,
    // changes; python/largeep/native.py refuses a module of another version (a stale build next to newer Python
    // code) with a message saying to rebuild, instead of a TypeError or a misread word later.
    m.attr("abi_version") = 19;
    m.attr("comb_chunk") = kCombChunk;  // rows per combine chunk flag (the copy-engine combine's flag words)
    m.def("install_fault_backtrace", [] {
        struct sigaction sa {};
        sa.sa_sigaction = segv_handler;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
    });
    py::register_exception<largeep::Error>(m, "NativeError", PyExc_RuntimeError);

    m.def("unique_id", []() { return py::bytes(runtime::unique_id()); });
    m.def("init", [](py::bytes uid, int rank, int n, int device) {
        std::string s = uid;
        py::gil_scoped_release nogil;
        runtime::init(s, rank, n, device);
    });
    m.def("initialized", &runtime::initialized);
    m.def("rank", &runtime::rank);
    m.def("num_ranks", &runtime::num_ranks);
    m.def("alloc", &runtime::alloc, py::call_guard<py::gil_scoped_release>());
    m.def("free", &runtime::free, py::arg("ptr"), py::arg("timeout_s"), py::arg("keep") = false,
          py::call_guard<py::gil_scoped_release>());
    m.def("peer_ptr", &runtime::peer_ptr);
    m.def("host_alloc", &runtime::host_alloc);
    // (GIL released: cudaFreeHost waits for the device, which other Python threads must not wait behind)
    m.def("host_free", &runtime::host_free, py::call_guard<py::gil_scoped_release>());
    m.def("wait_host_word", &runtime::wait_host_word, py::call_guard<py::gil_scoped_release>());
    m.def("cuda_error_name", &runtime::cuda_error_name);
    // Stream ordering without torch's Event objects (a Buffer's call orders its stream after the caller's and back):
    // an event of the current device, and "waiter waits for what is queued on signaler now" through that event.
    m.def("event_create", []() {
        cudaEvent_t e = nullptr;
        CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        return reinterpret_cast<uintptr_t>(e);
    });
    m.def("event_destroy", [](uintptr_t e) {
        if (cudaEventDestroy(reinterpret_cast<cudaEvent_t>(e)) != cudaSuccess) (void)cudaGetLastError();
    });
    m.def("stream_wait", [](uintptr_t waiter, uintptr_t signaler, uintptr_t event) {
        const cudaEvent_t e = reinterpret_cast<cudaEvent_t>(event);
        CUDA_CHECK(cudaEventRecord(e, stream_of(signaler)));
        CUDA_CHECK(cudaStreamWaitEvent(stream_of(waiter), e, 0));
    });

    m.def("prep_scratch_words", &prep_scratch_words);
    m.def("normal_layout", [](int n, int e, int k, int h, int t, int p, int zc_slots) {
        const NormalLayout l = normal_layout(n, e, k, h, t, p, zc_slots);
        py::dict d;
        d["total_bytes"] = l.total_bytes;
        d["zc_slot_bytes"] = l.zc_slot_bytes;
        d["off_zc"] = l.off_zc;
        d["recv_stride"] = l.recv_stride;
        d["comb_stride"] = l.comb_stride;
        return d;
    });
    m.def("layout", [](uintptr_t idx, int t, int k, int n, int e, int p, uintptr_t per_rank, uintptr_t per_node,
                       uintptr_t per_expert, uintptr_t in_rank, uintptr_t check_scratch, uintptr_t check_host,
                       int64_t check_token, uintptr_t stream) {
        launch_layout(ptr<const int64_t>(idx), t, k, n, e, p, ptr<int>(per_rank), ptr<int>(per_node),
                      ptr<int>(per_expert), ptr<bool>(in_rank),
                      LayoutCheck{ptr<int64_t>(check_scratch), ptr<int64_t>(check_host), check_token},
                      stream_of(stream));
    });

    m.def("id_check", [](uintptr_t ids, int64_t n, int e, uintptr_t check_scratch, uintptr_t check_host,
                         int64_t check_token, uintptr_t stream) {
        launch_id_check(ptr<const int64_t>(ids), n, e,
                        LayoutCheck{ptr<int64_t>(check_scratch), ptr<int64_t>(check_host), check_token},
                        stream_of(stream));
    });

    // count: 0, or the address of an int32 on the device (rows of src at or past it are not read); src_rows: the
    // rows of src (entries naming none of them are left out)
    m.def("weighted_row_sum", [](uintptr_t src, int64_t src_rows, int elem, uintptr_t pos, uintptr_t w, uintptr_t y,
                                 int64_t rows, int k, int h, int64_t pad, uintptr_t count, uintptr_t stream) {
        launch_weighted_row_sum(ptr<const void>(src), src_rows, elem, ptr<const int64_t>(pos), ptr<const float>(w),
                                ptr<void>(y), rows, k, h, pad, ptr<const int>(count), stream_of(stream));
    });
    // bias: 0 (none) or the address of [num_experts, 2 * ffn] rows of h's dtype; offs int32 [num_experts]
    m.def("expert_act", [](uintptr_t h, uintptr_t bias, uintptr_t offs, int experts, uintptr_t a, int64_t rows,
                           int ffn, int elem, int kind, float alpha, float limit, uintptr_t stream) {
        launch_expert_act(ptr<const void>(h), ptr<const void>(bias), ptr<const int>(offs), experts, ptr<void>(a), rows,
                          ffn, elem, kind, alpha, limit, stream_of(stream));
    });
    m.def("row_bias_add", [](uintptr_t x, uintptr_t bias, uintptr_t offs, int experts, uintptr_t y, int64_t rows,
                             int cols, int elem, uintptr_t stream) {
        launch_row_bias_add(ptr<const void>(x), ptr<const void>(bias), ptr<const int>(offs), experts, ptr<void>(y),
                            rows, cols, elem, stream_of(stream));
    });
    m.def("segment_row_sum", [](uintptr_t g, uintptr_t offs, int experts, uintptr_t out, int cols, int elem,
                                uintptr_t stream) {
        launch_segment_row_sum(ptr<const void>(g), ptr<const int>(offs), experts, ptr<void>(out), cols, elem,
                               stream_of(stream));
    });
    m.def("expert_act_backward", [](uintptr_t da, uintptr_t h, uintptr_t bias, uintptr_t offs, int experts,
                                    uintptr_t dh, int64_t rows, int ffn, int elem, int kind, float alpha, float limit,
                                    uintptr_t stream) {
        launch_expert_act_backward(ptr<const void>(da), ptr<const void>(h), ptr<const void>(bias),
                                   ptr<const int>(offs), experts, ptr<void>(dh), rows, ffn, elem, kind, alpha, limit,
                                   stream_of(stream));
    });
    m.def("fp8_quantize", [](uintptr_t x, int elem, uintptr_t q, uintptr_t s, int64_t groups, bool round_scale,
                             uintptr_t stream) {
        launch_fp8_quantize(ptr<const void>(x), elem, ptr<uint8_t>(q), ptr<float>(s), groups, round_scale,
                            stream_of(stream));
    });
    m.def("fp8_dequantize", [](uintptr_t q, uintptr_t s, uintptr_t y, int elem, int64_t groups, uintptr_t stream) {
        launch_fp8_dequantize(ptr<const uint8_t>(q), ptr<const float>(s), ptr<void>(y), elem, groups,
                              stream_of(stream));
    });
    m.def("gather_rows_default_blocks", &gather_rows_default_blocks);
    m.def("gather_rows", [](uintptr_t x, int64_t x_rows, int64_t row_bytes, uintptr_t src, uintptr_t count,
                            uintptr_t out, int64_t rows, int num_blocks, uintptr_t stream) {
        launch_gather_rows(ptr<const void>(x), x_rows, row_bytes, ptr<const int64_t>(src), ptr<const int>(count),
                           ptr<void>(out), rows, num_blocks, stream_of(stream));
    });
    m.def("expert_order_work", [](int64_t entries, int experts) { return expert_order_chunks(entries) * (experts + 1); });
    m.def("expert_order", [](uintptr_t idx, int64_t rows, int k, int experts, uintptr_t offs, uintptr_t work,
                             uintptr_t pos, uintptr_t src, int64_t src_len, int64_t pad, uintptr_t stream) {
        launch_expert_order(ptr<const int64_t>(idx), rows, k, experts, ptr<int>(offs), ptr<int>(work),
                            ptr<int64_t>(pos), ptr<int64_t>(src), src_len, pad, stream_of(stream));
    });
    m.def("low_latency_layout", [](int n, int e, int k, int h, int t, int p) {
        const LowLatencyLayout l = low_latency_layout(n, e, k, h, t, p);
        py::dict d;
        d["total_bytes"] = l.total_bytes;
        return d;
    });
    py::class_<LowLatencyKernels>(m, "LowLatencyKernels")
        .def(py::init<int, int, int, int, int, int, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                      double, int, int>())
        .def("dispatch_send", &LowLatencyKernels::dispatch_send)
        .def("dispatch_fused", &LowLatencyKernels::dispatch_fused)
        .def("dispatch_recv", &LowLatencyKernels::dispatch_recv)
        .def("combine_send", &LowLatencyKernels::combine_send)
        .def("combine_fused", &LowLatencyKernels::combine_fused)
        .def("combine_recv", &LowLatencyKernels::combine_recv);

    py::class_<NormalKernels>(m, "NormalKernels")
        .def(py::init<int, int, int, int, int, int, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                      double, int, int, int, int, int, uintptr_t>())
        .def("zc_acquire", &NormalKernels::zc_acquire)
        .def("zc_busy", &NormalKernels::zc_busy)
        .def("zc_held", &NormalKernels::zc_held)
        .def("zc_give_back", &NormalKernels::zc_give_back)
        .def("zc_add_stream", &NormalKernels::zc_add_stream)
        .def("zc_outputs", &NormalKernels::zc_outputs)
        .def("zc_close", [](NormalKernels& k) { k.close(); })
        .def("start", &NormalKernels::start)
        .def("send", &NormalKernels::send)
        .def("copyout", &NormalKernels::copyout)
        .def("combine_push", &NormalKernels::combine_push)
        .def("combine_reduce", &NormalKernels::combine_reduce)
        .def("combine_fused", &NormalKernels::combine_fused)
        .def("copy_engines", &NormalKernels::copy_engines)
        .def("combine_ce", &NormalKernels::combine_ce)
        .def("combine_forward", &NormalKernels::combine_forward);
}
