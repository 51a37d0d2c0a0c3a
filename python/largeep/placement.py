"""Expert placement: logical experts (with replicas) on physical slots, topology-aware planning, link-load model.

Words. A *logical* expert is what the gate picks (ids [0, L)). A *slot* is a physical expert id as dispatch sees it:
GPU g owns slots [g * slots_per_gpu, (g + 1) * slots_per_gpu), so the slots are SPEC.md's physical experts
(E = num_gpus * slots_per_gpu). A :class:`Placement` says which logical expert each slot holds (``phys_to_log``,
-1 for an empty slot); a logical expert held by several slots has *replicas*. ``Placement.route`` turns a batch's
logical ``topk_idx`` into the physical ``topk_idx`` that ``Buffer.dispatch`` takes (same GPU, then same node, then
the least-loaded replica, with ``node_limited`` only on the token's own node and its experts' home nodes; each rank
routes its own tokens, and the model routes a trace the same way).

Link model (``simulate_links``). Each GPU has one NIC (``nic_bw`` bytes/s each way) and one NVLink port
(``nvlink_bw`` bytes/s each way). A token goes to a GPU once however many of its experts live there.
- flat dispatch: a token crosses a NIC (source out, destination in) once per destination GPU on another node, and
  NVLink once per other destination GPU on its own node.
- hierarchical dispatch (DeepEP internode): a token crosses the network once per destination node, from its source
  GPU to the GPU of the same local index on that node, which forwards it over NVLink to the destination GPUs there.
Compute load of a GPU = the (token, expert) choices it serves.

Planner (``plan_placement``).
1. The greedy baseline (``greedy_placement``, EPLB-style, topology-blind): the next replica goes to the expert with
   the highest load per replica; then the largest replica first onto the least-loaded GPU with a free slot.
2. With a routing trace, the topology-aware plan starts from the same packing, with replica counts that are
   multiples of the node count once an expert has more replicas than nodes (so every node can serve its own tokens),
   then runs two local searches of swaps between GPUs of different nodes, each swap keeping both GPUs' compute load
   under the bound (greedy's largest GPU load on the trace * (1 + tolerance / 2), on estimated loads: each replica
   serving an even share of its expert):
   a. co-activation: keep inside nodes the pairs of experts that tokens use together and each expert with the
      source nodes of its tokens (replicas of one expert repel, so they spread to where demand comes from);
   b. demand balance: lower sum_n D_n^4 where D_n = remote tokens that need node n (the NIC load of node n's GPUs
      under hierarchical dispatch), with each token bound to the replicas that ``route`` gave it.
   Swaps on disjoint pairs of nodes are independent, so each round applies the best swap of many node pairs.
3. The search result is routed on the trace; if its compute imbalance exceeds greedy's * (1 + tolerance), the
   search reruns with a tighter bound (twice at most). The plan with the lower bottleneck link time wins (the
   search result, else greedy).
"""

from __future__ import annotations

import heapq
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from largeep.checks import flags
from largeep.errors import ArgumentError

__all__ = [
    "LinkLoad",
    "Move",
    "Placement",
    "RoutingTrace",
    "Topology",
    "contiguous_placement",
    "greedy_placement",
    "migration_plan",
    "plan_placement",
    "replica_counts",
    "simulate_links",
    "synthetic_trace",
]


def _check(cond: bool, arg: str, msg: str) -> None:
    if not cond:
        raise ArgumentError(f"argument '{arg}' {msg}")

def _check_int(value: object, arg: str, minimum: int) -> None:
    _check(isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= minimum, arg,
           f"must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class Topology:
    """A cluster: ``num_nodes`` x ``gpus_per_node`` GPUs; GPU g is on node g // gpus_per_node.

    Attributes:
        num_nodes, gpus_per_node: sizes (>= 1).
        nvlink_bw: NVLink bytes/s per GPU per direction (H100/H200 NVLink4: 450e9).
        nic_bw: network bytes/s per GPU per direction (ConnectX-7 400 Gb/s: 50e9).
        slots_per_gpu: expert slots each GPU has memory for.
    """

    num_nodes: int
    gpus_per_node: int
    nvlink_bw: float = 450e9
    nic_bw: float = 50e9
    slots_per_gpu: int = 1

    def __post_init__(self) -> None:
        _check_int(self.num_nodes, "num_nodes", 1)
        _check_int(self.gpus_per_node, "gpus_per_node", 1)
        _check(self.nvlink_bw > 0, "nvlink_bw", f"must be > 0 bytes/s, got {self.nvlink_bw}")
        _check(self.nic_bw > 0, "nic_bw", f"must be > 0 bytes/s, got {self.nic_bw}")
        _check_int(self.slots_per_gpu, "slots_per_gpu", 1)

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def num_slots(self) -> int:
        return self.num_gpus * self.slots_per_gpu

    @property
    def slots_per_node(self) -> int:
        """Slots of one node: slot s is on node s // slots_per_node."""
        return self.gpus_per_node * self.slots_per_gpu


@dataclass(eq=False)
class RoutingTrace:
    """Routing of T tokens over L logical experts.

    Attributes:
        topk_idx: int64 [T, K], logical experts in [-1, L) (-1: no expert).
        src_gpu: int64 [T], the GPU each token comes from.
        num_experts: L.
    """

    topk_idx: torch.Tensor
    src_gpu: torch.Tensor
    num_experts: int

    def __post_init__(self) -> None:
        _check(
            isinstance(self.topk_idx, torch.Tensor) and self.topk_idx.dtype == torch.int64 and self.topk_idx.dim() == 2,
            "topk_idx",
            "must be an int64 tensor [T, K]",
        )
        t = self.topk_idx.shape[0]
        _check(
            isinstance(self.src_gpu, torch.Tensor) and self.src_gpu.dtype == torch.int64 and self.src_gpu.shape == (t,),
            "src_gpu",
            f"must be an int64 tensor [{t}]",
        )
        _check_int(self.num_experts, "num_experts", 1)
        # the planner and the link model count on the CPU: a trace gathered from the gate's CUDA ids moves there
        self.topk_idx, self.src_gpu = self.topk_idx.cpu(), self.src_gpu.cpu()
        if t:
            _check(int(self.src_gpu.min()) >= 0, "src_gpu", f"must be >= 0, got {int(self.src_gpu.min())}")
        if self.topk_idx.numel():
            lo, hi = int(self.topk_idx.min()), int(self.topk_idx.max())
            _check(
                lo >= -1 and hi < self.num_experts, "topk_idx", f"must be in [-1, {self.num_experts}), got [{lo}, {hi}]"
            )

    def expert_load(self) -> torch.Tensor:
        """float64 [L]: choices per logical expert."""
        flat = self.topk_idx.reshape(-1)
        return torch.bincount(flat[flat >= 0], minlength=self.num_experts).double()


def _check_topk(topk_idx: torch.Tensor, num_experts: int, arg: str = "topk_idx", *, values: bool = True) -> None:
    """int64 [T, K]; with ``values``, in [-1, num_experts) too (a host read of the ids)."""
    _check(
        isinstance(topk_idx, torch.Tensor) and topk_idx.dtype == torch.int64 and topk_idx.dim() == 2,
        arg,
        "must be an int64 tensor [T, K]",
    )
    if values and topk_idx.numel():
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        _check(lo >= -1 and hi < num_experts, arg, f"must be in [-1, {num_experts}), got [{lo}, {hi}]")


@dataclass(eq=False)
class Placement:
    """Which logical expert each physical slot holds.

    Every rank must hold the same placement. Each rank routes its own tokens with its copy (``route``, or
    ``table_route`` in a traced ``MoELayer``) and loads its slots' weights from it (``MoELayer`` reads its
    ``phys_to_log``, e.g. in ``load_global_experts``); where two ranks' copies differ, tokens reach slots that hold
    other experts than their sender assumed and are computed with the wrong experts, with no error. Plan on one rank
    and share the plan, e.g. ``torch.distributed.broadcast_object_list([placement], src=0)`` (a pickled Placement
    carries no lookup tables; each rank builds its own), or plan on every rank from the same loads and trace
    (all-reduced or gathered) without ``plan_placement``'s ``time_budget_s``, whose result depends on the speed of
    the machine.

    Attributes:
        topology: the cluster (slot s is on GPU s // slots_per_gpu).
        num_logical: L.
        phys_to_log: int64 [num_slots], logical expert of each slot, -1 if empty. Every logical expert needs a slot.
        replica_table: int64 [L, R] (derived), slots of each logical expert ascending, -1 padded; R = max replicas.
        replica_count: int64 [L] (derived), replicas of each logical expert.
    """

    topology: Topology
    num_logical: int
    phys_to_log: torch.Tensor
    replica_table: torch.Tensor = field(init=False, repr=False)
    replica_count: torch.Tensor = field(init=False, repr=False)
    # route's lookup tables per device (_tables): a field, read with a plain attribute lookup, which torch.compile
    # traces on every torch version (Dynamo of torch 2.11 refuses __dict__.setdefault)
    _table_cache: dict[torch.device, tuple[torch.Tensor, ...]] = field(
        init=False, repr=False, default_factory=dict, compare=False
    )
    # table_route's cap and remote cycles per device (_spread), apart: route never needs them
    _spread_cache: dict[torch.device, tuple[torch.Tensor, ...]] = field(
        init=False, repr=False, default_factory=dict, compare=False
    )

    def __post_init__(self) -> None:
        s = self.topology.num_slots
        p2l = self.phys_to_log
        _check(
            isinstance(p2l, torch.Tensor) and p2l.dtype == torch.int64 and p2l.shape == (s,),
            "phys_to_log",
            f"must be an int64 tensor [{s}] (num_gpus * slots_per_gpu)",
        )
        _check_int(self.num_logical, "num_logical", 1)
        self.phys_to_log = p2l = p2l.cpu().clone()  # (its own: a caller's later change would not match the tables)
        _check(
            bool(((p2l >= -1) & (p2l < self.num_logical)).all()),
            "phys_to_log",
            f"values must be in [-1, {self.num_logical})",
        )
        used = p2l >= 0
        counts = torch.bincount(p2l[used], minlength=self.num_logical)
        missing = (counts == 0).nonzero().flatten()
        _check(missing.numel() == 0, "phys_to_log", f"leaves logical experts without a slot: {missing[:8].tolist()}")
        order = torch.argsort(torch.where(used, p2l, self.num_logical), stable=True)[: int(used.sum())]
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(order.numel(), device="cpu") - starts[p2l[order]]
        table = torch.full((self.num_logical, int(counts.max())), -1, dtype=torch.int64, device="cpu")
        table[p2l[order], pos] = order
        self.replica_table = table
        self.replica_count = counts

    def __getstate__(self) -> dict[str, object]:
        # a pickled plan (broadcast_object_list sharing it over ranks, torch.save) carries no lookup tables: they
        # may be CUDA tensors of the sender's device; the receiver builds its own at first use (or prepare)
        state = self.__dict__.copy()
        state["_table_cache"], state["_spread_cache"] = {}, {}
        return state

    @property
    def replicas(self) -> list[list[int]]:
        """Slots of each logical expert, ascending."""
        return [row[: int(c)].tolist() for row, c in zip(self.replica_table, self.replica_count, strict=True)]

    def gpu_of_slot(self) -> torch.Tensor:
        """int64 [num_slots]: the GPU of each slot."""
        return torch.arange(self.topology.num_slots, device="cpu") // self.topology.slots_per_gpu

    def gpu_share(self) -> torch.Tensor:
        """float32 [L, G]: share of each logical expert's load that each GPU serves when split evenly over its
        replicas."""
        share = torch.zeros(self.num_logical, self.topology.num_gpus, device="cpu")
        used = self.phys_to_log >= 0
        e = self.phys_to_log[used]
        share.index_put_((e, self.gpu_of_slot()[used]), 1.0 / self.replica_count[e].float(), accumulate=True)
        return share

    def home_node(self) -> torch.Tensor:
        """int64 [L]: the group of each logical expert for node-limited gating (``TopKGate(group_of_expert=...)``):
        the node of its first replica, numbered 0..G-1 over the nodes that are some expert's home (a node that is
        no expert's home, possible when experts are fewer than nodes, gets no number, since the gate refuses empty
        groups). The limit holds for the experts' home nodes; with replicas, ``route`` and ``table_route`` keep a
        token on them and its own node with ``node_limited=True`` (as ``MoELayer`` does under such a gate), so it
        reaches at most ``topk_groups`` nodes besides its own. Without it they may serve a choice from a replica
        on any node."""
        node = self.replica_table[:, 0] // self.topology.slots_per_node
        return torch.unique(node, return_inverse=True)[1]

    def table_route(self, topk_idx: torch.Tensor, src_gpu: int, *, node_limited: bool = False) -> torch.Tensor:
        """A traceable ``route`` for the tokens of one source GPU: no host wait and no data-dependent shape, so
        ``torch.compile(fullgraph=True)`` and CUDA-graph capture take it (``MoELayer`` uses it there).

        Its local cap is static (``route``'s default ``local_cap=1.0`` counts each source's choices; this one cannot
        look at them): a choice (t, k) of logical e from a node that holds c of e's R replicas (N nodes) stays on
        that node for a fixed share min(1, N * c / R) of the (t, k), the node's fair share when every node sends a
        similar mix, chosen by a golden-ratio sequence over t and k (offset by the source GPU), so that over
        consecutive tokens each source keeps that share to within a few choices. A choice that stays goes to e's
        replica on ``src_gpu`` if there is one, else to the node's replicas in turn by t + k + src_gpu. The others
        (all of them from a node with no replica of e) go to the replicas of the nodes holding more than their
        share (N * c > R), in turn by t + k over a fixed interleaved cycle in which each replica appears in
        proportion to what its own node's choices leave of its fair share (N / R - 1 / c), each source starting at
        its own point of the cycle (src_gpu / phi of the way round). With every node sending the same number of
        choices of e, every replica of e then serves about the same number. Where a node holds fewer than its share
        of e's replicas, more choices of e cross nodes than if they all stayed (as with ``route``).

        Unlike ``route`` it does not water-fill by the load a batch actually brings (a batch whose nodes send uneven
        numbers of choices of an expert is balanced less well), and it does not check the ids (``route`` does; an
        id >= L indexes out of range). Where every expert has one replica the two agree; where every node holds an
        expert's replicas in proportion (N * c = R) every choice of it stays on its node, as with ``route``.
        With ``node_limited`` (as ``route``'s), a remote choice whose cycle entry is on a node the token may not
        reach (neither its own nor a home node of one of its experts) goes instead to e's replicas on its allowed
        nodes that are in e's cycle (else to all of e's replicas there; its home replica is always one), in turn
        by t + k + src_gpu. Deterministic.

        Args:
            topk_idx: int64 [T, K], logical experts in [-1, L); -1 passes through.
            src_gpu: the source GPU of every token, in [0, num_gpus): an integer (Python, numpy) or a 0-dim integer
                tensor.
            node_limited: keep each token on its own node and its experts' home nodes (``route``'s).

        Returns:
            int64 [T, K], slots in [-1, num_slots).
        """
        topo = self.topology
        flags("Placement.table_route", node_limited=node_limited)
        # (a numpy integer would turn the tensor arithmetic below into numpy's)
        forms = "an int or a 0-dim integer tensor"
        src_gpu = _one_source(src_gpu, forms)
        got = (f"a {src_gpu.dtype} tensor of shape {tuple(src_gpu.shape)}" if isinstance(src_gpu, torch.Tensor)
               else f"{type(src_gpu).__name__} {src_gpu!r}")
        _check(isinstance(src_gpu, int), "src_gpu", f"must be {forms} (one source GPU for every token), got {got}")
        _check(0 <= src_gpu < topo.num_gpus, "src_gpu", f"must be in [0, {topo.num_gpus}), got {src_gpu}")
        _check_topk(topk_idx, self.num_logical, values=False)  # (the values are not read: no host wait)
        table, _, on_gpu, node_list, node_cnt = self._tables(topk_idx.device)
        keep, cycles, cycle_start, cycle_len, in_cycle = self._spread(topk_idx.device)
        t, k = topk_idx.shape
        dev = topk_idx.device
        t_idx, k_idx = torch.arange(t, device=dev)[:, None], torch.arange(k, device=dev)[None, :]
        turn = t_idx + k_idx + src_gpu
        e = topk_idx.clamp(min=0)
        node = src_gpu // topo.gpus_per_node
        cnt = node_cnt[e, node]
        mine = on_gpu[e, src_gpu]
        near = node_list[e, node, turn % cnt.clamp(min=1)]
        # the sources start their remote cycles spread over it (src / phi of the way round; +1 would bunch a node's
        # GPUs on neighbouring entries, which a batch shorter than the cycle leaves uneven)
        n_far = cycle_len[e]
        far = cycles[cycle_start[e] + (t_idx + k_idx + ((src_gpu * 40503) & 0xFFFF) * n_far // 65536) % n_far]
        # u / 2**16 = t / phi + k * (sqrt(2) - 1) + src * (sqrt(3) - 1) mod 1, in 16-bit fixed point (whole
        # numbers: no overflow, the same on every device); choice (t, k) stays on its node iff u < keep
        u = (t_idx * 40503 + k_idx * 27146 + src_gpu * 47976) & 0xFFFF
        if node_limited:
            per_node = topo.slots_per_node
            reach = self._allowed_nodes(topk_idx, src_gpu, table)  # [T, N]
            cand = table[e]  # [T, K, R]
            ok = (cand >= 0) & reach.gather(1, (cand.clamp(min=0) // per_node).view(t, -1)).view(cand.shape)
            pick = ok & in_cycle[e]
            pick = torch.where(pick.any(dim=-1, keepdim=True), pick, ok)
            j = turn % pick.sum(dim=-1).clamp(min=1)
            alt = cand.gather(-1, (pick & (pick.long().cumsum(-1) == j[..., None] + 1)).long().argmax(-1, keepdim=True))
            far = torch.where(reach.gather(1, (far // per_node).view(t, -1)).view(t, k), far, alt.squeeze(-1))
        out = torch.where(u < keep[e, node], torch.where(mine >= 0, mine, near), far)
        return torch.where(topk_idx >= 0, out, torch.full_like(out, -1))

    def prepare(self, device: torch.device | str) -> Placement:
        """Builds the lookup tables of ``route`` and ``table_route`` on ``device`` now (they are otherwise built at
        the first call there), so that a ``torch.compile`` trace or a CUDA-graph capture only reads them. Returns
        self."""
        dev = torch.empty(0, device=device).device  # (the key a tensor there has: "cuda" is cuda:<current>)
        self._tables(dev)
        self._spread(dev)
        return self

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Lookup tables for ``route`` (and ``table_route``), cached per device: replica_table, replica_count, on_gpu
        int64 [L, G] (the lowest slot of e on GPU g, else -1), node_list int64 [L, N, Rn] (slots of e on node n
        ascending, -1 padded), node_cnt int64 [L, N]."""
        cache = self._table_cache
        if device not in cache:
            topo = self.topology
            used = (self.phys_to_log >= 0).nonzero().flatten()
            e = self.phys_to_log[used]
            gpu = used // topo.slots_per_gpu
            node = gpu // topo.gpus_per_node
            big = topo.num_slots
            on_gpu = torch.full((self.num_logical * topo.num_gpus,), big, dtype=torch.int64, device="cpu")
            on_gpu.scatter_reduce_(0, e * topo.num_gpus + gpu, used, reduce="amin")  # lowest slot of e on g
            on_gpu = torch.where(on_gpu == big, -1, on_gpu).view(self.num_logical, topo.num_gpus)
            key = e * topo.num_nodes + node
            cnt = torch.bincount(key, minlength=self.num_logical * topo.num_nodes)
            node_list = torch.full(
                (self.num_logical * topo.num_nodes, int(cnt.max())), -1, dtype=torch.int64, device="cpu"
            )
            node_list[key, _rank_within(key, self.num_logical * topo.num_nodes)] = used  # ascending slots
            cache[device] = (
                self.replica_table.to(device),
                self.replica_count.to(device),
                on_gpu.to(device),
                node_list.view(self.num_logical, topo.num_nodes, -1).to(device),
                cnt.view(self.num_logical, topo.num_nodes).to(device),
            )
        return cache[device]

    def _spread(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``table_route``'s static cap and remote cycles, cached per device (built on the host, once):

        keep int64 [L, N]: the choices of e that node n keeps, in 2**16ths: 2**16 * min(1, N * c / R) rounded down
        (c: replicas of e on n, R: all of e's), exactly 2**16 where N * c >= R.
        cycles int64 [sum of the lengths], with cycle_start int64 [L] and cycle_len int64 [L] (>= 1): e's cycle is
        cycles[start : start + len], each replica of a node with N * c > R in it as often as its weight N / R -
        1 / c (in the smallest whole numbers, or rounded to 1024 entries, every replica kept, where those need
        more), interleaved (entry j of a replica of weight w sorted at (j + 1/2) / w); all of e's replicas once
        where no node has more than its share (no choice of e is then remote). Stored end to end, so that one
        expert's long cycle pads no other's.
        in_cycle bool [L, R]: whether each replica (``replica_table``'s order) is in e's cycle."""
        cache = self._spread_cache
        if device not in cache:
            topo = self.topology
            n_nodes, per_node = topo.num_nodes, topo.slots_per_node
            used = (self.phys_to_log >= 0).nonzero().flatten()
            node_cnt = torch.bincount(self.phys_to_log[used] * n_nodes + used // per_node,
                                      minlength=self.num_logical * n_nodes).view(self.num_logical, n_nodes)
            reps = self.replica_count[:, None]
            keep = torch.where(n_nodes * node_cnt >= reps, 1 << 16, (n_nodes * node_cnt << 16) // reps)
            cycles: list[list[int]] = []
            for row, slots in zip(node_cnt.tolist(), self.replicas, strict=True):
                r = len(slots)
                # each replica's weight in whole numbers: (N * c - R) / c over the nodes where it is positive
                over = [n for n, c in enumerate(row) if n_nodes * c > r]
                common = math.lcm(*(row[n] for n in over)) if over else 1
                weight = {s: (n_nodes * row[s // per_node] - r) * common // row[s // per_node]
                          for s in slots if s // per_node in over} or dict.fromkeys(slots, 1)
                g = math.gcd(*weight.values())
                weight = {s: w // g for s, w in weight.items()}
                total = sum(weight.values())
                if total > 1024:  # largest remainders, each replica kept at least once
                    exact = {s: w * 1024 / total for s, w in weight.items()}
                    weight = {s: max(1, int(x)) for s, x in exact.items()}
                    short = max(0, 1024 - sum(weight.values()))
                    for s in sorted(exact, key=lambda s: (int(exact[s]) - exact[s], s))[:short]:
                        weight[s] += 1
                cycles.append([s for _, s in sorted(((j + 0.5) / w, s) for s, w in weight.items() for j in range(w))])
            length = torch.tensor([len(c) for c in cycles], dtype=torch.int64, device="cpu")
            flat = np.fromiter((s for c in cycles for s in c), dtype=np.int64, count=int(length.sum()))
            members = [set(c) for c in cycles]
            in_cycle = torch.tensor([[slot in m for slot in row] for row, m in
                                     zip(self.replica_table.tolist(), members, strict=True)],
                                    dtype=torch.bool, device="cpu").view(self.replica_table.shape)
            cache[device] = (keep.to(device), torch.from_numpy(flat).to(device),
                             (torch.cumsum(length, 0) - length).to(device), length.to(device), in_cycle.to(device))
        return cache[device]

    def _allowed_nodes(self, topk_idx: torch.Tensor, src: torch.Tensor | int, table: torch.Tensor) -> torch.Tensor:
        """bool [T, N]: each token's allowed nodes under a node limit: its source GPU's node (src int64 [T] or one
        GPU for all) and the home nodes of its valid choices (topk_idx int64 [T, K]; table: ``_tables``' first)."""
        topo = self.topology
        t = topk_idx.shape[0]
        src_node = torch.as_tensor(src, device=topk_idx.device) // topo.gpus_per_node
        src_node = src_node.expand(t)[:, None]
        home = table[topk_idx.clamp(min=0), 0] // topo.slots_per_node  # [T, K]
        nodes = torch.cat([src_node, torch.where(topk_idx >= 0, home, src_node)], 1)
        return torch.zeros(t, topo.num_nodes, dtype=torch.bool, device=topk_idx.device).scatter_(1, nodes, True)

    def _local_share(self, local_cap: float | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(share float64 [S], remote float64 [L]): the fraction of its expert's choices that each slot receives
        from its own node when every GPU sends a similar mix, min(1 / (nodes * replicas of the expert on that
        node), local_cap / replicas); and per expert, the fraction left for remote fills (at least 1 / replicas)."""
        topo = self.topology
        _, nrep, _, _, node_cnt = self._tables(device)
        p2l = self.phys_to_log.to(device)
        e = p2l.clamp(min=0)
        node = torch.arange(topo.num_slots, device=device) // topo.slots_per_gpu // topo.gpus_per_node
        share = 1.0 / (topo.num_nodes * node_cnt[e, node].clamp(min=1).double())
        if local_cap is not None:
            share = torch.minimum(share, local_cap / nrep[e].double())
        share = torch.where(p2l >= 0, share, torch.zeros_like(share))
        total = torch.zeros(self.num_logical, dtype=torch.float64, device=device).index_add_(0, e, share)
        return share, torch.maximum(1.0 - total, 1.0 / nrep.double())

    def route(
        self,
        topk_idx: torch.Tensor,
        src_gpu: torch.Tensor | numbers.Integral | int,
        *,
        slot_load: torch.Tensor | None = None,
        local_cap: float | None = 1.0,
        node_limited: bool = False,
    ) -> torch.Tensor:
        """Maps logical experts to physical slots (vectorised; no loop over tokens; waits on the host only to
        size intermediate tensors).

        Each source GPU's tokens are routed as that GPU would route them alone (in a deployment every rank calls
        this on its own batch, so the result for a trace of many sources equals one call per source). For each
        (token, k): a replica on the source GPU; else one on its node (several there: used in turn, starting at a
        GPU-dependent one); else the least-loaded replica: the source's remaining choices of each expert fill the
        replicas by water-filling over the load the source has put on them so far, plus ``slot_load``, plus the
        source's part of the load each replica gets from its own node (so that the fills of all sources add up to
        even totals: a replica alone on its node serves that node's tokens and gets fewer remote ones). Each replica
        gets the floor of its share of the fill or one more, the extra units going in an order rotated by the
        source GPU (so that sources do not all favour the same replica): the busiest replica ends within one
        choice of the lightest split.
        With ``local_cap``, a source sends at most ceil(local_cap * nodes * c * its choices of the expert /
        replicas) to the c replicas on its node by locality, all of them together (earlier tokens first; this is
        those replicas' fair share when every GPU sends a similar mix and each node's GPUs use their node's
        replicas), and water-fills the rest over all the replicas, those on its node included (so that its own
        node may end up with more than that bound, where that is the least load), so that locality does not
        overload a replica: without the cap,
        a node that holds fewer replicas of an expert than its share of the tokens would pile them on those.
        With ``node_limited``, a choice goes only to a replica on the token's *allowed nodes*: its source GPU's
        node and the home nodes (``home_node``) of its experts (its K choices'). The steps above are the same, the
        water-filling among the allowed replicas only: a source's choices of an expert are filled in sets of equal
        allowed replicas, the sets with fewer first, each over the load the earlier ones left. A token then reaches
        no node but its own and its experts' home nodes, so with a gate limited to M home nodes
        (``TopKGate(group_of_expert=home_node(), topk_groups=M)``) at most M nodes besides its own.
        Deterministic.

        Args:
            topk_idx: int64 [T, K], logical experts in [-1, L); -1 passes through.
            src_gpu: int64 [T], source GPU of each token, or one for all tokens: an integer (Python, numpy) or a
                0-dim integer tensor.
            slot_load: float [num_slots] or None, load already on each slot.
            local_cap: > 0, or None for no cap (see above).
            node_limited: keep each token on its allowed nodes (see above); False: any replica.

        Returns:
            int64 [T, K], slots in [-1, num_slots).
        """
        topo = self.topology
        flags("Placement.route", node_limited=node_limited)
        _check_topk(topk_idx, self.num_logical)
        t_num = topk_idx.shape[0]
        dev = topk_idx.device
        src = _one_source(src_gpu, f"an int or an int64 tensor [{t_num}]")
        if isinstance(src, int):  # (one source for all tokens, as table_route takes it)
            src = torch.full((t_num,), src, dtype=torch.int64, device=dev)
        else:
            _check(
                isinstance(src, torch.Tensor) and src.dtype == torch.int64 and src.shape == (t_num,),
                "src_gpu",
                f"must be an int or an int64 tensor [{t_num}]",
            )
            src = src.to(dev)  # (topk_idx's device: a CPU tensor beside CUDA ids is taken)
        if src.numel():
            _check(
                int(src.min()) >= 0 and int(src.max()) < topo.num_gpus,
                "src_gpu",
                f"must be in [0, {topo.num_gpus})",
            )
        if slot_load is not None:
            _check(slot_load.shape == (topo.num_slots,), "slot_load", f"must have shape [{topo.num_slots}]")
            _check(bool(torch.isfinite(slot_load).all() and (slot_load >= 0).all()), "slot_load",
                   "must be finite and >= 0")
        _check(local_cap is None or (isinstance(local_cap, numbers.Real) and not isinstance(local_cap, bool)
                                     and 0 < local_cap < math.inf), "local_cap",
               f"must be a finite number > 0, or None for no cap, got {local_cap!r}")
        table, nrep, on_gpu, node_list, node_cnt = self._tables(dev)
        out = torch.full_like(topk_idx, -1)
        valid = topk_idx >= 0
        e = topk_idx.clamp(min=0)
        single = valid & (nrep[e] == 1)
        out[single] = table[e[single], 0]
        t_idx, k_idx = (valid & (nrep[e] > 1)).nonzero(as_tuple=True)
        if t_idx.numel() == 0:
            return out
        n_nodes, n_log, n_slots = topo.num_nodes, self.num_logical, topo.num_slots
        em = e[t_idx, k_idx]
        sm = src[t_idx]
        snode = sm // topo.gpus_per_node
        src_key = sm * n_log + em  # (source GPU, expert)
        chosen = on_gpu[em, sm]
        cnt = node_cnt[em, snode]
        on_node = (chosen < 0) & (cnt > 0)
        if bool(on_node.any()):
            turn = (_rank_within(src_key[on_node], topo.num_gpus * n_log) + sm[on_node]) % cnt[on_node]
            chosen[on_node] = node_list[em[on_node], snode[on_node], turn]
        near = chosen >= 0
        if local_cap is not None and bool(near.any()):
            n_se = torch.bincount(src_key, minlength=topo.num_gpus * n_log).double()
            # per (source, expert): the fair share of the replicas on the source's node, all of them together
            cap = torch.ceil(local_cap * n_nodes * cnt[near].double() * n_se[src_key[near]] / nrep[em[near]].double())
            over = _rank_within(src_key[near], topo.num_gpus * n_log) >= cap.clamp(max=2.0**62).long()
            near[near.nonzero().flatten()[over]] = False
        chosen = torch.where(near, chosen, torch.full_like(chosen, -1))
        far = ~near
        if bool(far.any()):
            # Load each source has put on each slot: its single-replica and local choices, plus slot_load.
            st, sk = single.nonzero(as_tuple=True)
            placed = torch.cat([src[st] * n_slots + out[st, sk], sm[near] * n_slots + chosen[near]])
            # which of its expert's replicas each remote choice may take (all of them, or those on its allowed
            # nodes); one row to fill per (source, expert, allowed replicas)
            cand = table[em[far]]  # [M, R]
            allowed = cand >= 0
            if node_limited:
                reach = self._allowed_nodes(topk_idx, src, table)  # [T, N]
                allowed &= reach[t_idx[far][:, None], cand.clamp(min=0) // topo.slots_per_node]
            keys, row = torch.unique(torch.cat([src_key[far][:, None], allowed.long()], 1), dim=0,
                                     return_inverse=True)
            rs, re = keys[:, 0] // n_log, keys[:, 0] % n_log
            # each row's allowed replicas first (ascending), -1 after them
            ok = keys[:, 1:].bool()
            width = table.shape[1]
            order = torch.argsort((~ok).long() * width + torch.arange(width, device=dev), dim=1)
            rows_table = torch.where(ok, table[re], -1).gather(1, order)  # [rows, R]
            n_ok = ok.sum(dim=1)
            used = torch.bincount(placed, minlength=topo.num_gpus * n_slots).double()
            if slot_load is not None:
                used = used + slot_load.to(device=dev, dtype=torch.float64).repeat(topo.num_gpus)
            n_row = torch.bincount(row, minlength=keys.shape[0]).double()
            # The inflow every replica gets from its own node (the GPUs there use it first): with each source
            # weighing it in, the remote fills of all sources add up to even totals (see _local_share).
            share, remote = self._local_share(local_cap, dev)
            # A source's rows of one expert are filled one after another, those with fewer allowed replicas first,
            # each over the load the earlier ones put there (rows of one (source, expert) are consecutive in keys)
            first = torch.ones_like(rs, dtype=torch.bool)
            first[1:] = keys[1:, 0] != keys[:-1, 0]
            group = torch.cumsum(first.long(), 0) - 1
            by_size = torch.argsort(n_ok, stable=True)
            by_size = by_size[torch.argsort(group[by_size], stable=True)]
            step = torch.empty_like(group)
            step[by_size] = _rank_within(group[by_size], int(group[-1]) + 1)
            quota = torch.zeros_like(rows_table)
            for i in range(int(step.max()) + 1):
                sel = (step == i).nonzero().flatten()
                tab = rows_table[sel]
                flat = rs[sel, None] * n_slots + tab.clamp(min=0)
                a_load = used[flat] + n_row[sel, None] * share[tab.clamp(min=0)] / remote[re[sel]][:, None]
                q = _water_fill(a_load, tab, n_row[sel], rs[sel] % n_ok[sel], n_ok[sel])
                quota[sel] = q
                used.index_add_(0, flat.flatten(), q.flatten().double())
            # Row r's cumulative quotas, offset by r so one sorted search serves every row.
            big = int(topk_idx.numel()) + 1
            cum = torch.cumsum(quota, dim=1) + torch.arange(keys.shape[0], device=dev)[:, None] * big
            r = torch.searchsorted(cum.flatten(), row * big + _rank_within(row, keys.shape[0]), right=True)
            r = torch.minimum(r - row * width, n_ok[row] - 1)
            chosen[far] = rows_table[row, r]
        out[t_idx, k_idx] = chosen
        return out


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _one_source(src_gpu: Any, forms: str) -> Any:
    """``src_gpu`` as a Python int where it names one GPU (a Python or numpy integer, or a 0-dim integer tensor),
    else as given; a bool is refused (``forms``: what the argument may be, for the message)."""
    _check(not isinstance(src_gpu, bool), "src_gpu", f"must be {forms}, got a bool")
    if isinstance(src_gpu, torch.Tensor) and src_gpu.dim() == 0 and src_gpu.dtype in _INT_DTYPES:
        return int(src_gpu)
    if isinstance(src_gpu, numbers.Integral):
        return int(src_gpu)
    return src_gpu  # (route checks what else it takes)


def _rank_within(key: torch.Tensor, num_keys: int) -> torch.Tensor:
    """int64 [M]: for each entry, how many earlier entries have the same key (key int64 [M] in [0, num_keys))."""
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_keys)
    starts = torch.cumsum(counts, 0) - counts
    ranked = torch.arange(key.numel(), device=key.device) - starts[key[order]]
    return torch.empty_like(ranked).scatter_(0, order, ranked)


def _water_fill(
    load: torch.Tensor, table: torch.Tensor, n: torch.Tensor, rot: torch.Tensor, nrep: torch.Tensor
) -> torch.Tensor:
    """Splits n[r] new units over the replicas of row r so that the most loaded replica is as light as possible,
    to within one unit: each replica gets the floor of its share at the water level, or one more, the left-over
    units going in the order ``rot`` gives (not to the largest fractions).

    Args:
        load: float64 [rows, R], load on each replica so far (ignored on padding).
        table: int64 [rows, R], replica slots (-1 padded at the end).
        n: float64 [rows], units to place (whole numbers).
        rot: int64 [rows], left-over units go first to replica index rot, then rot + 1, ... (mod nrep).
        nrep: int64 [rows], replicas per row.

    Returns:
        int64 [rows, R]: units per replica (0 on padding), each row summing to n[r].
    """
    pad = table < 0
    width = table.shape[1]
    a = torch.where(pad, torch.full_like(load, math.inf), load)
    a_sorted, _ = torch.sort(a, dim=1)
    finite = torch.isfinite(a_sorted)
    csum = torch.cumsum(torch.where(finite, a_sorted, torch.zeros_like(a_sorted)), dim=1)
    k = torch.arange(1, width + 1, device=table.device, dtype=torch.float64)
    level_k = (n[:, None] + csum) / k
    ok = (level_k >= a_sorted) & finite
    kstar = (ok.long() * torch.arange(width, device=table.device)).max(dim=1).values
    level = level_k.gather(1, kstar[:, None])
    q = torch.where(pad, torch.zeros_like(a), (level - a).clamp(min=0))
    fl = torch.floor(q + 1e-9)
    rem = (n - fl.sum(dim=1)).round().clamp(min=0).long()
    # The rem left-over units go one each to the replicas with a fractional quota, in the rotated order (not by
    # size of the fraction: that order would be the same for every source and add up to a bias).
    idx = torch.arange(width, device=table.device).expand_as(table)
    rotated = torch.where(pad, idx + width, (idx - rot[:, None]) % nrep.clamp(min=1)[:, None])
    key = torch.where(q - fl > 1e-9, rotated, rotated + 2 * width)
    rank = torch.empty_like(key).scatter_(1, torch.argsort(key, dim=1), idx.contiguous())
    return fl.long() + (rank < rem[:, None]).long()


# ----------------------------------------------------------------------------------------------------------------
# Baselines and the planner


def _check_load(load: torch.Tensor, arg: str = "load") -> torch.Tensor:
    _check(isinstance(load, torch.Tensor) and load.dim() == 1 and load.numel() >= 1, arg, "must be a tensor [L]")
    load = load.detach().double().cpu()
    _check(bool(torch.isfinite(load).all()) and bool((load >= 0).all()), arg, "must be finite and >= 0")
    return load


def _num_replicas(num_logical: int, topology: Topology, num_replicas: int | None) -> int:
    spare = topology.num_slots - num_logical
    _check(
        spare >= 0,
        "topology",
        f"has {topology.num_slots} slots (num_gpus * slots_per_gpu) for {num_logical} logical experts",
    )
    if num_replicas is None:
        return spare
    _check_int(num_replicas, "num_replicas", 0)
    _check(num_replicas <= spare, "num_replicas", f"must be in [0, {spare}], got {num_replicas}")
    return num_replicas


def replica_counts(load: torch.Tensor, num_physical: int, max_per_expert: int | None = None) -> torch.Tensor:
    """EPLB's rule: start with one replica each, give every further replica to the expert with the highest load per
    replica (ties: fewer replicas, then lower id -- so that equal or zero loads spread the replicas evenly).

    Args:
        load: float [L], load per logical expert.
        num_physical: total replicas (>= L).
        max_per_expert: cap per expert (e.g. the GPU count), None for none.

    Returns:
        int64 [L], replicas per expert, summing to ``num_physical`` (less when the cap binds everywhere).
    """
    load = _check_load(load)
    num_logical = load.numel()
    _check_int(num_physical, "num_physical", num_logical)
    cap = num_physical if max_per_expert is None else max_per_expert
    _check(cap >= 1, "max_per_expert", f"must be >= 1, got {max_per_expert}")
    counts = [1] * num_logical
    heap = [(-float(w), 1, e) for e, w in enumerate(load.tolist())]
    heapq.heapify(heap)
    for _ in range(num_physical - num_logical):
        while heap and counts[heap[0][2]] >= cap:
            heapq.heappop(heap)
        if not heap:
            break
        _, _, e = heapq.heappop(heap)
        counts[e] += 1
        if counts[e] < cap:
            heapq.heappush(heap, (-float(load[e]) / counts[e], counts[e], e))
    return torch.tensor(counts, dtype=torch.int64, device="cpu")


def _local_replica_counts(load: torch.Tensor, num_physical: int, num_nodes: int, cap: int) -> torch.Tensor:
    """Like ``replica_counts`` but an expert with more replicas than nodes gets a multiple of the node count, so
    that every node can hold the same number of its replicas and serve its own tokens locally (with 12 replicas on
    8 nodes, the nodes holding one replica would have to send a third of their tokens away). int64 [L]; may sum to
    less than ``num_physical`` when no expert's next step fits what is left (those slots stay empty)."""
    load = _check_load(load)
    num_logical = load.numel()
    counts = [1] * num_logical
    left = num_physical - num_logical
    heap = [(-float(w), 1, e) for e, w in enumerate(load.tolist())]
    heapq.heapify(heap)
    while heap and left > 0:
        _, _, e = heapq.heappop(heap)
        step = 1 if counts[e] < num_nodes else num_nodes
        if counts[e] + step > cap or step > left:
            continue  # cannot afford this expert's next step; the others may still fit
        counts[e] += step
        left -= step
        heapq.heappush(heap, (-float(load[e]) / counts[e], counts[e], e))
    return torch.tensor(counts, dtype=torch.int64, device="cpu")


def contiguous_placement(num_logical: int, topology: Topology) -> Placement:
    """Logical expert i on slot i (SPEC.md's layout: GPU r holds experts [r*L/G, (r+1)*L/G) when L fills the slots);
    slots past L stay empty."""
    _check(num_logical >= 1, "num_logical", f"must be >= 1, got {num_logical}")
    _num_replicas(num_logical, topology, None)
    p2l = torch.full((topology.num_slots,), -1, dtype=torch.int64, device="cpu")
    p2l[:num_logical] = torch.arange(num_logical, device="cpu")
    return Placement(topology, num_logical, p2l)


def _pack_greedy(unit_expert: np.ndarray, unit_w: np.ndarray, topology: Topology) -> np.ndarray:
    """Largest unit first onto the least-loaded GPU that has a free slot and no copy of that expert (among equally
    loaded GPUs, the one with the most free slots: units of no load spread instead of filling one GPU first).

    Returns int64 [U]: GPU of each unit.
    """
    g_num, spg = topology.num_gpus, topology.slots_per_gpu
    gpu_load = np.zeros(g_num)
    free = np.full(g_num, spg)
    held: list[set[int]] = [set() for _ in range(g_num)]
    gpu_of = np.empty(unit_expert.size, dtype=np.int64)
    for u in np.argsort(-unit_w, kind="stable"):
        e = int(unit_expert[u])
        cost = np.where(free > 0, gpu_load, np.inf)
        for g in np.lexsort((-free, cost)):  # (cost first, then the most free slots; stable)
            if e not in held[g] or not np.isfinite(cost[g]):
                break
        if not np.isfinite(cost[g]):  # every GPU with room already holds e: accept a duplicate
            g = int(np.argmin(cost))
        gpu_of[u] = g
        gpu_load[g] += unit_w[u]
        free[g] -= 1
        held[g].add(e)
    return gpu_of


def _units(
    load: torch.Tensor, topology: Topology, num_replicas: int | None, local: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(expert of each unit int64 [U], estimated load of each unit float64 [U]); units = replicas, then empty
    slots (expert -1, load 0), U = num_slots. ``local``: replica counts by ``_local_replica_counts``."""
    n_rep = _num_replicas(load.numel(), topology, num_replicas)
    if local:
        counts = _local_replica_counts(load, load.numel() + n_rep, topology.num_nodes, topology.num_gpus).numpy()
    else:
        counts = replica_counts(load, load.numel() + n_rep, topology.num_gpus).numpy()
    expert = np.repeat(np.arange(load.numel()), counts)
    w = (load.numpy() / counts)[expert]
    empty = topology.num_slots - expert.size
    return np.concatenate([expert, np.full(empty, -1)]), np.concatenate([w, np.zeros(empty)])


def _to_placement(unit_expert: np.ndarray, unit_at: np.ndarray, num_logical: int, topology: Topology) -> Placement:
    """Slot s holds unit ``unit_at[s]``."""
    return Placement(topology, num_logical, torch.from_numpy(unit_expert[unit_at].astype(np.int64)))


def greedy_placement(load: torch.Tensor, topology: Topology, *, num_replicas: int | None = None) -> Placement:
    """The EPLB-style baseline, topology-blind: replicas by load per replica (``replica_counts``), then largest
    replica first onto the least-loaded GPU with a free slot.

    Args:
        load: float [L], measured load per logical expert.
        topology: the cluster; needs num_slots >= L.
        num_replicas: extra replicas (default: fill every slot); at most one replica of an expert per GPU, so
            fewer where that bounds them (the rest of the slots stay empty).
    """
    load = _check_load(load)
    unit_expert, w = _units(load, topology, num_replicas)
    unit_at = np.argsort(_pack_greedy(unit_expert, w, topology), kind="stable")
    return _to_placement(unit_expert, unit_at, load.numel(), topology)


def _coactivation(trace: RoutingTrace, topology: Topology) -> tuple[np.ndarray, np.ndarray]:
    """(pairs float64 [L, L]: tokens choosing both e and f, zero diagonal; src float64 [L, N]: tokens from node n
    choosing e)."""
    num_logical = trace.num_experts
    idx = trace.topk_idx
    i, j = torch.triu_indices(idx.shape[1], idx.shape[1], 1, device="cpu")
    a, b = idx[:, i], idx[:, j]  # [T, K(K-1)/2]: each unordered pair of a token's choices once
    ok = (a >= 0) & (b >= 0) & (a != b)
    pairs = torch.bincount(a[ok] * num_logical + b[ok], minlength=num_logical * num_logical)
    pairs = pairs.view(num_logical, num_logical)
    pairs = (pairs + pairs.T).flatten()
    node = (trace.src_gpu // topology.gpus_per_node)[:, None].expand_as(idx)
    v = idx >= 0
    src = torch.bincount(idx[v] * topology.num_nodes + node[v], minlength=num_logical * topology.num_nodes)
    return (
        pairs.double().view(num_logical, num_logical).numpy(),
        src.double().view(num_logical, topology.num_nodes).numpy(),
    )


class _SwapState:
    """Units (replicas and empty slots) at positions (slots); swaps exchange the units of two slots on different
    nodes. Positions are slot ids, so node(p) = p // slots_per_node and gpu(p) = p // slots_per_gpu."""

    def __init__(self, unit_expert: np.ndarray, unit_at: np.ndarray, unit_w: np.ndarray, topology: Topology) -> None:
        self.topo = topology
        self.unit_expert = unit_expert
        self.unit_at = unit_at.copy()
        self.unit_w = unit_w.astype(np.float64)
        u_num = unit_at.size
        self.per_node = topology.gpus_per_node * topology.slots_per_gpu
        self.node_pos = np.arange(u_num) // self.per_node
        self.other_node = self.node_pos[:, None] != self.node_pos[None, :]
        self.gpu_pos = np.arange(u_num) // topology.slots_per_gpu
        self.pos_of = np.empty(u_num, dtype=np.int64)
        self.pos_of[self.unit_at] = np.arange(u_num)
        num_logical = int(unit_expert.max()) + 1
        self.empty_col = num_logical
        self.col = np.where(unit_expert >= 0, unit_expert, num_logical)  # empty units: a column never counted
        self.held = np.zeros((topology.num_gpus, num_logical + 1), dtype=np.int64)
        np.add.at(self.held, (self.gpu_pos, self.col[self.unit_at]), 1)
        self.held[:, num_logical] = 0
        self.gpu_load = np.bincount(self.gpu_pos, weights=self.unit_w[self.unit_at], minlength=topology.num_gpus)
        # experts (replicas, not empty slots) per GPU: where there are at least as many as GPUs, no swap may take a
        # GPU's last one away (an expert's weight can be small enough for the load bound to allow it)
        self.real = np.bincount(self.gpu_pos, weights=(self.col[self.unit_at] < num_logical).astype(np.float64),
                                minlength=topology.num_gpus)
        self.keep_real = int((unit_expert >= 0).sum()) >= topology.num_gpus
        self.replicated = bool((np.bincount(self.col, minlength=num_logical + 1)[:num_logical] > 1).any())

    def reset(self, unit_at: np.ndarray) -> None:
        """Puts the units back at the given positions."""
        self.__init__(self.unit_expert, unit_at, self.unit_w, self.topo)  # type: ignore[misc]

    def node_of_unit(self) -> np.ndarray:
        return self.node_pos[self.pos_of]

    def feasible(self, bound: float) -> np.ndarray:
        """bool [U, U] over positions: the swap keeps both GPUs under ``bound`` and puts no second copy of an
        expert on a GPU, nor leaves a GPU without an expert where every GPU can have one."""
        w = self.unit_w[self.unit_at]
        col = self.col[self.unit_at]
        dw = w[None, :] - w[:, None]  # [p, q]: w_q - w_p
        load = self.gpu_load[self.gpu_pos]
        ok = (load[:, None] + dw <= bound) & (load[None, :] - dw <= bound)
        ok &= self.other_node
        # Two units of one expert are never swapped: the dup test below excludes them (and empty units, which share
        # a column, have zero gain).
        if self.replicated:  # only an expert with several replicas can end up twice on a GPU
            dup = self.held[self.gpu_pos][:, col] > 0  # [p, q]: q's expert already on p's GPU
            ok &= ~dup & ~dup.T
        if self.keep_real:
            empty = col == self.empty_col
            if empty.any():
                last = ~empty & (self.real[self.gpu_pos] <= 1)  # p holds its GPU's last expert
                ok &= ~(last[:, None] & empty[None, :]) & ~(empty[:, None] & last[None, :])
        return ok

    def pick(self, gain: np.ndarray) -> list[tuple[int, int]]:
        """The best swap of each pair of nodes with positive gain, taken greedily over disjoint node pairs (their
        gains add up: a swap only changes the two nodes it touches)."""
        n, s = self.topo.num_nodes, self.per_node
        g4 = gain.reshape(n, s, n, s).transpose(0, 2, 1, 3).reshape(n, n, s * s)
        arg = g4.argmax(axis=2)
        best = np.take_along_axis(g4, arg[:, :, None], axis=2)[:, :, 0]
        best = np.triu(np.where(np.isfinite(best), best, -np.inf), 1) + np.tril(np.full((n, n), -np.inf))
        used: set[int] = set()
        swaps: list[tuple[int, int]] = []
        for flat in np.argsort(-best, axis=None, kind="stable"):
            a, b = divmod(int(flat), n)
            if not best[a, b] > 1e-9:
                break
            if a in used or b in used:
                continue
            used.update((a, b))
            i, j = divmod(int(arg[a, b]), s)
            swaps.append((a * s + i, b * s + j))
        return swaps

    def apply(self, p: int, q: int) -> tuple[int, int]:
        """Swaps the units at positions p and q; returns (unit that was at p, unit that was at q)."""
        u, v = int(self.unit_at[p]), int(self.unit_at[q])
        gp, gq = self.gpu_pos[p], self.gpu_pos[q]
        self.held[gp, self.col[u]] -= 1
        self.held[gq, self.col[v]] -= 1
        self.held[gp, self.col[v]] += 1
        self.held[gq, self.col[u]] += 1
        self.held[:, -1] = 0
        self.gpu_load[gp] += self.unit_w[v] - self.unit_w[u]
        self.gpu_load[gq] += self.unit_w[u] - self.unit_w[v]
        ru, rv = float(self.unit_expert[u] >= 0), float(self.unit_expert[v] >= 0)
        self.real[gp] += rv - ru
        self.real[gq] += ru - rv
        self.unit_at[p], self.unit_at[q] = v, u
        self.pos_of[u], self.pos_of[v] = q, p
        return u, v


_PAIR_WEIGHT = 2.0


def _pair_search(
    state: _SwapState, pairs: np.ndarray, src: np.ndarray, topk: int, bound: float, max_rounds: int, deadline: float
) -> None:
    """Phase 1: swaps that raise the co-activation kept inside nodes: pairs of experts chosen by one token (scaled
    2/K: K co-located experts save K-1 network crossings, not K(K-1)/2) and each expert with the source nodes of its
    tokens, both split over replicas; replicas of one expert repel each other (they serve different places)."""
    ue = state.unit_expert
    real = ue >= 0
    e = np.where(real, ue, 0)
    reps = np.bincount(e[real], minlength=pairs.shape[0]).astype(np.float64)
    scale = np.where(real, 1.0 / np.maximum(reps[e], 1.0), 0.0)
    aff_u = ((_PAIR_WEIGHT / max(topk, 2)) * pairs[np.ix_(e, e)] * scale[:, None] * scale[None, :]).astype(np.float32)
    same = (ue[:, None] == ue[None, :]) & real[:, None] & real[None, :]
    aff_u[same] = -float(src.sum(axis=1).max() + 1.0)
    np.fill_diagonal(aff_u, 0.0)
    n_nodes = state.topo.num_nodes
    onehot = np.zeros((ue.size, n_nodes))
    onehot[np.arange(ue.size), state.node_of_unit()] = 1.0
    # [U, N]: affinity of each unit to each node, kept in float64 so that the search does not depend on the BLAS.
    aff = aff_u.astype(np.float64) @ onehot + src[e] * scale[:, None]
    for _ in range(max_rounds):
        if time.perf_counter() > deadline:
            return
        at = state.unit_at
        a_pos = aff_u[np.ix_(at, at)]
        d = (aff[at] - aff[at, state.node_pos][:, None]).astype(np.float32)  # [p, n]: gain of p's unit moving to n
        dn = d[:, state.node_pos]
        gain = np.where(state.feasible(bound), dn + dn.T - 2.0 * a_pos, -np.inf)
        swaps = state.pick(gain)
        if not swaps:
            return
        for p, q in swaps:
            a, b = state.node_pos[p], state.node_pos[q]
            u, v = state.apply(p, q)
            aff[:, a] += aff_u[:, v] - aff_u[:, u]
            aff[:, b] += aff_u[:, u] - aff_u[:, v]


def _demand_search(
    state: _SwapState, bind: np.ndarray, src_node: np.ndarray, bound: float, max_rounds: int, deadline: float
) -> None:
    """Phase 2: swaps that lower sum_n (D_n / mean D)^4, D_n = remote tokens that need node n (under hierarchical
    dispatch the NIC-in load of node n's GPUs; their sum is the NIC-out load), each (token, k) bound to the unit
    it was routed to (bind int64 [T, K] of units, -1 none; src_node int64 [T]).

    Kept per unit u: X[u] = its remote tokens that reach u's node only through u; Y[u, n] = its tokens remote from
    n that do not reach n yet. A swap of u (node a) and v (node b) changes D_a by about -X[u] + Y[v, a] and D_b by
    -X[v] + Y[u, b] (exact unless one token uses both)."""
    n_nodes, u_num = state.topo.num_nodes, state.unit_at.size
    t_num, k = bind.shape
    ok_all = bind >= 0
    flat = np.where(ok_all, bind, u_num).ravel()
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], np.arange(u_num + 1))
    tok_sorted = order // k

    def counts(node_of: np.ndarray, tok: np.ndarray) -> np.ndarray:
        b = bind[tok]
        nd = np.where(b >= 0, node_of[np.maximum(b, 0)], n_nodes)
        idx = np.arange(tok.size)[:, None] * (n_nodes + 1) + nd
        return np.bincount(idx.ravel(), minlength=tok.size * (n_nodes + 1)).reshape(tok.size, n_nodes + 1)[:, :n_nodes]

    def contrib(c: np.ndarray, tok: np.ndarray, node_of: np.ndarray, sign: float) -> None:
        remote = np.ones(c.shape, dtype=bool)
        remote[np.arange(tok.size), src_node[tok]] = False
        dem[:] += sign * ((c > 0) & remote).sum(axis=0)
        b = bind[tok]
        ok = b >= 0
        bu = np.maximum(b, 0)
        un = node_of[bu]
        only = (np.take_along_axis(c, un, axis=1) == 1) & (un != src_node[tok][:, None]) & ok
        x[:] += sign * np.bincount(bu[only], minlength=u_num)
        lack = torch.from_numpy(((c == 0) & remote).astype(np.float64))  # [A, N]
        rows, ks = np.nonzero(ok)
        y_t.index_add_(0, torch.from_numpy(bu[rows, ks]), lack[torch.from_numpy(rows)], alpha=sign)

    node_of = state.node_of_unit()
    dem = np.zeros(n_nodes)
    x = np.zeros(u_num)
    y = np.zeros((u_num, n_nodes))
    y_t = torch.from_numpy(y)  # shares y's memory
    all_tok = np.arange(t_num)
    c_all = counts(node_of, all_tok)
    contrib(c_all, all_tok, node_of, 1.0)
    scale = max(float(dem.mean()), 1.0)
    best_obj, best_at, stale = float(((dem / scale) ** 4).sum()), state.unit_at.copy(), 0
    for _ in range(max_rounds):
        if time.perf_counter() > deadline or stale >= 3:
            break
        at = state.unit_at
        xp, yp = x[at], y[at]
        yq = yp[:, state.node_pos]  # [q, p]: Y of q's unit at p's node
        dpos = dem[state.node_pos]
        da = dpos[:, None] - xp[:, None] + yq.T  # [p, q]: new D of p's node
        db = dpos[None, :] - xp[None, :] + yq  # new D of q's node
        base = (dpos / scale) ** 4
        delta = (da / scale) ** 4 + (db / scale) ** 4 - base[:, None] - base[None, :]
        swaps = state.pick(np.where(state.feasible(bound), -delta, -np.inf))
        if not swaps:
            break
        moved = [u for p, q in swaps for u in state.apply(p, q)]
        tok = np.unique(np.concatenate([tok_sorted[starts[u] : starts[u + 1]] for u in moved]))
        contrib(c_all[tok], tok, node_of, -1.0)
        node_of = state.node_of_unit()
        c_all[tok] = counts(node_of, tok)
        contrib(c_all[tok], tok, node_of, 1.0)
        obj = float(((dem / scale) ** 4).sum())
        # The predicted gains are approximate: stop after 3 rounds without a real improvement, keep the best.
        if obj < best_obj - 1e-12:
            best_obj, best_at, stale = obj, state.unit_at.copy(), 0
        else:
            stale += 1
    state.reset(best_at)


def plan_placement(
    load: torch.Tensor | None,
    topology: Topology,
    *,
    trace: RoutingTrace | None = None,
    num_replicas: int | None = None,
    imbalance_tolerance: float = 0.05,
    hierarchical: bool = True,
    max_rounds: int = 200,
    time_budget_s: float | None = None,
    node_limited: bool = False,
) -> Placement:
    """Topology-aware placement from measured load and, when given, a routing trace.

    Args:
        load: float [L], load per logical expert (None: counted from ``trace``).
        topology: the cluster; needs num_slots >= L. L <= GPUs with one slot each: one expert per GPU and the spare
            GPUs hold replicas; L > GPUs: experts packed under the slot limit.
        trace: routing trace of logical experts with source GPUs; without it the plan is the greedy baseline
            (nothing is known about co-activation).
        num_replicas: extra replicas (default: fill every slot); at most one replica of an expert per GPU, so
            fewer where that bounds them (the rest of the slots stay empty). With a trace (and more than one node)
            the search result rounds an expert's replica count up in steps of the node count once it has as many
            replicas as nodes (step 2 of the module docstring), so it may use fewer replicas than asked (or than
            the default's free slots), leaving those slots empty: on 3 nodes x 2 GPUs x 2 slots with 2 experts and
            ``num_replicas=5``, its plan holds 3 + 3 replicas (4 extra, 6 slots empty). The greedy plan, returned
            when the search does not win, uses them all (up to the one-per-GPU bound).
        imbalance_tolerance: the search keeps every GPU's estimated compute load (each replica serving an even
            share of its expert) <= the greedy plan's largest GPU load on the trace * (1 + tolerance / 2);
            the returned plan's compute imbalance on the trace, as routed, is within (1 + tolerance) of greedy's
            (the search is retried up to twice with a tighter bound, then greedy is returned).
        hierarchical: the dispatch mode whose bottleneck link decides between the search result and greedy.
        max_rounds: rounds of swaps per search phase (each round: the best swap of each of many disjoint node
            pairs); both phases normally stop earlier, when no swap improves (the result is then deterministic).
        time_budget_s: optional wall-clock limit of the searches (the result then depends on the machine's speed
            and load: never plan on every rank independently with it, since the ranks may get different plans).
        node_limited: evaluate (and search) with the trace routed as ``Placement.route(node_limited=True)`` routes
            it: what a :class:`~largeep.layers.MoELayer` does when its gate limits each token to groups that are
            the placement's home nodes. Without it the plan is judged on routing that ignores the node limit.
            With it the plan searched without it is judged that way too (the search runs twice, each with half of
            ``time_budget_s``), and the faster of the two within the compute limit above, or greedy, is returned.

    Returns:
        The plan with the lower bottleneck link time on the trace (the greedy plan when the search does not win).

    Every rank must use the same plan (see :class:`Placement`): plan on one rank and share the result (e.g.
    ``torch.distributed.broadcast_object_list``), or on every rank from the same loads and trace (all-reduced or
    gathered) without ``time_budget_s`` (the result then depends on the inputs only).
    """
    t0 = time.perf_counter()
    if load is None:
        _check(trace is not None, "load", "must be given when trace is None")
        assert trace is not None
        load = trace.expert_load()
    load = _check_load(load)
    flags("plan_placement", hierarchical=hierarchical, node_limited=node_limited)
    _check(imbalance_tolerance >= 0, "imbalance_tolerance", f"must be >= 0, got {imbalance_tolerance}")
    _check_int(max_rounds, "max_rounds", 0)
    _check(time_budget_s is None or time_budget_s >= 0, "time_budget_s", f"must be None or >= 0, got {time_budget_s}")
    budget = math.inf if time_budget_s is None else time_budget_s
    if trace is not None:
        _check(
            trace.num_experts == load.numel(),
            "trace",
            f"has {trace.num_experts} experts, load has {load.numel()}",
        )
        if trace.src_gpu.numel():
            _check(int(trace.src_gpu.max()) < topology.num_gpus, "trace", "has src_gpu >= topology.num_gpus")
    unit_expert, w = _units(load, topology, num_replicas)
    unit_at = np.argsort(_pack_greedy(unit_expert, w, topology), kind="stable")
    greedy = _to_placement(unit_expert, unit_at, load.numel(), topology)
    if trace is None or topology.num_nodes == 1 or trace.topk_idx.numel() == 0:
        return greedy
    ref = simulate_links(trace, greedy, hierarchical=hierarchical, node_limited=node_limited)
    limit = ref.compute_imbalance * (1.0 + imbalance_tolerance) + 1e-12
    # Estimated loads (a replica's even share of its expert's choices, in the trace's units) drive the search,
    # under greedy's largest routed GPU load * (1 + tolerance / 2).
    unit_scale = float(ref.compute.sum()) / max(float(w.sum()), 1e-30)
    bound = float(ref.compute.max()) * (1.0 + 0.5 * imbalance_tolerance)
    pairs, src = _coactivation(trace, topology)
    unit_expert, w = _units(load, topology, num_replicas, local=True)
    start = np.argsort(_pack_greedy(unit_expert, w, topology), kind="stable")
    # Phase 2 on about 8192 tokens (fewer than 16384; evenly strided, so every source GPU keeps its share).
    sub = torch.arange(0, trace.topk_idx.shape[0], max(1, trace.topk_idx.shape[0] // 8192), device="cpu")
    src_node = (trace.src_gpu[sub] // topology.gpus_per_node).numpy()
    best, best_time = greedy, ref.max_link_time_s
    span = budget / 2 if node_limited else budget  # (node_limited: the other half for the unlimited search below)
    for _ in range(3):  # the routed loads differ a little from the estimates: retry with a tighter bound
        state = _SwapState(unit_expert, start, w * unit_scale, topology)
        _pair_search(state, pairs, src, trace.topk_idx.shape[1], bound, max_rounds, t0 + 0.6 * span)
        mid = _to_placement(unit_expert, state.unit_at, load.numel(), topology)
        bind = mid.route(trace.topk_idx[sub], trace.src_gpu[sub], node_limited=node_limited)
        bind = torch.where(bind >= 0, torch.from_numpy(state.unit_at)[bind.clamp(min=0)], bind)  # slot -> unit
        _demand_search(state, bind.numpy(), src_node, bound, max_rounds, t0 + span)
        topo = _to_placement(unit_expert, state.unit_at, load.numel(), topology)
        new = simulate_links(trace, topo, hierarchical=hierarchical, node_limited=node_limited)
        if new.compute_imbalance <= limit:
            if new.max_link_time_s < best_time:
                best, best_time = topo, new.max_link_time_s
            break
        bound *= 0.99 * limit / new.compute_imbalance
    if node_limited:
        # The node-limited routes load the GPUs less evenly than the search's estimates, so its retries can end at
        # the greedy plan where the plan searched on unlimited routes is within the same limit and faster on the
        # node-limited routes: the faster of the two (both judged on node-limited routes) is returned.
        left = None if time_budget_s is None else max(0.0, t0 + budget - time.perf_counter())
        plain = plan_placement(load, topology, trace=trace, num_replicas=num_replicas,
                               imbalance_tolerance=imbalance_tolerance, hierarchical=hierarchical,
                               max_rounds=max_rounds, time_budget_s=left)
        judged = simulate_links(trace, plain, hierarchical=hierarchical, node_limited=True)
        if judged.compute_imbalance <= limit and judged.max_link_time_s < best_time:
            best = plain
    return best


# ----------------------------------------------------------------------------------------------------------------
# Link-load model


@dataclass(eq=False)
class LinkLoad:
    """Bytes on every link and compute per GPU for one routed batch.

    Attributes:
        nic_out, nic_in, nvlink_out, nvlink_in: float64 [G], bytes through each GPU's NIC / NVLink port.
        compute: float64 [G], (token, expert) choices served by each GPU.
        max_link_bytes: the largest of all the link byte counts.
        max_link_time_s: the largest bytes / bandwidth over all links (the bottleneck).
        bottleneck: which link, e.g. "nic_in[12]".
        compute_imbalance: max / mean of ``compute`` (1 when nothing is served).
        hierarchical: the dispatch mode modelled.
    """

    nic_out: torch.Tensor
    nic_in: torch.Tensor
    nvlink_out: torch.Tensor
    nvlink_in: torch.Tensor
    compute: torch.Tensor
    max_link_bytes: float
    max_link_time_s: float
    bottleneck: str
    compute_imbalance: float
    hierarchical: bool


def _first_in_row(x: torch.Tensor) -> torch.Tensor:
    """bool [T, K]: entry is >= 0 and the first of its value in the row (x int64 [T, K])."""
    s, order = torch.sort(x, dim=1)
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    first &= s >= 0
    return torch.empty_like(first).scatter_(1, order, first)


def simulate_links(
    trace: RoutingTrace,
    placement: Placement,
    *,
    hidden: int = 7168,
    bytes_per_elem: int = 2,
    hierarchical: bool = True,
    physical_idx: torch.Tensor | None = None,
    node_limited: bool = False,
) -> LinkLoad:
    """Per-link bytes of dispatching ``trace`` (combine sends the same bytes back the other way).

    Args:
        trace: logical routing and source GPUs.
        placement: the plan; the trace is routed with ``placement.route`` unless ``physical_idx`` is given.
        hidden, bytes_per_elem: bytes per token = hidden * bytes_per_elem.
        hierarchical: model hierarchical (True) or flat (False) dispatch (see the module docstring).
        physical_idx: int64 [T, K] slots, if already routed.
        node_limited: route with ``placement.route(node_limited=True)`` (not with ``physical_idx``).

    Returns:
        :class:`LinkLoad`.
    """
    _check(hidden >= 1, "hidden", f"must be >= 1, got {hidden}")
    _check(bytes_per_elem >= 1, "bytes_per_elem", f"must be >= 1, got {bytes_per_elem}")
    flags("simulate_links", hierarchical=hierarchical, node_limited=node_limited)
    _check(trace.num_experts == placement.num_logical, "trace", "and placement differ in logical experts")
    topo = placement.topology
    g_num, gpn = topo.num_gpus, topo.gpus_per_node
    if physical_idx is None:
        physical_idx = placement.route(trace.topk_idx, trace.src_gpu, node_limited=node_limited)
    else:
        _check(not node_limited, "node_limited", "routes the trace: give it or physical_idx, not both")
        _check_topk(physical_idx, topo.num_slots, "physical_idx")
        _check(physical_idx.shape == trace.topk_idx.shape, "physical_idx", "must have the trace's shape")
        physical_idx = physical_idx.cpu()
    src = trace.src_gpu
    if src.numel():
        _check(int(src.max()) < g_num, "trace", f"has a src_gpu outside [0, {g_num}) (its largest: {int(src.max())})")
    dst = torch.where(physical_idx >= 0, physical_idx // topo.slots_per_gpu, physical_idx)  # [T, K] GPU
    compute = torch.bincount(dst[dst >= 0], minlength=g_num).double()
    first_gpu = _first_in_row(dst)
    s2 = src[:, None].expand_as(dst)
    same_node = (dst // gpn) == (s2 // gpn)
    nic_out = torch.zeros(g_num, dtype=torch.float64, device="cpu")
    nic_in = torch.zeros(g_num, dtype=torch.float64, device="cpu")
    nvl_out = torch.zeros(g_num, dtype=torch.float64, device="cpu")
    nvl_in = torch.zeros(g_num, dtype=torch.float64, device="cpu")

    def add(acc: torch.Tensor, idx: torch.Tensor) -> None:
        acc += torch.bincount(idx, minlength=g_num).double()

    local = first_gpu & same_node & (dst != s2)
    add(nvl_out, s2[local])
    add(nvl_in, dst[local])
    remote = first_gpu & ~same_node
    if hierarchical:
        dnode = torch.where(dst >= 0, dst // gpn, dst)
        first_node = _first_in_row(dnode) & ~same_node
        relay = dnode * gpn + s2 % gpn  # the GPU of the source's local index on the destination node
        add(nic_out, s2[first_node])
        add(nic_in, relay[first_node])
        fwd = remote & (dst != relay)
        add(nvl_out, relay[fwd])
        add(nvl_in, dst[fwd])
    else:
        add(nic_out, s2[remote])
        add(nic_in, dst[remote])
    tok = float(hidden * bytes_per_elem)
    links = {"nic_out": nic_out, "nic_in": nic_in, "nvlink_out": nvl_out, "nvlink_in": nvl_in}
    for v in links.values():
        v *= tok
    bw = {"nic_out": topo.nic_bw, "nic_in": topo.nic_bw, "nvlink_out": topo.nvlink_bw, "nvlink_in": topo.nvlink_bw}
    max_bytes = max(float(v.max()) for v in links.values())
    times = {k: v / bw[k] for k, v in links.items()}
    name = max(times, key=lambda k: float(times[k].max()))
    mean = float(compute.mean())
    return LinkLoad(
        nic_out,
        nic_in,
        nvl_out,
        nvl_in,
        compute,
        max_bytes,
        float(times[name].max()),
        f"{name}[{int(times[name].argmax())}]",
        float(compute.max()) / mean if mean > 0 else 1.0,
        hierarchical,
    )


# ----------------------------------------------------------------------------------------------------------------
# Migration


@dataclass(frozen=True)
class Move:
    """Copy logical ``expert``'s weights from GPU ``src_gpu`` into slot ``dst_slot`` of GPU ``dst_gpu``."""

    expert: int
    src_gpu: int
    dst_gpu: int
    dst_slot: int


def migration_plan(old: Placement, new: Placement) -> list[Move]:
    """Weights to move between GPUs to go from ``old`` to ``new``.

    A slot of ``new`` needs no move when its GPU already holds that expert in ``old``, or receives it for another
    of its slots earlier in the plan (a copy between slots of one GPU is local and not listed). Otherwise the
    weights come from an ``old`` replica on the same node when there is one, else from the replica GPU with the
    fewest moves so far (spreading the sends).

    Every move reads the ``old`` layout, and a move's source slot may be another move's destination: apply the plan
    into separate buffers (or finish every send before any slot is overwritten), not in place in plan order.

    Returns:
        Moves in ascending ``dst_slot`` order.
    """
    _check(old.num_logical == new.num_logical, "new", f"has {new.num_logical} logical experts, old {old.num_logical}")
    _check(
        old.topology.num_gpus == new.topology.num_gpus and old.topology.gpus_per_node == new.topology.gpus_per_node,
        "new",
        "must be on the same GPUs as old",
    )
    o_topo, n_topo = old.topology, new.topology
    gpn = n_topo.gpus_per_node
    held: list[set[int]] = [set() for _ in range(o_topo.num_gpus)]
    for s, e in enumerate(old.phys_to_log.tolist()):
        if e >= 0:
            held[s // o_topo.slots_per_gpu].add(e)
    sources = [sorted({s // o_topo.slots_per_gpu for s in reps}) for reps in old.replicas]
    sends = [0] * o_topo.num_gpus
    moves: list[Move] = []
    for s, e in enumerate(new.phys_to_log.tolist()):
        g = s // n_topo.slots_per_gpu
        if e < 0 or e in held[g]:
            continue
        cands = sources[e]
        near = [c for c in cands if c // gpn == g // gpn]
        pick = min(near or cands, key=lambda c: (sends[c], c))
        sends[pick] += 1
        moves.append(Move(e, pick, g, s))
        held[g].add(e)  # a second slot of e on GPU g copies locally
    return moves


# ----------------------------------------------------------------------------------------------------------------
# Synthetic traces


def synthetic_trace(
    num_tokens: int,
    num_experts: int,
    topk: int,
    topology: Topology,
    *,
    zipf_s: float = 1.0,
    num_clusters: int | None = None,
    cluster_strength: float = 3.0,
    source_affinity: float = 0.0,
    seed: int = 0,
    sample_seed: int | None = None,
) -> RoutingTrace:
    """A skewed router with co-activation clusters.

    Expert popularity is Zipf-like: p_e proportional to rank_e^-zipf_s, ranks a random permutation. Experts are split
    at random into ``num_clusters`` clusters (default: clusters of 16 experts). Each token has a cluster (uniform, or
    with probability ``source_affinity`` the preferred cluster of its source node) and picks K distinct experts by
    sampling without replacement (Gumbel top-k) from logits ``log p_e + cluster_strength * [e in its cluster]``
    (with the default strength 3 and 256 experts, 40-50% of a token's choices fall in its cluster of 16).
    Tokens are spread evenly over the GPUs (token t from GPU t * G // T). ``seed`` fixes the router (ranks,
    clusters, preferred clusters); ``sample_seed`` (default: ``seed``) the tokens drawn from it, so two sample seeds
    give two batches of one router. The same arguments give the same trace.

    Returns:
        :class:`RoutingTrace` with topk_idx int64 [T, K] and src_gpu int64 [T].
    """
    _check(num_tokens >= 0, "num_tokens", f"must be >= 0, got {num_tokens}")
    _check(num_experts >= 1, "num_experts", f"must be >= 1, got {num_experts}")
    _check(1 <= topk <= num_experts, "topk", f"must be in [1, {num_experts}], got {topk}")
    _check(zipf_s >= 0, "zipf_s", f"must be >= 0, got {zipf_s}")
    if num_clusters is None:
        num_clusters = max(1, num_experts // 16)
    _check(1 <= num_clusters <= num_experts, "num_clusters", f"must be in [1, {num_experts}], got {num_clusters}")
    _check(0.0 <= source_affinity <= 1.0, "source_affinity", f"must be in [0, 1], got {source_affinity}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rank = torch.randperm(num_experts, generator=gen, device="cpu").double() + 1.0
    log_p = -zipf_s * torch.log(rank)
    cluster_of = torch.empty(num_experts, dtype=torch.int64, device="cpu")
    cluster_of[torch.randperm(num_experts, generator=gen, device="cpu")] = (
        torch.arange(num_experts, device="cpu") % num_clusters
    )
    g_num = topology.num_gpus
    src = torch.arange(num_tokens, dtype=torch.int64, device="cpu") * g_num // max(num_tokens, 1)
    node = src // topology.gpus_per_node
    home = torch.randperm(max(num_clusters, topology.num_nodes), generator=gen, device="cpu")
    home = home[: topology.num_nodes] % num_clusters
    sample = seed if sample_seed is None else (sample_seed + 1) * 1_000_003 + seed
    gen = torch.Generator(device="cpu").manual_seed(sample)
    token_cluster = torch.randint(num_clusters, (num_tokens,), generator=gen, device="cpu")
    affine = torch.rand(num_tokens, generator=gen, device="cpu") < source_affinity
    token_cluster = torch.where(affine, home[node], token_cluster)
    u = torch.rand(num_tokens, num_experts, generator=gen, dtype=torch.float64, device="cpu").clamp_min(1e-300)
    gumbel = -torch.log((-torch.log(u)).clamp_min(1e-300))
    logits = log_p[None, :] + cluster_strength * (cluster_of[None, :] == token_cluster[:, None]).double() + gumbel
    topk_idx = logits.topk(topk, dim=1).indices
    return RoutingTrace(topk_idx, src, num_experts)
