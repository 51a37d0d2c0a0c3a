"""Top-k MoE gate with group-limited (node-limited) routing, aux-loss-free bias balancing and a load monitor.

Everything here is plain torch (CPU or GPU), with no Python loop over tokens. Expert ids produced by the gate are
whatever ids the gate's weight rows stand for: physical ids when the gate is sized to the Buffer's experts, logical
ids when a :class:`largeep.placement.Placement` maps them to physical slots afterwards (``Placement.route``).

Group-limited routing (DeepSeek-V3 style): experts are split into G groups; each token first keeps its best
``topk_groups`` groups, then picks its top-k experts inside them. The score of a group is the sum of its two best
expert scores (``group_score="top2"``; a group of one expert uses that expert's score) or its best expert score
(``group_score="max"``), computed on the selection scores (scores + balancing bias). With the groups equal to the
nodes of the placement and one replica per expert, a token reaches at most ``topk_groups`` nodes; with replicas,
``Placement.route(..., node_limited=True)`` (``MoELayer``'s under a limited gate) keeps it to at most
``topk_groups`` nodes besides its own (see ``Placement.home_node``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from largeep.checks import integer_tensor
from largeep.errors import ArgumentError
from largeep.placement import _check_topk

if TYPE_CHECKING:
    import torch.distributed as dist

    from largeep.placement import Placement

ScoreFunc = Literal["softmax", "sigmoid"]
GroupScore = Literal["top2", "max"]


def _check(cond: bool, arg: str, msg: str) -> None:
    if not cond:
        raise ArgumentError(f"argument '{arg}' {msg}")


def _is_int(x: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _finite(x: object) -> bool:
    """A real number (not a bool) that is neither infinite nor NaN."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


# GateConfig fields a gate depends on from its construction (its group checks, its weight's shape, whether it has a
# router bias)
_FIXED_GATE_FIELDS = frozenset({"hidden", "num_experts", "topk", "num_groups", "topk_groups", "router_bias"})


@dataclass
class GateConfig:
    """Options of :class:`TopKGate`.

    Attributes:
        hidden: input size H.
        num_experts: experts E (rows of the gate weight).
        topk: experts per token K.
        score_func: "softmax" over experts or elementwise "sigmoid".
        norm_topk_prob: divide the K chosen scores by their sum.
        routed_scaling_factor: multiplies the final weights.
        num_groups: G contiguous equal groups (E % G == 0); ignored when the gate is given ``group_of_expert``.
        topk_groups: groups a token may use (None, or G or more: all, i.e. no limit).
        group_score: "top2" (sum of the two best expert scores of the group) or "max".
        bias_balancing: aux-loss-free balancing: a per-expert bias added to the scores for selection only,
            moved by ``update_bias`` (which evens the load per logical expert, not per replica: see there).
        bias_update_rate: step of the bias update (``bias += rate * sign(mean load - load)``).
        aux_loss_coef: > 0 returns the Switch/GShard balance loss ``coef * E * sum_e f_e * P_e``.
        capacity_factor: None, or > 0: each expert keeps at most ceil(factor * T * K / E) of the (token, k)
            choices, earlier tokens first; the others become -1 with weight 0. With replicas
            (``TopKGate.set_replicas``): ceil(factor * T * K * r_e / S), S = sum of r, e's share of the slots.
        router_bias: a bool; True gives the gate a trainable bias on its logits (``TopKGate.router_bias`` [E], zero
            at first): ``logits = x @ weight.T + router_bias`` (an ``nn.Linear(H, E, bias=True)`` router, e.g.
            GPT-OSS's). Unlike the balancing ``expert_bias`` it enters the logits, so the scores, the weights and
            their gradients too.

    The sizes, the grouping and the router's form (hidden, num_experts, topk, num_groups, topk_groups,
    router_bias) are fixed once the config exists (a gate checks its groups against them and makes its parameters
    for them when it is made: make a new gate to change them; a gate's ``config`` may be replaced by one that keeps
    them); the other fields may change between calls and are checked again when set. Sizes are ints; rates,
    coefficients and ``routed_scaling_factor`` (> 0) finite numbers.
    """

    hidden: int
    num_experts: int
    topk: int
    score_func: ScoreFunc = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    num_groups: int = 1
    topk_groups: int | None = None
    group_score: GroupScore = "top2"
    bias_balancing: bool = True
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 0.0
    router_bias: bool = False
    capacity_factor: float | None = None  # (the last field: its setting marks the end of construction, __setattr__)

    def __post_init__(self) -> None:
        self._validate()
        self._warn_top1(stacklevel=4)
        # (capacity_factor is checked whenever it is set: __setattr__)

    def _warn_top1(self, stacklevel: int) -> None:
        if self.topk == 1 and self.norm_topk_prob and self.num_experts > 1:
            warnings.warn("GateConfig: topk=1 with norm_topk_prob=True makes every weight 1, so the router's weight "
                          "gets no gradient from the task loss (pass norm_topk_prob=False to train it)",
                          UserWarning, stacklevel=stacklevel)

    def _validate(self) -> None:
        """Checks the fields (run again whenever one is set)."""
        for name in ("hidden", "num_experts", "topk", "num_groups"):
            value = getattr(self, name)
            _check(_is_int(value), name, f"must be an int, got {value!r}")
        _check(self.topk_groups is None or _is_int(self.topk_groups), "topk_groups",
               f"must be None or an int, got {self.topk_groups!r}")
        _check(self.topk_groups is None or self.topk_groups >= 1, "topk_groups",
               f"must be None or >= 1, got {self.topk_groups}")
        _check(self.hidden >= 1, "hidden", f"must be >= 1, got {self.hidden}")
        _check(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
        _check(1 <= self.topk <= self.num_experts, "topk", f"must be in [1, num_experts], got {self.topk}")
        _check(
            self.score_func in ("softmax", "sigmoid"), "score_func", f"must be softmax|sigmoid, got {self.score_func!r}"
        )
        _check(self.group_score in ("top2", "max"), "group_score", f"must be top2|max, got {self.group_score!r}")
        _check(self.num_groups >= 1, "num_groups", f"must be >= 1, got {self.num_groups}")
        _check(_finite(self.bias_update_rate) and self.bias_update_rate >= 0, "bias_update_rate",
               f"must be a finite number >= 0, got {self.bias_update_rate!r}")
        _check(_finite(self.aux_loss_coef) and self.aux_loss_coef >= 0, "aux_loss_coef",
               f"must be a finite number >= 0, got {self.aux_loss_coef!r}")
        _check(_finite(self.routed_scaling_factor) and self.routed_scaling_factor > 0, "routed_scaling_factor",
               f"must be a finite number > 0, got {self.routed_scaling_factor!r}")
        _check(isinstance(self.router_bias, bool), "router_bias", f"must be a bool, got {self.router_bias!r}")

    def __setattr__(self, name: str, value: object) -> None:
        built = "_capacity_ratio" in self.__dict__  # (set at the end of construction, by capacity_factor's field)
        if built and name in _FIXED_GATE_FIELDS:
            raise ArgumentError(f"GateConfig: argument {name!r} cannot change once the config exists (a gate "
                                f"was built for it); make a new GateConfig and gate instead")
        old = self.__dict__.get(name)
        # (capacity_factor is checked before it is set, so that a refused value leaves the config as it was)
        ratio = _capacity_ratio_of(value) if name == "capacity_factor" else None
        object.__setattr__(self, name, value)
        if built and name != "capacity_factor":
            try:
                self._validate()
            except ArgumentError:
                object.__setattr__(self, name, old)  # (the config stays as it was)
                raise
            # the top-1 warning once per config: again only where this assignment turns it on (the sizes are fixed)
            if name == "norm_topk_prob" and value and not old:
                self._warn_top1(stacklevel=3)
        if name == "capacity_factor":
            object.__setattr__(self, "_capacity_ratio", ratio)


def _capacity_ratio_of(value: object) -> tuple[int, int] | None:
    """A capacity_factor's exact fraction (None for None), made whenever the factor is set (outside any
    torch.compile trace: Fraction and str(float) do not trace, and a retrace after a change must not need them);
    ArgumentError for anything but None or a finite number > 0."""
    if value is None:
        return None
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    try:
        finite = math.isfinite(float(value)) and float(value) > 0  # type: ignore[arg-type]
    except (OverflowError, ValueError, TypeError):  # (an int too large for a float, say)
        finite = False
    _check(real and finite, "capacity_factor", f"must be None or a finite number > 0, got {value!r}")
    return capacity_ratio(float(value))  # type: ignore[arg-type]


@dataclass(eq=False)
class GateOutput:
    """Result of :meth:`TopKGate.forward`.

    Attributes:
        topk_idx: int64 [T, K], expert ids in [-1, E) (-1 only where the capacity dropped a choice).
        topk_weights: float32 [T, K], combine weights (0 where topk_idx is -1); never contain the balancing bias
            (``expert_bias``).
        scores: float32 [T, E], routing probabilities (softmax or sigmoid of the logits, which hold the gate's
            ``router_bias`` if it has one; never the balancing ``expert_bias``).
        tokens_per_expert: int64 [E], choices kept per expert (after the capacity).
        aux_loss: float32 scalar with grad when ``aux_loss_coef`` > 0, else None.
    """

    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    scores: torch.Tensor
    tokens_per_expert: torch.Tensor
    aux_loss: torch.Tensor | None


def _counts(idx: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [n]: occurrences of each value 0..n-1 in ``idx`` (any shape; -1 ignored), without a host sync."""
    flat = idx.reshape(-1)
    key = torch.where(flat >= 0, flat, torch.full_like(flat, n))
    return torch.zeros(n + 1, dtype=torch.int64, device=idx.device).index_add_(0, key, torch.ones_like(key))[:n]


def contiguous_groups(num_experts: int, num_groups: int, device: torch.device | None = None) -> torch.Tensor:
    """Group of each expert for G contiguous equal groups: int64 [E], expert e in group e // (E / G)."""
    _check(num_groups >= 1, "num_groups", f"must be >= 1, got {num_groups}")
    _check(num_experts % num_groups == 0, "num_groups", f"must divide num_experts={num_experts}, got {num_groups}")
    return torch.arange(num_experts, device=device) // (num_experts // num_groups)


def group_tables(group_of_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Members of each group, padded: (table int64 [G, S] of expert ids ascending with E as padding, sizes int64
    [G]), on the CPU whatever the default device (built from the groups read on the host as Python ints, so that a
    gate made under ``torch.device("meta")`` still gets them)."""
    groups = [int(g) for g in group_of_expert.tolist()]
    _check(min(groups, default=0) >= 0, "group_of_expert", "must be >= 0")
    num_experts = len(groups)
    members: list[list[int]] = [[] for _ in range(max(groups) + 1 if groups else 0)]
    for e, g in enumerate(groups):
        members[g].append(e)
    width = max((len(m) for m in members), default=0)
    rows = [m + [num_experts] * (width - len(m)) for m in members]
    table = torch.tensor(rows, dtype=torch.int64, device="cpu").view(len(members), width)
    return table, torch.tensor([len(m) for m in members], dtype=torch.int64, device="cpu")


def check_groups(group_of_expert: torch.Tensor, num_experts: int, topk: int, topk_groups: int) -> int:
    """Raises ArgumentError unless ``group_of_expert`` (int64 [E], groups 0..G-1, none empty) admits top-k in
    any ``topk_groups`` (>= 1) of its groups. Returns the groups kept per token, min(topk_groups, G): a limit of G
    or more is no limit (a placement whose home nodes are fewer than its nodes, say, takes a limit of the node
    count)."""
    _check(
        isinstance(group_of_expert, torch.Tensor) and group_of_expert.dtype == torch.int64,
        "group_of_expert",
        "must be an int64 tensor",
    )
    _check(group_of_expert.device.type != "meta", "group_of_expert", "must hold values (not a meta tensor)")
    _check(group_of_expert.shape == (num_experts,), "group_of_expert", f"must have shape [{num_experts}]")
    _check(bool((group_of_expert >= 0).all()), "group_of_expert", "must be >= 0")
    sizes = torch.bincount(group_of_expert)
    _check(bool((sizes > 0).all()), "group_of_expert", "must use every group id 0..G-1 (no empty group)")
    _check(topk_groups >= 1, "topk_groups", f"must be >= 1, got {topk_groups}")
    kept = min(topk_groups, sizes.numel())
    smallest = int(torch.sort(sizes).values[:kept].sum().item())
    _check(topk <= smallest, "topk_groups", f"={topk_groups} groups may hold only {smallest} < topk={topk} experts")
    return kept


def select_topk(
    scores: torch.Tensor,
    topk: int,
    *,
    bias: torch.Tensor | None = None,
    group_of_expert: torch.Tensor | None = None,
    topk_groups: int | None = None,
    group_score: GroupScore = "top2",
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    group_table: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Picks each token's top-k experts, optionally inside its best ``topk_groups`` groups.

    Args:
        scores: float [T, E], routing scores (probabilities); the weights are taken from these.
        topk: K.
        bias: float32 [E] or None; added to ``scores`` for the choice of groups and experts only.
        group_of_expert: int64 [E] (group ids 0..G-1) or None (no groups).
        topk_groups: groups kept per token (None, or G or more: all).
        group_score: "top2" or "max" (see the module docstring).
        norm_topk_prob: weights divided by their sum over the K choices.
        routed_scaling_factor: weights multiplied by it.
        group_table: ``group_tables(group_of_expert)``, precomputed (else computed here, reading group sizes on the
            host; ``TopKGate`` keeps it so its forward never waits on the host).

    Returns:
        (topk_idx int64 [T, K] in descending selection score, topk_weights float32 [T, K]); the order of
        exactly tied scores is torch.topk's.
    """
    _check(scores.dim() == 2, "scores", f"must be [T, E], got shape {tuple(scores.shape)}")
    num_experts = scores.shape[1]
    _check(1 <= topk <= num_experts, "topk", f"must be in [1, {num_experts}], got {topk}")
    _check(bias is None or bias.shape == (num_experts,), "bias",
           f"must have shape [{num_experts}], got {None if bias is None else tuple(bias.shape)}")
    scores = scores.float()
    choice = scores if bias is None else scores + bias.to(scores)
    if group_of_expert is not None and topk_groups is not None:
        if group_table is None:  # (TopKGate checked its groups when it was built)
            check_groups(group_of_expert, num_experts, topk, topk_groups)
        table, sizes = group_table if group_table is not None else group_tables(group_of_expert)
        table, sizes = table.to(scores.device), sizes.to(scores.device)
        if topk_groups < table.shape[0]:
            padded = F.pad(choice, (0, 1), value=-math.inf)  # column E: the padding member
            members = padded[:, table]  # [T, G, S]
            if group_score == "max" or table.shape[1] == 1:
                gscore = members.max(dim=-1).values
            else:
                top2 = members.topk(2, dim=-1).values
                second = torch.where(sizes >= 2, top2[..., 1], torch.zeros_like(top2[..., 1]))
                gscore = top2[..., 0] + second
            keep = gscore.topk(topk_groups, dim=-1).indices  # [T, topk_groups]
            allowed = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~allowed[:, group_of_expert.to(scores.device)], -math.inf)
    topk_idx = choice.topk(topk, dim=-1, sorted=True).indices
    weights = scores.gather(1, topk_idx)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return topk_idx, (weights * routed_scaling_factor).float()


def apply_capacity(
    topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, capacity: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps at most ``capacity`` choices per expert; earlier tokens (then lower k) keep their slot.

    Args:
        topk_idx: int64 [T, K] in [-1, E).
        topk_weights: float32 [T, K].
        num_experts: E.
        capacity: choices kept per expert (>= 0): one for every expert (an int, or a traced size's SymInt), or an
            int64 tensor [E] of each expert's (values >= 0, not checked: no host read).

    Returns:
        New (topk_idx int64 [T, K], topk_weights float32 [T, K]) with dropped choices set to -1 / 0.
    """
    flat = topk_idx.reshape(-1)
    if isinstance(capacity, torch.Tensor):
        _check(capacity.shape == (num_experts,) and integer_tensor(capacity), "capacity",
               f"must be an int or an integer tensor [{num_experts}], got {capacity.dtype} {tuple(capacity.shape)}")
    elif torch.compiler.is_compiling() or isinstance(capacity, torch.SymInt):
        # (a traced size, under torch.compile or make_fx: branching on it, or formatting it into a message, would
        # make it a constant, a graph per batch size)
        torch._check(capacity >= 0)
    else:
        _check(isinstance(capacity, numbers.Integral) and not isinstance(capacity, bool), "capacity",
               f"must be an int or an integer tensor [{num_experts}], got {type(capacity).__name__} {capacity!r:.40}")
        _check(capacity >= 0, "capacity", f"must be >= 0, got {capacity}")
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))  # -1 goes to an extra bucket
    order = torch.argsort(key, stable=True)
    counts = _counts(key, num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[key[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    if isinstance(capacity, torch.Tensor):
        cap = capacity.to(device=flat.device, dtype=torch.int64)
        drop = (rank >= torch.cat([cap, cap.new_zeros(1)])[key]) & (flat >= 0)
    else:
        capacity = torch.sym_min(capacity, flat.numel())  # (the same choices kept; a huge cap fits an int64 then)
        drop = (rank >= capacity) & (flat >= 0)
    drop = drop.view_as(topk_idx)
    return topk_idx.masked_fill(drop, -1), topk_weights.masked_fill(drop, 0.0)


def capacity_ratio(capacity_factor: float) -> tuple[int, int]:
    """The factor as the fraction its decimal form says (1.1 -> 11/10, not the binary float's ratio)."""
    from fractions import Fraction

    f = Fraction(str(capacity_factor))
    return f.numerator, f.denominator


def capacity_for(num_tokens: int, topk: int, num_experts: int, capacity_factor: float | tuple[int, int]) -> int:
    """Choices kept per expert: ceil(capacity_factor * T * K / E), at most T * K, exact for a factor given in
    decimal (1.1 * 100 * 8 / 8 is 110, not float rounding's 111). The factor may be given as ``capacity_ratio``'s
    (num, den); integer arithmetic only, so a traced T (torch.compile) works."""
    num, den = capacity_ratio(capacity_factor) if not isinstance(capacity_factor, tuple) else capacity_factor
    # (at most every choice: a larger cap keeps the same, and a huge factor's would not fit an int64 comparison)
    return torch.sym_min(-((-num * num_tokens * topk) // (den * num_experts)), num_tokens * topk)


def balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard auxiliary loss ``E * sum_e f_e * P_e`` (1.0 when perfectly balanced).

    Args:
        scores: float32 [T, E] routing scores (with grad); rows are normalised to sum 1 for P (sigmoid scores).
        topk_idx: int64 [T, K] chosen experts (-1 ignored).
        num_experts: E.

    Returns:
        float32 scalar; f_e = share of the valid choices that went to e, P_e = mean normalised score of e.
    """
    counts = _counts(topk_idx, num_experts).float()
    f = counts / counts.sum().clamp_min(1.0)
    probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    p = probs.sum(dim=0) / max(scores.shape[0], 1)  # (0 tokens: zeros that keep the graph, so backward works)
    return num_experts * (f * p).sum()


class TopKGate(nn.Module):
    """Linear router ``logits = x @ weight.T`` (``+ router_bias`` with ``GateConfig.router_bias``) followed by
    :func:`select_topk`, with optional bias balancing, auxiliary loss and capacity.

    Parameters: ``weight`` [E, H]; ``router_bias`` [E] with ``config.router_bias`` (zero at first; an
    ``nn.Linear(H, E, bias=True)`` router's bias goes there), else None (not in the state dict). The router bias
    enters the logits, hence the scores, the weights and their gradients; the balancing ``expert_bias`` below only
    moves the choice of experts.

    Buffers: ``expert_bias`` float32 [E] (selection only), ``expert_load`` float32 [E] (choices counted since the
    last ``update_bias``; counted in training mode when ``bias_balancing`` is on), ``group_of_expert`` int64 [E]
    (and its member table, not saved), ``expert_replicas`` int64 [E] (``set_replicas``; 1 each by default).
    ``forward`` never waits on the host.

    Made on the meta device (``with torch.device("meta")``, e.g. for FSDP2), the gate holds no values; after
    ``to_empty(device=...)`` its tensors hold whatever memory they got, and ``reset_parameters()`` (a fresh gate's
    values: weight, zero router bias, balancing bias and load, the groups and their table) or ``load_state_dict``
    (the groups saved with the gate; the table is rebuilt from them) make it usable. The gate keeps its groups on
    the host too, for that.
    """

    distinct_experts = True  # a token's K choices are distinct experts (MoELayer.experts_chunk counts on it)
    router_bias: nn.Parameter | None
    expert_bias: torch.Tensor
    expert_load: torch.Tensor
    group_of_expert: torch.Tensor
    group_table: torch.Tensor
    group_sizes: torch.Tensor
    expert_replicas: torch.Tensor
    replica_class: torch.Tensor

    def __init__(self, config: GateConfig, *, group_of_expert: torch.Tensor | None = None) -> None:
        """``group_of_expert``: int64 [E] holding values (on any device but meta), the group of each expert (e.g.
        ``Placement.home_node()``); default: ``config.num_groups`` contiguous groups. The gate's tensors are made on
        the default device."""
        super().__init__()
        self.config = config
        if group_of_expert is None:
            group_of_expert = contiguous_groups(config.num_experts, config.num_groups, device=torch.device("cpu"))
        self.topk_groups = self._check_groups(group_of_expert)
        # the groups on the host: what reset_parameters writes back (a meta or to_empty gate's buffer holds none)
        self._host_groups = group_of_expert.detach().to("cpu", copy=True)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden))
        # (made as the weight is; None without router_bias: the gate's parameters and state dict as before)
        self.register_parameter("router_bias", nn.Parameter(torch.zeros(config.num_experts))
                                if config.router_bias else None)
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(config.num_experts, dtype=torch.float32))
        self.register_buffer("group_of_expert", torch.empty(config.num_experts, dtype=torch.int64))
        # replicas of each expert, for the capacity (set_replicas); the host copy as for the groups
        self._host_replicas = torch.ones(config.num_experts, dtype=torch.int64, device="cpu")
        self.register_buffer("expert_replicas", torch.empty(config.num_experts, dtype=torch.int64))
        self.register_buffer("replica_class", None, persistent=False)  # (index of each expert's count, see there)
        # (the member table and sizes: set by reset_parameters, from the groups on the host)
        self.register_buffer("group_table", None, persistent=False)
        self.register_buffer("group_sizes", None, persistent=False)
        self.reset_parameters()

    def __setattr__(self, name: str, value: object) -> None:
        # a new config keeps the fields the gate was built for (its groups were checked against them, its weight
        # has their shape); the others may change, as they may on the config itself
        if name == "config" and "config" in self.__dict__:
            _check(isinstance(value, GateConfig), "config", f"must be a GateConfig, got {type(value).__name__}")
            assert isinstance(value, GateConfig)
            changed = sorted(f for f in _FIXED_GATE_FIELDS if getattr(value, f) != getattr(self.config, f))
            _check(not changed, "config", f"cannot change {', '.join(changed)} of a built gate (it checked its "
                   "groups against them and made its weight and router bias for them); make a new gate instead")
        super().__setattr__(name, value)  # type: ignore[arg-type]  # (nn.Module takes any value)

    def reset_parameters(self) -> None:
        """Sets a fresh gate's values in place: weight normal with std hidden**-0.5, zero ``router_bias`` (if any),
        ``expert_bias`` and ``expert_load``, and the groups last given (at construction, by ``set_groups`` or by a
        state dict) with their table, on the gate's device. After ``to_empty(device=...)`` of a gate made on the meta
        device this makes it a working gate (with the replica counts last given, by ``set_replicas`` or a state
        dict)."""
        with torch.no_grad():
            nn.init.normal_(self.weight, std=self.config.hidden**-0.5)
            if self.router_bias is not None:
                self.router_bias.zero_()
            self.expert_bias.zero_()
            self.expert_load.zero_()
            self.group_of_expert.copy_(self._host_groups)
            self.expert_replicas.copy_(self._host_replicas)
        self._use_groups(self._host_groups)
        self._use_replicas(self._host_replicas)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # a module-wide cast (gate.to(torch.bfloat16), .half()) must not round the balancing state: a bias step of
        # 1e-3 vanishes next to 0.5 in bf16 and load counts stop at 256; they stay float32, from their values
        # before the cast (devices still move)
        before = {name: getattr(self, name) for name in ("expert_bias", "expert_load")}
        super()._apply(fn, recurse)
        for name, old in before.items():
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, old.to(device=buf.device, dtype=torch.float32))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        groups = state_dict.get(prefix + "group_of_expert")
        if isinstance(groups, torch.Tensor) and groups.device.type != "meta":  # refused before anything is loaded
            self._check_groups(groups)  # (not a gate half loaded)
        replicas = state_dict.get(prefix + "expert_replicas")
        if replicas is None:  # a state saved before gates had replica counts: the gate keeps its own
            state_dict[prefix + "expert_replicas"] = self._host_replicas.clone()
        elif isinstance(replicas, torch.Tensor) and replicas.device.type != "meta":
            self._check_replicas(replicas)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_groups()
        if self.expert_replicas.device.type != "meta":
            self._use_replicas(self.expert_replicas)

    def _check_groups(self, group_of_expert: torch.Tensor) -> int:
        """Refuses groups that cannot hold top-k; returns the groups kept per token (config's, default all)."""
        cfg = self.config
        _check(group_of_expert.device.type != "meta", "group_of_expert", "must hold values (not a meta tensor)")
        topk_groups = cfg.topk_groups if cfg.topk_groups is not None else int(group_of_expert.max()) + 1
        return check_groups(group_of_expert, cfg.num_experts, cfg.topk, topk_groups)

    def _use_groups(self, group_of_expert: torch.Tensor) -> None:
        """Takes checkable groups as the gate's: its host copy, topk_groups and member table (the buffer
        ``group_of_expert`` is the caller's to write)."""
        self.topk_groups = self._check_groups(group_of_expert)
        self._host_groups = group_of_expert.detach().to("cpu", copy=True)
        table, sizes = group_tables(self._host_groups)
        dev = self.group_of_expert.device
        self.group_table, self.group_sizes = table.to(dev), sizes.to(dev)

    def _refresh_groups(self) -> None:
        """Rebuilds the group table from ``group_of_expert`` (after a state dict or an in-place change of it). A meta
        buffer holds no groups to read: the gate keeps those it had (loading into a meta module changes nothing)."""
        if self.group_of_expert.device.type != "meta":
            self._use_groups(self.group_of_expert)

    def set_groups(self, group_of_expert: torch.Tensor) -> None:
        """Replaces the group of each expert (e.g. a new ``Placement.home_node()`` after re-planning)."""
        self._check_groups(group_of_expert)  # before anything changes
        with torch.no_grad():
            self.group_of_expert.copy_(group_of_expert.to(self.group_of_expert.device))
        self._use_groups(group_of_expert)

    def _check_replicas(self, replica_count: object) -> torch.Tensor:
        """Refuses anything but an integer tensor [E] of values >= 1 holding values (one host read); returns it as
        int64 on the CPU."""
        e = self.config.num_experts
        ok = integer_tensor(replica_count) and replica_count.shape == (e,) and replica_count.device.type != "meta"
        _check(ok, "replica_count", f"must be an integer tensor [{e}] holding values, got "
               f"{replica_count.dtype} {tuple(replica_count.shape)}" if isinstance(replica_count, torch.Tensor)
               else f"must be an integer tensor [{e}], got {type(replica_count).__name__}")
        assert isinstance(replica_count, torch.Tensor)
        host = replica_count.detach().to("cpu", torch.int64, copy=True)
        _check(bool((host >= 1).all()), "replica_count", f"must be >= 1, got min {int(host.min())}")
        return host

    def _use_replicas(self, replica_count: torch.Tensor) -> None:
        """Takes checked replica counts as the gate's: the host copy, the distinct counts (``_replica_values``) and
        the index of each expert's among them (``replica_class``, on the gate's device), which the capacity uses
        with one computation per distinct count (the buffer ``expert_replicas`` is the caller's to write)."""
        host = self._check_replicas(replica_count)
        self._host_replicas = host
        self._replica_values = sorted(set(host.tolist()))
        self._replica_total = int(host.sum())
        cls = torch.tensor([self._replica_values.index(r) for r in host.tolist()], dtype=torch.int64, device="cpu")
        self.replica_class = cls.to(self.expert_replicas.device)

    def set_replicas(self, replica_count: torch.Tensor) -> None:
        """Sets each expert's replica count (e.g. ``Placement.replica_count``; ``MoELayer`` sets its placement's),
        integer [E], values >= 1 (one host read): the capacity (``capacity_factor``) of expert e becomes
        ceil(factor * T * K * r_e / S), S = sum of r (the slots in use), so that a replicated expert keeps as many
        choices as its slots serve. Equal counts (the default: 1 each) keep ceil(factor * T * K / E) for every
        expert. Saved in the state dict (``expert_replicas``), as the groups are: both describe the placement the
        gate was saved under, so after loading a checkpoint made under another placement (a re-plan, another EP
        size) call ``set_groups`` and ``set_replicas`` again from the current one (a :class:`largeep.layers.MoELayer`
        sets its own placement's replica counts, all ones without one, again itself after ``load_state_dict``)."""
        host = self._check_replicas(replica_count)  # before anything changes
        with torch.no_grad():
            self.expert_replicas.copy_(host.to(self.expert_replicas.device))
        self._use_replicas(host)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Routing probabilities float32 [T, E] from logits [T, E]."""
        logits = logits.float()
        return logits.softmax(dim=-1) if self.config.score_func == "softmax" else logits.sigmoid()

    def forward(self, x: torch.Tensor) -> GateOutput:
        """Routes tokens x [T, H] (any float dtype). Does not wait on the host."""
        cfg = self.config
        _check(x.dim() == 2 and x.shape[1] == cfg.hidden, "x", f"must be [T, {cfg.hidden}], got {tuple(x.shape)}")
        # float32 logits whatever the module's dtype or an autocast region: bf16 logits flip near-tied choices
        bias = None if self.router_bias is None else self.router_bias.float()
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float(), bias)
        return self.route_logits(logits)

    def route_logits(self, logits: torch.Tensor) -> GateOutput:
        """Routes from given logits float [T, E] (the gate's weight and ``router_bias`` are not used: the logits
        are taken as they are)."""
        cfg = self.config
        _check(
            logits.dim() == 2 and logits.shape[1] == cfg.num_experts,
            "logits",
            f"must be [T, {cfg.num_experts}], got {tuple(logits.shape)}",
        )
        scores = self.scores(logits)
        topk_idx, topk_weights = select_topk(
            scores,
            cfg.topk,
            bias=self.expert_bias if cfg.bias_balancing else None,
            group_of_expert=self.group_of_expert,
            group_table=(self.group_table, self.group_sizes),
            topk_groups=self.topk_groups,
            group_score=cfg.group_score,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        if cfg.bias_balancing and self.training:
            self.expert_load += _counts(topk_idx, cfg.num_experts).float()
        aux = balance_loss(scores, topk_idx, cfg.num_experts) * cfg.aux_loss_coef if cfg.aux_loss_coef > 0 else None
        ratio = getattr(cfg, "_capacity_ratio", None)  # (None without a capacity factor)
        if ratio is not None:
            t = logits.shape[0]
            if len(self._replica_values) == 1:  # (equal counts: one capacity, ceil(factor * T * K / E))
                cap: int | torch.Tensor = capacity_for(t, cfg.topk, cfg.num_experts, ratio)
            else:  # ceil(factor * T * K * r / S) per distinct count r, exact in Python ints (T may be traced)
                cap = torch.zeros_like(self.replica_class)
                for i, r in enumerate(self._replica_values):
                    each = torch.sym_min(capacity_for(t * r, cfg.topk, self._replica_total, ratio), t * cfg.topk)
                    cap = cap.masked_fill(self.replica_class == i, each)
            topk_idx, topk_weights = apply_capacity(topk_idx, topk_weights, cfg.num_experts, cap)
        tokens_per_expert = _counts(topk_idx, cfg.num_experts)
        return GateOutput(topk_idx, topk_weights, scores, tokens_per_expert, aux)

    @torch.no_grad()
    def update_bias(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        load: torch.Tensor | None = None,
        rate: float | None = None,
        per_replica: bool = False,
    ) -> torch.Tensor:
        """One aux-loss-free balancing step: ``bias += rate * sign(mean(load) - load)``, then resets the counts.

        The step evens the load per logical expert; it knows nothing of replicas. Beside a
        :class:`largeep.placement.Placement` that gives a hot expert several replicas this works against the plan:
        the bias pushes the replicated expert down toward the mean load of one expert, so its replicas' GPUs serve
        less than the plan gave them (underloaded) and the GPUs of the experts it moves the load to more, until a
        re-plan from the new loads. To even the load per replica instead, pass ``load`` = the counts divided by each
        expert's replica count (``Placement.replica_count``), or ``per_replica=True`` to use the counts of
        :meth:`set_replicas` (which :class:`largeep.layers.MoELayer` sets from its placement); a re-plan from loads
        balanced that way sees loads in proportion to the current replica counts, so it keeps them.

        Args:
            group: when given, the loads are summed over it (one all_reduce of E float32 numbers; over gloo an
                all-to-all of them that each rank sums in rank order, so that a peer that exits ends every rank's
                wait at once; every rank of the group must call this). None: local loads only (a gate replicated
                over the group then drifts apart from its copies). (Under DDP call
                ``largeep.layers.ddp_ignore_experts(model)`` before wrapping, or pass DDP ``broadcast_buffers=False``:
                its buffer broadcast copies rank 0's counts over the others'. A checkpointed forward that is
                recomputed counts twice.)
            load: float [E] to use instead of the counts gathered by ``forward`` since the last update; finite
                (checked: one host read of it).
            rate: overrides ``config.bias_update_rate`` (a finite number >= 0; checked before the all_reduce).
            per_replica: even the load per replica: the (summed) load is divided by ``expert_replicas`` (the
                counts of :meth:`set_replicas`; 1 each by default) before the step.

        Returns:
            float32 [E], the (summed; with ``per_replica``, divided) load the step used. Waits on the host only
            through the all_reduce.
        """
        e = self.config.num_experts
        step = self.config.bias_update_rate if rate is None else rate
        _check(_finite(step) and step >= 0, "rate", f"must be a finite number >= 0, got {step!r}")
        _check(isinstance(per_replica, bool), "per_replica", f"must be a bool, got {type(per_replica).__name__}")
        _check(load is None or isinstance(load, torch.Tensor), "load",
               f"must be None or a tensor [{e}], got {type(load).__name__}")
        used = self.expert_load.clone() if load is None else load.detach().float().to(self.expert_bias.device).clone()
        _check(used.shape == (e,), "load", f"must have shape [{e}], got {tuple(used.shape)}")
        # (a given load is read once on the host: a NaN would make the mean NaN and move no expert's bias)
        _check(load is None or bool(torch.isfinite(used).all()), "load", "must hold finite values")
        if group is not None:
            from largeep import _collective

            _collective.all_reduce(used, group, "TopKGate.update_bias", direct=True)
        if per_replica:
            used /= self.expert_replicas.to(used)
        if self.config.bias_balancing:
            self.expert_bias += step * torch.sign(used.mean() - used)
        self.expert_load.zero_()
        return used


@dataclass(eq=False)
class LoadSnapshot:
    """Loads seen by one :meth:`LoadMonitor.update` (tensors on the monitor's device; reading them as Python
    numbers is the caller's host sync).

    Attributes:
        expert_load: float32 [E], choices per expert this step.
        gpu_load: float32 [G], choices per GPU this step.
        ema_expert_load: float32 [E]; ema_gpu_load: float32 [G] (exponential moving averages).
        expert_imbalance, gpu_imbalance: float32 scalars, max / mean of this step's loads (1 when all zero).
        ema_expert_imbalance, ema_gpu_imbalance: float32 scalars, the same on the moving averages.
    """

    expert_load: torch.Tensor
    gpu_load: torch.Tensor
    ema_expert_load: torch.Tensor
    ema_gpu_load: torch.Tensor
    expert_imbalance: torch.Tensor
    gpu_imbalance: torch.Tensor
    ema_expert_imbalance: torch.Tensor
    ema_gpu_imbalance: torch.Tensor


def imbalance(load: torch.Tensor) -> torch.Tensor:
    """max / mean of a float load vector [n] as a float32 scalar; 1 when the mean is 0."""
    mean = load.float().mean()
    return torch.where(mean > 0, load.float().max() / mean.clamp_min(1e-30), torch.ones_like(mean))


class LoadMonitor:
    """Per-expert and per-GPU routing load with exponential moving averages, cheap enough for every step.

    Either ``experts_per_gpu`` (ids are physical: GPU of expert e = e // experts_per_gpu) or ``placement`` (ids are
    logical; each logical expert's load is split evenly over its replicas) fixes the GPU of each expert; with
    neither, every expert is its own GPU.
    """

    def __init__(
        self,
        num_experts: int,
        *,
        experts_per_gpu: int | None = None,
        placement: Placement | None = None,
        ema_decay: float = 0.9,
        device: torch.device | str | None = None,
    ) -> None:
        """``ema_decay``: ema = decay * ema + (1 - decay) * load; the first update sets the ema to the load."""
        _check(num_experts >= 1, "num_experts", f"must be >= 1, got {num_experts}")
        _check(0.0 <= ema_decay < 1.0, "ema_decay", f"must be in [0, 1), got {ema_decay}")
        _check(experts_per_gpu is None or placement is None, "placement", "cannot be given with experts_per_gpu")
        self.num_experts = num_experts
        self.ema_decay = ema_decay
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if placement is not None:
            _check(
                placement.num_logical == num_experts,
                "placement",
                f"has {placement.num_logical} logical experts, expected {num_experts}",
            )
            self.share = placement.gpu_share().to(dev)  # [E, G]: fraction of e's load that each GPU serves
        else:
            per = 1 if experts_per_gpu is None else experts_per_gpu
            _check(_is_int(per), "experts_per_gpu", f"must be an int, got {per!r}")
            _check(per >= 1 and num_experts % per == 0, "experts_per_gpu", f"must divide {num_experts}, got {per}")
            gpu = torch.arange(num_experts, device=dev) // per
            self.share = F.one_hot(gpu, num_experts // per).float()
        self.num_gpus = self.share.shape[1]
        self.ema_expert_load = torch.zeros(num_experts, device=dev)
        self.ema_gpu_load = torch.zeros(self.num_gpus, device=dev)
        self.steps = 0

    def update(
        self, topk_idx: torch.Tensor | None = None, *, expert_counts: torch.Tensor | None = None
    ) -> LoadSnapshot:
        """Adds one step, from ``topk_idx`` int64 [T, K] (-1 ignored; ids are not range-checked, which would wait on
        the host: give ids in [-1, E)) or ``expert_counts`` float/int [E]."""
        _check((topk_idx is None) != (expert_counts is None), "topk_idx", "or expert_counts: give exactly one")
        if topk_idx is not None:
            _check_topk(topk_idx, self.num_experts, values=False)  # (ids not range-checked: no host wait)
            load = _counts(topk_idx.to(self.share.device), self.num_experts).float()
        else:
            assert expert_counts is not None
            _check(isinstance(expert_counts, torch.Tensor), "expert_counts",
                   f"must be a tensor [{self.num_experts}], got {type(expert_counts).__name__}")
            load = expert_counts.to(self.share.device).float()
        _check(load.shape == (self.num_experts,), "expert_counts", f"must have {self.num_experts} entries")
        gpu = load @ self.share
        if self.steps == 0:
            self.ema_expert_load.copy_(load)
            self.ema_gpu_load.copy_(gpu)
        else:
            self.ema_expert_load.mul_(self.ema_decay).add_(load, alpha=1 - self.ema_decay)
            self.ema_gpu_load.mul_(self.ema_decay).add_(gpu, alpha=1 - self.ema_decay)
        self.steps += 1
        return LoadSnapshot(
            load,
            gpu,
            self.ema_expert_load.clone(),
            self.ema_gpu_load.clone(),
            imbalance(load),
            imbalance(gpu),
            imbalance(self.ema_expert_load),
            imbalance(self.ema_gpu_load),
        )
