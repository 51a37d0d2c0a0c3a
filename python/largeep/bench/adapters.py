"""Thin adapters that give every benchmarked backend the same calls.

| name | what runs |
| --- | --- |
| nvshmem | ``largeep.Buffer(backend="nvshmem")``: the native kernels |
| torch | ``largeep.Buffer(backend="torch")``: the NCCL (GPU) / gloo (CPU) collective pipeline |
| symm_mem | PyTorch's symmetric-memory all-to-all (``torch.ops.symm_mem.all_to_all_vdev`` for normal mode,
  ``..._2d`` and ``..._2d_offset`` for low-latency mode) with the permutation and reduction around it in plain torch |
| deepep | DeepEP V1 (``import deep_ep``): ``deep_ep.Buffer`` with its recommended configs |

Every adapter answers, on every rank, why it cannot run (:meth:`Adapter.unavailable_reason`, None when it can), and
offers the calls the sweep times. "dispatch" includes whatever the backend needs before sending (layout, count
exchange), so ``dispatch`` + ``combine`` is what an MoE layer calls; ``dispatch_cached`` re-sends new tokens with a
handle's routing. Adapters never check arguments: the sweep passes valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

Tokens = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
Hook = Callable[[], Any] | None


@dataclass(frozen=True)
class BufferSpec:
    """What one communication buffer is sized from. mode: "normal" or "low_latency"; max_tokens: the most tokens
    per rank of any call; num_sms: None for backends that take no SM count."""

    mode: str
    hidden: int
    num_experts: int
    num_topk: int
    max_tokens: int
    num_sms: int | None
    ranks_per_node: int


class Adapter:
    """Base class. Subclasses set ``name``, ``uses_sms`` and ``has_hook`` and implement the calls."""

    name = "?"
    uses_sms = False  # sweeps num_sms in normal mode (low-latency kernels take no SM count)
    has_hook = False  # low-latency receive hook, timed as send/recv phases
    # why a backend with a receive hook gets no send/recv records (the sweep says so once, in "skipped")
    hook_untimed: str | None = None
    sends_ll_weights = False  # ll_dispatch takes topk_weights (the combine then applies those); others ignore them
    # the normal combine takes Buffer.combine's bf16_partial_sums (its partial sums between nodes sent as bf16);
    # others ignore it
    takes_bf16_partial_sums = False
    # None: the calls do the work of largeep.Buffer's; else what they leave out (their records say semantics
    # "partial" and this note in their extras, and stay out of x_best)
    partial: str | None = None

    def __init__(self) -> None:
        self.group: dist.ProcessGroup | None = None
        self.device = torch.device("cpu")
        self.spec: BufferSpec | None = None

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when this backend can run in this process on ``device``, else why not (one line)."""
        return None

    def config_reason(self, spec: BufferSpec, num_ranks: int) -> str | None:
        """None when this backend supports the configuration, else why not."""
        return None

    def open(self, group: dist.ProcessGroup, spec: BufferSpec, device: torch.device) -> None:
        """Creates the buffers (collective)."""
        self.group, self.spec, self.device = group, spec, device

    def close(self) -> None:
        """Frees the buffers (collective where the backend's destroy is)."""

    def shutdown(self) -> None:
        """Frees everything the adapter kept across ``open`` calls (end of the sweep)."""
        self.close()

    # normal mode
    def layout(self, topk_idx: torch.Tensor) -> Any:
        raise NotImplementedError

    def dispatch(self, x: Tokens, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> tuple[Any, int | None]:
        """Fresh dispatch -> (handle, received rows or None when the backend does not know it on the host)."""
        raise NotImplementedError

    def dispatch_cached(self, x: Tokens, handle: Any) -> Any:
        raise NotImplementedError

    def combine_input(self, rows: int) -> torch.Tensor:
        """bf16 [rows, H] filled with random values, where the backend wants expert outputs."""
        assert self.spec is not None
        return torch.randn(rows, self.spec.hidden, dtype=torch.bfloat16, device=self.device)

    def combine(self, y: torch.Tensor, handle: Any, bf16_partial_sums: bool = False) -> Any:
        """bf16_partial_sums: Buffer.combine's option, where ``takes_bf16_partial_sums`` (ignored elsewhere)."""
        raise NotImplementedError

    # low-latency mode
    def ll_dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, use_fp8: bool, hook: bool,
        topk_weights: torch.Tensor | None = None, bf16_partial_sums: bool = False,
    ) -> tuple[Any, Hook]:
        """-> (handle, receive hook or None). topk_weights: None, or (where ``sends_ll_weights``) the weights the
        dispatch carries for its combine to apply; bf16_partial_sums: with them, Buffer.low_latency_dispatch's
        option."""
        raise NotImplementedError

    def ll_combine_input(self) -> torch.Tensor:
        """bf16 expert outputs in the backend's low-latency receive layout (random values)."""
        s = self.spec
        assert s is not None
        n = dist.get_world_size(self.group)
        return torch.randn(
            s.num_experts // n, n * s.max_tokens, s.hidden, dtype=torch.bfloat16, device=self.device
        )

    def ll_combine(
        self, y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: Any, hook: bool
    ) -> Hook:
        raise NotImplementedError


# -- largeep ----------------------------------------------------------------------------------------------------
class LargeepAdapter(Adapter):
    """largeep.Buffer with backend "nvshmem" or "torch"."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.name = backend
        self.backend = backend
        # The sweep times a hook's send, then aligns the ranks (device synchronize, barrier) and times the receive.
        # nvshmem's send makes its stores inside the timed call. The torch backend's send only queues an
        # all_to_all_single(async_op=True), which runs on NCCL's own stream (gloo's threads on CPU) and ends after
        # the call returns; the alignment would finish it untimed, so its send and receive would both leave the
        # transfer out. Its dispatch, combine and roundtrip records time the transfer whole.
        self.has_hook = backend == "nvshmem"
        if backend == "torch":
            self.hook_untimed = (
                "its send returns before its transfer ends (an async all_to_all on NCCL's own stream, gloo's threads "
                "on CPU), and the ranks' alignment before the timed receive would finish the transfer untimed: its "
                "send/recv would not mean what nvshmem's do; its dispatch/combine/roundtrip time the transfer")
        # the nvshmem combine sums a token's outputs on the experts' ranks when the dispatch carried the weights;
        # the torch backend takes them too but applies them at the source either way (same traffic)
        self.sends_ll_weights = backend == "nvshmem"
        self.takes_bf16_partial_sums = True  # (both backends' normal combines: Buffer.combine's option)
        self.uses_sms = backend == "nvshmem"
        self.buf: Any = None

    def unavailable_reason(self, device: torch.device) -> str | None:
        if self.backend != "nvshmem":
            return None
        from largeep import native

        reason = native.unavailable_reason()
        if reason is None and device.type != "cuda":
            reason = "the benchmark runs on CPU processes (no CUDA device)"
        return reason

    def open(self, group: dist.ProcessGroup, spec: BufferSpec, device: torch.device) -> None:
        super().open(group, spec, device)
        from largeep import Buffer

        self.buf = Buffer(
            group, hidden=spec.hidden, num_experts=spec.num_experts, num_topk=spec.num_topk,
            max_tokens_per_rank=spec.max_tokens, backend=self.backend, ranks_per_node=spec.ranks_per_node,
            num_sms=spec.num_sms, low_latency=spec.mode == "low_latency",
        )

    def close(self) -> None:
        if self.buf is not None:
            self.buf.destroy()
            self.buf = None

    def layout(self, topk_idx: torch.Tensor) -> Any:
        return self.buf.get_dispatch_layout(topk_idx)

    def dispatch(self, x: Tokens, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> tuple[Any, int | None]:
        res = self.buf.dispatch(x, topk_idx, topk_weights)
        return res.handle, int(res.handle.num_recv_tokens)

    def dispatch_cached(self, x: Tokens, handle: Any) -> Any:
        return self.buf.dispatch(x, handle=handle)

    def combine(self, y: torch.Tensor, handle: Any, bf16_partial_sums: bool = False) -> Any:
        return self.buf.combine(y, handle, bf16_partial_sums=bf16_partial_sums)

    def ll_dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, use_fp8: bool, hook: bool,
        topk_weights: torch.Tensor | None = None, bf16_partial_sums: bool = False,
    ) -> tuple[Any, Hook]:
        res = self.buf.low_latency_dispatch(x, topk_idx, use_fp8=use_fp8, return_recv_hook=hook,
                                            topk_weights=topk_weights, bf16_partial_sums=bf16_partial_sums)
        return res.handle, res.hook

    def ll_combine(
        self, y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: Any, hook: bool
    ) -> Hook:
        res = self.buf.low_latency_combine(y, topk_idx, topk_weights, handle, return_recv_hook=hook)
        return res.hook  # type: ignore[no-any-return]


# -- PyTorch symmetric memory -----------------------------------------------------------------------------------
def _as_rows16(x: Tokens) -> torch.Tensor:
    """Token rows as bf16-typed words: bf16 [T, H] as is; the FP8 pair packed to bytes (values, then scales) and
    viewed as bf16 [T, (H + 4*H/128)/2]. The all-to-all only moves bytes."""
    if isinstance(x, torch.Tensor):
        return x
    q, s = x
    packed = torch.cat([q.view(torch.uint8), s.contiguous().view(torch.uint8)], dim=1)
    return packed.view(torch.bfloat16)


@dataclass
class _SymmNormalHandle:
    t_sorted: torch.Tensor  # int64 [N*T]: token of each sent row (rows by destination rank, then token); T = none
    splits: torch.Tensor  # int64 [N]: rows sent to each rank
    out_so: torch.Tensor  # the dispatch's (received splits, offsets) [2, N], symmetric
    num_tokens: int


_SYMM_2D_MAX_EXPERTS = 16  # torch.ops.symm_mem.all_to_all_vdev_2d: experts per rank <= NUM_TILES (16)


@dataclass
class _SymmLLHandle:
    order: torch.Tensor  # int64 [T*K]: (token, k) copy of each sent row, rows sorted by global expert
    token_of: torch.Tensor  # int64 [T*K]: token of each sent row; T = none
    out_so: torch.Tensor  # [2, E] received (splits, offsets), expert-major, symmetric
    num_tokens: int


class SymmMemAdapter(Adapter):
    """PyTorch's NVSHMEM-backed symmetric-memory all-to-all (``torch.ops.symm_mem``).

    Buffers (all symmetric, allocated once per open, one flat byte pool per direction viewed at each row width):
    normal: ``send`` [N*M rows] (each token to every rank, worst case) and ``recv`` [N*M rows] (M rows from each
    source, worst case), each 2*H bytes a row; low-latency: ``send`` [M*K] and ``recv`` [N*M*K + E/N] rows (every
    copy of every source lands here; the 2-D all-to-all pads each empty expert to one row). Combine runs the same
    pools in reverse. Splits and offsets tensors are symmetric int64 too: ``in_splits`` / ``out_so`` for dispatch,
    ``c_in_splits`` / ``c_out_so`` for combine.

    What one torch op does (``torch/csrc/distributed/c10d/symm_mem/nvshmem_extension.cu``), two kernels on the
    current stream: (1) each rank *puts* its splits and source offsets into every peer's ``out_splits_offsets``,
    then a barrier of the group; (2) each rank *pulls* (``nvshmemx_getmem_nbi_block``) its rows from every peer's
    ``input`` into its own ``out``, waits for its own pulls (``nvshmem_quiet``), and block 0 overwrites row 1 of its
    own ``out_splits_offsets`` with the output offsets. There is no barrier at the end: when an op is done on this
    rank's stream, its ``out`` and ``out_splits_offsets`` are final, but a peer may still be pulling from this rank's
    ``input`` and may not yet have rewritten its own row 1. The only ordering across ranks is the barrier in kernel
    (1) of the next op, which comes after that op's puts and after whatever was queued before it.

    Reusing one pool per direction is therefore safe when the direction alternates and needs a fence when it
    repeats. Dispatch writes ``send`` (before its barrier) and puts into peers' ``out_so``, and its peers pull from
    ``send``; combine writes ``recv`` (the copy of ``y``, ``combine_input``) and puts into peers' ``c_out_so``, and its
    peers pull from ``recv``. A peer reaches the barrier of op n+1 only after its op n is done, so op n+1 may touch
    what op n-1 used: a dispatch after a combine (or the reverse) conflicts with nothing still in flight. A dispatch
    right after a dispatch would overwrite ``send`` while a peer may still pull from it, and its puts could land in a
    peer's ``out_so`` before that peer's previous kernel (2) rewrites row 1, which then replaces our source offsets
    with the peer's stale output offsets, so the peer pulls the wrong rows of our ``send``; a combine right after a
    combine has the same two hazards on ``recv`` and ``c_out_so``. Before the first write of such a repeat (and in
    ``combine_input`` / ``ll_combine_input`` after a combine) the adapter queues :meth:`_fence`, an NCCL all-reduce
    of one int on the current stream (no host wait). Timing: the sweep alternates dispatch and combine, so the only
    timed call that pays a fence is the first ``dispatch_cached`` of each normal-mode point (it follows the untimed
    fresh ``dispatch``), a warm-up call unless ``--warmup 0``; any timed same-direction repeat includes one fence.

    What each call guarantees: ``dispatch_cached`` returns a view of the ``recv`` pool, valid until the next dispatch
    or ``combine_input``, or a combine whose ``y`` is not that view; ``combine`` and ``ll_combine`` results
    (``ll_out``) are fresh tensors. A handle refers to the live ``out_so``: it stays valid until the next
    ``dispatch`` / ``ll_dispatch`` with other routing (re-dispatching the same routing, as the sweep does, keeps it).
    ``close`` fences and waits before it drops the pools, so no peer still reads them; views that a caller still
    holds keep their memory allocated but must not be used after ``close``.
    """

    name = "symm_mem"
    partial = (
        "not a Buffer's work: the combine's expert outputs already lie in the symmetric pool (no copy in), the "
        "normal dispatch moves only the token rows (no topk_idx, no topk_weights, no per-expert counts), and no "
        "call checks its arguments; left out of x_best")

    def __init__(self) -> None:
        super().__init__()
        self._pools: dict[str, torch.Tensor] = {}
        self._meta: dict[str, torch.Tensor] = {}
        self._group_name = ""
        self._backend_set = False
        self._ll_2d = True
        self.ll_out: torch.Tensor | None = None
        # direction ("dispatch" / "combine") of the last all-to-all queued since the last fence: peers may still be
        # pulling from its pool and rewriting its offsets row (see the class docstring)
        self._in_flight: str | None = None
        self._fence_word: torch.Tensor | None = None  # int32 [1], always 0: the all-reduce that fences

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "needs CUDA GPUs (NVSHMEM)"
        try:
            import torch.distributed._symmetric_memory as symm_mem
        except ImportError as exc:
            return f"this PyTorch has no symmetric memory ({exc})"
        if not hasattr(torch.ops.symm_mem, "all_to_all_vdev_2d_offset"):
            return f"PyTorch {torch.__version__} lacks torch.ops.symm_mem.all_to_all_vdev_2d_offset (needs >= 2.9)"
        if not symm_mem.is_nvshmem_available():
            return "PyTorch's symmetric memory has no usable NVSHMEM here (symm_mem.is_nvshmem_available() is False)"
        return None

    def open(self, group: dist.ProcessGroup, spec: BufferSpec, device: torch.device) -> None:
        super().open(group, spec, device)
        import torch.distributed._symmetric_memory as symm_mem

        if not self._backend_set:
            try:
                symm_mem.set_backend("NVSHMEM")
            except RuntimeError:
                pass  # already set (it cannot change after the first allocation)
            self._backend_set = True
        self._group_name = group.group_name
        n = dist.get_world_size(group)
        m, k, e, h = spec.max_tokens, spec.num_topk, spec.num_experts, spec.hidden
        if spec.mode == "normal":
            send_rows, recv_rows, nsplit = n * m, n * m, n
        else:
            # the 2-D all-to-all (expert-major arrival) takes at most 16 experts per rank; beyond, the 1-D one
            # (rows grouped by source rank, then expert)
            self._ll_2d = e // n <= _SYMM_2D_MAX_EXPERTS
            nsplit = e if self._ll_2d else n
            send_rows, recv_rows = m * k, n * m * k + (e // n if self._ll_2d else 0)
        # local allocation first, then agree, then the collective rendezvous: a failed allocation on one rank must
        # not leave the others waiting in a rendezvous
        err: str | None = None
        try:
            self._pools = {
                "send": symm_mem.empty(send_rows * 2 * h, dtype=torch.uint8, device=device),
                "recv": symm_mem.empty(recv_rows * 2 * h, dtype=torch.uint8, device=device),
            }
            self._meta = {
                "in_splits": symm_mem.empty(nsplit, dtype=torch.int64, device=device),
                "out_so": symm_mem.empty((2, nsplit), dtype=torch.int64, device=device),
                "c_in_splits": symm_mem.empty(nsplit, dtype=torch.int64, device=device),
                "c_out_so": symm_mem.empty((2, nsplit), dtype=torch.int64, device=device),
            }
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            err = f"symm_mem.empty failed: {exc}"
        errs: list[Any] = [None] * n
        dist.all_gather_object(errs, err, group=group)
        bad = [x for x in errs if x]
        if bad:
            self._pools, self._meta = {}, {}
            raise RuntimeError(bad[0])
        for t in list(self._pools.values()) + list(self._meta.values()):
            symm_mem.rendezvous(t, group)
        self._send_rows, self._recv_rows = send_rows, recv_rows
        self._fence_word = torch.zeros(1, dtype=torch.int32, device=device)
        # all_gather_object waited on the host for every rank's NCCL work, queued after all its earlier work
        self._in_flight = None

    def close(self) -> None:
        """Collective: fences and waits, so no peer still pulls from or puts into these pools, then drops them."""
        if self._pools:
            self._fence()
            torch.cuda.synchronize(self.device)
        self._pools, self._meta = {}, {}
        self._in_flight = None

    def _fence(self) -> None:
        """Queues a barrier on the current stream (no host wait): work this rank queues after it runs only once every
        rank has finished all the work it queued before its own fence. NCCL starts the all-reduce after the stream's
        earlier work on each rank, and it cannot finish on any rank before every rank has started it."""
        assert self._fence_word is not None
        dist.all_reduce(self._fence_word, op=dist.ReduceOp.MAX, group=self.group)
        self._in_flight = None

    def _begin(self, direction: str) -> None:
        """Call before an op's first write to a pool or a splits tensor: fences when the last all-to-all ran in the
        same direction (its peers may still read the pool this op writes, see the class docstring)."""
        if self._in_flight == direction:
            self._fence()

    def _view(self, pool: str, rows: int, width: int) -> torch.Tensor:
        """bf16 [rows, width] at the start of a pool (same base pointer, so the same symmetric allocation)."""
        return self._pools[pool][: rows * width * 2].view(torch.bfloat16).view(rows, width)

    # normal mode: rows deduplicated per destination rank, all_to_all_vdev
    def layout(self, topk_idx: torch.Tensor) -> Any:
        from largeep.layout import compute_layout

        s = self.spec
        assert s is not None
        return compute_layout(topk_idx, dist.get_world_size(self.group), s.num_experts, s.ranks_per_node)

    def dispatch(self, x: Tokens, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> tuple[Any, int | None]:
        n = dist.get_world_size(self.group)
        t = topk_idx.shape[0]
        in_rank = self.layout(topk_idx).is_token_in_rank  # bool [T, N]
        key = torch.arange(n, device=self.device).unsqueeze(1) * t + torch.arange(t, device=self.device)
        key = torch.where(in_rank.t(), key, n * t).reshape(-1)  # [N*T], destination-major, no host sync
        sorted_key = torch.sort(key).values
        t_sorted = torch.where(sorted_key < n * t, sorted_key % max(t, 1), t)
        handle = _SymmNormalHandle(t_sorted, in_rank.sum(0, dtype=torch.int64), self._meta["out_so"], t)
        self.dispatch_cached(x, handle)
        return handle, None

    def dispatch_cached(self, x: Tokens, handle: Any) -> Any:
        h: _SymmNormalHandle = handle
        rows = _as_rows16(x)
        w = rows.shape[1]
        ext = torch.cat([rows, rows.new_zeros(1, w)])
        self._begin("dispatch")
        send = self._view("send", self._send_rows, w)
        send[: h.t_sorted.numel()] = ext[h.t_sorted]
        self._meta["in_splits"].copy_(h.splits)
        recv = self._view("recv", self._recv_rows, w)
        torch.ops.symm_mem.all_to_all_vdev(send, recv, self._meta["in_splits"], h.out_so, self._group_name)
        self._in_flight = "dispatch"
        return recv

    def combine_input(self, rows: int) -> torch.Tensor:
        """A view of the ``recv`` pool (no copy in ``combine``), filled with random values."""
        assert self.spec is not None
        self._begin("combine")
        y = self._view("recv", self._recv_rows, self.spec.hidden)[:rows]
        y.normal_()
        return y

    def combine(self, y: torch.Tensor, handle: Any, bf16_partial_sums: bool = False) -> Any:
        h: _SymmNormalHandle = handle
        hdim = y.shape[1]
        self._begin("combine")
        src = self._view("recv", self._recv_rows, hdim)
        if y.data_ptr() != src.data_ptr():
            src[: y.shape[0]].copy_(y)
        self._meta["c_in_splits"].copy_(h.out_so[0])
        back = self._view("send", self._send_rows, hdim)
        torch.ops.symm_mem.all_to_all_vdev(src, back, self._meta["c_in_splits"], self._meta["c_out_so"],
                                           self._group_name)
        self._in_flight = "combine"
        acc = torch.zeros(h.num_tokens + 1, hdim, dtype=torch.float32, device=self.device)
        acc.index_add_(0, h.t_sorted, back[: h.t_sorted.numel()].float())
        return acc[: h.num_tokens].to(torch.bfloat16)

    # low-latency mode: one row per (token, expert) copy, sorted by expert; all_to_all_vdev_2d (expert-major on
    # arrival) when E/N <= 16, else all_to_all_vdev (grouped by source rank)
    def ll_dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, use_fp8: bool, hook: bool,
        topk_weights: torch.Tensor | None = None, bf16_partial_sums: bool = False,
    ) -> tuple[Any, Hook]:
        from largeep import fp8

        s = self.spec
        assert s is not None
        t, k, e = topk_idx.shape[0], s.num_topk, s.num_experts
        flat = topk_idx.reshape(-1)
        valid = flat >= 0
        copy = torch.arange(t * k, device=self.device)
        order = torch.sort(torch.where(valid, flat * (t * k) + copy, e * t * k)).indices
        token_of = torch.where(valid[order], order // k, t)
        counts = torch.bincount(torch.where(valid, flat, e), minlength=e + 1)[:e]
        if not self._ll_2d:
            counts = counts.view(-1, e // dist.get_world_size(self.group)).sum(1)
        rows = _as_rows16(fp8.quantize(x) if use_fp8 else x)
        w = rows.shape[1]
        self._begin("dispatch")
        send = self._view("send", self._send_rows, w)
        send[: t * k] = torch.cat([rows, rows.new_zeros(1, w)])[token_of]
        self._meta["in_splits"].copy_(counts)
        recv = self._view("recv", self._recv_rows, w)
        if self._ll_2d:
            torch.ops.symm_mem.all_to_all_vdev_2d(send, recv, self._meta["in_splits"], self._meta["out_so"],
                                                  self._group_name)
        else:
            torch.ops.symm_mem.all_to_all_vdev(send, recv, self._meta["in_splits"], self._meta["out_so"],
                                               self._group_name)
        self._in_flight = "dispatch"
        return _SymmLLHandle(order, token_of, self._meta["out_so"], t), None

    def ll_combine_input(self) -> torch.Tensor:
        """A view of the whole ``recv`` pool (no copy in ``ll_combine``), filled with random values."""
        assert self.spec is not None
        self._begin("combine")
        y = self._view("recv", self._recv_rows, self.spec.hidden)
        y.normal_()
        return y

    def ll_combine(
        self, y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: Any, hook: bool
    ) -> Hook:
        h: _SymmLLHandle = handle
        hdim = y.shape[-1]
        self._begin("combine")
        src = self._view("recv", self._recv_rows, hdim)
        if y.data_ptr() != src.data_ptr():
            src[: y.shape[0]].copy_(y.reshape(-1, hdim)[: self._recv_rows])
        back = self._view("send", self._send_rows, hdim)
        if self._ll_2d:
            torch.ops.symm_mem.all_to_all_vdev_2d_offset(src, back, h.out_so, self._meta["c_out_so"],
                                                         self._group_name)
        else:
            self._meta["c_in_splits"].copy_(h.out_so[0])
            torch.ops.symm_mem.all_to_all_vdev(src, back, self._meta["c_in_splits"], self._meta["c_out_so"],
                                               self._group_name)
        self._in_flight = "combine"
        n_copies = h.order.numel()
        w = torch.where(topk_idx.reshape(-1) >= 0, topk_weights.reshape(-1), 0.0)[h.order]
        acc = torch.zeros(h.num_tokens + 1, hdim, dtype=torch.float32, device=self.device)
        acc.index_add_(0, h.token_of, back[:n_copies].float() * w.unsqueeze(1))
        self.ll_out = acc[: h.num_tokens].to(torch.bfloat16)
        return None


# -- DeepEP -----------------------------------------------------------------------------------------------------
class DeepEPAdapter(Adapter):
    """DeepEP V1 (``deep_ep.Buffer``). Its SM count is a class setting (``Buffer.set_num_sms``), so one buffer per
    mode and size serves every SM count; buffers are kept across ``open`` calls and freed by ``shutdown``, because
    DeepEP's low-latency buffer initialises NVSHMEM, which a process should do once."""

    name = "deepep"
    uses_sms = True
    has_hook = True

    def __init__(self) -> None:
        super().__init__()
        self.buf: Any = None
        self._key: tuple[Any, ...] | None = None

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "needs CUDA GPUs"
        try:
            import deep_ep  # noqa: F401
        except ImportError as exc:
            return f"DeepEP is not installed (import deep_ep: {exc})"
        return None

    def config_reason(self, spec: BufferSpec, num_ranks: int) -> str | None:
        import deep_ep

        if spec.mode == "normal":
            try:
                deep_ep.Buffer.get_dispatch_config(num_ranks)
                deep_ep.Buffer.get_combine_config(num_ranks)
            except (AssertionError, KeyError):
                return f"DeepEP has no normal-mode config for {num_ranks} ranks"
        if spec.num_sms is not None and spec.num_sms % 2:
            return "DeepEP needs an even SM count"
        return None

    def open(self, group: dist.ProcessGroup, spec: BufferSpec, device: torch.device) -> None:
        super().open(group, spec, device)
        import deep_ep

        n = dist.get_world_size(group)
        if spec.num_sms is not None:
            deep_ep.Buffer.set_num_sms(spec.num_sms)
        key = (spec.mode, spec.hidden, spec.num_experts, spec.num_topk, spec.max_tokens)
        if key == self._key:
            return
        self.shutdown()
        if spec.mode == "normal":
            hidden_bytes = spec.hidden * 2
            configs = (deep_ep.Buffer.get_dispatch_config(n), deep_ep.Buffer.get_combine_config(n))
            nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, n) for c in configs)
            rdma = 0
            if n > spec.ranks_per_node:
                rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, n) for c in configs)
            self.buf = deep_ep.Buffer(group, nvl, rdma)
        else:
            rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(spec.max_tokens, spec.hidden, n, spec.num_experts)
            self.buf = deep_ep.Buffer(group, 0, rdma, low_latency_mode=True,
                                      num_qps_per_rank=max(1, spec.num_experts // n))
        self._key = key

    def close(self) -> None:
        pass  # kept for the next open (see the class docstring)

    def shutdown(self) -> None:
        if self.buf is not None:
            destroy = getattr(self.buf, "destroy", None)
            if destroy is not None:
                try:
                    destroy()
                except (RuntimeError, AssertionError):
                    pass  # built without explicitly_destroy: freed with the object
            self.buf = None
            self._key = None
            import gc

            gc.collect()

    def layout(self, topk_idx: torch.Tensor) -> Any:
        assert self.spec is not None
        return self.buf.get_dispatch_layout(topk_idx, self.spec.num_experts)

    def dispatch(self, x: Tokens, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> tuple[Any, int | None]:
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.layout(topk_idx)
        recv_x, _, _, _, handle, _ = self.buf.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
        )
        rows = recv_x[0].shape[0] if isinstance(recv_x, tuple) else recv_x.shape[0]
        return handle, int(rows)

    def dispatch_cached(self, x: Tokens, handle: Any) -> Any:
        return self.buf.dispatch(x, handle=handle)

    def combine(self, y: torch.Tensor, handle: Any, bf16_partial_sums: bool = False) -> Any:
        return self.buf.combine(y, handle)

    def ll_dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, use_fp8: bool, hook: bool,
        topk_weights: torch.Tensor | None = None, bf16_partial_sums: bool = False,
    ) -> tuple[Any, Hook]:
        assert self.spec is not None
        out = self.buf.low_latency_dispatch(
            x, topk_idx, self.spec.max_tokens, self.spec.num_experts, use_fp8=use_fp8, return_recv_hook=hook
        )
        return out[2], (out[4] if hook else None)

    def ll_combine(
        self, y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: Any, hook: bool
    ) -> Hook:
        out = self.buf.low_latency_combine(y, topk_idx, topk_weights, handle, return_recv_hook=hook)
        return out[2] if hook else None


BACKENDS = ("nvshmem", "torch", "symm_mem", "deepep")


def make_adapter(name: str) -> Adapter:
    """The adapter for one of :data:`BACKENDS`."""
    if name in ("nvshmem", "torch"):
        return LargeepAdapter(name)
    if name == "symm_mem":
        return SymmMemAdapter()
    if name == "deepep":
        return DeepEPAdapter()
    raise ValueError(f"unknown backend {name!r}, expected one of {BACKENDS}")
