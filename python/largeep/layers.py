"""A Mixture-of-Experts layer over a :class:`largeep.Buffer`.

Data flow of :class:`MoELayer` (x [T, H] on each rank of the Buffer's group):

1. gate: a module ``x -> (topk_idx int64 [T, K], topk_weights float32 [T, K])`` (or any object with those two
   attributes, e.g. ``largeep.gate.TopKGate``'s output); by default the built-in :class:`LinearTopKRouter`.
2. placement (optional): logical ids -> physical slots (a callable, or a ``largeep.placement.Placement``, whose
   ``route`` is called with this rank as the source GPU).
3. dispatch (:mod:`largeep.ops`, differentiable), 4. the rank's local experts (:class:`GroupedExperts`: SwiGLU,
   grouped GEMMs over all local experts -- gate and up projections in one, then the down projection -- rows
   weighted by topk_weights on the expert side; optionally with biases and GPT-OSS's clamped activation),
   5. combine, plus optional shared experts computed on the whole batch.

Normal mode (training, prefill) supports autograd and ``torch.compile`` (see :mod:`largeep.ops` for the custom ops
and the two ways to get static or unbacked row counts). Low-latency mode (decoding) has no autograd (it runs under
``torch.no_grad``: its output needs no grad, so a backward through it fails instead of giving the gate alone a
gradient); the Buffer's low-latency combine applies the weights there, as SPEC.md says.

Overlap. ``num_chunks`` > 1 splits the batch: chunk i+1 is dispatched and chunk i-1 combined on the Buffer's stream
(``async_finish`` events; every dispatch waits only for the gate through ``previous_event``; its count exchange,
which the host waits for, queues behind combine i-1 on the Buffer's stream, and so behind experts i-1, but not
behind experts i, queued before it) while the experts compute chunk i on the caller's stream, leaving the
communication kernels their SMs (``overlap_sm_carveout``). Each chunk's GEMMs read every local expert's weights
again, so chunking pays only where the experts are not bound by reading their weights (enough rows per expert).
On CPU, or under ``torch.compile`` (the ops then run in program order), the same schedule simply runs in order and
gives the same result. :class:`MoEPipeline` carries the chunks across a stack of layers separated by token-wise
functions (residual add + norm): chunk i is dispatched into layer l+1 while chunk i+1 is still in layer l's experts.
:class:`TwoBatchOverlap` runs two decoding micro-batches with ``return_recv_hook``: while one micro-batch's tokens
travel, the other computes.

Experts and replicas. Rank r holds the physical slots [r*E/N, (r+1)*E/N) (w13 [E/N, H, 2F] holding w1 and w3,
w2 [E/N, F, H]; with ``expert_mlp_bias`` also b13 [E/N, 2F] and b2 [E/N, H]).
A logical expert with several slots (replicas) has one copy of its weights per slot; after backward
:func:`allreduce_replica_grads` sums the grads of the copies (one all-reduce over the group of the replicated
experts' grads only), so every copy takes the same optimizer step.
Checkpoints: a rank's state dict holds its own slots (``slot_experts`` says which experts; loading into other
slots is refused); :meth:`MoELayer.gather_global_experts` (collective) or :func:`global_experts_from_states` (from
every rank's saved states) give the weights per logical expert, which ``load_global_experts`` reshards onto another
expert-parallel size or placement (docs/usage.md, "Checkpoints").

Expert tensor parallelism (``expert_tp_group``, normal mode): each slot's expert MLPs are split over the T ranks of
a TP group (F/T columns of w1/w3, F/T rows of w2), the Buffer lives on an EP group of one rank per TP group, and
the received rows are all-gathered over the TP group before the experts and their partial outputs reduce-scattered
after; :mod:`largeep.expert_tp` has the groups, the data flow and its communication cost.

FP8. ``use_fp8`` (normal mode) dispatches the tokens as FP8 (``ops.dispatch(use_fp8=True)``: e4m3 with one scale
per 128 channels, about half the bytes of bf16) and the experts compute on the dequantised rows; the combine and
every gradient stay in the activations' dtype (the quantisation passes the gradient straight through). With
``num_chunks`` > 1 a chunk's dequantisation runs on the Buffer's stream after its dispatch, where the next combine
queues behind it. ``ll_use_fp8`` sends FP8 in low-latency mode (no gradient there; the tokens go as bf16 first).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from largeep import _collective, _env, checks, fp8, ops
from largeep.buffer import Buffer
from largeep.errors import ArgumentError, PeerRefusedError, _recomputation_stopped
from largeep.expert_tp import ExpertTP

__all__ = [
    "ClampedSwiGLU",
    "GroupedExperts",
    "LinearTopKRouter",
    "MoELayer",
    "MoEPipeline",
    "SwiGLU",
    "TwoBatchOverlap",
    "allreduce_replica_grads",
    "clip_grad_norm_",
    "ddp_ignore_experts",
    "experts_from_linear",
    "global_experts_from_states",
    "run_interleaved",
]


class LinearTopKRouter(nn.Module):
    """``logits = x @ weight.T`` (``+ bias`` with ``bias=True``; float32), scores by softmax or sigmoid, top-k.

    forward(x [T, H] any float dtype) -> (topk_idx int64 [T, K], topk_weights float32 [T, K]); with
    ``norm_topk_prob`` the K weights of a token sum to 1. No host wait. ``bias=True`` gives the router a trainable
    bias [E] on its logits (zero at first; an ``nn.Linear(H, E, bias=True)`` router's bias goes there), which
    moves the scores, the weights and their gradients; without it ``self.bias`` is None (not in the state dict).
    """

    distinct_experts = True  # a token's K choices are distinct experts (MoELayer.experts_chunk counts on it)
    bias: nn.Parameter | None

    def __init__(
        self, hidden: int, num_experts: int, topk: int, *, score_func: str = "softmax", norm_topk_prob: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if score_func not in ("softmax", "sigmoid"):
            raise ArgumentError(f"LinearTopKRouter: argument 'score_func' = {score_func!r}, expected softmax|sigmoid")
        if not 1 <= topk <= num_experts:
            raise ArgumentError(f"LinearTopKRouter: argument 'topk' = {topk} must be in [1, {num_experts}]")
        if not isinstance(bias, bool):
            raise ArgumentError(f"LinearTopKRouter: argument 'bias' = {bias!r}, expected a bool")
        if topk == 1 and norm_topk_prob and num_experts > 1:
            warnings.warn("LinearTopKRouter: topk=1 with norm_topk_prob=True makes every weight 1, so the router's "
                          "weight gets no gradient from the task loss (pass norm_topk_prob=False to train it)",
                          UserWarning, stacklevel=2)
        self.topk = topk
        self.score_func = score_func
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.register_parameter("bias", nn.Parameter(torch.zeros(num_experts)) if bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws the weight again (normal, std H^-0.5) and zeroes the bias (if any): after ``to_empty`` of a router
        made on the meta device."""
        with torch.no_grad():
            nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # float32 logits inside an autocast region too (bf16 logits flip near-tied choices)
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float(), bias)
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        w, idx = scores.topk(self.topk, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return idx, w


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP ``(silu(x W1) * (x W3)) W2`` (shared experts): w1/w3 [H, F], w2 [F, H] (``nn.Linear``'s
    weights transposed: :meth:`load_linear` copies from those).

    ``sigmoid_gate``: the output is multiplied by ``sigmoid(x wg)`` per token, wg [H, 1] (Qwen2-MoE's
    ``shared_expert_gate``; ``MoELayer(shared_expert_gate=True)``).
    """

    wg: nn.Parameter | None

    def __init__(
        self, hidden: int, ffn_hidden: int, *, dtype: torch.dtype | None = None, sigmoid_gate: bool = False
    ) -> None:
        super().__init__()
        checks.flags("SwiGLU", sigmoid_gate=sigmoid_gate)
        self.w1 = nn.Parameter(torch.empty(hidden, ffn_hidden, dtype=dtype))
        self.w3 = nn.Parameter(torch.empty(hidden, ffn_hidden, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(ffn_hidden, hidden, dtype=dtype))
        self.wg = nn.Parameter(torch.empty(hidden, 1, dtype=dtype)) if sigmoid_gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws the weights again (normal, std H^-0.5 for w1/w3 and wg, F^-0.5 for w2): after ``to_empty`` of a
        module made on the meta device."""
        with torch.no_grad():
            for w in (self.w1, self.w3, self.w2, self.wg):
                if w is not None:
                    nn.init.normal_(w, std=w.shape[0] ** -0.5)

    @torch.no_grad()
    def load_linear(
        self, gate_proj: nn.Linear | Tensor, up_proj: nn.Linear | Tensor, down_proj: nn.Linear | Tensor,
        sigmoid_gate: nn.Linear | Tensor | None = None,
    ) -> None:
        """Copies the weights of a SwiGLU MLP made of ``nn.Linear`` modules (or their weights), in their layout
        [out, in]: ``gate_proj`` [F, H] into w1, ``up_proj`` [F, H] into w3, ``down_proj`` [H, F] into w2 (each
        transposed), and ``sigmoid_gate`` [1, H] into wg (given exactly when this module has one). Modules with a
        bias are refused (this MLP has none). ArgumentError, before anything is copied, on a wrong shape."""
        if (sigmoid_gate is None) != (self.wg is None):
            raise ArgumentError(
                "SwiGLU.load_linear: argument 'sigmoid_gate' " + ("is missing: this module has one (wg [H, 1])"
                                                                   if sigmoid_gate is None else
                                                                   "given, but this module has none (made without "
                                                                   "sigmoid_gate)"))
        w1, w3, w2 = experts_from_linear([gate_proj], [up_proj], [down_proj], op="SwiGLU.load_linear")
        h, f = self.w1.shape
        if (w1.shape[2], w1.shape[1]) != (f, h):
            raise ArgumentError(f"SwiGLU.load_linear: argument 'gate_proj' has shape {(w1.shape[2], w1.shape[1])}, "
                                f"expected ({f}, {h}) (F, H: [out, in], nn.Linear's layout)")
        wg = None
        if sigmoid_gate is not None:
            wg = _linear_weight("SwiGLU.load_linear", "sigmoid_gate", sigmoid_gate, (1, h), "(1, H)")
        for mine, src in ((self.w1, w1[0]), (self.w3, w3[0]), (self.w2, w2[0]), (self.wg, wg)):
            if mine is not None and src is not None:
                mine.copy_(src.t() if mine is self.wg else src)

    def forward(self, x: Tensor) -> Tensor:
        """x [T, H] -> [T, H] in x's dtype (computed in the weights' dtype)."""
        xw = x.to(self.w1.dtype)
        y = (F.silu(xw @ self.w1) * (xw @ self.w3)) @ self.w2
        if self.wg is not None:
            y = torch.sigmoid(xw @ self.wg) * y
        return y.to(x.dtype)


def _linear_weight(op: str, arg: str, m: object, shape: tuple[int, ...] | None, what: str) -> Tensor:
    """The weight [out, in] of an ``nn.Linear`` without a bias, or a 2-D tensor taken as one; ArgumentError naming
    ``arg`` otherwise, or when its shape is not ``shape`` (None: any 2-D one)."""
    if isinstance(m, nn.Linear):
        if m.bias is not None:
            raise ArgumentError(f"{op}: argument '{arg}' is an nn.Linear with a bias, which this takes no part of "
                                "(it would be dropped): for routed experts with biases "
                                "(MoELayer(expert_mlp_bias=True)) pass the weights and the biases to "
                                "load_global_experts yourself; shared experts have none")
        w = m.weight
    elif isinstance(m, Tensor):
        w = m
    else:
        raise ArgumentError(f"{op}: argument '{arg}' must be an nn.Linear or its weight tensor [out, in], got "
                            f"{type(m).__name__}")
    if w.dim() != 2 or (shape is not None and tuple(w.shape) != shape):
        raise ArgumentError(f"{op}: argument '{arg}' has shape {tuple(w.shape)}, expected {what} ([out, in], "
                            "nn.Linear's layout)")
    return w.detach()


def experts_from_linear(
    gate_proj: Sequence[nn.Linear | Tensor], up_proj: Sequence[nn.Linear | Tensor],
    down_proj: Sequence[nn.Linear | Tensor], *, op: str = "experts_from_linear",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-expert SwiGLU weights in ``nn.Linear``'s layout -> the global expert tensors that
    :meth:`MoELayer.load_global_experts` takes (and :meth:`MoELayer.gather_global_experts` returns).

    Args:
        gate_proj: L modules (or weights) of ``silu(x W1)``, each an ``nn.Linear(H, F, bias=False)`` (weight [F, H];
            Mixtral's ``w1``, Qwen's and DeepSeek's ``gate_proj``).
        up_proj: L of ``x W3`` [F, H] (Mixtral's ``w3``, ``up_proj``).
        down_proj: L of the output projection, ``nn.Linear(F, H, bias=False)`` [H, F] (Mixtral's ``w2``,
            ``down_proj``).
        op: the name errors give (for callers that wrap it).

    Returns:
        (w1 [L, H, F], w3 [L, H, F], w2 [L, F, H]): each weight transposed to largeep's [in, out] and stacked in
        expert order, new tensors on the weights' device and in their dtype, without grad. Modules with a bias,
        lists of different lengths or empty, and shapes that differ between experts or do not fit together raise
        ArgumentError naming the argument and the expert (for experts with biases,
        ``MoELayer(expert_mlp_bias=True)``, pass the weights and biases to ``load_global_experts`` yourself). Not
        collective, no host wait.
    """
    lists = {"gate_proj": gate_proj, "up_proj": up_proj, "down_proj": down_proj}
    for arg, items in lists.items():
        if isinstance(items, (Tensor, nn.Linear)) or not isinstance(items, (Sequence, nn.ModuleList)) or not items:
            raise ArgumentError(f"{op}: argument '{arg}' must be a non-empty sequence with one nn.Linear (or weight "
                                f"[out, in]) per expert, got {_kind(items)}")
    n = len(gate_proj)
    for arg, items in lists.items():
        if len(items) != n:
            raise ArgumentError(f"{op}: argument '{arg}' has {len(items)} experts, 'gate_proj' {n}")
    first = _linear_weight(op, "gate_proj[0]", gate_proj[0], None, "(F, H)")
    f, h = first.shape
    out = []
    for arg, items, shape, what in (("gate_proj", gate_proj, (f, h), "(F, H)"), ("up_proj", up_proj, (f, h), "(F, H)"),
                                    ("down_proj", down_proj, (h, f), "(H, F)")):
        ws = [_linear_weight(op, f"{arg}[{i}]", m, shape, f"{what} = {shape}") for i, m in enumerate(items)]
        out.append(torch.stack([w.t() for w in ws]))
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's expert activation, for ``GroupedExperts(activation=...)`` / ``MoELayer(expert_activation=...)``:
    on the gate and up projections g, u (each [rows, F], biases added)
    ``(clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g')`` with ``g' = min(g, limit)``. GPT-OSS uses the
    defaults (alpha 1.702, limit 7.0)."""

    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        for arg in ("alpha", "limit"):
            v = getattr(self, arg)
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(float(v)) or \
                    (arg == "limit" and float(v) <= 0):
                raise ArgumentError(f"ClampedSwiGLU: argument '{arg}' must be a finite number"
                                    f"{' > 0' if arg == 'limit' else ''}, got {v!r}")


Activation = str | ClampedSwiGLU  # "silu" (SwiGLU) or ClampedSwiGLU(...)


def _check_activation(op: str, arg: str, activation: Any) -> None:
    if not ((isinstance(activation, str) and activation == "silu") or isinstance(activation, ClampedSwiGLU)):
        raise ArgumentError(f"{op}: argument '{arg}' must be \"silu\" (SwiGLU: silu(x W1) * (x W3)) or a "
                            f"largeep.layers.ClampedSwiGLU (GPT-OSS's), got {activation!r}")


def _activation_code(activation: Any) -> int:
    """An int that tells activations apart (0: "silu"; a ClampedSwiGLU's from its constants; -1: neither)."""
    if isinstance(activation, ClampedSwiGLU):
        return 1 + (hash((float(activation.alpha), float(activation.limit))) & (2**40 - 1))
    return 0 if isinstance(activation, str) and activation == "silu" else -1


def _act_args(activation: Activation) -> tuple[int, float, float]:
    """(kind, alpha, limit) of ``ops.expert_activation`` for an activation."""
    if isinstance(activation, ClampedSwiGLU):
        return ops.ACT_CLAMPED, float(activation.alpha), float(activation.limit)
    return ops.ACT_SILU, 1.702, 7.0


def _add_row_bias(out: Tensor, bias: Tensor, offs: Tensor, value_elsewhere: bool = False) -> Tensor:
    """out [P, N] sorted by group (offs: inclusive ends) plus its group's row of ``bias`` [G, N] in out's dtype
    (``ops._row_bias_add``: one kernel on CUDA; rows past offs[-1] get nothing, or zeros there). ``value_elsewhere``:
    the bias adds 0 here but takes its whole gradient (``bias - bias.detach()``: an expert-TP member whose b2 another
    member adds). The gradient of a row of the bias sums its group's rows of out's."""
    b = bias.to(out.dtype)
    if value_elsewhere:
        b = b - b.detach()
    return ops._row_bias_add(out, b, offs)


class GroupedExperts(nn.Module):
    """The E_l local experts of a rank, SwiGLU (or GPT-OSS's clamped SwiGLU with biases, below): two grouped GEMMs
    over all of them (gate and up, then down).

    Parameters: w13 [E_l, H, 2F], the gate projection w1 in columns [0, F) and the up projection w3 in [F, 2F)
    (one GEMM of N = 2F instead of two of F: on H200 with 8 experts, H 7168, F 384 and 32768 rows, 463 us
    against 2 x 318 us, bench/results/2026-11-30-session8); w2 [E_l, F, H]. ``w1`` and ``w3`` are views of
    w13's halves: read them, or copy into them under ``torch.no_grad``; they are not parameters (``ex.w1.grad`` is
    None: the gradients are ``w13.grad[..., :F]`` and ``[..., F:]``; optimizers and ``allreduce_replica_grads``
    take ``w13``). A state dict with separate ``w1`` / ``w3`` (the earlier layout) loads into w13 through
    ``load_state_dict``; optimizer states and checkpoint readers that bypass it (``torch.distributed.checkpoint``)
    are not converted. :func:`largeep.ops.grouped_mm` runs ``torch._grouped_mm`` where it can, else a padded bmm
    (never a Python loop over experts).

    ``bias`` True (GPT-OSS's experts): also b13 [E_l, 2F] (the gate and up projections' biases, b1 and b3 as
    views of its halves) and b2 [E_l, H], added to each row of the GEMMs' outputs (in their dtype), zero at the
    start. ``activation``: ``"silu"`` (``silu(g) * u`` of the gate and up projections g, u) or a
    :class:`ClampedSwiGLU` (GPT-OSS's). The expert computes ``act(x W13 + b13) W2 + b2``.
    """

    b13: nn.Parameter | None
    b2: nn.Parameter | None

    def __init__(
        self, num_experts: int, hidden: int, ffn_hidden: int, *, dtype: torch.dtype | None = None, init: bool = True,
        bias: bool = False, activation: Activation = "silu",
    ) -> None:
        """``init`` False: the weights are left uninitialised (for :meth:`seeded_init_` or a load)."""
        super().__init__()
        checks.flags("GroupedExperts", bias=bias)
        _check_activation("GroupedExperts", "activation", activation)
        self.num_experts = num_experts
        self.ffn_hidden = ffn_hidden
        self.activation = activation
        self.w13 = nn.Parameter(torch.empty(num_experts, hidden, 2 * ffn_hidden, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden, hidden, dtype=dtype))
        self.b13 = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden, dtype=dtype)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype)) if bias else None
        # expert TP: a member other than the first adds no b2 (the members' partial outputs are summed, so the
        # first adds it for all), yet takes its whole gradient, the same as the first's: the copies stay equal
        self.b2_added_elsewhere = False
        self._seeded: tuple[list[int], int, int, int] | None = None  # seeded_init_'s arguments, once it ran
        if init:
            self.reset_parameters()

    def seeded_init_(self, experts: Sequence[int], seed: int, shard: int = 0, num_shards: int = 1) -> None:
        """Draws slot i's weights from a generator of its own, seeded by (``seed``, ``experts[i]``, ``shard``), on
        the weights' device: slots holding one expert get the same weights, on whatever rank they are (ranks whose
        weights are on the same kind of device: CPU and CUDA generators differ), and different experts differ.
        ``experts``: the expert of each slot (< 0: an empty slot, zeroed). ``shard`` of ``num_shards``: this rank's
        F columns of an expert split over a tensor-parallel group (the scales are the whole expert's). The biases
        (``bias``) are zeroed. The arguments are kept: :meth:`reset_parameters` draws the same weights again (e.g.
        after a meta-device module's ``to_empty``; on the meta device nothing is drawn)."""
        if len(experts) != self.num_experts:
            raise ArgumentError(f"GroupedExperts.seeded_init_: argument 'experts' has {len(experts)} entries, expected "
                                f"one per slot ({self.num_experts})")
        self._seeded = ([int(e) for e in experts], seed, shard, num_shards)
        hidden, f = self.w13.shape[1], self.ffn_hidden
        dev = self.w13.device
        if dev.type == "meta":  # (no memory to fill: a meta-device module is materialised later)
            return
        with torch.no_grad():
            for b in (self.b13, self.b2):
                if b is not None:
                    b.zero_()
            for i, e in enumerate(experts):
                if e < 0:
                    self.w13[i].zero_()
                    self.w2[i].zero_()
                    continue
                g = torch.Generator(device=dev).manual_seed(_mix_seed(seed, int(e), shard, num_shards))
                self.w13[i].copy_(torch.randn(hidden, 2 * f, generator=g, device=dev).mul_(hidden**-0.5))
                self.w2[i].copy_(torch.randn(f, hidden, generator=g, device=dev).mul_((f * num_shards) ** -0.5))

    def reset_parameters(self) -> None:
        """Draws the weights again: as :meth:`seeded_init_` drew them last, else normal with std H^-0.5 (w13) and
        F^-0.5 (w2); the biases zero."""
        if self._seeded is not None:
            self.seeded_init_(*self._seeded)
            return
        with torch.no_grad():
            self.w13.normal_(std=self.w13.shape[1] ** -0.5)
            self.w2.normal_(std=self.ffn_hidden**-0.5)
            for b in (self.b13, self.b2):
                if b is not None:
                    b.zero_()

    @property
    def w1(self) -> Tensor:
        """The gate projection [E_l, H, F]: a view of w13's first F columns."""
        return self.w13[:, :, : self.ffn_hidden]

    @property
    def w3(self) -> Tensor:
        """The up projection [E_l, H, F]: a view of w13's last F columns."""
        return self.w13[:, :, self.ffn_hidden :]

    @property
    def b1(self) -> Tensor | None:
        """The gate projection's bias [E_l, F] (a view of b13's first F columns), None without biases."""
        return self.b13[:, : self.ffn_hidden] if self.b13 is not None else None

    @property
    def b3(self) -> Tensor | None:
        """The up projection's bias [E_l, F] (a view of b13's last F columns), None without biases."""
        return self.b13[:, self.ffn_hidden :] if self.b13 is not None else None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        k1, k3 = prefix + "w1", prefix + "w3"
        if prefix + "w13" not in state_dict and k1 in state_dict and k3 in state_dict:
            state_dict[prefix + "w13"] = torch.cat([state_dict.pop(k1), state_dict.pop(k3)], dim=2)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, offs: Tensor, used: int | None = None, *, clear_tail: bool = True) -> Tensor:
        """x [P, H] sorted by expert; offs int32 [E_l] inclusive end row of each expert -> [P, H] in the weights'
        dtype (inside a ``torch.autocast`` region of x's device: x and the weights cast to its dtype, the GEMMs and
        the output in it, as ``nn.Linear`` there; the weights' grads stay in their dtype), zero past ``offs[-1]``.
        ``used``: ``offs[-1]`` when known on the host (see ``ops.grouped_mm``).
        ``clear_tail`` False: the rows past ``offs[-1]`` of the output, and of x's gradient, are unspecified
        (NaN possible; see ``ops.grouped_mm``), for a caller that reads neither."""
        w13: Tensor = self.w13
        w2: Tensor = self.w2
        if torch.is_autocast_enabled(x.device.type):  # as nn.Linear: the GEMMs in autocast's dtype
            dt = torch.get_autocast_dtype(x.device.type)
            w13, w2 = w13.to(dt), w2.to(dt)
        h13 = ops.grouped_mm(x.to(w13.dtype), w13, offs, used, clear_tail=clear_tail)
        # the gate and up projections' biases and the activation: one kernel on CUDA (ops.expert_activation)
        b13 = self.b13.to(h13.dtype) if self.b13 is not None else None
        act = ops.expert_activation(h13, offs, b13, *_act_args(self.activation))
        out = ops.grouped_mm(act, w2, offs, used, clear_tail=clear_tail)
        if self.b2 is not None:
            out = _add_row_bias(out, self.b2, offs, self.b2_added_elsewhere)
        return out

    def forward_rows(
        self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, num_pairs: int | None = None
    ) -> Tensor:
        """Rows of a normal dispatch -> weighted expert outputs.

        Args:
            x: [R, H]; topk_idx: int64 [R, K] local expert ids (-1: not here); topk_weights: float32 [R, K].
            num_pairs: the number of (row, k) entries naming a local expert (ids in [0, E_l)) when known on the
                host: then the gather takes those entries' rows plus, where some entry names none, one pad row (x's
                row 0, at position num_pairs, past offs[-1]: the GEMMs and the weighted sum skip it). It must be
                exact (``ops.expert_order``); a dispatch's rows per expert sum to it only where no row names one
                expert twice (a row that does is fine here, counted once per entry). None: all R*K entries go
                through the sort, and the gather, the GEMMs and the weighted sum stop at the valid ones (offs[-1],
                read on the device).

        Returns:
            y [R, H] in x's dtype: ``y[r] = sum_k w[r, k] * expert_{idx[r, k]}(x[r])``, summed in float32 (weights
            in float32 with largeep's kernel; rounded to the expert outputs' dtype where ``embedding_bag`` stands in,
            see ``ops.weighted_row_sum``). No host wait with the native grouped GEMM.

        The entries are put in expert order (:func:`largeep.ops.expert_order`: one counting sort on CUDA), their
        rows gathered once, two grouped GEMMs run, and :func:`largeep.ops.weighted_row_sum` sums each row's K
        outputs straight from the expert-sorted GEMM output: one read of it, no float32 copy of [pairs, H], no
        atomics, no scatter.
        """
        valid = topk_idx >= 0
        offs, src, pos, pad = ops.expert_order(topk_idx, self.num_experts, num_pairs)
        w = torch.where(valid, topk_weights, 0.0).float()
        if num_pairs is not None:
            # the pad row (which the entries naming no local expert point at) lies past offs[-1]: the GEMMs leave
            # it unwritten and the weighted sum skips it, so it needs clearing only for x's gradient (x[src]'s
            # backward adds its gradient into x[src[pad]]); without one, two small ops per GEMM are saved
            clear = torch.is_grad_enabled() and x.requires_grad
            out = self.forward(x[src], offs, num_pairs, clear_tail=clear)  # [P, H] in the weights' dtype
            return ops.weighted_row_sum(out, pos, w, pad).to(x.dtype)
        # P = R*K positions of which the first offs[-1] are valid, a number only the device knows. No step reads a
        # row past it, so none is cleared: the gather copies the valid rows only (the rest of xs is unspecified);
        # each grouped GEMM computes the groups' rows only, reads no input row past offs[-1] (its weight gradient
        # neither), and leaves its output rows past it unwritten; silu * mul is row-wise, so garbage there stays
        # there; the weighted sum skips every entry at or past offs[-1] (those naming no local expert: -1 or out of
        # range) instead of multiplying its row by 0 (garbage may be NaN). Backward, mirror-wise: the weighted sum's
        # gradient is zero on those rows, and the GEMMs' input gradients past offs[-1] (unspecified: computed from
        # unspecified rows) are dropped by the gather's backward, which sums only the positions below offs[-1] into
        # x's gradient -- so no NaN reaches x, the weights or the expert parameters.
        count = offs[-1:]
        xs = ops.gather_rows(x, src, count, pos)
        out = self.forward(xs, offs, clear_tail=False)
        return ops.weighted_row_sum(out, pos, w, None, count).to(x.dtype)

    def forward_slots(
        self, x: Tensor, counts: Tensor, capacity: int | None = None, scales: Tensor | None = None
    ) -> Tensor:
        """Slots of a low-latency dispatch -> expert outputs (unweighted).

        Args:
            x: [E_l, S, H]; rows [0, counts[e]) of expert e are valid. counts: int32 [E_l].
            capacity: the most valid rows in all (fixed; default E_l * S). Only valid rows are computed.
            scales: with FP8 slots (x e4m3), their scales [E_l, S, H/128]: the rows are dequantised to the
                weights' dtype after they are gathered (``capacity`` of them, the valid ones first, not every slot
                when ``capacity`` < E_l * S).

        Returns:
            [E_l, S, H] in the weights' dtype; invalid rows are zero. No host wait outside the GEMM op.
        """
        e, s, h = x.shape
        j = torch.arange(s, device=x.device)
        ids = torch.arange(e, device=x.device).unsqueeze(1)
        key = torch.where(j.unsqueeze(0) < counts.to(torch.int64).unsqueeze(1), ids, e).reshape(-1)
        order = torch.argsort(key, stable=True)
        if capacity is not None and capacity < e * s:
            order = order[:capacity]
        offs = torch.cumsum(counts.to(torch.int64), 0).to(torch.int32)
        rows = x.reshape(e * s, h)[order]
        if scales is not None:
            rows = fp8.dequantize(rows, scales.reshape(e * s, -1)[order], self.w13.dtype)
        out = self.forward(rows, offs)
        y = torch.zeros(e * s, h, dtype=out.dtype, device=x.device).index_copy(0, order, out)
        return y.view(e, s, h)


def _mix_seed(seed: int, *parts: int) -> int:
    """One generator seed from ``seed`` and small ints (SplitMix64-style mixing: nearby inputs, unrelated seeds)."""
    z = seed & (2**64 - 1)
    for p in parts:
        z = (z + 0x9E3779B97F4A7C15 * (p + 1)) & (2**64 - 1)
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        z ^= z >> 31
    return z & (2**63 - 1)


def _is_placement(placement: Any) -> bool:
    """A ``largeep.placement.Placement`` (or one shaped like it): route by replicas, a physical-to-logical table."""
    return hasattr(placement, "route") and hasattr(placement, "phys_to_log")


def _node_limited(gate: Any, placement: Any) -> bool:
    """Whether a gate limits each token's nodes: a ``TopKGate`` with ``topk_groups`` below its group count whose
    groups are ``placement``'s home nodes (``Placement.home_node``), which ``route`` then keeps tokens on. Groups
    of another kind (contiguous blocks of experts, say) limit no node: routing is left free to balance."""
    limit, sizes = getattr(gate, "topk_groups", None), getattr(gate, "group_sizes", None)
    groups = getattr(gate, "_host_groups", None)
    if not (isinstance(limit, int) and isinstance(sizes, Tensor) and limit < sizes.shape[0]):
        return False
    home = placement.home_node() if hasattr(placement, "home_node") else None
    return isinstance(groups, Tensor) and isinstance(home, Tensor) and torch.equal(groups, home.cpu())


def _wrap_placement(placement: Any, rank: int, device: torch.device) -> Callable[..., Tensor] | None:
    if placement is None:
        return None
    if _is_placement(placement):
        tabled = hasattr(placement, "table_route") and hasattr(placement, "prepare")
        if tabled:
            placement.prepare(device)  # (its tables built now, eagerly: a trace then only reads them)

        def route(idx: Tensor, node_limited: bool = False) -> Tensor:
            # route water-fills by load and waits on the host; traced or captured, the table route instead
            traced = torch.compiler.is_compiling() or (idx.is_cuda and torch.cuda.is_current_stream_capturing())
            limited = {"node_limited": True} if node_limited else {}  # (a placement shaped like one may lack it)
            if traced and tabled:
                return placement.table_route(idx, rank, **limited)  # type: ignore[no-any-return]
            return placement.route(idx, rank, **limited)  # type: ignore[no-any-return]

        return route
    if callable(placement):
        return placement  # type: ignore[no-any-return]
    raise ArgumentError("MoELayer: argument 'placement' must be a callable or a largeep.placement.Placement")


def _kind(v: object) -> str:
    """What ``v`` is, for an error: a tensor's dtype and shape, else its type."""
    return f"a {v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else f"a {type(v).__name__}"


def _sent(sent: list[tuple[int, Tensor]], buffer_id: int, d: ops.DispatchOutput) -> None:
    """Notes a custom-op dispatch's ticket in ``sent`` (for :func:`_release_dispatches`). Only the ticket: holding
    the DispatchOutput would keep its received rows (a zero-copy receive slot) alive to the end of the forward, so a
    third chunk's dispatch found both slots taken and copied its rows."""
    if isinstance(d.handle, ops.TicketHandle):
        sent.append((buffer_id, d.handle.ticket))


def _release_dispatches(sent: Sequence[tuple[int, Tensor]]) -> None:
    """After a forward that raised: frees the registry entries of its custom-op dispatches ((buffer id, ticket) from
    :func:`_sent`), which only their combine or backward would have freed, and neither will now run (the forward's
    outputs and autograd graph are lost with the error). Eager handles are objects that go with their last
    reference."""
    for buffer_id, ticket in sent:
        ops._drop(buffer_id, ticket)


def _split_rows(t: Tensor, n: int) -> tuple[Tensor, ...]:
    """``t.tensor_split(n)`` (chunk i has ceil((T - i) / n) rows). While compiling the same chunks come from their
    sizes as expressions of T: ``tensor_split`` of a dynamic T makes Dynamo guard on T % n, so each remainder (and
    each small T) compiled a graph of its own and a training run with varying token counts hit torch's recompile
    limit (an error with ``fullgraph=True``)."""
    if n == 1 or not torch.compiler.is_compiling():
        return t.tensor_split(n)
    rows = t.shape[0]
    return tuple(torch.split(t, [(rows - i + n - 1) // n for i in range(n)]))


class MoELayer(nn.Module):
    """gate -> (placement) -> dispatch -> local grouped SwiGLU experts (optionally with biases and GPT-OSS's clamped
    activation: ``expert_mlp_bias``, ``expert_activation``) -> combine, plus optional shared experts.

    Args:
        buffer: the Buffer (normal mode: training/prefill, with autograd; low-latency mode: decoding, no
            autograd). H, E (physical experts), K come from it; rank r owns physical experts [r*E/N, (r+1)*E/N).
        ffn_hidden: F of each routed expert.
        gate: module ``x -> (topk_idx, topk_weights)`` or an object with those attributes (and optionally
            ``aux_loss``, kept in ``self.aux_loss``). Default: :class:`LinearTopKRouter` over the logical experts.
            A token may name one expert at several k (each is computed and weighted); a gate whose choices are
            always distinct says so with a ``distinct_experts = True`` attribute (the built-in gates do), which
            lets the experts run only the (row, k) entries the dispatch counted on the host instead of sorting
            all R*K entries (the GEMMs stop at the valid ones either way). It is trusted with no placement or a
            ``Placement`` (distinct experts land on distinct replicas), not through another callable, which may
            send two experts to one.
        num_logical_experts: experts the default gate chooses from (default E, or a Placement's logical experts;
            without a placement at most E, the ids being the Buffer's experts; at least num_topk for the default
            gate).
        placement: None, a callable logical topk_idx int64 [T, K] -> physical [T, K], or a
            ``largeep.placement.Placement`` (its ``route`` gets this rank as the source GPU; under
            ``torch.compile`` or CUDA-graph capture its ``table_route``, which needs no host wait and spreads the
            choices by a static cap and cycle instead of the batch's load). Every rank must hold the same one.
            Where the gate limits groups (a ``TopKGate`` with ``topk_groups`` below its group count, its groups
            the placement's ``home_node()``), both route with ``node_limited=True``: a token reaches no node but its
            own and its experts' home nodes. A ``TopKGate``'s capacity counts replicas (``set_replicas``, called
            here from the placement's ``replica_count``, and again after each ``load_state_dict``).
        shared_ffn_hidden: F of the shared experts (0: none), applied to every token.
        shared_expert_gate: the shared experts' output is scaled per token by ``sigmoid(x wg)``, wg [H, 1]
            (Qwen2-MoE's ``shared_expert_gate``; :class:`SwiGLU` ``sigmoid_gate``); needs ``shared_ffn_hidden`` > 0.
        num_chunks: normal mode: split the batch into this many chunks pipelined as described in the module doc.
        num_worst_tokens: normal mode: > 0 uses fixed-size dispatch outputs (no host wait, static shapes).
        overlap_sm_carveout: with ``num_chunks`` > 1 on CUDA, SMs the expert GEMMs leave free for the
            communication kernels that run beside them (``ops.sm_carveout``); default (None): the Buffer's
            ``num_sms``; 0: none.
        use_fp8: normal mode: dispatch FP8 (needs H % 128 == 0; ``ops.dispatch(use_fp8=True)``): the experts see
            the dequantized values; the combine and the gradients stay in the activations' dtype.
        bf16_partial_sums: normal mode, bf16 activations (x in another dtype is refused at the call): every combine
            of the layer's (the experts' rows home, and in the backward x's gradient rows, ``ops.dispatch`` /
            ``ops.combine(bf16_partial_sums=True)``) sends each other node's partial sum of a token's rows as bf16
            instead of float32: half the bytes between nodes, one more bf16 rounding of each such partial sum.
            Within one node it changes nothing. Default False (a low-latency layer takes ``ll_bf16_partial_sums``).
        ll_use_fp8: low-latency mode: dispatch FP8 (needs H % 128 == 0); the experts see the dequantized values.
        ll_send_weights: low-latency mode: the dispatch carries the gate weights, so that the combine
            sums each token's outputs on the experts' ranks (``Buffer.low_latency_dispatch(topk_weights=)``: fewer
            bytes back at 2-8 ranks; on 2 H200s 7 us less at 128 tokens, 2 us more at 1 token). Default True.
        ll_bf16_partial_sums: with ``ll_send_weights``, those sums come back as one bf16 row each instead of two
            (``Buffer.low_latency_dispatch(bf16_partial_sums=)``): fewer bytes again, one more bf16 rounding of
            each rank's partial sum. Default False.
        use_custom_ops: take the custom-op path in eager mode too (always taken under ``torch.compile``).
        router_score, norm_topk_prob: options of the default gate.
        dtype: of the expert and shared-expert weights (default: torch's default dtype). The parameters are made
            on torch's default device (``with torch.device(...)``), not the Buffer's: move the layer there
            (``.to(buffer.ctx.device)``) before calling it.
        expert_tp_group: None, or a process group of T ranks that share this rank's expert slots, each holding
            F/T of every expert's hidden units (:mod:`largeep.expert_tp`; normal mode only; ``ffn_hidden`` % T ==
            0). The Buffer's group must hold exactly one rank of it (this one), and its members must be the same
            rank of their Buffers' groups, and a Buffer's group must hold the same member j of every TP group:
            ``largeep.expert_tp.make_expert_tp_groups(T)`` gives both groups. With it the constructor is collective
            over the group and the Buffer's group (a check of the configuration, which refuses an argument wrong on
            any rank on every rank: every rank of both groups must then give ``expert_tp_group``); T = 1 is the
            layer without TP. ``allreduce_replica_grads`` then takes ``group=buffer.ctx.group``.
        expert_mlp_bias: the routed experts have biases (:class:`GroupedExperts` ``bias``: b13 [E_l, 2F], b2
            [E_l, H], zero at first; GPT-OSS's experts). ``load_global_experts`` then takes b1/b3/b2 and
            ``gather_global_experts`` gives them. With expert TP each member holds its F/T columns of b13 and the
            whole b2, which the first member adds and every member's copy takes the whole gradient of (so the
            copies stay equal; ``clip_grad_norm_`` counts it once).
        expert_activation: of the routed experts: ``"silu"`` (SwiGLU, the default) or a :class:`ClampedSwiGLU`
            (GPT-OSS's clamped SwiGLU, ``ClampedSwiGLU()`` with its constants).
    """

    def __init__(
        self,
        buffer: Buffer,
        *,
        ffn_hidden: int,
        gate: nn.Module | None = None,
        num_logical_experts: int | None = None,
        placement: Any = None,
        shared_ffn_hidden: int = 0,
        shared_expert_gate: bool = False,
        num_chunks: int = 1,
        num_worst_tokens: int = 0,
        overlap_sm_carveout: int | None = None,
        use_fp8: bool = False,
        bf16_partial_sums: bool = False,
        ll_use_fp8: bool = False,
        ll_send_weights: bool = True,
        ll_bf16_partial_sums: bool = False,
        use_custom_ops: bool = False,
        router_score: str = "softmax",
        norm_topk_prob: bool = True,
        dtype: torch.dtype | None = None,
        expert_tp_group: dist.ProcessGroup | None = None,
        expert_mlp_bias: bool = False,
        expert_activation: Activation = "silu",
        _weights_of: MoELayer | None = None,
    ) -> None:
        """(``_weights_of``: :meth:`for_buffer`'s: the experts and shared experts are that layer's modules, not
        made here, and nothing is drawn from torch's generator.)"""
        super().__init__()
        if not isinstance(buffer, Buffer):
            raise ArgumentError(f"MoELayer: argument 'buffer' must be a largeep.Buffer, got {type(buffer).__name__}")
        c = buffer.ctx
        # every copy of an expert starts from the same weights, and different experts from different ones, on
        # every rank whose torch generator was seeded alike: the seed is drawn from it first (before the default
        # gate's initialisation, which draws nothing on the meta device)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")) if _weights_of is None else 0
        local_error: Exception | None = None
        try:
            for arg, value, least in (("ffn_hidden", ffn_hidden, 1), ("shared_ffn_hidden", shared_ffn_hidden, 0),
                                      ("num_chunks", num_chunks, 1), ("num_worst_tokens", num_worst_tokens, 0)):
                if not isinstance(value, int) or isinstance(value, bool) or value < least:
                    raise ArgumentError(f"MoELayer: argument '{arg}' must be an int >= {least}, got {value!r}")
            if c.low_latency and num_chunks > 1:
                raise ArgumentError(
                    f"MoELayer: argument 'num_chunks' = {num_chunks} applies to normal mode; a low-latency call moves "
                    "at most max_tokens_per_rank tokens at once (use low_latency_steps or TwoBatchOverlap to overlap "
                    "micro-batches)"
                )
            if num_worst_tokens and getattr(buffer, "num_rounds", 1) > 1:
                raise ArgumentError(
                    f"MoELayer: argument 'num_worst_tokens' = {num_worst_tokens} needs a Buffer without "
                    f"tokens_per_round (this one moves calls in {buffer.num_rounds} rounds, which need the host's "
                    "row counts)"
                )
            carveout = overlap_sm_carveout
            if carveout is not None and (not isinstance(carveout, int) or isinstance(carveout, bool) or carveout < 0):
                raise ArgumentError(
                    f"MoELayer: argument 'overlap_sm_carveout' must be None or an int >= 0, got {overlap_sm_carveout!r}"
                )
            checks.flags("MoELayer", use_fp8=use_fp8, bf16_partial_sums=bf16_partial_sums, ll_use_fp8=ll_use_fp8,
                         ll_send_weights=ll_send_weights,
                         ll_bf16_partial_sums=ll_bf16_partial_sums, use_custom_ops=use_custom_ops,
                         norm_topk_prob=norm_topk_prob, shared_expert_gate=shared_expert_gate,
                         expert_mlp_bias=expert_mlp_bias)
            _check_activation("MoELayer", "expert_activation", expert_activation)
            if shared_expert_gate and shared_ffn_hidden == 0:
                raise ArgumentError("MoELayer: argument 'shared_expert_gate' = True needs shared experts "
                                    "(shared_ffn_hidden > 0)")
            if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise ArgumentError(f"MoELayer: argument 'dtype' must be None or a floating-point torch.dtype (of the "
                                    f"expert weights), got {dtype!r}")
            if gate is not None and not callable(gate):
                raise ArgumentError(f"MoELayer: argument 'gate' must be a module x -> (topk_idx, topk_weights), got "
                                    f"{type(gate).__name__}")
            if use_fp8 and c.low_latency:
                raise ArgumentError("MoELayer: argument 'use_fp8' applies to normal mode; a low-latency Buffer takes "
                                    "ll_use_fp8")
            if bf16_partial_sums and c.low_latency:
                raise ArgumentError("MoELayer: argument 'bf16_partial_sums' applies to normal mode; a low-latency "
                                    "Buffer takes ll_bf16_partial_sums (with ll_send_weights)")
            # (the low-latency settings a normal-mode Buffer would ignore, each away from its default)
            if not c.low_latency and ll_use_fp8:
                raise ArgumentError("MoELayer: argument 'll_use_fp8' applies to low-latency mode; a normal-mode Buffer "
                                    "takes use_fp8")
            for arg, flag, default in (("ll_send_weights", ll_send_weights, True),
                                       ("ll_bf16_partial_sums", ll_bf16_partial_sums, False)):
                if not c.low_latency and flag != default:
                    raise ArgumentError(f"MoELayer: argument '{arg}' = {flag} applies to low-latency mode (a "
                                        "normal-mode combine sums each token's rows in float32)")
            for arg, flag in (("use_fp8", use_fp8), ("ll_use_fp8", ll_use_fp8)):
                if flag and c.hidden % fp8.GROUP:
                    raise ArgumentError(f"MoELayer: {arg} needs hidden % {fp8.GROUP} == 0, hidden is {c.hidden}")
            if ll_bf16_partial_sums and not ll_send_weights:
                raise ArgumentError("MoELayer: argument 'll_bf16_partial_sums' = True needs ll_send_weights=True")
            num_logical = _logical_experts(c, placement, num_logical_experts)
            known = _gate_experts(gate)
            if known is not None and known != num_logical:
                raise ArgumentError(
                    f"MoELayer: argument 'gate' chooses among {known} experts; the layer has {num_logical} logical "
                    "experts (num_logical_experts, the placement's, else the Buffer's num_experts)"
                )
            route = _wrap_placement(placement, c.rank, c.device)
            if gate is None and num_logical < c.num_topk:
                raise ArgumentError(
                    f"MoELayer: the default router picks num_topk = {c.num_topk} distinct experts among the layer's "
                    f"{num_logical} logical experts (num_logical_experts, or the placement's): pass a gate of your "
                    "own, or more logical experts"
                )
            router: nn.Module = gate or LinearTopKRouter(
                c.hidden, num_logical, c.num_topk, score_func=router_score, norm_topk_prob=norm_topk_prob
            )
            set_replicas = getattr(router, "set_replicas", None)
            if hasattr(placement, "replica_count") and callable(set_replicas):
                set_replicas(placement.replica_count)  # (a TopKGate's capacity by the slots of each expert)
        except Exception as exc:  # noqa: BLE001 - with expert TP any refusal (a TypeError too) must reach the others
            if expert_tp_group is None:
                raise
            # with expert TP the check below is collective: this refusal goes to the other members as a verdict
            # (as Buffer.__init__ sends its ranks'), and every member raises, none left waiting there
            local_error = exc
        self.expert_tp: ExpertTP | None = None
        if expert_tp_group is not None:
            self.expert_tp = ExpertTP.check(
                expert_tp_group, c, ffn_hidden,
                {"num_chunks": num_chunks, "num_worst_tokens": num_worst_tokens, "use_fp8": int(use_fp8),
                 "expert_mlp_bias": int(expert_mlp_bias is True),
                 # (the name is the refusal's legend: the codes of two ClampedSwiGLU are not readable)
                 'expert_activation (codes: 0: "silu", others: a ClampedSwiGLU\'s of its alpha and limit)':
                     _activation_code(expert_activation)},
                local_error,
            )
        tp = self.expert_tp.size if self.expert_tp is not None else 1
        self.buffer = buffer
        self.buffer_id = ops.register_buffer(buffer)
        self.hidden = c.hidden
        self.num_experts = c.num_experts
        self.num_local_experts = c.experts_per_rank
        self.topk = c.num_topk
        self.rank = c.rank
        self.low_latency = c.low_latency
        self.num_chunks = num_chunks
        self.num_worst_tokens = num_worst_tokens
        self.overlap_sm_carveout = overlap_sm_carveout
        self.use_fp8 = use_fp8
        self.bf16_partial_sums = bf16_partial_sums
        self.ll_use_fp8 = ll_use_fp8
        self.ll_send_weights = ll_send_weights
        self.ll_bf16_partial_sums = ll_bf16_partial_sums
        self.use_custom_ops = use_custom_ops
        # every valid low-latency row is one (token, local expert) copy: at most N*M*min(K, E_l)
        self.ll_capacity = c.num_ranks * c.max_tokens_per_rank * min(c.num_topk, c.experts_per_rank)
        self.num_logical_experts = num_logical
        self.gate = router
        self._use_placement(placement, route)
        # the layers that share this one's experts (itself, and for_buffer's twins, which share its family):
        # set_placement re-routes them all
        self._family: list[weakref.ref[MoELayer]] = (
            _weights_of._family if _weights_of is not None else []
        )
        self._family.append(weakref.ref(self))
        self.ffn_hidden = ffn_hidden
        self.experts: GroupedExperts
        self.shared_experts: SwiGLU | None
        if _weights_of is not None:
            self.experts, self.shared_experts = _weights_of.experts, _weights_of.shared_experts
        else:
            self.experts = GroupedExperts(self.num_local_experts, c.hidden, ffn_hidden // tp, dtype=dtype, init=False,
                                          bias=expert_mlp_bias, activation=expert_activation)
            # (expert TP: the first member adds b2, the others take its gradient only; see GroupedExperts)
            self.experts.b2_added_elsewhere = self.expert_tp is not None and self.expert_tp.rank > 0
            self.experts.seeded_init_(
                self._slot_experts(), seed, self.expert_tp.rank if self.expert_tp is not None else 0, tp
            )
            self.shared_experts = SwiGLU(c.hidden, shared_ffn_hidden, dtype=dtype, sigmoid_gate=shared_expert_gate) \
                if shared_ffn_hidden > 0 else None
        self.aux_loss: Tensor | None = None
        self._ddp_seen: weakref.ref[nn.Module] | None = None  # (the DDP _check_ddp last let through)
        self._fsdp_seen: tuple[int, Any] | None = None  # (the registry of composable states _check_fsdp last saw)
        self.register_state_dict_post_hook(_save_slot_layout)
        self.register_load_state_dict_pre_hook(_check_slot_layout)
        self.register_load_state_dict_post_hook(_replicas_after_load)

    def _use_placement(self, placement: Any, route: Callable[..., Tensor] | None) -> None:
        """Takes ``placement`` (checked; ``route``: its ``_wrap_placement``) as the layer's routing: everything that
        depends on it but the gate's replica counts and the expert weights (the constructor and set_placement)."""
        self.phys_to_log: Tensor | None = getattr(placement, "phys_to_log", None)
        self.placement = route
        self._placement_arg = placement  # (as given: for_buffer passes it on)
        # whether a token's distinct logical experts stay distinct physical ones (see experts_chunk)
        self._placement_keeps_distinct = placement is None or _is_placement(placement)
        self._by_replicas = _is_placement(placement)  # (self.placement is route's wrapper, which takes node_limited)
        self._placement_obj = placement if self._by_replicas else None
        self._groups_seen: Any = None  # (the gate's groups node_limited was decided for: see _limits_nodes)
        self._limited = False
        self._limits_nodes()  # (decided now, eagerly: a compiled forward then only tests the groups' identity)

    # -- weights ----------------------------------------------------------------------------------------------
    _FOR_BUFFER_OPTIONS = frozenset({
        "num_chunks", "num_worst_tokens", "overlap_sm_carveout", "use_fp8", "bf16_partial_sums", "ll_use_fp8",
        "ll_send_weights", "ll_bf16_partial_sums", "use_custom_ops",
    })

    def for_buffer(self, buffer: Buffer, **options: Any) -> MoELayer:
        """A layer on another Buffer that computes with this layer's weights: the same gate, placement, routed
        experts and shared experts (the modules themselves, no copy: a change to either layer's weights is the
        other's too). For serving one model in both modes: prefill through a normal-mode layer, decode through
        ``prefill_layer.for_buffer(ll_buffer)`` (docs/usage.md, "Serving: prefill and decode").

        ``buffer`` must have this layer's Buffer's hidden, num_experts, num_topk, ranks and this rank's place among
        them (so that each rank holds the same slots), else ArgumentError naming what differs. ``options``: the
        new layer's mode settings (``num_chunks``, ``num_worst_tokens``, ``overlap_sm_carveout``, ``use_fp8``,
        ``bf16_partial_sums``, ``ll_use_fp8``, ``ll_send_weights``, ``ll_bf16_partial_sums``, ``use_custom_ops``;
        MoELayer's defaults where left out, not this layer's values), checked as MoELayer checks them. A layer
        with expert tensor parallelism is refused (its slots hold shards; a low-latency layer needs whole
        experts). The gate is shared, so in training mode its ``expert_load`` counts the choices of both layers'
        calls (in eval mode neither counts). Draws nothing from torch's generator and allocates no weights."""
        other = sorted(set(options) - self._FOR_BUFFER_OPTIONS)
        if other:
            raise ArgumentError(
                f"MoELayer.for_buffer: argument {other[0]!r} is not a mode setting (the weights, gate and placement "
                f"are this layer's); expected some of {sorted(self._FOR_BUFFER_OPTIONS)}"
            )
        if not isinstance(buffer, Buffer):
            raise ArgumentError(f"MoELayer.for_buffer: argument 'buffer' must be a largeep.Buffer, got "
                                f"{type(buffer).__name__}")
        mine, theirs = self.buffer.ctx, buffer.ctx
        for name in ("hidden", "num_experts", "num_topk", "num_ranks", "rank"):
            if getattr(theirs, name) != getattr(mine, name):
                raise ArgumentError(
                    f"MoELayer.for_buffer: argument 'buffer' has {name} = {getattr(theirs, name)}, this layer's Buffer "
                    f"{getattr(mine, name)}: the new layer must hold the same slots of the same experts on each rank"
                )
        if self.expert_tp is not None and self.expert_tp.size > 1:
            raise ArgumentError(
                f"MoELayer.for_buffer: this layer splits its experts over an expert-TP group of "
                f"{self.expert_tp.size} ranks (each slot holds a shard): load whole experts into a layer without "
                "expert TP instead (load_global_experts)"
            )
        shared = self.shared_experts.w1.shape[1] if self.shared_experts is not None else 0
        gated = self.shared_experts is not None and self.shared_experts.wg is not None
        return MoELayer(
            buffer, ffn_hidden=self.ffn_hidden, gate=self.gate, num_logical_experts=self.num_logical_experts,
            placement=self._placement_arg, shared_ffn_hidden=shared, shared_expert_gate=gated,
            expert_mlp_bias=self.experts.b13 is not None, expert_activation=self.experts.activation, _weights_of=self,
            **options,
        )

    def _slot_experts(self) -> list[int]:
        """The logical expert of each local slot (-1: empty): the placement's table, else slot s holds expert s."""
        lo = self.rank * self.num_local_experts
        return self._slot_table()[lo : lo + self.num_local_experts]

    @torch.no_grad()
    def load_global_experts(
        self, w1: Tensor, w3: Tensor, w2: Tensor, phys_to_log: Tensor | None = None, *more: Tensor,
        b1: Tensor | None = None, b3: Tensor | None = None, b2: Tensor | None = None,
    ) -> None:
        """Copies this rank's slots from global weights: w1/w3 [L, H, F], w2 [L, F, H] indexed by logical expert
        (the transposes of ``nn.Linear`` weights, [in, out]: :func:`experts_from_linear` stacks per-expert
        ``nn.Linear`` modules so; with H == F the shapes cannot tell a forgotten transpose);
        slot s holds logical ``phys_to_log[s]`` (default: this layer's placement's table, else the identity: then
        L may be anything from ``num_logical_experts`` to the Buffer's num_experts, the slots at or past L zeroed).
        Empty slots (-1) are zeroed. With expert TP, member j of the TP group copies its shard: columns
        [j*F/T, (j+1)*F/T) of w1/w3, the same rows of w2.

        ``b1`` / ``b3`` [L, F], ``b2`` [L, H]: the biases of a layer made with ``expert_mlp_bias=True`` (given
        exactly then, all three); with expert TP each member copies its columns of b1 / b3 and the whole b2. Six
        tensors given positionally are (w1, w3, w2, b1, b3, b2), as :meth:`gather_global_experts` and
        :func:`global_experts_from_states` give them (with the layer's own table: for another ``phys_to_log`` give
        the biases by name); four are (w1, w3, w2, phys_to_log)."""
        if more:  # (w1, w3, w2, b1, b3, b2) positionally: the six the gathers give
            what = "MoELayer.load_global_experts"
            if len(more) != 2:
                raise ArgumentError(f"{what}: got {4 + len(more)} tensors positionally, expected w1, w3, w2 and "
                                    "either phys_to_log or the biases b1, b3, b2 (those given by name otherwise)")
            for arg, t in (("b1", b1), ("b3", b3), ("b2", b2)):
                if t is not None:
                    raise ArgumentError(f"{what}: argument '{arg}' given twice, positionally (w1, w3, w2, b1, b3, "
                                        "b2) and by name")
            (b1, b3, b2), phys_to_log = (phys_to_log, *more), None
        if phys_to_log is not None:
            sized = checks.integer_tensor(phys_to_log) and tuple(phys_to_log.shape) == (self.num_experts,)
            least_id = int(phys_to_log.min()) if sized and phys_to_log.numel() else -1
            if not sized or least_id < -1:
                raise ArgumentError(
                    f"MoELayer.load_global_experts: argument 'phys_to_log' must be an integer tensor "
                    f"[{self.num_experts}] (the logical expert of each physical slot, -1: empty), got "
                    f"{_kind(phys_to_log) if not sized else f'a value {least_id}'}"
                )
        table = phys_to_log if phys_to_log is not None else self.phys_to_log
        parts = self._slots_of("load_global_experts", w1, w3, w2, table, (b1, b3, b2))
        ex = self.experts
        for mine, part in zip((ex.w1, ex.w3, ex.w2, ex.b1, ex.b3, ex.b2), parts, strict=False):
            assert mine is not None
            mine.copy_(part.to(device=mine.device, dtype=mine.dtype))

    def _slots_of(
        self, op: str, w1: Tensor, w3: Tensor, w2: Tensor, table: Tensor | None,
        biases: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None),
    ) -> tuple[Tensor, ...]:
        """This rank's slots (by ``table``, the physical slots' logical experts; None: the identity) of global
        per-expert tensors w1/w3 [L, H, F], w2 [L, F, H] (and ``biases`` b1/b3 [L, F], b2 [L, H] where the experts
        have biases: given exactly then), on their device, empty slots zero; with expert TP this member's shard
        (columns [j*F/T, (j+1)*F/T) of w1/w3 and b1/b3, the same rows of w2, all of b2). Shapes checked for
        ``op``. Returns (w1, w3, w2) or (w1, w3, w2, b1, b3, b2)."""
        # every rank checks the same shapes (a rank whose slots all lie below a short L would load silently)
        # L: at least the table's largest logical expert + 1 (the identity: E), at most the layer's logical experts
        # (without a placement slot s holds expert s: L from the layer's logical experts, which may be fewer than the
        # slots, whose rest no token reaches, up to every slot)
        least = int(table.max()) + 1 if table is not None and table.numel() else \
            min(self.num_logical_experts, self.num_experts)
        most = max(least, self.num_logical_experts) if table is not None else self.num_experts
        h, f = self.hidden, self.ffn_hidden
        for arg, t, want in (("w1", w1, (h, f)), ("w3", w3, (h, f)), ("w2", w2, (f, h))):
            if not isinstance(t, Tensor) or t.dim() != 3 or tuple(t.shape[1:]) != want or \
                    not least <= t.shape[0] <= most:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                span = f"L = {least}" if least == most else f"{least} <= L <= {most}"
                # (the commonest mistake: per-expert nn.Linear weights stacked as they are, [out, in])
                swapped = isinstance(t, Tensor) and t.dim() == 3 and tuple(t.shape[1:]) == want[::-1]
                hint = (" (nn.Linear's [out, in] layout? largeep's is [in, out]: transpose each expert's weight, or "
                        "use largeep.layers.experts_from_linear)") if swapped else ""
                raise ArgumentError(
                    f"MoELayer.{op}: argument '{arg}' has shape {got}, expected (L, {want[0]}, {want[1]}) with "
                    f"{span} logical experts{hint}"
                )
        has_bias = self.experts.b13 is not None
        for arg, bt, size in (("b1", biases[0], f), ("b3", biases[1], f), ("b2", biases[2], h)):
            if not has_bias and bt is not None:
                raise ArgumentError(f"MoELayer.{op}: argument '{arg}' given, but this layer's experts have no biases "
                                    "(made without expert_mlp_bias=True)")
            if has_bias and (not isinstance(bt, Tensor) or tuple(bt.shape) != (w1.shape[0], size)):
                got_b = tuple(bt.shape) if isinstance(bt, Tensor) else type(bt).__name__
                raise ArgumentError(
                    f"MoELayer.{op}: argument '{arg}' " + ("is missing: this layer's experts have biases "
                                                           "(expert_mlp_bias=True), so b1, b3 and b2 are needed"
                                                           if bt is None else
                                                           f"has shape {got_b}, expected ({w1.shape[0]}, {size}) "
                                                           "(L as w1's: one row per logical expert)"))
        lo = self.rank * self.num_local_experts
        slots = torch.arange(lo, lo + self.num_local_experts, device="cpu")
        logical = table.cpu()[slots] if table is not None else slots
        ok = (logical >= 0) & (logical < w1.shape[0])  # (without a placement, the slots past L are zeroed)
        full = [w1, w3, w2] + ([t for t in biases if t is not None] if has_bias else [])
        if self.expert_tp is not None and self.expert_tp.size > 1:
            f = self.ffn_hidden // self.expert_tp.size
            cols = slice(self.expert_tp.rank * f, (self.expert_tp.rank + 1) * f)
            full[:3] = [w1[:, :, cols], w3[:, :, cols], w2[:, cols, :]]
            if has_bias:
                full[3:5] = [full[3][:, cols], full[4][:, cols]]
        # (only this rank's experts move, whatever device the global weights are on)
        return tuple(
            torch.where(ok.to(t.device).view(-1, *([1] * (t.dim() - 1))),
                        t[logical.clamp(0, t.shape[0] - 1).to(t.device)], 0)
            for t in full
        )

    @overload
    def gather_global_experts(
        self, w13: Tensor | None = None, w2: Tensor | None = None, *, b13: Tensor | None = None,
        b2: Tensor | None = None, dst: None = None, device: torch.device | str | None = None,
    ) -> tuple[Tensor, ...]: ...

    @overload
    def gather_global_experts(
        self, w13: Tensor | None = None, w2: Tensor | None = None, *, b13: Tensor | None = None,
        b2: Tensor | None = None, dst: int, device: torch.device | str | None = None,
    ) -> tuple[Tensor, ...] | None: ...

    @torch.no_grad()
    def gather_global_experts(
        self, w13: Tensor | None = None, w2: Tensor | None = None, *, b13: Tensor | None = None,
        b2: Tensor | None = None, dst: int | None = None, device: torch.device | str | None = None,
    ) -> tuple[Tensor, ...] | None:
        """The inverse of :meth:`load_global_experts`: every rank's expert weights as global ones indexed by logical
        expert, (w1 [L, H, F], w3 [L, H, F], w2 [L, F, H]) in the weights' dtype, on every rank (default) or on
        rank ``dst`` only, for a checkpoint that loads at another expert-parallel size or placement
        (``load_global_experts`` of the new layer takes them as they are). Collective: every rank of the Buffer's
        group (and with expert TP of the TP group, whose members' shards are joined along F) must call it, with
        the same ``dst``. Experts with biases (``expert_mlp_bias``) give (w1, w3, w2, b1 [L, F], b3 [L, F],
        b2 [L, H]) (``load_global_experts`` takes the six as they are, positionally or b1/b3/b2 by name; with expert
        TP b2 is the first member's, the members' copies being equal).

        L: the layer's logical experts (at least the table's largest id + 1); without a placement slot s holds
        expert s, and L is ``num_logical_experts`` (the Buffer's num_experts unless fewer were given: the slots past
        them, which no token reaches, are left out). A logical expert held by no slot comes back as zeros (it has no
        weights, as ``load_global_experts`` zeroes an empty slot). An expert held by several slots (replicas)
        comes back once; its copies must be equal (``allreduce_replica_grads`` keeps them so in training), else
        ``ArgumentError`` names the expert and the slots that differ, on every rank. Ranks whose layers hold
        different placements (``phys_to_log``) are refused likewise, naming the first rank and slot that differ
        (each rank would cut the slots by its own table).

        ``w13`` / ``w2``: other per-slot tensors of the experts' shapes ([E_l, H, 2F/T] and [E_l, F/T, H]) to
        gather instead of the weights, e.g. the optimizer's state of ``experts.w13`` and ``experts.w2`` (Adam's
        ``exp_avg``, ``exp_avg_sq``); :meth:`local_experts` cuts such global tensors back into a layer's slots.
        With biases, ``b13`` [E_l, 2F/T] and ``b2`` [E_l, H] likewise, and then all four are given or none.

        Memory. By default every rank receives every slot of the group at once (all-gathers), on the weights'
        device: the whole layer's experts on every GPU. For a large model pass ``dst`` and/or ``device``:

        - ``dst``: a rank of the Buffer's group (its numbering); only that rank receives the result, every other
          rank returns None (so the return type is ``tuple | None`` with ``dst``). With expert TP the receiver is
          the rank of EP rank ``dst`` that is member 0 of its TP group (``expert_tp_group`` rank 0); the others
          of its TP group return None too. The ranks must give the same ``dst`` (refused on every rank otherwise).
        - ``device``: where the result is assembled (e.g. ``"cpu"``; default: the weights' device).

        With either, the slots travel one rank's at a time (point to point to ``dst``, or a broadcast from each
        rank when every rank receives; then the TP group's shards of them) and each piece is moved to ``device``
        before the next: beyond the result itself, the weights' device of a receiving rank holds at most
        (T + 1) x one rank's ``w13`` and ``w2`` (and biases) at a time (T: the expert-TP size, 1 without),
        whatever the group's size; a rank that only sends holds nothing extra. The errors are the same and raised
        on every rank alike: the placements' and ``dst``'s agreement is checked before anything moves, the
        replicas' equality on the receiver, whose verdict is then sent to every rank. The default call (neither
        given) is the all-gather above, unchanged. Per-rank checkpoint files can also be assembled offline with
        :func:`global_experts_from_states`.
        """
        what = "MoELayer.gather_global_experts"
        ex = self.experts
        refs: list[tuple[str, Tensor | None, Tensor | None]] = [("w13", w13, ex.w13), ("w2", w2, ex.w2),
                                                                 ("b13", b13, ex.b13), ("b2", b2, ex.b2)]
        if ex.b13 is None:
            for arg, t, _ in refs[2:]:
                if t is not None:
                    raise ArgumentError(f"{what}: argument '{arg}' given, but this layer's experts have no biases "
                                        "(made without expert_mlp_bias=True)")
            refs = refs[:2]
        elif any(t is not None for _, t, _ in refs) and any(t is None for _, t, _ in refs):
            missing = [arg for arg, t, _ in refs if t is None]
            raise ArgumentError(f"{what}: argument '{missing[0]}' is missing: this layer's experts have biases, so "
                                "w13, w2, b13 and b2 are given together (other per-slot tensors) or none (the "
                                "weights)")
        stored: list[Tensor] = []
        for arg, t, ref in refs:
            assert ref is not None
            mine = ref if t is None else t
            if not isinstance(mine, Tensor) or tuple(mine.shape) != tuple(ref.shape):
                got = tuple(mine.shape) if isinstance(mine, Tensor) else type(mine).__name__
                raise ArgumentError(f"{what}: argument '{arg}' has shape {got}, expected "
                                    f"{tuple(ref.shape)} (experts.{arg}'s: one row per local slot)")
            stored.append(mine)
        if dst is not None or device is not None:
            return self._gather_piecewise(what, stored, dst, device)
        e_l = self.num_local_experts
        group = self.buffer.ctx.group
        table, num = self._gather_table()
        many = self.buffer.ctx.num_ranks > 1
        if many:  # every rank's table: each cuts the gathered slots by its own
            _same_tables(what, _collective.all_gather(table.to(stored[0].device), group, what))
        every = [torch.cat(_collective.all_gather(t.detach(), group, what)) if many else t.detach() for t in stored]
        tp = self.expert_tp
        members = [_collective.all_gather(t, tp.group, what) if tp is not None and tp.size > 1 else [t]
                   for t in every]
        joined = []
        for i, half, dim in self._gather_fields(len(stored)):  # every member's columns of every slot, joined along F
            ps = [p if half is None else p[..., half] for p in members[i]]
            joined.append(torch.cat(ps, dim=dim) if dim is not None else ps[0])
        # (every rank checks the replicas alike: the same gathered data)
        return _by_logical(what, table, tuple(joined), num, e_l)

    def _gather_fields(self, num_stored: int) -> list[tuple[int, slice | None, int | None]]:
        """The global tensors gather_global_experts builds from the per-slot ones it moves (w13, w2[, b13, b2]): for
        each (the index of the tensor it comes from, the columns it takes of that one's last dim or None: all, the
        dim along which the expert-TP members' parts join or None: the first member's whole)."""
        f = self.experts.ffn_hidden  # (F/T: each member's columns)
        lo, hi = slice(0, f), slice(f, 2 * f)
        fields: list[tuple[int, slice | None, int | None]] = [(0, lo, 2), (0, hi, 2), (1, None, 1)]
        if num_stored > 2:
            fields += [(2, lo, 1), (2, hi, 1), (3, None, None)]
        return fields

    def _gather_table(self) -> tuple[Tensor, int]:
        """gather_global_experts' slot table (int64 [E] on the host, :meth:`_slot_table`) and its number L of
        logical experts (at least the table's largest id + 1; without a placement the layer's logical experts, the
        slots past them, which no token reaches, marked empty)."""
        table = torch.tensor(self._slot_table(), dtype=torch.int64)
        if self.phys_to_log is None:
            num = min(self.num_logical_experts, self.num_experts)
            return torch.where(table < num, table, -1), num
        return table, max(self.num_logical_experts, int(table.max()) + 1)

    def _gather_piecewise(
        self, what: str, stored: list[Tensor], dst: int | None, device: torch.device | str | None
    ) -> tuple[Tensor, ...] | None:
        """gather_global_experts with ``dst`` or ``device``: one rank's slots at a time to the receiving ranks (all
        with ``dst`` None), each piece moved to ``device`` (the weights' by default) before the next. ``stored``:
        the per-slot tensors to gather (w13, w2[, b13, b2])."""
        c = self.buffer.ctx
        group, n, me = c.group, c.num_ranks, c.rank
        if dst is not None and (not isinstance(dst, int) or isinstance(dst, bool) or not 0 <= dst < n):
            raise ArgumentError(f"{what}: argument 'dst' must be None or a rank of the Buffer's group (an int in "
                                f"[0, {n})), got {dst!r}")
        try:
            out_dev = torch.device(device) if device is not None else stored[0].device
        except (RuntimeError, TypeError) as exc:
            raise ArgumentError(f"{what}: argument 'device' must be None or a torch.device (or its name, e.g. "
                                f"\"cpu\"), got {device!r} ({_collective.first_line(exc)})") from None
        tp = self.expert_tp if self.expert_tp is not None and self.expert_tp.size > 1 else None
        e_l, h, big_f = self.num_local_experts, self.hidden, self.ffn_hidden
        table, num = self._gather_table()
        fields = self._gather_fields(len(stored))
        shapes = [(num, h, big_f), (num, h, big_f), (num, big_f, h), (num, big_f), (num, big_f), (num, h)]
        # the receiving ranks: every rank, or EP rank dst (with expert TP, its TP group's member 0)
        receives = dst is None or (me == dst and (tp is None or tp.rank == 0))
        outs: tuple[Tensor, ...] | None = None
        alloc_error: BaseException | None = None
        if receives:  # (before anything moves: a result that does not fit refuses the call on every rank)
            try:
                outs = tuple(torch.zeros(shape, dtype=stored[i].dtype, device=out_dev)
                             for shape, (i, _, _) in zip(shapes, fields, strict=False))
            except RuntimeError as exc:  # (torch.OutOfMemoryError too)
                alloc_error = exc
        self._gather_agree(what, table, dst, alloc_error, out_dev, stored, tp)
        first: dict[int, int] = {}  # each logical expert's lowest slot: its value; the others are replicas
        for slot, e in enumerate(table.tolist()):
            if e >= 0:
                first.setdefault(e, slot)
        bad: tuple[int, int, int] | None = None  # the first replica that differs: (expert, its first slot, slot)
        f = self.experts.ffn_hidden  # (F/T: each member's columns)
        for s in range(n):
            parts = self._gather_piece(what, s, stored, dst, out_dev, tp)
            if parts is None or outs is None:
                continue
            for k in range(e_l):
                slot, e = s * e_l + k, int(table[s * e_l + k])
                if e < 0:
                    continue
                # expert e's values by the member whose columns hold them: (result's view, received view)
                views = []
                for j, member in enumerate(parts):
                    for out, (i, half, dim) in zip(outs, fields, strict=True):
                        if dim is None and j > 0:
                            continue  # (the first member's whole)
                        src = member[i][k] if half is None else member[i][k][..., half]
                        views.append((out[e] if dim is None else out[e].narrow(dim - 1, j * f, f), src))
                if first[e] == slot:
                    for o, p in views:
                        o.copy_(p)
                elif bad is None and not all(torch.equal(o, p) for o, p in views):
                    bad = (e, first[e], slot)
            del parts  # (freed before the next piece arrives)
        if dst is not None:  # the receiver's verdict to every rank (every rank saw the same data without dst)
            verdict = torch.tensor([1, *bad] if bad is not None else [0, 0, 0, 0], dtype=torch.int64)
            verdict = verdict.to(stored[0].device)
            if n > 1:  # (EP group 0's ranks; then each TP group, which has one member there)
                _collective.all_reduce(verdict, group, what)
            if tp is not None:
                _collective.all_reduce(verdict, tp.group, what)
            got = [int(v) for v in verdict.cpu().tolist()]
            bad = (got[1], got[2], got[3]) if got[0] else None
        if bad is not None:
            raise _replicas_differ(what, *bad, e_l)
        return outs if receives else None

    def _gather_agree(
        self, what: str, table: Tensor, dst: int | None, alloc_error: BaseException | None, out_dev: torch.device,
        stored: list[Tensor], tp: ExpertTP | None,
    ) -> None:
        """Before _gather_piecewise moves anything: every rank of the Buffer's group holds the same placement,
        gives the same ``dst`` and the tensors' dtypes, and the receiver made its result (``alloc_error``: why
        not); refused on every rank alike (with expert TP: a refusal in one EP group reaches every TP group
        through its member there, and from it every EP group)."""
        c = self.buffer.ctx
        n = c.num_ranks
        dev = stored[0].device
        dtypes = list(_DTYPE_CODES)
        codes = [dtypes.index(t.dtype) if t.dtype in dtypes else -2 for t in stored]
        mine = torch.cat([table, torch.tensor([-1 if dst is None else dst, int(alloc_error is not None), *codes])])
        every = [t.cpu() for t in _collective.all_gather(mine.to(dev), c.group, what)] if n > 1 \
            else [mine]
        # (every rank of the EP group reads the same gathered rows: the same verdict)
        k = table.numel()
        dsts = [int(t[k]) for t in every]
        why, code = None, 0
        try:
            _same_tables(what, [t[:k] for t in every])
        except ArgumentError as exc:
            why, code = str(exc), 1
        if code == 0 and dsts != [dsts[0]] * n:
            r = next(r for r, d in enumerate(dsts) if d != dsts[0])
            why, code = (f"{what}: the ranks gave different 'dst': rank {r} {_dst_name(dsts[r])}, rank 0 "
                         f"{_dst_name(dsts[0])}: every rank must give the same"), 2
        for i, arg in enumerate(("w13", "w2", "b13", "b2")[: len(stored)]):
            kinds = [int(t[k + 2 + i]) for t in every]
            if code == 0 and kinds != [kinds[0]] * n:
                r = next(r for r, d in enumerate(kinds) if d != kinds[0])
                why, code = (f"{what}: argument '{arg}' is {_dtype_name(kinds[r])} on rank {r}, "
                             f"{_dtype_name(kinds[0])} on rank 0: every rank must give the same dtype"), 3
        refused = [r for r, t in enumerate(every) if int(t[k + 1])]
        if code == 0 and refused:
            code = 4
            why = (f"{what}: the receiving rank {refused[0]} could not make the result on its device "
                   f"({_collective.first_line(alloc_error)[:300]})" if alloc_error is not None else
                   f"{what}: the receiving rank {refused[0]} could not make the result on its device {out_dev} "
                   "(see its error); nothing was moved")
        if tp is not None:  # every TP group has a member in the EP group that refused
            verdicts = _collective.all_gather(torch.tensor([code, dsts[0]]).to(dev), tp.group, what)
            verdicts = [v.cpu() for v in verdicts]
            if code == 0 and any(int(v[0]) for v in verdicts):
                j = next(j for j, v in enumerate(verdicts) if int(v[0]))
                code, why = int(verdicts[j][0]), (
                    f"{what}: refused in the EP group of TP member {j} ({_GATHER_REFUSALS[int(verdicts[j][0])]}); "
                    "see the error on its ranks")
            elif code == 0 and any(int(v[1]) != dsts[0] for v in verdicts):
                j = next(j for j, v in enumerate(verdicts) if int(v[1]) != dsts[0])
                code, why = 2, (f"{what}: the TP group's members gave different 'dst': member {j} "
                                f"{_dst_name(int(verdicts[j][1]))}, member {tp.rank} {_dst_name(dsts[0])}: every "
                                "rank must give the same")
        if code == 0:
            return
        if code == 4 and alloc_error is not None:
            raise alloc_error
        assert why is not None
        raise (PeerRefusedError if code == 4 else ArgumentError)(why)

    def _gather_piece(
        self, what: str, s: int, stored: list[Tensor], dst: int | None, out_dev: torch.device, tp: ExpertTP | None,
    ) -> list[tuple[Tensor, ...]] | None:
        """EP rank ``s``'s slots of the ``stored`` tensors (w13, w2[, b13, b2]) on ``out_dev``, as each TP member
        holds them ([(w13, w2, ...)] without expert TP), on the receiving ranks (None on the others): sent to
        ``dst`` (broadcast to every rank with ``dst`` None), then the TP group's shards gathered (to member 0 with
        ``dst``). One tensor at a time, each moved to ``out_dev`` before the next arrives."""
        c = self.buffer.ctx
        me = c.rank
        if dst is not None and me != dst and me != s:
            return None  # (neither sends nor receives this piece)
        moved: list[list[Tensor]] = []
        for mine in stored:
            piece = mine.detach().contiguous() if me == s else torch.empty_like(
                mine, memory_format=torch.contiguous_format)
            if dst is None and c.num_ranks > 1:
                _collective.broadcast(piece, s, c.group, what)
            elif dst is not None:
                _collective.send_recv(piece, s, dst, c.group, what)
            if dst is not None and me != dst:
                continue  # (sent)
            if tp is None:
                moved.append([piece.to(out_dev)])
                continue
            # every member's columns of the piece (to member 0 only, with dst)
            parts = _collective.all_gather(piece, tp.group, what) if dst is None else \
                _collective.gather(piece, 0, tp.group, what)
            del piece
            moved.append([p.to(out_dev) for p in parts] if parts is not None else [])
            del parts
        if len(moved) < len(stored) or not moved[0]:
            return None
        return list(zip(*moved, strict=True))

    def local_experts(
        self, w1: Tensor, w3: Tensor, w2: Tensor, b1: Tensor | None = None, b3: Tensor | None = None,
        b2: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """This rank's slots of global per-expert tensors (w1/w3 [L, H, F], w2 [L, F, H], e.g. from
        :meth:`gather_global_experts`) as (w13 [E_l, H, 2F/T], w2 [E_l, F/T, H]): what :meth:`load_global_experts`
        copies into the weights, for other per-slot tensors such as the optimizer's state of ``experts.w13`` and
        ``experts.w2`` (empty slots zero). Experts with biases (``expert_mlp_bias``) take b1/b3 [L, F] and b2
        [L, H] too and give (w13, w2, b13 [E_l, 2F/T], b2 [E_l, H]). Not collective; the shapes are checked as
        there."""
        p = self._slots_of("local_experts", w1, w3, w2, self.phys_to_log, (b1, b3, b2))
        mine = (torch.cat([p[0], p[1]], dim=2), p[2])
        return mine if len(p) == 3 else (*mine, torch.cat([p[3], p[4]], dim=1), p[5])

    # -- re-placement -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_placement(self, placement: Any, *, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Moves the layer's experts to ``placement`` in place, on the same ranks: a re-plan during training
        (docs/usage.md, "Moving experts to a new placement during training"). Collective: every rank of the
        Buffer's group (and with expert TP of the TP group) must call it, with the same placement. Waits on the
        host.

        ``placement``: a ``largeep.placement.Placement`` (or one shaped like it) with this layer's logical experts
        and the Buffer's slots (its topology's GPUs, slots and GPUs per node as the constructor checks them), or
        None: slot s holds expert s, as a layer built without a placement (its slots beyond the logical experts
        come back zero). A layer that routes by another callable cannot move (its slots' experts are not known),
        nor can one move to such a callable.

        Each slot's weights (``experts.w13``, ``experts.w2``, and ``b13``, ``b2`` with biases) are copied into the
        same Parameter objects
        (``param.data``), from a slot that held the slot's new expert: on the same rank where it held one (no
        transfer), else from one of its replicas' ranks through an all-to-all over the Buffer's group (each
        expert sent once to each rank that needs it, the sends spread over its replicas' ranks); a slot whose
        expert had no slot comes back zero. ``optimizer``: every per-parameter state tensor it holds for those
        parameters with one row per slot moves alike: the parameter's shape (Adam's ``exp_avg``/``exp_avg_sq``,
        SGD's ``momentum_buffer``) or that shape with sizes after the first reduced to 1 (Adafactor's ``row_var``
        / ``col_var``); scalars (``step``) are left as they are, and the optimizer keeps working without a rebuild.
        A state tensor of another shape is refused (it cannot follow the slots).
        Memory: per moved tensor a rank holds at most the rows it sends, the rows it receives (one per expert it
        gains, at most its slots) and its local copies besides its own tensor; no rank gathers the group's experts.

        Then everything that depends on the placement follows it, as the constructor sets it: ``phys_to_log`` (so
        ``slot_experts`` of the state dict), the routing (the placement's tables prepared on the Buffer's device),
        the gate's replica counts (``set_replicas`` of the placement's ``replica_count``; all ones for None) and,
        where the gate limited tokens to the old placement's home nodes (node-limited routing), its groups
        (``set_groups`` of the new ``home_node()``; moving to None leaves the groups as they are, no longer
        nodes), and the experts' seeded initialisation (``experts.reset_parameters()`` draws each slot's new
        expert). Layers made by :meth:`for_buffer` (from this layer or from the layer it was made from) share the
        experts and the gate, and are re-routed with it. A compiled forward recompiles; a captured CUDA graph
        must be captured again (it holds the old tables).

        Refused with ``ArgumentError`` on every rank before anything moves (the refusing rank's own error names
        the argument; the others name that rank): a placement of other sizes; ranks (or expert-TP members) whose
        placements differ, new or current (``_same_tables``' message, naming the first rank and slot); replicas of
        an expert that differ in any tensor that moves (compared bit for bit on the rank of its first replica,
        an all-to-all of the other replicas: ``allreduce_replica_grads`` keeps them equal); an optimizer that does
        not hold the experts' parameters, or whose per-slot state differs between ranks (other keys, dtypes or
        devices); a state tensor on another device than the weights, or of a shape that is neither scalar nor per
        slot. Gradients: refused where one of those parameters holds a non-zero ``.grad`` (None or all
        zeros is fine, and stays so): a grad means a slot's share before ``allreduce_replica_grads`` and its
        expert's sum after it, so a move would be right for one and double-count the other; move between steps
        (after ``optimizer.step()`` and ``zero_grad()``).
        """
        what = "MoELayer.set_placement"
        c = self.buffer.ctx
        e_l, n = self.num_local_experts, c.num_ranks
        weights = {f"experts.{name}": prm for name, prm in self.experts.named_parameters()}  # (w13, w2[, b13, b2])
        error: str | None = None
        local: Exception | None = None
        new: list[int] = []
        moving: list[tuple[str, Tensor]] = []  # what moves, in the same order on every rank
        regroup: Tensor | None = None
        try:
            new, regroup = self._check_new_placement(what, placement)
            moving = self._moving_tensors(what, weights, optimizer)
        except Exception as exc:  # noqa: BLE001 - any refusal (a TypeError of an odd placement too) reaches the others
            local, error = exc, str(exc) or type(exc).__name__
        old = self._slot_table()
        signature = [(name, str(t.dtype), t.device.type) for name, t in moving]
        rows = (_collective.all_gather_object((error, old, new, signature), c.group, what, _env.settings().timeout_s)
                if n > 1 else [(error, old, new, signature)])
        verdict = error if error is not None else _set_placement_verdict(what, rows)
        verdict = self._agreed(what, verdict, (old, new))
        if local is not None:
            raise local
        if verdict is not None:
            raise ArgumentError(verdict)
        old_t, new_t = torch.tensor(old, dtype=torch.int64), torch.tensor(new, dtype=torch.int64)
        # replicas must be equal in everything that moves (each new slot copies one of them)
        differ = self._differing_replicas(what, old_t, moving)
        verdict = self._agreed(what, differ, None, gather=n > 1)
        if verdict is not None:
            raise ArgumentError(verdict)
        # (from here on nothing is refused: every rank moves)
        sources, plan = _slot_moves(old_t, new_t, e_l, n, self.rank)
        for _, t in moving:
            self._move_slots(what, t, sources, plan)
        set_replicas = getattr(self.gate, "set_replicas", None)
        if callable(set_replicas):
            counts = getattr(placement, "replica_count", None) if placement is not None else \
                torch.ones(self.num_logical_experts, dtype=torch.int64)
            if counts is not None:
                set_replicas(counts)
        if regroup is not None:
            self.gate.set_groups(regroup)  # type: ignore[operator]
        for layer in self._shares_experts():
            lc = layer.buffer.ctx
            layer._use_placement(placement, _wrap_placement(placement, lc.rank, lc.device))
        seeded = self.experts._seeded
        if seeded is not None:  # (reset_parameters draws each slot's new expert, as a layer built so would)
            self.experts._seeded = (self._slot_experts(), seeded[1], seeded[2], seeded[3])

    def _shares_experts(self) -> list[MoELayer]:
        """This layer and the live layers of its family (``for_buffer``) that compute with its experts (a deep
        copy of the model holds the family's references but its own experts: not the copy's)."""
        family = [ref() for ref in self._family]
        return [self] + [m for m in family if m is not None and m is not self and m.experts is self.experts]

    def _slot_table(self) -> list[int]:
        """The logical expert of every slot of the group (-1: empty): the placement's table, else the identity."""
        if self.phys_to_log is None:
            return list(range(self.num_experts))
        return [int(e) for e in self.phys_to_log.cpu().tolist()]

    def _check_new_placement(self, what: str, placement: Any) -> tuple[list[int], Tensor | None]:
        """set_placement's local checks of ``placement`` -> (its table, the gate's new groups or None)."""
        c = self.buffer.ctx
        if self._placement_arg is not None and not _is_placement(self._placement_arg):
            raise ArgumentError(
                f"{what}: this layer routes by a callable placement, whose slots' experts are not known, so they "
                "cannot move: build a layer with the new placement and load_global_experts into it"
            )
        if placement is None:
            return list(range(self.num_experts)), None
        if not _is_placement(placement):
            raise ArgumentError(
                f"{what}: argument 'placement' must be None or a largeep.placement.Placement (a table of the slots' "
                f"experts, which the weights follow), got {type(placement).__name__}"
            )
        try:
            num = _logical_experts(c, placement, None)
        except ArgumentError as exc:
            raise ArgumentError(str(exc).replace("MoELayer:", f"{what}:", 1)) from None
        if num != self.num_logical_experts:
            raise ArgumentError(
                f"{what}: argument 'placement' has {num} logical experts; this layer has {self.num_logical_experts} "
                "(its gate chooses among them)"
            )
        table = placement.phys_to_log
        if not (checks.integer_tensor(table) and tuple(table.shape) == (self.num_experts,)):
            raise ArgumentError(
                f"{what}: argument 'placement' has phys_to_log {_kind(table)}, expected an integer tensor "
                f"[{self.num_experts}] (the Buffer's physical experts: the logical expert of each slot, -1 empty)"
            )
        host = table.detach().to("cpu", torch.int64)
        if host.numel() and (int(host.min()) < -1 or int(host.max()) >= num):
            raise ArgumentError(f"{what}: argument 'placement' has phys_to_log values outside [-1, {num})")
        gate = self.gate
        counts = getattr(placement, "replica_count", None)
        check_replicas = getattr(gate, "_check_replicas", None)
        if counts is not None and callable(check_replicas):
            try:
                check_replicas(counts)
            except ArgumentError as exc:
                raise ArgumentError(f"{what}: argument 'placement': its replica_count is refused by the gate: "
                                    f"{exc}") from None
        regroup = None
        if self._limits_nodes() and hasattr(placement, "home_node") and callable(getattr(gate, "set_groups", None)):
            # (the gate's groups were the old placement's home nodes: they become the new one's)
            regroup = placement.home_node()
            check_groups = getattr(gate, "_check_groups", None)
            if callable(check_groups):
                try:
                    check_groups(regroup)
                except ArgumentError as exc:
                    raise ArgumentError(
                        f"{what}: argument 'placement': the gate limits tokens to its home nodes (node-limited "
                        f"routing), and its home_node() gives groups the gate refuses: {exc}"
                    ) from None
        return [int(e) for e in host.tolist()], regroup

    def _moving_tensors(
        self, what: str, weights: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer | None
    ) -> list[tuple[str, Tensor]]:
        """set_placement's tensors to move (name, tensor): the weights' data, then the optimizer's per-slot state
        of each, by key; refuses non-zero grads, a foreign optimizer, state on another device."""
        out: list[tuple[str, Tensor]] = []
        for name, p in weights.items():
            if p.grad is not None and bool(p.grad.any()):
                raise ArgumentError(
                    f"{what}: {name} holds a non-zero .grad: move between steps (after optimizer.step() and "
                    "zero_grad()): a grad before allreduce_replica_grads is a slot's share, after it the expert's "
                    "sum, and moved to other replicas it would be counted again"
                )
            out.append((name, p.data))
        if optimizer is None:
            return out
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ArgumentError(f"{what}: argument 'optimizer' must be None or a torch.optim.Optimizer, got "
                                f"{type(optimizer).__name__}")
        held = {id(q) for group in optimizer.param_groups for q in group["params"]}
        for name, p in weights.items():
            if id(p) not in held:
                raise ArgumentError(f"{what}: argument 'optimizer' does not optimize this layer's {name}, so its "
                                    "state cannot follow the weights: pass the optimizer that holds them")
            for key, v in sorted(optimizer.state.get(p, {}).items(), key=lambda kv: str(kv[0])):
                if not isinstance(v, Tensor) or v.dim() == 0 or (v.numel() == 1 and v.dim() != p.dim()):
                    continue  # (step and other scalars stay)
                # per slot: the parameter's shape (Adam's moments), or one row of each slot in its layout whose
                # other sizes are reduced (Adafactor's row_var [E_l, H, 1] and col_var [E_l, 1, 2F])
                if v.dim() != p.dim() or v.shape[0] != p.shape[0] or any(
                        a not in (b, 1) for a, b in zip(v.shape[1:], p.shape[1:], strict=True)):
                    raise ArgumentError(
                        f"{what}: argument 'optimizer' holds {name}'s state {key!r} of shape {tuple(v.shape)}, neither "
                        f"a scalar nor per slot ({tuple(p.shape)}, or that with sizes after the first reduced to 1), "
                        "so it cannot follow the slots; move a layer whose optimizer keeps no such state"
                    )
                if v.device != p.device:
                    raise ArgumentError(
                        f"{what}: argument 'optimizer' holds {name}'s state {key!r} on {v.device}, the weights are on "
                        f"{p.device}: the state moves with the weights, over the same group"
                    )
                out.append((f"optimizer state {key!r} of {name}", v))
        return out

    def _agreed(self, what: str, verdict: str | None, tables: tuple[list[int], list[int]] | None,
                gather: bool = False) -> str | None:
        """A verdict every rank of the Buffer's group and of the expert-TP group shares. ``verdict``: this rank's
        (already shared over the Buffer's group, unless ``gather``: then it is gathered there first). With expert
        TP, the members' verdicts and ``tables`` (current, new) go over the TP group, and the result over the
        Buffer's group again (a refusal in one EP group reaches every TP group through its members, and from
        them every EP group)."""
        c = self.buffer.ctx
        timeout = _env.settings().timeout_s
        if gather:
            every = _collective.all_gather_object(verdict, c.group, what, timeout)
            refused = [r for r, v in enumerate(every) if v is not None]
            if verdict is None and refused:
                verdict = every[refused[0]]
        tp = self.expert_tp
        if tp is None or tp.size == 1:
            return verdict
        members = _collective.all_gather_object((verdict, tables), tp.group, what, timeout)
        if verdict is None:
            for j, (v, t) in enumerate(members):
                if v is not None:
                    verdict = f"{what}: member {j} of the expert-TP group refused: {v}"
                    break
                if t != tables:
                    verdict = (f"{what}: member {j} of the expert-TP group holds (or moves to) another placement "
                               f"than member {tp.rank}: every member must hold and move to the same one")
                    break
        if c.num_ranks > 1:
            every = _collective.all_gather_object(verdict, c.group, what, timeout)
            refused = [r for r, v in enumerate(every) if v is not None]
            if verdict is None and refused:
                verdict = every[refused[0]]
        return verdict

    def _differing_replicas(self, what: str, old: Tensor, moving: list[tuple[str, Tensor]]) -> str | None:
        """Compares every replica of an expert (slots of ``old`` holding it) with its first, bit for bit, in each
        tensor of ``moving``, on the first's rank (the others' rows sent there by one all-to-all per tensor);
        -> this rank's refusal naming the first difference found, or None."""
        e_l, n, rank = self.num_local_experts, self.buffer.ctx.num_ranks, self.rank
        first: dict[int, int] = {}
        pairs: list[tuple[int, int]] = []  # (first slot, other slot) of each replica, in slot order
        for s, e in enumerate(old.tolist()):
            if e < 0:
                continue
            if e in first:
                pairs.append((first[e], s))
            else:
                first[e] = s
        if not pairs:
            return None
        sends = [(s // e_l, s % e_l, f // e_l) for f, s in pairs]  # (source rank, its slot, destination rank)
        differ: str | None = None
        for name, t in moving:  # (every tensor's exchange, whatever is found: the others make them all)
            got = _send_rows(what, t, sends, rank, n, self.buffer.ctx.group)
            for i, (f, s) in enumerate(pairs):
                if differ is not None or f // e_l != rank:
                    continue
                other = t[s % e_l] if s // e_l == rank else got[i]
                if not torch.equal(t[f % e_l], other):
                    differ = (f"{what}: the replicas of logical expert {int(old[f])} differ in {name} (slots {f} and "
                              f"{s}, of ranks {f // e_l} and {s // e_l}), so there is no one value to move: keep them "
                              "equal (allreduce_replica_grads after each backward, load_global_experts after "
                              "loading)")
        return differ

    def _move_slots(self, what: str, t: Tensor, sources: list[tuple[str, int]], plan: list[tuple[int, int, int]]
                    ) -> None:
        """Rewrites this rank's slots of ``t`` [E_l, ...] in place: ``sources[j]`` says where new slot j's rows come
        from ("local", an old slot of this rank), ("recv", an index into ``plan``) or ("zero", -1); ``plan``: the
        group's transfers (source rank, its slot, destination rank), the same on every rank."""
        got = _send_rows(what, t, plan, self.rank, self.buffer.ctx.num_ranks, self.buffer.ctx.group)
        local = [(j, s) for j, (kind, s) in enumerate(sources) if kind == "local"]
        kept = t[[s for _, s in local]] if local else None  # (copies: read before any slot is written)
        for j, (kind, i) in enumerate(sources):
            if kind == "zero":
                t[j].zero_()
            elif kind == "recv":
                t[j].copy_(got[i])
        if kept is not None:
            for row, (j, _) in enumerate(local):
                t[j].copy_(kept[row])

    # -- routing ----------------------------------------------------------------------------------------------
    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, H] -> (physical topk_idx int64 [T, K], topk_weights float32 [T, K]); stores the gate's aux loss.
        x is checked first (either mode: the low-latency dispatch sends bf16 of any float input)."""
        checks.tensor("MoELayer", "x", x, dtypes=checks.FLOAT_DTYPES, ndim=2, device=None, shape=(None, self.hidden),
                      contiguous=False)
        out = self.gate(x)
        if isinstance(out, (tuple, list)) and len(out) >= 2:
            idx, w = out[0], out[1]
        elif hasattr(out, "topk_idx") and hasattr(out, "topk_weights"):
            idx, w = out.topk_idx, out.topk_weights
            self.aux_loss = getattr(out, "aux_loss", None)
        else:
            raise ArgumentError(f"MoELayer: argument 'gate' returned {_kind(out)}, expected (topk_idx, topk_weights) "
                                "or an object with those attributes")
        if not checks.integer_tensor(idx):
            raise ArgumentError(f"MoELayer: argument 'gate' returned topk_idx as {_kind(idx)}, expected an integer "
                                "tensor (int64)")
        if not isinstance(w, Tensor) or not w.dtype.is_floating_point:
            raise ArgumentError(f"MoELayer: argument 'gate' returned topk_weights as {_kind(w)}, expected a float "
                                "tensor")
        want = (x.shape[0], self.topk)
        if not torch.compiler.is_compiling():  # (the dispatch checks them too, naming its own arguments)
            for name, t in (("topk_idx", idx), ("topk_weights", w)):
                if tuple(t.shape) != want:
                    raise ArgumentError(f"MoELayer: argument 'gate' returned {name} of shape {tuple(t.shape)}, "
                                        f"expected {want} (x's tokens, the Buffer's num_topk)")
        if self.placement is not None:
            # a Placement keeps each token on its own node and its experts' home nodes where the gate limits groups
            idx = self.placement(idx, self._limits_nodes()) if self._by_replicas else self.placement(idx)
            if not checks.integer_tensor(idx) or (not torch.compiler.is_compiling() and tuple(idx.shape) != want):
                raise ArgumentError(f"MoELayer: argument 'placement' returned {_kind(idx)}, expected an integer "
                                    f"tensor (int64) of shape {want}: the physical expert of each choice")
        return idx.to(torch.int64).contiguous(), w.float().contiguous()

    def _limits_nodes(self) -> bool:
        """_node_limited for the gate's current groups (decided again when ``set_groups`` or a state dict replaced
        them: the gate then holds a new host copy; a Python identity test, nothing traced)."""
        groups = getattr(self.gate, "_host_groups", None)
        if groups is not self._groups_seen:
            self._groups_seen = groups
            self._limited = _node_limited(self.gate, self._placement_obj)
        return self._limited

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """x [T, H] (bf16/fp32; T <= max_tokens_per_rank per chunk, and per call in low-latency mode) -> [T, H] in
        x's dtype. Normal mode waits on the host for each chunk's count exchange unless ``num_worst_tokens`` > 0;
        low-latency mode has no count exchange, but an eager call waits for its dispatch's expert-id check (not
        inside a CUDA graph), and a placement's ``route`` waits on the host (its ``table_route``, taken under
        capture and compile, does not). Low-latency mode sends the tokens and the experts' outputs as bf16 and
        combines into bf16 whatever x's dtype (the shared experts compute in their weights' dtype and are added in
        x's): a float32 layer's decode output carries those roundings (docs/usage.md, "Serving: prefill and decode")."""
        self._check_ddp()
        self._check_fsdp()
        if self.low_latency:
            state = self._ll_send(x, hooks=False)
            self._ll_experts(state)
            return self._ll_finish(state)
        idx, w = self.route(x)
        return self._forward_normal(x, idx, w)

    def _check_ddp(self) -> None:
        """Refuses a forward inside a ``DistributedDataParallel`` that reduces this layer's expert weights over
        ranks that hold other experts (or other shards of them): DDP's construction copied rank 0's experts over
        every rank's, and its backward would average different experts' grads. A DDP over ranks that hold the
        same slots (data-parallel copies of the expert-parallel group) is fine. Eager only; checked once per DDP."""
        if torch.compiler.is_compiling():
            return
        ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
        if ddp is None or (self._ddp_seen is not None and self._ddp_seen() is ddp):
            return
        mine = {id(p) for p in self.experts.parameters()}
        if any(id(p) in mine for p in getattr(ddp, "_module_parameters", ())):
            shared = self._ranks_of_my_groups(dist.get_process_group_ranks(ddp.process_group))
            if shared:
                raise ArgumentError(
                    "MoELayer: this layer runs inside a DistributedDataParallel whose process group holds ranks "
                    f"{shared[:8]} of the layer's expert-parallel (or expert-TP) group, and that DDP "
                    "reduces the layer's expert weights: its construction copied rank 0's experts over every "
                    "rank's, and its backward would average the grads of different experts. Call "
                    "largeep.layers.ddp_ignore_experts(model) before DistributedDataParallel(model), or keep "
                    "the experts out of the DDP module (docs/usage.md, \"Gradients the layer leaves to you\")"
                )
        self._ddp_seen = weakref.ref(ddp)

    def _check_fsdp(self) -> None:
        """Refuses a forward of a layer whose routed experts an FSDP2 ``fully_shard`` manages over a mesh that holds
        several ranks of the layer's expert-parallel (or expert-TP) group: it cut each rank's own expert tensor and
        gathers the slices of different ranks' experts, so the layer would compute with a mix of them (and FSDP
        would average different experts' grads). The forward sees plain tensors there, so the check asks torch's
        registry of composable states which FSDP parameters live on this layer's experts. Eager only; checked again
        only when fully_shard (or another composable API) has been applied since (the registry's size or its newest
        entry changed: a module sharded after one was collected keeps the size); a no-op on a torch without that
        registry."""
        if torch.compiler.is_compiling():
            return
        managers = _fsdp_managers()
        if managers is None:
            return
        key = _registry_key(managers)
        seen = self._fsdp_seen
        if seen is not None and key[0] == seen[0] and key[1] is seen[1]:
            return
        mine = {id(m) for m in self.experts.modules()}
        for mesh_ranks, name in _fsdp_params_on(managers, mine):
            shared = self._ranks_of_my_groups(mesh_ranks)
            if shared:
                raise ArgumentError(
                    f"MoELayer: FSDP2 (fully_shard over a module holding this layer) manages experts.{name} over "
                    f"a mesh holding ranks {shared[:8]} of the layer's expert-parallel (or expert-TP) "
                    "group: each of those ranks' slots hold other experts, so FSDP would gather a mix of them "
                    "into the layer and average different experts' grads; leave them out, fully_shard(model, "
                    "ignored_params=<the experts' parameters>) (docs/usage.md, \"Gradients the layer leaves to "
                    "you\")"
                )
        self._fsdp_seen = key

    def _ranks_of_my_groups(self, ranks: Iterable[int]) -> list[int]:
        """The global ``ranks`` (a DDP's group, an FSDP mesh) that share this layer's expert-parallel group, or its
        expert-TP group, with at least one other of them (sorted; the first such group's): ranks that hold other
        experts, or other shards of them. Empty when each of the layer's groups holds at most one of them."""
        ranks = set(ranks)
        groups = [self.buffer.ctx.group] + ([self.expert_tp.group] if self.expert_tp is not None else [])
        for g in groups:
            shared = ranks & set(dist.get_process_group_ranks(g))
            if len(shared) > 1:
                return sorted(shared)
        return []

    def _forward_normal(self, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return self._forward_chunks(x, idx, w, [])
        sent: list[tuple[int, Tensor]] = []
        try:
            return self._forward_chunks(x, idx, w, sent)
        except BaseException as exc:
            if not _recomputation_stopped(exc):
                _release_dispatches(sent)
            raise

    def _forward_chunks(self, x: Tensor, idx: Tensor, w: Tensor, sent: list[tuple[int, Tensor]]) -> Tensor:
        """The chunked schedule; ``sent`` collects its custom-op dispatches' tickets (for
        :func:`_release_dispatches` on an error)."""
        n = self.num_chunks
        x = x.contiguous()  # (a strided x copied once, before the event the dispatches wait for)
        # chunk views that start at an address not 16-byte aligned are copied now, before that event, not in
        # send_chunk, whose copy would queue behind the previous chunk's experts on this stream
        xs = [ops._row_aligned(v) for v in _split_rows(x, n)]
        idxs, ws = _split_rows(idx, n), _split_rows(w, n)
        ready = ops.capture_event(x.device)  # the gate's outputs exist: dispatches wait for this only
        pending: list[ops.DispatchOutput | None] = [self.send_chunk(xs[0], idxs[0], ws[0], ready)]
        _sent(sent, self.buffer_id, pending[0])  # type: ignore[arg-type]
        shared = self.shared_experts(x) if self.shared_experts is not None else None  # overlaps the first dispatch
        carveout = self.overlap_carveout(x) if n > 1 else 0
        combined: list[ops.CombineOutput] = []
        for i in range(n):
            d = pending[i]
            assert d is not None
            y = self.experts_chunk(d, carveout)
            # Queue chunk i's experts before sending chunk i+1. That dispatch waits on the host (the count
            # exchange, behind combine i-1 on the Buffer's stream); with experts i already queued the GPU computes
            # meanwhile, and dispatch i+1 and combine i-1 overlap experts i. No id check makes the host wait for
            # experts i first: the backend checks the ids with the count exchange, on the Buffer's stream.
            if i + 1 < n:
                pending.append(self.send_chunk(xs[i + 1], idxs[i + 1], ws[i + 1], ready))
                _sent(sent, self.buffer_id, pending[-1])  # type: ignore[arg-type]
            combined.append(self.combine_chunk(y, d))
            # (without autograd nothing else holds the chunk's received rows: a zero-copy receive slot they sit in
            # is free for the next dispatch once its kernels are done, instead of at the end of the forward)
            pending[i] = d = None  # type: ignore[assignment]
        for c in combined:
            ops.wait(c.event)
        out = combined[0].x if n == 1 else torch.cat([c.x for c in combined])
        return out + shared if shared is not None else out

    # -- normal mode, one chunk in three steps (MoELayer's schedule above, and MoEPipeline's across layers) --------
    def send_chunk(self, x: Tensor, idx: Tensor, w: Tensor, ready: Any = None) -> ops.DispatchOutput:
        """Dispatches one chunk: x [t, H], idx int64 [t, K] physical ids, w float32 [t, K] (from :meth:`route`).
        ``ready``: an event (``ops.capture_event``) after which x, idx and w exist; the dispatch waits for it
        only (``async_finish``: wait on the result's event before using it). Waits on the host for the count
        exchange unless ``num_worst_tokens`` > 0; the ids are checked with it (largeep's backends send each
        rank's verdict with the counts, so a bad id on one rank voids the dispatch on every rank at once). A
        strided x, idx or w is copied first, on the current stream (so is an x that starts at an address not 16-byte
        aligned, as chunk views of a batch can on CUDA), and the dispatch then waits for the copies. With
        ``use_fp8`` the chunk travels as FP8 and its rows come back dequantised (``ops.dispatch(use_fp8=True)``).
        With ``bf16_partial_sums`` x must be bf16 (ArgumentError otherwise, before anything is sent); the dispatch's
        backward then combines x's gradient rows with bf16 partial sums. With expert TP a dispatch that raises is
        joined to the chunk's TP count exchange as a void row first, so
        that the TP partners (in other EP groups) raise too (:meth:`largeep.expert_tp.ExpertTP.dispatch_failed`)."""
        tp = self.expert_tp if self.expert_tp is not None and self.expert_tp.size > 1 else None
        if tp is not None:
            tp.begin_chunk()
        try:
            # (x copied too where it starts at an address not 16-byte aligned: a chunk's view of a batch whose rows
            # are not a multiple of 16 bytes)
            if self.bf16_partial_sums and x.dtype != torch.bfloat16:
                raise ArgumentError(
                    f"MoELayer: argument 'bf16_partial_sums' = True needs x in bfloat16 (the expert rows that its "
                    f"combines sum are in x's dtype), x is {x.dtype}"
                )
            # (while compiling no copy is made here: the custom ops copy a strided or misaligned x when they run, and
            # a contiguity test of a chunk would make Dynamo guard on the chunk's size)
            copies = not torch.compiler.is_compiling() and (
                ops._needs_row_copy(x) or not idx.is_contiguous() or not w.is_contiguous()
            )
            xc, idxc, wc = x, idx, w
            if copies:
                # the copies read x, idx and w, which exist after `ready` (made on another stream, in MoEPipeline):
                # the current stream waits for it first; and the dispatch then waits for the copies, queued after
                # `ready`
                ops.wait(ready)
                xc, idxc, wc = ops._row_aligned(x), idx.contiguous(), w.contiguous()
                if ready is not None:
                    ready = ops.capture_event(x.device)
            return ops.dispatch(
                self.buffer_id, xc, idxc, wc,
                num_worst_tokens=self.num_worst_tokens, previous_event=ready, async_finish=True,
                use_custom_ops=self.use_custom_ops, use_fp8=self.use_fp8, bf16_partial_sums=self.bf16_partial_sums,
            )
        except BaseException as exc:
            if tp is not None and not _recomputation_stopped(exc):
                # a refusal in this rank's EP group: the TP partners, in other EP groups, dispatched theirs and wait
                # in this chunk's count exchange; this rank joins it with a void row, so that every member raises
                # there and the TP group stays in step (expert_tp.ExpertTP.dispatch_failed)
                tp.dispatch_failed(exc, x, self.num_worst_tokens)
            raise

    def experts_chunk(self, d: ops.DispatchOutput, carveout: int = 0) -> Tensor:
        """The local experts (through the TP group with expert TP) on the rows of a :meth:`send_chunk`, on the
        caller's stream after the dispatch's event, under ``ops.sm_carveout(carveout)`` -> weighted rows [R, H]
        for :meth:`combine_chunk`. No host wait, except with expert TP and variable sizes (``num_worst_tokens`` 0:
        the TP group exchanges its row counts on the host), and where the grouped GEMM falls back to a padded bmm
        (no native grouped GEMM: float32 weights on CUDA, or a GPU other than sm90/sm100), which reads the row
        counts on the host (``ops.grouped_mm``)."""
        ops.wait(d.event)
        # The dispatch counts rows per expert: that is the number of (row, k) entries only where no token names an
        # expert twice, which a gate says with distinct_experts = True (the built-in ones) and a placement keeps
        # (none, or a Placement). Otherwise the entries are counted on the device (every one computed, a repeated
        # expert once per k).
        distinct = getattr(self.gate, "distinct_experts", False) is True and self._placement_keeps_distinct
        num_pairs = sum(d.num_tokens_per_expert) if d.num_tokens_per_expert is not None and distinct else None
        with ops.sm_carveout(carveout):
            if self.expert_tp is not None and self.expert_tp.size > 1:
                return self.expert_tp.forward_rows(
                    self.experts, d.x, d.topk_idx, d.topk_weights, num_pairs, self.num_worst_tokens
                )
            return self.experts.forward_rows(d.x, d.topk_idx, d.topk_weights, num_pairs)

    def combine_chunk(self, y: Tensor, d: ops.DispatchOutput) -> ops.CombineOutput:
        """Combines a chunk's expert rows y [R, H] home on the Buffer's stream (``async_finish``): wait on the
        result's event (``ops.wait``) before using its x [t, H]. The shared experts are not added. No host wait.
        With ``bf16_partial_sums``, each other node's partial sum comes home as bf16 (``ops.combine``)."""
        return ops.combine(self.buffer_id, y, d.handle, async_finish=True, bf16_partial_sums=self.bf16_partial_sums)

    def overlap_carveout(self, x: Tensor) -> int:
        """SMs the expert GEMMs of an overlapped schedule leave to the communication kernels running beside them
        (``overlap_sm_carveout``, default the Buffer's ``num_sms``; 0 on CPU and while compiling)."""
        if not x.is_cuda or torch.compiler.is_compiling():
            return 0
        if self.overlap_sm_carveout is not None:
            return self.overlap_sm_carveout
        return self.buffer.ctx.num_sms

    # -- low-latency mode, in three steps ---------------------------------------------------------------------
    @torch.no_grad()  # low-latency mode has no autograd: no partial gradients (the gate's alone) either
    def _ll_send(self, x: Tensor, hooks: bool) -> dict[str, Any]:
        idx, w = self.route(x)
        w = w.float().contiguous()
        # the weights travel with the tokens, and the experts' ranks sum each token's outputs (fewer bytes back
        # where a token has several experts on one rank); the combine gets this very w
        d = ops.low_latency_dispatch(
            self.buffer_id, x.to(torch.bfloat16).contiguous(), idx, use_fp8=self.ll_use_fp8,
            return_recv_hook=hooks, use_custom_ops=self.use_custom_ops,
            topk_weights=w if self.ll_send_weights else None,
            bf16_partial_sums=self.ll_send_weights and self.ll_bf16_partial_sums,
        )
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        return {"x": x, "idx": idx, "w": w, "d": d, "shared": shared, "hooks": hooks}

    @torch.no_grad()  # low-latency mode has no autograd: no partial gradients (the gate's alone) either
    def _ll_experts(self, st: dict[str, Any]) -> None:
        # (taken out of the state: the received rows [E/N, N*M, H] go once the combine is sent, not when the call
        # ends -- in TwoBatchOverlap that is after the other micro-batch's experts, beside which they took memory)
        d: ops.LowLatencyDispatchOutput = st.pop("d")
        if st["hooks"]:
            d.hook()
        # (FP8 slots: the layer's capacity of gathered rows is dequantised, not every slot of the fixed-size buffer)
        y = self.experts.forward_slots(d.x, d.num_tokens_per_expert, self.ll_capacity, d.scales)
        st["out"], st["hook"] = ops.low_latency_combine(
            self.buffer_id, y.to(torch.bfloat16), st["idx"], st["w"], d.handle, return_recv_hook=st["hooks"]
        )

    @torch.no_grad()  # low-latency mode has no autograd: no partial gradients (the gate's alone) either
    def _ll_finish(self, st: dict[str, Any]) -> Tensor:
        if st["hooks"]:
            st["hook"]()
        out = st["out"].to(st["x"].dtype)
        return out + st["shared"] if st["shared"] is not None else out

    def low_latency_steps(self, x: Tensor) -> Generator[None, None, Tensor]:
        """Low-latency forward as a generator that yields while its tokens travel (``return_recv_hook``): after
        the dispatch sends, and after the combine sends. Drive several with :func:`run_interleaved`; the value
        returned (``StopIteration.value``) is the output [T, H]. Eager only."""
        if not self.low_latency:
            raise ArgumentError("MoELayer.low_latency_steps: needs a Buffer created with low_latency=True")
        if self.use_custom_ops:
            raise ArgumentError(
                "MoELayer.low_latency_steps (and TwoBatchOverlap): receive hooks are eager-only; build the layer "
                "with use_custom_ops=False for the interleaved steps"
            )
        st = self._ll_send(x, hooks=True)
        due: Callable[[], None] | None = st["d"].hook  # the receive this rank owes its peers' sends
        try:
            yield
            due = None  # (_ll_experts calls it first)
            self._ll_experts(st)
            due = st["hook"]
            yield
            due = None
            return self._ll_finish(st)
        except (Exception, GeneratorExit):
            # closed (run_interleaved ends every generator when one raises) or failed between a send and its
            # receive: receive now, so the Buffer has no call left in flight; a receive that fails in turn (the
            # Buffer failed) leaves the first error to propagate. (Not on KeyboardInterrupt: a receive waits for
            # the peers, up to LARGEEP_TIMEOUT_S.)
            if due is not None:
                with contextlib.suppress(Exception):
                    due()
            raise


class MoEPipeline(nn.Module):
    """A stack of normal-mode :class:`MoELayer` whose chunks flow from one layer into the next without waiting for
    the rest of the batch.

    **The functions between the layers must be token-wise**: output row t of ``between[l](x, y)`` may depend only
    on row t of x and y (a residual add, RMSNorm or LayerNorm over H, an elementwise activation, a dense MLP over
    H). Anything that mixes tokens (attention, a batch statistic, a reshape across rows) makes the chunked result
    differ from the whole-batch one, silently. The same holds for the gates of the layers after the first (they
    run per chunk): the built-in :class:`LinearTopKRouter` is token-wise, a :class:`largeep.gate.TopKGate` with a
    ``capacity_factor`` is not (its capacity is per call, earlier tokens first). A gate's ``aux_loss`` is computed
    per chunk: :attr:`aux_losses` lists each layer's, and after a forward each layer's ``aux_loss`` is their mean
    weighted by the chunks' tokens (the whole batch's loss where the loss is a mean over tokens; a loss that
    multiplies such means, as the usual load-balancing loss does, is near it but not equal).

    Args:
        layers: L >= 1 normal-mode MoE layers of one hidden size H on one device (any Buffers; one layer may
            appear more than once). Their own ``num_chunks`` is not used here.
        between: None (layer l's output is layer l+1's input), or L-1 functions ``between[l](x_l, y_l) ->
            x_{l+1}`` taking layer l's input and output [t, H] to layer l+1's input [t, H] (e.g. a residual add
            and a norm), or L functions: the last one is applied after the last layer too. Modules among them
            are registered as submodules.
        num_chunks: C >= 1; the batch is split into C chunks (``tensor_split``: uneven sizes, empty chunks allowed).

    Schedule (a wavefront): step s runs chunk s - l through layer l, for every l, the shallow layers first; each
    (layer, chunk) is MoELayer's per-chunk steps (:meth:`MoELayer.send_chunk`, :meth:`MoELayer.experts_chunk`,
    :meth:`MoELayer.combine_chunk`). In issue order: the experts of one (layer, chunk), then the end of the one
    before it (wait for its combine, add its shared experts, ``between``, the next layer's gate on that chunk),
    then the dispatch of the next one (waiting only for its own gate's event), then this one's combine, on the
    Buffer's stream. So chunk i's dispatch into layer l+1 is issued while chunk i+1 is still in layer l's experts,
    and combines and dispatches of neighbouring chunks run beside the experts. On CUDA (C > 1, not compiling) the
    end of a (layer, chunk) -- the wait for its combine, the shared experts' sum, ``between``, the next layer's
    gate and shared experts on it -- runs on a side stream of the pipeline's own (same priority as the first
    layer's Buffer; one per device and priority), which waits for that combine only: so the next dispatch's gate,
    and with it the dispatch's count exchange that the host waits for, is queued behind the ends of earlier
    (layer, chunk)s (their shared experts included), not behind the routed experts' GEMMs on the caller's stream.
    The caller's stream waits for the side stream before the output is returned. A layer with ``use_custom_ops``
    keeps everything on the caller's stream (that path gives no events to order the streams by). Eagerly each
    (layer, chunk) costs the host about 1 ms of Python and launches on the 2-GPU machine (more than a 1024-token
    chunk's GPU work there: the pipeline was host-bound and slower than the layers one after another); with
    ``num_worst_tokens`` on every layer the whole call can be captured in a CUDA graph (docs/usage.md, "Chunks
    across layers"). C = 1 runs the layers one after another. On CPU, or under ``torch.compile``, everything
    runs in program order and gives the layers' sequential result (up to float rounding: chunked GEMMs);
    autograd goes through the differentiable ops as usual (each op's backward on the stream of its forward).
    """

    def __init__(
        self,
        layers: Sequence[MoELayer],
        between: Sequence[Callable[[Tensor, Tensor], Tensor]] | None = None,
        num_chunks: int = 2,
    ) -> None:
        super().__init__()
        stack = list(layers)
        if not stack:
            raise ArgumentError("MoEPipeline: argument 'layers' is empty")
        for j, layer in enumerate(stack):
            if not isinstance(layer, MoELayer):
                raise ArgumentError(f"MoEPipeline: layers[{j}] is a {type(layer).__name__}, expected MoELayer")
            if layer.low_latency:
                raise ArgumentError(
                    f"MoEPipeline: layers[{j}] has a low-latency Buffer; the pipeline needs normal-mode layers"
                )
            if layer.hidden != stack[0].hidden:
                raise ArgumentError(
                    f"MoEPipeline: layers[{j}] has hidden size {layer.hidden}, layers[0] has {stack[0].hidden}"
                )
        devices = {p.device for layer in stack for p in layer.parameters()}
        if len(devices) > 1:
            names = sorted(map(str, devices))
            raise ArgumentError(f"MoEPipeline: the layers' parameters are on different devices {names}")
        if not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks < 1:
            raise ArgumentError(f"MoEPipeline: argument 'num_chunks' must be an int >= 1, got {num_chunks!r}")
        fns = list(between) if between is not None else []
        if between is not None and len(fns) not in (len(stack) - 1, len(stack)):
            raise ArgumentError(
                f"MoEPipeline: argument 'between' has {len(fns)} functions; {len(stack)} layers take "
                f"{len(stack) - 1} (or {len(stack)}: the last one applied after the last layer)"
            )
        for j, fn in enumerate(fns):
            if not callable(fn):
                raise ArgumentError(f"MoEPipeline: between[{j}] is not callable")
            if isinstance(fn, nn.Module):
                self.add_module(f"between{j}", fn)
        self.layers = nn.ModuleList(stack)
        self._stack = stack  # the same layers, typed
        self.between: list[Callable[[Tensor, Tensor], Tensor]] = fns
        self.num_chunks = num_chunks
        self.aux_losses: list[list[Tensor]] = [[] for _ in stack]
        self._aux_rows: list[list[int]] = [[] for _ in stack]

    def _route(self, j: int, x: Tensor) -> dict[str, Any]:
        layer = self._stack[j]
        layer.aux_loss = None
        idx, w = layer.route(x)
        if layer.aux_loss is not None:
            self.aux_losses[j].append(layer.aux_loss)
            self._aux_rows[j].append(x.shape[0])
        return {"idx": idx, "w": w, "ready": ops.capture_event(x.device)}

    def _merge_aux_losses(self) -> None:
        """Each layer's ``aux_loss`` after a forward: the mean of its chunks' losses weighted by their tokens (the
        first layer's gate ran on the whole batch: its one loss), over every place the layer appears in the stack."""
        merged: dict[int, tuple[MoELayer, list[Tensor], list[int]]] = {}
        for layer, losses, rows in zip(self._stack, self.aux_losses, self._aux_rows, strict=True):
            # (a layer that appears more than once: every occurrence's chunks)
            _, all_losses, all_rows = merged.setdefault(id(layer), (layer, [], []))
            all_losses += losses
            all_rows += rows
        for layer, losses, rows in merged.values():
            if len(losses) > 1:
                total = sum(rows)
                weights = [r / total for r in rows] if total else [1 / len(rows)] * len(rows)
                layer.aux_loss = sum((loss * wt for loss, wt in zip(losses, weights, strict=True)), losses[0] * 0)

    def forward(self, x: Tensor) -> Tensor:
        """x [T, H] (bf16/fp32; every chunk T/C <= each Buffer's max_tokens_per_rank) -> [T, H] in x's dtype.
        Waits on the host for each (layer, chunk)'s count exchange unless that layer has ``num_worst_tokens`` > 0.
        Collective: every rank of the Buffers' groups must call it with the same ``num_chunks``."""
        for layer in self._stack:
            layer._check_ddp()
            layer._check_fsdp()
        if torch.compiler.is_compiling():
            return self._forward(x, [])
        sent: list[tuple[int, Tensor]] = []
        try:
            return self._forward(x, sent)
        except BaseException as exc:
            if not _recomputation_stopped(exc):
                _release_dispatches(sent)
            raise

    def _forward(self, x: Tensor, sent: list[tuple[int, Tensor]]) -> Tensor:
        """The wavefront schedule; ``sent`` collects its custom-op dispatches' tickets (for
        :func:`_release_dispatches` on an error)."""
        num_layers, n = len(self._stack), self.num_chunks
        self.aux_losses = [[] for _ in range(num_layers)]
        self._aux_rows = [[] for _ in range(num_layers)]
        carveouts = [layer.overlap_carveout(x) if n > 1 else 0 for layer in self._stack]
        # (the custom-op path orders its calls after the caller's stream and returns no events to wait on: a layer
        # taking it keeps the whole pipeline on the caller's stream)
        custom = any(layer.use_custom_ops for layer in self._stack)
        side = None if n == 1 or custom else self._side_stream(x, self._stack[0].buffer._settings.stream_priority)
        caller = torch.cuda.current_stream(x.device) if side is not None else None
        if side is not None and caller is not None:
            side.wait_stream(caller)  # x (and whatever made it) before the side stream's first read
        # per (layer, chunk): x (input rows), idx / w / ready (its gate), d (dispatch), shared, c (combine)
        st: dict[tuple[int, int], dict[str, Any]] = {}
        first = self._route(0, x)  # the first layer's gate on the whole batch, as MoELayer does
        parts = [_split_rows(first[k], n) for k in ("idx", "w")]
        for i, xi in enumerate(_split_rows(x, n)):
            st[(0, i)] = {"x": xi, "idx": parts[0][i], "w": parts[1][i], "ready": first["ready"]}
        outs: list[Tensor | None] = [None] * n

        def send(u: tuple[int, int]) -> None:
            layer, s = self._stack[u[0]], st[u]
            s["d"] = layer.send_chunk(s["x"], s["idx"], s["w"], s["ready"])
            _sent(sent, layer.buffer_id, s["d"])
            if side is None or u[0] == 0:  # (with a side stream, a later layer's shared experts ran there in finish)
                s["shared"] = layer.shared_experts(s["x"]) if layer.shared_experts is not None else None

        def finish(u: tuple[int, int]) -> None:
            j, i = u
            s = st.pop(u)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                # the combine waited for the caller's stream as it was when it was issued, so its event also
                # covers layer 0's shared experts, issued there before it
                assert side is None or s["c"].event is not None
                ops.wait(s["c"].event)
                if side is not None:  # the combine's output was made safe for the caller's stream; read here
                    s["c"].x.record_stream(side)
                    if s["shared"] is not None:
                        s["shared"].record_stream(side)
                y = s["c"].x + s["shared"] if s["shared"] is not None else s["c"].x
                if j < len(self.between):
                    y = self.between[j](s["x"], y)
                if side is not None:
                    y = y.contiguous()  # here: a copy the dispatch made would read y on the caller's stream
                if j + 1 < num_layers:
                    nxt = self._stack[j + 1]
                    st[(j + 1, i)] = {"x": y, **self._route(j + 1, y)}
                    if side is not None:
                        st[(j + 1, i)]["shared"] = nxt.shared_experts(y) if nxt.shared_experts is not None else None
                else:
                    outs[i] = y

        # the wavefront: step s holds (j, s - j), shallow layers first. With C > 1 a unit's successor (j + 1, i)
        # comes at least two units later, so its input is ready (finished) when it is sent
        units = [(j, s - j) for s in range(num_layers + n - 1) for j in range(num_layers) if 0 <= s - j < n]
        send(units[0])
        for k, u in enumerate(units):
            y = self._stack[u[0]].experts_chunk(st[u]["d"], carveouts[u[0]])
            if k > 0 and units[k - 1] in st:
                finish(units[k - 1])
            nxt = units[k + 1] if k + 1 < len(units) else None
            if nxt == (u[0] + 1, u[1]):  # C = 1: the next unit needs this one's output
                st[u]["c"] = self._stack[u[0]].combine_chunk(y, st[u]["d"])
                finish(u)
                send(nxt)
                continue
            if nxt is not None:
                send(nxt)
            st[u]["c"] = self._stack[u[0]].combine_chunk(y, st[u]["d"])
        finish(units[-1])
        self._merge_aux_losses()
        done = [o for o in outs if o is not None]
        assert len(done) == n
        if side is not None:
            assert caller is not None
            caller.wait_stream(side)
            for o in done:
                o.record_stream(caller)  # made on the side stream, read (and freed) on the caller's
        return done[0] if n == 1 else torch.cat(done)

    @staticmethod
    def _side_stream(x: Tensor, priority: int) -> torch.cuda.Stream | None:
        """The stream the ends of (layer, chunk) run on (see the class docstring); None on CPU and while
        compiling. While capturing a CUDA graph it is forked from the caller's stream at the start of forward and
        joined at the end, so the graph gets the same dependencies as eager execution."""
        if not x.is_cuda or torch.compiler.is_compiling():
            return None
        return ops._side_stream("pipeline", x.device, priority)


def _logical_experts(c: Any, placement: Any, num_logical_experts: int | None) -> int:
    """The layer's number of logical experts: the placement's (checked against the Buffer's ranks and physical
    experts, and against ``num_logical_experts`` where given), else ``num_logical_experts``, else the Buffer's."""
    if num_logical_experts is not None:
        if not isinstance(num_logical_experts, numbers.Integral) or isinstance(num_logical_experts, bool) \
                or num_logical_experts < 1:
            raise ArgumentError(
                f"MoELayer: argument 'num_logical_experts' must be an int >= 1, got {num_logical_experts!r}"
            )
        num_logical_experts = int(num_logical_experts)
        if placement is None and num_logical_experts > c.num_experts:
            raise ArgumentError(
                f"MoELayer: argument 'num_logical_experts' = {num_logical_experts} without a placement: the ids "
                f"are then the Buffer's physical experts, of which it has {c.num_experts} (pass a placement that "
                f"maps {num_logical_experts} logical experts onto them)"
            )
    topo = getattr(placement, "topology", None)
    if topo is not None and hasattr(placement, "num_logical"):  # a largeep.placement.Placement: its sizes
        if topo.num_gpus != c.num_ranks or topo.num_slots != c.num_experts:
            raise ArgumentError(
                f"MoELayer: argument 'placement' has {topo.num_gpus} GPUs of {topo.slots_per_gpu} slots "
                f"({topo.num_slots} physical experts); the Buffer has {c.num_ranks} ranks and {c.num_experts} "
                "physical experts"
            )
        if topo.gpus_per_node != c.ranks_per_node:
            # (route would take replicas on another node for near ones, and a gate limited by the placement's
            # home nodes would limit by the wrong groups)
            raise ArgumentError(
                f"MoELayer: argument 'placement' has {topo.gpus_per_node} GPUs per node; the Buffer has "
                f"{c.ranks_per_node} ranks per node (its ranks_per_node): plan with Topology(num_nodes="
                f"{c.num_ranks // c.ranks_per_node}, gpus_per_node={c.ranks_per_node}, ...)"
            )
        if num_logical_experts is not None and num_logical_experts != placement.num_logical:
            raise ArgumentError(
                f"MoELayer: argument 'num_logical_experts' = {num_logical_experts} differs from the placement's "
                f"{placement.num_logical} logical experts"
            )
        return int(placement.num_logical)
    return num_logical_experts if num_logical_experts is not None else c.num_experts


def _gate_experts(gate: Any) -> int | None:
    """The number of experts a gate chooses among, where it says (largeep's gates; None: not known)."""
    if isinstance(gate, LinearTopKRouter):
        return int(gate.weight.shape[0])
    n = getattr(getattr(gate, "config", None), "num_experts", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


_SLOT_EXPERTS = "slot_experts"  # state-dict key: the logical expert of each of the layer's local slots (MoELayer)
_EXPERT_SHARD = "expert_shard"  # with expert TP: [member, T], the columns of every expert this state holds
_SLOT_LAYOUT = "slot_layout"  # the earlier key: the placement's whole table, saved only with a placement


def _save_slot_layout(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """A MoELayer saves which logical expert each of its slots holds (int64 [E_l], -1 empty) beside its expert
    weights, which are per slot, and with expert TP which shard of each expert they are."""
    assert isinstance(module, MoELayer)
    state_dict[prefix + _SLOT_EXPERTS] = torch.tensor(module._slot_experts(), dtype=torch.int64)
    tp = module.expert_tp
    if tp is not None and tp.size > 1:
        state_dict[prefix + _EXPERT_SHARD] = torch.tensor([tp.rank, tp.size], dtype=torch.int64)


def _replicas_after_load(module: nn.Module, incompatible: Any) -> None:
    """After a state dict loaded into a MoELayer with a placement, its gate's replica counts are the placement's
    again (``set_replicas`` of its ``replica_count``, as the constructor sets them; without a placement all ones,
    as ``set_placement(None)`` leaves them; a placement callable's are left as loaded): the gate's state holds the
    counts of the placement it was saved under, and loading the replicated part of a layer saved under another
    placement (``strict=False``, without the experts) would otherwise leave the capacity counting other replicas."""
    assert isinstance(module, MoELayer)
    counts = getattr(module._placement_obj, "replica_count", None)
    if module._placement_arg is None:  # (no placement: one slot per expert, as set_placement(None) leaves them)
        counts = torch.ones(module.num_logical_experts, dtype=torch.int64)
    set_replicas = getattr(module.gate, "set_replicas", None)
    if counts is not None and callable(set_replicas):
        set_replicas(counts)


def _check_slot_layout(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any,
                       strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                       error_msgs: list[str]) -> None:
    """Loading a MoELayer's state: its slots must hold the experts this layer's slots hold (the same placement,
    and the same rank: each rank saves its own slots), and with expert TP the same shard of them, else each slot
    would get another expert's weights; refused (load_state_dict raises, strict or not). A state without
    ``slot_experts`` is read as slot s of rank r holding expert r * E_l + s (a layer without a placement), or by
    the placement table it saved under ``slot_layout`` (earlier states); one without ``expert_shard`` (saved before
    it was) is not checked for its shard. A state without this layer's expert weights (a partial load) is not
    checked."""
    assert isinstance(module, MoELayer)
    key = prefix + _SLOT_EXPERTS
    saved = state_dict.pop(key, None)
    legacy = state_dict.pop(prefix + _SLOT_LAYOUT, None)
    shard = state_dict.pop(prefix + _EXPERT_SHARD, None)
    if not any(k.startswith(prefix + "experts.") for k in state_dict):
        return  # (a partial load without this layer's expert weights: nothing lands in its slots)
    mine = torch.tensor(module._slot_experts(), dtype=torch.int64)
    lo, hi = module.rank * module.num_local_experts, (module.rank + 1) * module.num_local_experts
    if saved is None and isinstance(legacy, Tensor) and legacy.dim() == 1:
        key = prefix + _SLOT_LAYOUT
        saved = legacy.to("cpu", torch.int64)[lo:hi]
    if saved is None:
        key = f"{prefix + _SLOT_EXPERTS} (absent: slot s holds expert s)"
        saved = torch.arange(lo, hi)
    if not (isinstance(saved, Tensor) and saved.shape == mine.shape and torch.equal(saved.to("cpu"), mine)):
        how = "its placement" if module.phys_to_log is not None else "no placement"
        error_msgs.append(
            f"{key}: the saved expert weights are those of logical experts {_short(saved)} in this rank's slots, "
            f"this layer's slots hold {_short(mine)} ({how}, rank {module.rank}): load them through "
            "load_global_experts (its weights per logical expert: layers.global_experts_from_states of every rank's "
            "state, or MoELayer.gather_global_experts), or build the layer with the saved placement, on the rank "
            "that saved them"
        )
    tp = module.expert_tp
    want = [tp.rank, tp.size] if tp is not None and tp.size > 1 else None
    got = shard.tolist() if isinstance(shard, Tensor) else shard
    if shard is not None and got != want:
        error_msgs.append(
            f"{prefix + _EXPERT_SHARD}: the saved expert weights are "
            f"{'the whole experts' if got is None else f'shard {got[0]} of {got[1]} of each expert'}; this layer "
            f"holds {'the whole experts' if want is None else f'shard {want[0]} of {want[1]}'} (expert_tp_group)"
        )


def global_experts_from_states(states: Sequence[dict[str, Any]], prefix: str = "") -> tuple[Tensor, ...]:
    """The global expert weights (w1 [L, H, F], w3 [L, H, F], w2 [L, F, H], L = the largest expert id + 1) from the
    state dicts of one ``MoELayer`` saved on every rank of its group, in rank order (``prefix``: the layer's in a
    model's state dict, e.g. ``"layers.3.moe."``), read by the ``slot_experts`` each holds: for a checkpoint of
    per-rank files loaded at another expert-parallel size or placement through ``load_global_experts``, without the
    old group (:meth:`MoELayer.gather_global_experts` does the same collectively). Experts with biases (the states
    hold ``experts.b13`` and ``experts.b2``) give (w1, w3, w2, b1 [L, F], b3 [L, F], b2 [L, H]). Not collective;
    an expert held by no slot comes back as zeros, replicas must be equal (``ArgumentError`` names the expert).
    States of expert-TP shards (``expert_shard``) are refused: gather them with ``gather_global_experts``."""
    what = "global_experts_from_states"
    if not states:
        raise ArgumentError(f"{what}: argument 'states' is empty, expected every rank's state dict")
    keys = [prefix + "experts." + k for k in ("w13", "w2", "b13", "b2")]
    first = states[0]
    biased = isinstance(first, dict) and keys[2] in first
    if not biased:
        keys = keys[:2]
    stacks: list[list[Tensor]] = [[] for _ in keys]
    tables = []
    for r, st in enumerate(states):
        k13, k2 = keys[0], keys[1]
        if not isinstance(st, dict) or k13 not in st or k2 not in st:
            raise ArgumentError(f"{what}: argument 'states[{r}]' holds no '{k13}' and '{k2}' (a MoELayer's state dict "
                                f"under prefix {prefix!r})")
        if (prefix + "experts.b13" in st) != biased or (prefix + "experts.b2" in st) != biased:
            raise ArgumentError(f"{what}: argument 'states[{r}]' " + ("lacks" if biased else "holds") + " the "
                                f"experts' biases ('{prefix}experts.b13', '{prefix}experts.b2'), states[0] "
                                + ("holds them" if biased else "does not") + ": expected one layer's states of every "
                                "rank")
        if prefix + _EXPERT_SHARD in st:
            raise ArgumentError(f"{what}: argument 'states[{r}]' is one expert-TP member's shard "
                                f"('{prefix + _EXPERT_SHARD}'): gather those with MoELayer.gather_global_experts")
        e_l = st[k13].shape[0]
        if any(st[k].shape != first[k].shape for k in keys):
            shapes = [tuple(st[k].shape) for k in keys]
            raise ArgumentError(f"{what}: argument 'states[{r}]' holds experts of shapes {shapes}, states[0] "
                                f"{[tuple(first[k].shape) for k in keys]}: expected one layer's states of every rank")
        table = st.get(prefix + _SLOT_EXPERTS)
        if table is None:
            legacy = st.get(prefix + _SLOT_LAYOUT)
            table = legacy[r * e_l : (r + 1) * e_l] if isinstance(legacy, Tensor) else torch.arange(r * e_l,
                                                                                                  (r + 1) * e_l)
        for stack, k in zip(stacks, keys, strict=True):
            stack.append(st[k])
        tables.append(table.to("cpu", torch.int64))
    table = torch.cat(tables)
    full = [torch.cat(stack) for stack in stacks]
    f = full[1].shape[1]
    num = int(table.max()) + 1 if table.numel() and int(table.max()) >= 0 else 0
    parts = [full[0][:, :, :f], full[0][:, :, f:], full[1]]
    if biased:
        parts += [full[2][:, :f], full[2][:, f:], full[3]]
    return _by_logical(what, table, tuple(parts), num, e_l)


def _same_tables(what: str, tables: Sequence[Tensor]) -> None:
    """Refuses, on every rank alike, ranks whose layers hold different placements (``tables``: every rank's
    ``phys_to_log``, the identity without a placement, in rank order)."""
    for r, t in enumerate(tables):
        diff = (t.cpu() != tables[0].cpu()).nonzero().flatten()
        if diff.numel():
            s = int(diff[0])
            raise ArgumentError(
                f"{what}: the ranks' layers hold different placements: rank {r}'s slot {s} holds logical expert "
                f"{int(t[s])}, rank 0's {int(tables[0][s])} (-1: empty), so tokens reach other experts than their "
                "senders meant: every rank must hold the same Placement (plan on one rank and share it, e.g. "
                "torch.distributed.broadcast_object_list([placement], src=0))"
            )


def _by_logical(
    what: str, table: Tensor, parts: tuple[Tensor, ...], num: int, e_l: int
) -> tuple[Tensor, ...]:
    """Per-slot tensors ``parts`` ([slots, ...], slot s holding logical expert ``table[s]``, -1: none) as
    [num, ...] by logical expert: each expert's lowest slot's values, zeros for an expert no slot holds. Every
    other slot of an expert (a replica) must hold the same values, else ``ArgumentError`` names the expert, the
    slots and their ranks (``e_l`` slots a rank)."""
    slots = (table >= 0).nonzero().flatten()
    ids = table[slots]
    first: dict[int, int] = {}
    for slot, e in zip(slots.tolist(), ids.tolist(), strict=True):
        first.setdefault(e, slot)
    es = torch.tensor(list(first), dtype=torch.int64)
    ss = torch.tensor(list(first.values()), dtype=torch.int64)
    outs = []
    for t in parts:
        g = t.new_zeros((num, *t.shape[1:]))
        g[es.to(t.device)] = t[ss.to(t.device)]
        outs.append(g)
    for slot, e in zip(slots.tolist(), ids.tolist(), strict=True):
        if slot != first[e] and not all(torch.equal(g[e], t[slot]) for g, t in zip(outs, parts, strict=True)):
            raise _replicas_differ(what, e, first[e], slot, e_l)
    return tuple(outs)


def _replicas_differ(what: str, e: int, one: int, slot: int, e_l: int) -> ArgumentError:
    """The refusal of logical expert ``e``'s replicas in slots ``one`` and ``slot`` that differ (``e_l`` slots a
    rank)."""
    return ArgumentError(
        f"{what}: the replicas of logical expert {e} differ (slots {one} and {slot}, of ranks {one // e_l} "
        f"and {slot // e_l}), so it has no one global value: keep them equal (allreduce_replica_grads after "
        "each backward, load_global_experts after loading)"
    )


# the dtypes whose agreement MoELayer.gather_global_experts(dst= / device=) checks by index (others: -2, "another")
_DTYPE_CODES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)
# why an EP group refused the piecewise gather, by the code sent to its TP groups
_GATHER_REFUSALS = {1: "different placements", 2: "different 'dst'", 3: "different dtypes",
                    4: "the receiving rank could not make the result"}


def _dtype_name(code: int) -> str:
    return str(_DTYPE_CODES[code]) if 0 <= code < len(_DTYPE_CODES) else "another dtype"


def _dst_name(d: int) -> str:
    return "None" if d < 0 else str(d)


def _short(t: Any) -> str:
    if not isinstance(t, Tensor):
        return repr(t)
    vals = t.flatten().tolist()
    return str(vals[:16])[:-1] + (", ...]" if len(vals) > 16 else "]")


def _set_placement_verdict(what: str, rows: Sequence[tuple[Any, ...]]) -> str | None:
    """MoELayer.set_placement's refusal (a message) from every rank's (own refusal, current table, new table,
    the tensors it moves), in rank order, or None: the same on every rank."""
    refused = {r: row[0] for r, row in enumerate(rows) if row[0] is not None}
    if refused:
        r0 = min(refused)
        return (f"{what}: rank(s) {sorted(refused)} refused their arguments, so no rank moves its experts (rank {r0}: "
                f"{refused[r0]})")
    for i, whose in ((1, f"{what} (the layers' current placements)"), (2, f"{what}: argument 'placement'")):
        try:
            _same_tables(whose, [torch.tensor(row[i], dtype=torch.int64) for row in rows])
        except ArgumentError as exc:
            return str(exc)
    for r, row in enumerate(rows):
        if row[3] != rows[0][3]:
            return (f"{what}: rank {r} would move {[m[0] for m in row[3]]} ({[m[1:] for m in row[3]]}), rank 0 "
                    f"{[m[0] for m in rows[0][3]]} ({[m[1:] for m in rows[0][3]]}): every rank's optimizer must hold "
                    "the same state of the experts (argument 'optimizer': the same kind, stepped alike)")
    return None


def _slot_moves(old: Tensor, new: Tensor, e_l: int, n: int, rank: int
                ) -> tuple[list[tuple[str, int]], list[tuple[int, int, int]]]:
    """The transfers that take the group's slots from table ``old`` to table ``new`` (int64 [n * e_l], the logical
    expert of each slot, -1 empty), the same on every rank: (``rank``'s source of each of its new slots:
    ("local", an old slot of its own that held the expert), ("recv", an index into the transfers) or ("zero", -1)
    for an empty slot or an expert no old slot held; the transfers (source rank, its slot, destination rank)).
    A rank that held the expert copies it locally; else it receives it once (for all its slots of it), from the
    replica rank with the fewest sends so far (the lowest on a tie), from that rank's first slot of it."""
    holders: dict[int, list[int]] = {}
    for s, e in enumerate(old.tolist()):
        if e >= 0:
            holders.setdefault(e, []).append(s)
    sends = [0] * n
    plan: list[tuple[int, int, int]] = []
    mine: list[tuple[str, int]] = []
    new_l = new.tolist()
    for d in range(n):
        got: dict[int, int] = {}  # expert -> its transfer to d
        for j in range(e_l):
            e = new_l[d * e_l + j]
            src: tuple[str, int]
            if e < 0 or e not in holders:
                src = ("zero", -1)
            else:
                here = [s for s in holders[e] if s // e_l == d]
                if here:
                    src = ("local", here[0] - d * e_l)
                else:
                    if e not in got:
                        pick = min({s // e_l for s in holders[e]}, key=lambda p: (sends[p], p))
                        sends[pick] += 1
                        got[e] = len(plan)
                        plan.append((pick, min(s for s in holders[e] if s // e_l == pick) - pick * e_l, d))
                    src = ("recv", got[e])
            if d == rank:
                mine.append(src)
    return mine, plan


def _send_rows(what: str, t: Tensor, plan: Sequence[tuple[int, int, int]], rank: int, n: int,
               group: dist.ProcessGroup | None) -> dict[int, Tensor]:
    """Carries out the transfers ``plan`` (source rank, its row of ``t``, destination rank; the same list on every
    rank) for this rank's ``t`` [rows, ...]: one all-to-all over ``group`` (none when no transfer crosses ranks;
    a transfer to the same rank is not made). -> the rows this rank received, by their index in ``plan``."""
    cross = [(i, m) for i, m in enumerate(plan) if m[0] != m[2]]
    if not cross or n == 1:
        return {}
    out_idx = [[i for i, m in cross if m[0] == p and m[2] == rank] for p in range(n)]
    in_rows = [[m[1] for _, m in cross if m[0] == rank and m[2] == p] for p in range(n)]
    send = t[[r for rows in in_rows for r in rows]]  # (a copy: index lists give one even when empty)
    recv = t.new_empty((sum(len(x) for x in out_idx), *t.shape[1:]))
    _collective.all_to_all_rows(recv, send, [len(x) for x in out_idx], [len(x) for x in in_rows], group, what)
    order = [i for idx in out_idx for i in idx]
    return {i: recv[k] for k, i in enumerate(order)}


def run_interleaved(steps: Sequence[Generator[None, None, Tensor]]) -> list[Tensor]:
    """Advances the generators round-robin (one step each in turn) until all return; returns their values. If a
    step raises, the other generators are closed before the error propagates (:meth:`MoELayer.low_latency_steps`
    then completes the receive it owes, so its Buffer has no call left in flight). A low-latency Buffer holds two
    calls of each op in flight: more than two generators on one Buffer raise at the third's dispatch."""
    out: list[Tensor | None] = [None] * len(steps)
    active = list(range(len(steps)))
    try:
        while active:
            for i in list(active):
                try:
                    next(steps[i])
                except StopIteration as stop:
                    out[i] = stop.value
                    active.remove(i)
    except Exception:  # (not KeyboardInterrupt: closing makes the others receive, a wait for the peers)
        for i in active:
            steps[i].close()
        raise
    return [o for o in out if o is not None]


class TwoBatchOverlap:
    """Decoding with two micro-batches through one low-latency :class:`MoELayer`: A's dispatch is sent, B's gate
    runs and B's dispatch is sent; A receives and computes its experts while B's tokens travel, then sends its
    combine; B computes while A's results travel back; then both receive. The Buffer's double buffering allows
    the two calls in flight. Same results as two separate calls. If a step of one micro-batch raises (e.g. B has
    more tokens than ``max_tokens_per_rank``), the other's receive that is due is completed before the error
    propagates, so when every rank raises alike the Buffer stays usable; a step that raises on some ranks only
    leaves the others' calls unanswered (they end in ``PeerTimeoutError``)."""

    def __init__(self, layer: MoELayer) -> None:
        if not isinstance(layer, MoELayer):
            raise ArgumentError(f"TwoBatchOverlap: argument 'layer' must be a MoELayer, got {type(layer).__name__}")
        if not layer.low_latency:
            raise ArgumentError("TwoBatchOverlap: the layer's Buffer must be low_latency=True")
        self.layer = layer

    def __call__(self, xa: Tensor, xb: Tensor) -> tuple[Tensor, Tensor]:
        """xa [Ta, H], xb [Tb, H] -> (ya [Ta, H], yb [Tb, H])."""
        ya, yb = run_interleaved([self.layer.low_latency_steps(xa), self.layer.low_latency_steps(xb)])
        return ya, yb


@torch.no_grad()
def ddp_ignore_experts(model: nn.Module) -> list[str]:
    """Makes ``DistributedDataParallel(model)`` leave every :class:`MoELayer`'s routed experts in ``model`` alone,
    and every :class:`largeep.gate.TopKGate`'s load counts: call it before wrapping ``model`` in DDP.

    The experts of each rank are its own (rank r holds slots [r*E/N, (r+1)*E/N)): DDP would copy rank 0's over
    every rank's at its construction and average different experts' grads in the backward. The gates' counts
    (``expert_load``) are each rank's own until ``update_bias(group)`` sums them: DDP's buffer broadcast would copy
    rank 0's over the others' before each forward. Everything else (the gates' weights and biases, the shared
    experts, the rest of the model) stays DDP's, replicated as usual.

    Adds the names to those ``model`` already had DDP ignore (``_ddp_params_and_buffers_to_ignore``) and returns
    the names it added. DDP's average and the experts' grads differ by a factor: see docs/usage.md, "Gradients the
    layer leaves to you" (with each rank's loss the mean over its own tokens, divide the expert grads by the
    Buffer's group size, times the expert-TP size with expert TP). With data-parallel copies of the Buffer's group,
    reduce the expert grads over the ranks that hold the same slots yourself (or with a DDP of their own over that
    group)."""
    from largeep.gate import TopKGate

    if not isinstance(model, nn.Module):
        raise ArgumentError(f"ddp_ignore_experts: argument 'model' must be a torch.nn.Module, got {_kind(model)}")
    names: list[str] = []
    for prefix, mod in model.named_modules():
        dot = prefix + "." if prefix else ""
        if isinstance(mod, MoELayer):
            names += [f"{dot}experts.{n}" for n, _ in mod.experts.named_parameters()]
        elif isinstance(mod, TopKGate):
            names.append(f"{dot}expert_load")
    before = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    added = [n for n in names if n not in before]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, before + added)
    return added


def _fsdp_managers() -> Any:
    """torch's registry of composable states (module -> weak reference to its FSDP2 state, among others), or None
    where this torch has none."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:
        return None
    return _module_state_mapping


def _registry_key(managers: Any) -> tuple[int, Any]:
    """What _check_fsdp compares to see whether ``managers`` (``_fsdp_managers()``) gained an entry: its size and
    the weak reference to its newest module (held, so that a later entry cannot reuse its id; compared by
    identity). The size alone stays put where a sharded module was collected and another sharded. O(1): the
    WeakKeyDictionary's dict keeps insertion order (another mapping: its key references listed)."""
    data = getattr(managers, "data", None)
    if isinstance(data, dict):
        return len(data), next(reversed(data)) if data else None
    refs = list(managers.keyrefs()) if hasattr(managers, "keyrefs") else list(managers)
    return len(refs), refs[-1] if refs else None


def _fsdp_params_on(managers: Any, modules: set[int]) -> list[tuple[list[int], str]]:
    """(the mesh's global ranks, the parameter's name) of every FSDP2 parameter held by one of ``modules`` (ids),
    read from the FSDP states in ``managers``; states of another shape (other composable APIs, other torch
    versions) are passed over."""
    found = []
    for ref in list(managers.values()):
        state = ref()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # (torch before 2.10 keeps one group per state)
            one = getattr(state, "_fsdp_param_group", None)
            groups = [one] if one is not None else []
        for group in groups:
            mesh = getattr(getattr(group, "mesh_info", None), "mesh", None)
            for fp in getattr(group, "fsdp_params", ()):
                info = getattr(fp, "_module_info", None)
                holders = [getattr(info, "module", None)] + list(getattr(info, "shared_modules", ()) or ())
                if mesh is not None and any(id(m) in modules for m in holders):
                    ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
                    found.append((ranks, str(getattr(info, "param_name", "?"))))
    return found


def _sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a parameter or grad that FSDP2's ``fully_shard`` sharded), without importing
    torch.distributed.tensor."""
    return any(k.__name__ == "DTensor" for k in type(t).__mro__)


_SHARDED_EXPERTS = (
    "the routed experts' parameters are sharded by FSDP2 (fully_shard over a module holding an MoELayer), and this "
    "call takes each rank's own expert tensors, not shards of them (over ranks of the layer's group FSDP also "
    "computes with a mix of the ranks' experts); leave them out, fully_shard(model, ignored_params=<the experts' "
    "parameters>) (docs/usage.md, \"Gradients the layer leaves to you\")"
)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model that holds :class:`MoELayer` s under expert parallelism: the
    norm of the whole model's gradient, every logical expert counted once, the same on every rank, and every grad
    (experts' included) scaled by ``min(1, max_norm / (norm + 1e-6))``. Returns the norm (float32 scalar).

    torch's own function over ``model.parameters()`` takes each rank's experts only, so each rank finds another
    norm and clips by another factor: the replicated parameters (gate, shared experts, the rest of the model) then
    drift apart between ranks. Here each layer's expert grads are summed over its Buffer's group (and its expert-TP
    group, whose members hold different shards; the whole b2 of experts with biases, which every member holds, is
    counted on the first member only), a replicated expert's slots each counted 1 / its replicas; the
    other parameters are counted once, as this rank holds them. Call it where torch's would go: after the backward,
    after the replicated parameters' grads are reduced (DDP's backward, or your all-reduce) and
    :func:`allreduce_replica_grads`, before the step. Collective: every rank of the layers' groups must call it
    (one small all-reduce per distinct group; ``norm_type`` inf: a gather). ``norm_type``: a number > 0, or inf.
    """
    what = "clip_grad_norm_"
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"{what}: argument 'model' must be a torch.nn.Module, got {_kind(model)}")
    for arg, v, ok in (("max_norm", max_norm, lambda v: v >= 0 and v < float("inf")),
                       ("norm_type", norm_type, lambda v: v > 0)):
        real = isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v
        if not real or not ok(float(v)):
            raise ArgumentError(f"{what}: argument '{arg}' must be a number "
                                f"{'>= 0 and finite' if arg == 'max_norm' else '> 0, or inf'}, got {v!r}")
    p_ = float(norm_type)
    inf = p_ == float("inf")

    def part(g: Tensor, weight: Tensor | None = None) -> Tensor:
        """|g|^p summed (inf: max |g|) in float32, over the rows of g weighted by ``weight`` [rows] if given."""
        a = g.detach().float().abs().flatten(1) if weight is not None else g.detach().float().abs().flatten()
        if inf:
            return a.max() if a.numel() else a.new_zeros(())
        v = a.pow(p_) if p_ != 1.0 else a
        return (v.sum(1) * weight).sum() if weight is not None else v.sum()

    expert_ids: set[int] = set()
    experts: list[Tensor] = []
    by_group: dict[tuple[int, int], tuple[list[Any], list[Tensor]]] = {}
    seen: set[int] = set()
    for m in model.modules():
        if not isinstance(m, MoELayer) or id(m.experts) in seen:  # (for_buffer twins share their experts)
            continue
        seen.add(id(m.experts))
        table = m.phys_to_log.cpu().to(torch.int64) if m.phys_to_log is not None else None
        mine = torch.tensor(m._slot_experts(), dtype=torch.int64)
        if table is not None:
            used = table[table >= 0]
            counts = torch.bincount(used, minlength=int(used.max()) + 1 if used.numel() else 0)
            reps = torch.where(mine >= 0, counts[mine.clamp(min=0)].clamp(min=1), 1).float()
        else:
            reps = torch.ones(mine.numel())
        weight = torch.where(mine >= 0, 1.0 / reps, 0.0)
        groups = [m.buffer.ctx.group] + ([m.expert_tp.group] if m.expert_tp is not None and m.expert_tp.size > 1
                                         else [])
        key = (id(groups[0]), id(groups[1]) if len(groups) > 1 else 0)
        entry = by_group.setdefault(key, (groups, []))
        for prm in m.experts.parameters():
            if _sharded(prm):  # (before any collective: every rank refuses alike)
                raise ArgumentError(f"{what}: {_SHARDED_EXPERTS}")
            expert_ids.add(id(prm))
            if prm.grad is not None:
                # (expert TP: every member holds the whole b2 with the same grad; the first member's counts)
                if not (prm is m.experts.b2 and m.experts.b2_added_elsewhere):
                    entry[1].append(part(prm.grad, weight.to(prm.grad.device)))
                experts.append(prm.grad)
    others = [prm.grad for prm in model.parameters() if id(prm) not in expert_ids and prm.grad is not None]
    if any(_sharded(g) for g in others):
        raise ArgumentError(
            f"{what}: the model's grads are sharded by FSDP2 (DTensors), which this function does not take: their "
            "norm needs each shard's part summed over the mesh as well (use FSDP's own tools for those parameters)"
        )
    dev = (experts or others or [torch.zeros(())])[0].device
    combine = torch.maximum if inf else torch.add
    total = torch.zeros((), dtype=torch.float32, device=dev)
    for g in others:
        total = combine(total, part(g).to(dev))
    for groups, parts in by_group.values():
        t = torch.zeros(1, dtype=torch.float32, device=dev)
        for q in parts:
            t = combine(t, q.to(dev).reshape(1))
        for grp in groups:
            if inf:
                t = torch.stack(_collective.all_gather(t, grp, what)).max().reshape(1)
            else:
                _collective.all_reduce(t, grp, what)
        total = combine(total, t[0])
    norm = total if inf else total.pow(1.0 / p_)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in others + experts:
        g.mul_(coef.to(g.device))
    return norm


def allreduce_replica_grads(
    params: Iterable[Tensor], phys_to_log: Tensor | None, group: dist.ProcessGroup | None = None
) -> int:
    """Sums the grads of every replica of each logical expert, so all copies take the same step.

    Args:
        params: this rank's expert parameters, each [S, ...] with one row per local slot (every parameter of
            :class:`GroupedExperts`, ``list(experts.parameters())``: ``w13`` and ``w2``, and ``b13`` and ``b2``
            with biases, whose replicas otherwise drift apart); rank r holds the global slots [r*S, (r+1)*S).
            Params without a grad count as zero; on a rank that holds a replicated slot they get a grad (zeros
            outside those slots), on the others they keep None.
        phys_to_log: int64 [N*S], the logical expert of each slot (-1: empty), e.g. ``Placement.phys_to_log``;
            None (a layer without a placement: ``MoELayer.phys_to_log``): no replicas, nothing to sum (returns 0,
            no collective; every rank of the group must then pass None).
        group: the expert-parallel group (default: the world).

    Only logical experts with two or more slots take part: their grads are added by logical expert into one
    [Q, sum of row sizes] float32 buffer (Q = replicated experts), all-reduced once over the group, and written
    back to every slot. Collective: every rank must call it. Returns Q.
    """
    plist = list(params)
    if not plist:
        return 0
    for i, p in enumerate(plist):
        if _sharded(p):
            raise ArgumentError(f"allreduce_replica_grads: params[{i}] is a DTensor: {_SHARDED_EXPERTS}")
        if not p.is_leaf:
            raise ArgumentError(
                f"allreduce_replica_grads: params[{i}] is not a leaf tensor (a view such as GroupedExperts.w1 / w3, "
                "whose .grad stays None); pass the parameters themselves, e.g. list(experts.parameters())"
            )
    s = plist[0].shape[0]
    for i, p in enumerate(plist):
        if p.shape[0] != s:
            raise ArgumentError(
                f"allreduce_replica_grads: params[{i}] has {p.shape[0]} rows, params[0] {s} (every parameter has one "
                "row per local expert slot)"
            )
    if phys_to_log is None:  # (a layer without a placement: slot s holds expert s, no replicas)
        return 0
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if not checks.integer_tensor(phys_to_log):
        raise ArgumentError(f"allreduce_replica_grads: argument 'phys_to_log' must be an integer tensor (int64 [N*S]), "
                            f"got {_kind(phys_to_log)}")
    table = phys_to_log.cpu().to(torch.int64)
    if table.numel() != n * s:
        raise ArgumentError(
            f"allreduce_replica_grads: phys_to_log has {table.numel()} slots, params have {s} rows on each of {n} ranks"
        )
    if table.numel() and int(table.min()) < -1:
        raise ArgumentError(f"allreduce_replica_grads: argument 'phys_to_log' holds {int(table.min())}, expected "
                            "logical expert ids >= 0, or -1 for an empty slot")
    used = table >= 0
    num_logical = int(table.max()) + 1 if bool(used.any()) else 0
    counts = torch.bincount(table[used], minlength=num_logical)
    replicated = (counts > 1).nonzero().flatten()
    q = replicated.numel()
    if q == 0:
        return 0
    compact = torch.full((num_logical,), -1, dtype=torch.int64, device="cpu")
    compact[replicated] = torch.arange(q, device="cpu")
    mine = table[rank * s : (rank + 1) * s]
    slot_q = torch.where(mine >= 0, compact[mine.clamp(min=0)], -1)
    local = (slot_q >= 0).nonzero().flatten()
    dev = plist[0].device
    widths = [p[0].numel() for p in plist]
    acc = torch.zeros(q, sum(widths), dtype=torch.float32, device=dev)
    rows = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(s, -1)[local.to(dev)].float() for p in plist
    ]
    acc.index_add_(0, slot_q[local].to(dev), torch.cat(rows, dim=1))
    _collective.all_reduce(acc, group, "allreduce_replica_grads")
    if local.numel() == 0:  # (no replicated slot here: this rank's gradients stay as they were, None included)
        return q
    back = acc[slot_q[local].to(dev)].split(widths, dim=1)
    for p, b in zip(plist, back, strict=True):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.view(s, -1)[local.to(dev)] = b.to(p.grad.dtype)
    return q
