// pybind11 surface of largeep._C: plain types only (ints for pointers and streams, bytes for the unique id).
// Nothing here depends on torch, so one build serves every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

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

// Normal-mode kernels bound to one Buffer's memory.
class NormalKernels {
   public:
    NormalKernels(int rank, int num_ranks, int num_experts, int num_topk, int hidden, int max_tokens, uintptr_t base,
                  uintptr_t peer_base, uintptr_t seq, uintptr_t block_counter, uintptr_t status_dev,
                  uintptr_t error_dev, double timeout_s, int ranks_per_node, int threads, int load_mode,
                  int unroll) {
        HOST_ASSERT(threads % 32 == 0 && threads >= 64 && threads <= 1024, "threads must be a multiple of 32 in [64, 1024]");
        HOST_ASSERT(load_mode >= 0 && load_mode <= 2 && (unroll == 4 || unroll == 8), "bad load mode or unroll");
        HOST_ASSERT(ranks_per_node > 0 && num_ranks % ranks_per_node == 0, "bad ranks_per_node " << ranks_per_node);
        c_.threads = threads;
        c_.load_mode = load_mode;
        c_.unroll = unroll;
        c_.ranks_per_node = ranks_per_node;
        fill_common(c_, rank, num_ranks, num_experts, num_topk, hidden, max_tokens, base, peer_base, seq, block_counter,
                    status_dev, error_dev, timeout_s);
        const NormalLayout l = normal_layout(num_ranks, num_experts, num_topk, hidden, max_tokens, ranks_per_node);
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
    }

    void prepare(uintptr_t idx, int num_tokens, uintptr_t send_pos, uintptr_t node_pos, uintptr_t self_token,
                 uintptr_t stream) {
        launch_dispatch_prepare(c_, ptr<const int64_t>(idx), num_tokens, ptr<int>(send_pos), ptr<int>(node_pos),
                                ptr<int>(self_token), stream_of(stream));
    }
    void notify(uintptr_t recv_off, uintptr_t send_off, uintptr_t fwd_off, uintptr_t fwd_count, bool report,
                uintptr_t stream) {
        launch_dispatch_notify(c_, ptr<int>(recv_off), ptr<int>(send_off), ptr<int>(fwd_off), ptr<int>(fwd_count),
                               report, stream_of(stream));
    }
    void push(uintptr_t x, int x_elem, uintptr_t scales, uintptr_t idx, uintptr_t w, int num_tokens,
              uintptr_t send_pos, uintptr_t send_off, int num_sms, uintptr_t stream) {
        launch_dispatch_push(c_, ptr<const void>(x), x_elem, ptr<const float>(scales), ptr<const int64_t>(idx),
                             ptr<const float>(w), num_tokens, ptr<const int>(send_pos), ptr<const int>(send_off),
                             num_sms, stream_of(stream));
    }
    void rdma_send(uintptr_t x, int x_elem, uintptr_t scales, uintptr_t idx, uintptr_t w, int num_tokens,
                   uintptr_t send_pos, uintptr_t node_pos, int num_sms, uintptr_t stream) {
        launch_dispatch_rdma_send(c_, ptr<const void>(x), x_elem, ptr<const float>(scales), ptr<const int64_t>(idx),
                                  ptr<const float>(w), num_tokens, ptr<const int>(send_pos), ptr<const int>(node_pos),
                                  num_sms, stream_of(stream));
    }
    void forward(int x_elem, bool has_scales, bool cached, uintptr_t fwd_off, uintptr_t fwd_count, uintptr_t fwd_pos,
                 int num_sms, uintptr_t stream) {
        launch_dispatch_forward(c_, x_elem, has_scales, cached, ptr<const int>(fwd_off), ptr<const int>(fwd_count),
                                ptr<int>(fwd_pos), num_sms, stream_of(stream));
    }
    void copyout(uintptr_t out_x, int x_elem, uintptr_t out_s, uintptr_t out_idx, uintptr_t out_w,
                 uintptr_t recv_src, uintptr_t recv_off, int num_rows, bool cached, uintptr_t x, uintptr_t scales,
                 uintptr_t idx, uintptr_t w, uintptr_t self_token, int num_sms, uintptr_t stream) {
        launch_dispatch_copyout(c_, ptr<void>(out_x), x_elem, ptr<float>(out_s), ptr<int64_t>(out_idx),
                                ptr<float>(out_w), ptr<int>(recv_src), ptr<const int>(recv_off), num_rows, cached,
                                ptr<const void>(x), ptr<const float>(scales), ptr<const int64_t>(idx),
                                ptr<const float>(w), ptr<const int>(self_token), num_sms, stream_of(stream));
    }
    void combine_push(uintptr_t y, int y_elem, uintptr_t y_w, uintptr_t recv_src, uintptr_t recv_off, int num_rows,
                      int num_sms, uintptr_t stream) {
        launch_combine_push(c_, ptr<const void>(y), y_elem, ptr<const float>(y_w), ptr<const int>(recv_src),
                            ptr<const int>(recv_off), num_rows, num_sms, stream_of(stream));
    }
    void combine_forward(int y_elem, bool with_weights, uintptr_t fwd_count, uintptr_t fwd_pos, int num_sms,
                         uintptr_t stream) {
        launch_combine_forward(c_, y_elem, with_weights, ptr<const int>(fwd_count), ptr<const int>(fwd_pos), num_sms,
                               stream_of(stream));
    }
    void combine_reduce(uintptr_t out, int out_elem, uintptr_t out_w, uintptr_t send_pos, uintptr_t node_pos,
                        int num_tokens, bool with_weights, uintptr_t y, uintptr_t y_w, uintptr_t recv_off, int num_sms,
                        uintptr_t stream) {
        launch_combine_reduce(c_, ptr<void>(out), out_elem, ptr<float>(out_w), ptr<const int>(send_pos),
                              ptr<const int>(node_pos), num_tokens, with_weights, ptr<const void>(y),
                              ptr<const float>(y_w), ptr<const int>(recv_off), num_sms, stream_of(stream));
    }

   private:
    NormalCtx c_{};
};

// Low-latency kernels bound to one Buffer's memory.
class LowLatencyKernels {
   public:
    LowLatencyKernels(int rank, int num_ranks, int num_experts, int num_topk, int hidden, int max_tokens,
                      uintptr_t base, uintptr_t peer_base, uintptr_t seq, uintptr_t block_counter,
                      uintptr_t status_dev, uintptr_t error_dev, double timeout_s, int ranks_per_node,
                      int send_mode) {
        HOST_ASSERT(ranks_per_node > 0 && num_ranks % ranks_per_node == 0, "bad ranks_per_node " << ranks_per_node);
        HOST_ASSERT(send_mode == 0 || send_mode == 1, "LARGEEP_TUNE ll_send must be 0 or 1, got " << send_mode);
        c_.ranks_per_node = ranks_per_node;
        c_.send_mode = send_mode;
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
    void dispatch_send(uintptr_t x, uintptr_t idx, int num_tokens, bool use_fp8, bool round_scale, uintptr_t hseq,
                       uintptr_t stream) {
        launch_ll_dispatch_send(c_, ptr<const void>(x), ptr<const int64_t>(idx), num_tokens, use_fp8, round_scale,
                                ptr<int64_t>(hseq), stream_of(stream));
    }
    void dispatch_recv(uintptr_t out_x, uintptr_t out_s, uintptr_t count, uintptr_t src_info, uintptr_t meta,
                       bool use_fp8, uintptr_t hseq, uintptr_t stream) {
        launch_ll_dispatch_recv(c_, ptr<void>(out_x), ptr<float>(out_s), ptr<int>(count), ptr<int>(src_info),
                                ptr<int>(meta), use_fp8, ptr<const int64_t>(hseq), stream_of(stream));
    }
    void combine_send(uintptr_t y, uintptr_t count, uintptr_t meta, uintptr_t hseq, uintptr_t stream) {
        launch_ll_combine_send(c_, ptr<const void>(y), ptr<const int>(count), ptr<const int>(meta),
                               ptr<int64_t>(hseq), stream_of(stream));
    }
    void combine_recv(uintptr_t idx, uintptr_t w, uintptr_t out, int num_tokens, uintptr_t hseq, uintptr_t stream) {
        launch_ll_combine_recv(c_, ptr<const int64_t>(idx), ptr<const float>(w), ptr<void>(out), num_tokens,
                               ptr<const int64_t>(hseq), stream_of(stream));
    }

   private:
    LowLatencyCtx c_{};
};

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "largeep native kernels (NVSHMEM)";
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
    m.def("free", &runtime::free, py::call_guard<py::gil_scoped_release>());
    m.def("peer_ptr", &runtime::peer_ptr);
    m.def("barrier", &runtime::barrier, py::call_guard<py::gil_scoped_release>());
    m.def("finalize", &runtime::finalize, py::call_guard<py::gil_scoped_release>());
    m.def("host_alloc", &runtime::host_alloc);
    m.def("host_free", &runtime::host_free);
    m.def("wait_host_word", &runtime::wait_host_word, py::call_guard<py::gil_scoped_release>());

    m.def("normal_layout", [](int n, int e, int k, int h, int t, int p) {
        const NormalLayout l = normal_layout(n, e, k, h, t, p);
        py::dict d;
        d["total_bytes"] = l.total_bytes;
        d["recv_stride"] = l.recv_stride;
        d["comb_stride"] = l.comb_stride;
        return d;
    });
    m.def("layout", [](uintptr_t idx, int t, int k, int n, int e, int p, uintptr_t per_rank, uintptr_t per_node,
                       uintptr_t per_expert, uintptr_t in_rank, uintptr_t status, uintptr_t error, uintptr_t stream) {
        launch_layout(ptr<const int64_t>(idx), t, k, n, e, p, ptr<int>(per_rank), ptr<int>(per_node),
                      ptr<int>(per_expert), ptr<bool>(in_rank),
                      ErrorWord{ptr<int64_t>(error), ptr<int64_t>(status)}, stream_of(stream));
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
        .def("dispatch_recv", &LowLatencyKernels::dispatch_recv)
        .def("combine_send", &LowLatencyKernels::combine_send)
        .def("combine_recv", &LowLatencyKernels::combine_recv);

    py::class_<NormalKernels>(m, "NormalKernels")
        .def(py::init<int, int, int, int, int, int, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                      double, int, int, int, int>())
        .def("prepare", &NormalKernels::prepare)
        .def("notify", &NormalKernels::notify)
        .def("push", &NormalKernels::push)
        .def("copyout", &NormalKernels::copyout)
        .def("combine_push", &NormalKernels::combine_push)
        .def("combine_reduce", &NormalKernels::combine_reduce)
        .def("rdma_send", &NormalKernels::rdma_send)
        .def("forward", &NormalKernels::forward)
        .def("combine_forward", &NormalKernels::combine_forward);
}
