"""A cost model of dispatch and combine at large expert parallelism, calibrated on benchmark records.

Model (per GPU, per call; T tokens per rank, N ranks, P GPUs per node, M = N/P nodes, b bytes per row):

Routing statistics (:class:`RoutingStats`): for top-K distinct experts out of E, with experts contiguous per rank,
the expected distinct ranks a token needs ``d_r = N * (1 - C(E - E/N, K) / C(E, K))`` and distinct nodes
``d_n = M * (1 - C(E - E/M, K) / C(E, K))`` (exact, hypergeometric), or the same counted on sampled routings (any
distribution, e.g. node-limited or skewed; ``imbalance`` = busiest rank over the mean, ``node_imbalance`` = busiest
node over the mean). Only groups and routings
that can exist are modelled (:func:`routing_problem`): E divisible by N (SPEC.md), a group of more than P ranks made
of whole nodes, K <= E, node-limited routing that leaves K experts; so d_r <= min(K, N) and d_n <= min(K, M).
:func:`routing_stats`, :func:`sampled_stats` and :func:`traffic` raise ValueError otherwise, :func:`sweep_ep` leaves
such a mode out at that EP with a warning, and the CLI refuses such arguments naming them.

Rows per leg, normal mode (a token goes to a rank once):
- received rows (the logical bytes of SPEC.md) ``R = T * d_r``;
- flat: NVLink ``T * d_r * (P-1)/N``, RDMA ``T * d_r * (N-P)/N`` (every remote (token, rank) pair crosses the NIC);
- hierarchical: RDMA ``T * d_n * (M-1)/M`` (a token crosses the network once per remote node, landing on the GPU
  with the same index), NVLink ``T * d_r * (P-1)/P`` (local pairs plus the fan-out of landed rows).
Normal-mode combine moves the same rows back in BF16, but for the hierarchical RDMA leg: the node's partial sums,
in float32 with K float32 weights, ``4 (H + K)`` bytes a row (the kernels' comb_send / comb_rdma rows; before
session 40's review the model counted them in BF16, half the bytes); with ``bf16_partial_sums``
(``Buffer.combine(bf16_partial_sums=True)``, since session 41) in BF16, ``2 H + 4 K`` bytes a row.
Low-latency mode: the logical bytes are every (token, expert) copy, ``C = T * K`` rows. Dispatch sends a token once
per destination rank and the receiver fans the row out to its experts' output rows: NVLink ``T * d_r * (P-1)/N``,
RDMA ``T * d_r * (N-P)/N`` (no per-node hop). Combine returns every copy (its rows carry different weights): NVLink
``C * (P-1)/N``, RDMA ``C * (N-P)/N``, in BF16.

Time: ``lat[mode, op] + max(t_nvl, t_rdma, t_sm) + t_copy`` with overlap, ``lat + max(t_nvl + t_rdma, t_sm) +
t_copy`` without, where ``t_leg = link latency + bytes * imbalance / (eff_leg * link bandwidth)`` (0 for a leg that
carries nothing; the hierarchical NIC leg with ``node_imbalance``, since a row lands on the same-index GPU of its
destination node and a GPU's NIC load follows its node's), ``t_sm = R * b * imbalance / (num_sms * sm_gbps)`` (normal
mode only: the SM-driven send kernels' throughput cap; it overlaps the links because the same SMs drive them) and
``t_copy = R * 2H * imbalance / (num_sms * copy_gbps)`` (normal mode only: the receive-side pass that runs after the
transfer, in series with it: largeep's copy-out of pushed rows in dispatch and the top-k reduction in combine;
counted in BF16 row bytes whatever the dispatch dtype, because that pass is bound per row more than per byte;
``copy_gbps`` None = no such pass, as in designs that receive in place). Records without an SM count have neither SM
term.

The fused combine (largeep inside one node since session 5: ``comb``/8 of max(2, num_sms) blocks push while the rest
reduce as rows arrive): ``t_sm = max(16 * c_push * 4 * b / comb_gbps, 16 * c_red * 2H / reduce_gbps)`` in place of
the SM and receive terms (the reduction overlaps the pushes), where c_push = ceil((N-1) * ceil(r / 4) / (16 *
push_blocks)) is the busiest push warp's count of 4-row chunks (r: rows for each other rank of the node, ``T d_r /
N`` times the imbalance) and c_red = ceil(T / (16 * reduce_blocks)) the busiest reduce warp's tokens: the kernel
deals chunks and tokens to its warps (16 per block) in a fixed stride and each warp works through its own one after
another, so the busiest warp, not the mean, sets the time (:func:`fused_units`); comb_gbps and reduce_gbps stay rates
per block. push_blocks = min(S - 1, max(1, round(S * comb / 8))) of S = max(2, num_sms) blocks, reduce_blocks the
rest. It applies to a normal-mode combine on one node when ``comb_gbps`` is known and the record
(``combine_eighths``, or ``comb=`` in its ``tune``) or the cluster (``combine_eighths``) says the fused kernel ran;
groups of several nodes keep push + reduce. In push + reduce, the reduction is in series: ``t_copy`` at ``copy_gbps``
where the model has a receive pass (``Params.receive_pass``), else the reduce kernel, one warp per token on all
num_sms blocks at ``reduce_gbps`` per block, ``16 * ceil(T / (16 * num_sms)) * 2H / reduce_gbps`` (counted per token
as the fused combine's reduce blocks, whose time goes with the tokens more than their rows; named in
``Prediction.unknown`` where the rate it needs is not known).

A low-latency combine whose dispatch carried the weights (``weights_sent``) adds a summing pass in series: the
experts' rank reads the T * K BF16 copies it holds and sums each token's before it sends them, ``sum_lat_us + T * K
* 2H / sum_gbps`` (:func:`fit_summing`, on such records, with the other constants as fitted without them; no term
until fitted).

Constants fitted by :func:`calibrate` (least squares on relative error; the active term of each record is chosen by
the current fit and the fit repeated until that choice settles): ``lat`` per (mode, op), ``eff_nvlink``,
``eff_rdma``, ``sm_gbps``, ``copy_gbps``, ``comb_gbps``, ``reduce_gbps``. A constant that no record exercises keeps
its placeholder value and is reported as such; one the records drive to no term is reported as that
(``Params.no_term``). Records of emulated nodes (fewer ranks per node than ranks, on one host: the "RDMA" leg ran
over NVLink) are refused unless asked for (``--emulated-nodes``). :func:`placeholder` gives the constants
ANCHORS.md's measured link ceilings suggest, for use before GPU records exist. Everything the CLI prints says which
numbers are measured and which modelled.

DeepEP's figures beside the model (ANCHORS.md), in our byte count, the bytes that cross a link: DeepEP's tests count
a token's RDMA bytes once for every node its experts are on, its own node included (d_n rows per token, where the
model's NIC leg carries d_n (M-1)/M), and its intranode "NVL" bytes as every received row, local ones included
(SPEC's logical bytes). So its published RDMA GB/s are shown x (M-1)/M (M = EP/8 of its nodes) beside the model's
RDMA GB/s, its EP8 figure beside the model's logical GB/s, and both (EP8: x 7/8 on NVLink) over the link's
theoretical per-direction peak (H800 NVLink 200 GB/s, NIC 50) beside the model's busiest-link utilisation on the
same basis (H200 NVLink 450 GB/s, NIC 50; :func:`deepep_normal_in_our_count`). That utilisation is of NVLink inside
one node and mostly of the NIC beyond, so it is no scaling efficiency: the sweep gives that as
``throughput_vs_ref`` (against ``ref_ep``, its smallest EP; ``throughput_vs_ep8`` before). Beside a cluster whose
NIC or GPUs per node differ from DeepEP's, its RDMA and low-latency figures are left out (:func:`deepep_left_out`).
Its low-latency figures are at 128 tokens, top-8 of 288 experts (its test's count; 288 does
not divide EP 64-256, where the published count is not stated): the model at that configuration is listed and
plotted beside them (:func:`deepep_ll_comparison`); its EP8 figure ran over RDMA, the model's EP8 over NVLink.

Record files (:func:`load`, through :func:`largeep.bench.records.read_results_files`): the benchmark's results.json (a
list of records, its run.json beside it with the settings and extras; or the older one object ``{"schema",
"records", "extras", ...}``): device-event times of whole Python calls, host overhead included; and the files of
``bench/kernel_times.py`` and ``bench/low_latency_times.py`` (the same two layouts; records with the SPEC keys plus
``bus_gbps`` and ``kernels``, or ``of``: profiler times of the GPU kernels only). Each loaded record says which in
``timing`` ("kernel" or "events"); by default only kernel-timed records are fitted when there are any, since event
times carry a few hundred microseconds of host work per call that the model has no term for. Records of CPU
processes are refused by ``--calibrate`` unless ``--allow-cpu`` is given.

CLI: ``python -m largeep.bench.sim --calibrate results.json [...] --out DIR`` (``--holdout-ep``/``--holdout-sms``
choose the records held out of the check fit; ``--show`` adds records that are listed and plotted, never fitted).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

MODES = ("normal", "low_latency")
OPS = ("dispatch", "combine")
_LAT_KEYS = tuple(f"{m}.{o}" for m in MODES for o in OPS)
_INV_KEYS = ("inv_eff_nvlink", "inv_eff_rdma", "inv_sm_gbps", "inv_copy_gbps", "inv_comb_gbps", "inv_reduce_gbps")
PARAM_KEYS = _LAT_KEYS + _INV_KEYS

# DeepEP V1 published on H800 + ConnectX-7 400 Gb/s (ANCHORS.md "Published"), in DeepEP's own byte count; beside
# ours they go through deepep_normal_in_our_count (its RDMA figure counts the token's own node too).
DEEPEP_NORMAL = {  # EP: (dispatch, combine) GB/s as published; EP8 is DeepEP's intranode "NVL" figure (every received
    # row, local ones included: SPEC's logical bytes), EP16+ its internode "RDMA" figure (a row for every node a
    # token's experts are on, its own node included). Their setting: 4096 tokens, H 7168, top-8 of 256 experts with
    # node-limited routing (top-4 groups), FP8 dispatch, BF16 combine, 8 GPUs per node
    8: (153.0, 158.0), 16: (43.0, 43.0), 32: (58.0, 57.0), 64: (51.0, 50.0),
}
DEEPEP_LL = {  # EP: (dispatch, combine) us, 128 tokens, H 7168, top-8, FP8 dispatch, BF16 combine; pure RDMA even
    # at EP8 (DeepEP's low-latency kernels as published), so EP8 is not an NVLink figure. Experts: its test's 288 at
    # EP 8, 16 and 32; 288 does not divide EP 64-256 (its test requires that), and ANCHORS.md does not say the count
    8: (77.0, 114.0), 16: (118.0, 195.0), 32: (155.0, 273.0), 64: (173.0, 314.0), 128: (192.0, 369.0),
    256: (194.0, 360.0),
}
DEEPEP_GPUS_PER_NODE = 8  # the H800 nodes of DeepEP's published figures
DEEPEP_LL_SHAPE = (128, 7168, 8, 288)  # DeepEP's low-latency test: tokens per rank, hidden, top-k, experts
# Link peaks that every efficiency here divides by, one basis for DeepEP's figures and the model's: theoretical,
# per direction, per GPU. H800 SXM: NVLink 400 GB/s both ways, 200 per direction (DeepEP's README quotes ~160 GB/s
# as its practical maximum; that is not the basis of the H200's 450 GB/s, Cluster.nvlink_gbps). ConnectX-7 400 Gb/s:
# 50 GB/s per GPU (Cluster.nic_gbps).
H800_NVLINK_GBPS = 200.0
CX7_NIC_GBPS = 50.0
# DeepEP V1 measured on our 4x H200 machine with its own tests (ANCHORS.md "Measured"), 4096 tokens, 24 SMs: logical
# GB/s (dispatch FP8, dispatch BF16, combine); low-latency (128 tokens, 288 experts) dispatch and combine in us.
DEEPEP_H200_NORMAL = {2: (248.0, 341.0, 292.0), 4: (254.0, 261.0, 358.0)}
DEEPEP_H200_NORMAL_SHAPE = (4096, 7168, 8, 256)  # its normal test there: tokens per rank, hidden, top-k, experts
DEEPEP_H200_LL = {2: (28.9, 39.8), 4: (34.5, 55.5)}


def deepep_normal_in_our_count(ep: int, op: str) -> dict[str, Any]:
    """DeepEP's published normal-mode figure at ``ep`` (:data:`DEEPEP_NORMAL`) converted into our byte count, the
    bytes that cross a link. DeepEP's tests count a dispatched token once for every node its experts are on, its own
    node included (the internode "RDMA" figure: d_n rows per token), and once for every rank it reaches, its own
    included (the "NVL" figure, SPEC's logical bytes). Ours: d_n (M-1)/M rows per token over the NIC (a token
    leaves its node once per other node), and a rank's received rows less its own over NVLink. Where the routing
    treats every node and rank alike (DeepEP's tests, node-limited or not), a token's own node is among its d_n
    nodes with probability d_n / M, so the RDMA figure in our count is (M-1)/M of DeepEP's, M = ep / 8 nodes (x1/2
    at EP16); the intranode figure is our logical GB/s as it stands, and (P-1)/P of it on NVLink (P = 8).
    Returns ep, op, leg ("nvlink" or "rdma"), published_gbps, factor, our_count_gbps (link bytes per second),
    logical_gbps (EP8 only: the published figure; None beyond one node) and efficiency (our_count_gbps over the
    link's theoretical peak per direction, the basis of the model's efficiency: the H800's NVLink,
    :data:`H800_NVLINK_GBPS`, or the NIC, :data:`CX7_NIC_GBPS`)."""
    if ep not in DEEPEP_NORMAL:
        raise ValueError(f"deepep_normal_in_our_count: ep {ep}, expected one of DeepEP's published EPs "
                         f"{', '.join(map(str, sorted(DEEPEP_NORMAL)))}")
    if op not in OPS:
        raise ValueError(f"deepep_normal_in_our_count: op {op!r}, expected one of {', '.join(OPS)}")
    published = DEEPEP_NORMAL[ep][OPS.index(op)]
    p = min(DEEPEP_GPUS_PER_NODE, ep)
    nodes = ep // p
    if nodes == 1:
        factor, leg, peak, logical = (p - 1) / p, "nvlink", H800_NVLINK_GBPS, published
    else:
        factor, leg, peak, logical = (nodes - 1) / nodes, "rdma", CX7_NIC_GBPS, None
    ours = published * factor
    return {"ep": ep, "op": op, "leg": leg, "published_gbps": published, "factor": factor, "our_count_gbps": ours,
            "logical_gbps": logical, "efficiency": ours / peak}


# -- cluster, workload, routing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """Hardware: GPUs per node, per-GPU one-way link bandwidths (GB/s) and latencies (us), SMs per kernel."""

    gpus_per_node: int = 8
    nvlink_gbps: float = 450.0  # NVLink4 per direction per GPU (H100/H200)
    nic_gbps: float = CX7_NIC_GBPS  # 400 Gb/s ConnectX-7 per GPU
    nvlink_latency_us: float = 1.0
    nic_latency_us: float = 3.0
    num_sms: int | None = 24
    combine_eighths: int = 3  # the fused combine's push share inside one node (LARGEEP_TUNE comb); 0 = two kernels

    def __post_init__(self) -> None:
        """Raise ValueError naming the field that no machine can have."""
        if self.gpus_per_node < 1:
            raise ValueError(f"Cluster: gpus_per_node {self.gpus_per_node}, expected >= 1")
        for name in ("nvlink_gbps", "nic_gbps"):
            v = getattr(self, name)
            if not 0 < v < math.inf:
                raise ValueError(f"Cluster: {name} {v}, expected a positive finite bandwidth (GB/s)")
        for name in ("nvlink_latency_us", "nic_latency_us"):
            v = getattr(self, name)
            if not 0 <= v < math.inf:
                raise ValueError(f"Cluster: {name} {v}, expected a finite latency >= 0 (us)")
        if self.num_sms is not None and self.num_sms < 1:
            raise ValueError(f"Cluster: num_sms {self.num_sms}, expected >= 1 (or None: no SM cap)")
        if not 0 <= self.combine_eighths <= 7:
            raise ValueError(f"Cluster: combine_eighths {self.combine_eighths}, expected 0 to 7 (0: push + reduce "
                             "kernels)")


@dataclass(frozen=True)
class Workload:
    """One call: mode "normal"/"low_latency", op "dispatch"/"combine", T tokens per rank, dtype of dispatch rows."""

    mode: str
    op: str
    num_tokens: int
    hidden: int
    num_topk: int
    num_experts: int
    dtype: str = "bf16"
    # low-latency: the dispatch carried topk_weights, so the combine returns summed rows (RoutingStats); with
    # bf16_partial_sums one row per (token, rank) it names (ranks_per_token), as the dispatch sends. Normal mode:
    # bf16_partial_sums is the combine's (its partial sums between nodes in BF16; weights_sent has no meaning there)
    weights_sent: bool = False
    bf16_partial_sums: bool = False

    def __post_init__(self) -> None:
        """Raise ValueError naming the field that no call can have."""
        from largeep.bench.records import DTYPES

        if self.mode not in MODES:
            raise ValueError(f"Workload: mode {self.mode!r}, expected one of {', '.join(MODES)}")
        if self.op not in OPS:
            raise ValueError(f"Workload: op {self.op!r}, expected one of {', '.join(OPS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Workload: dtype {self.dtype!r}, expected one of {', '.join(DTYPES)}")
        if self.num_tokens < 0:
            raise ValueError(f"Workload: num_tokens {self.num_tokens}, expected >= 0")
        for name in ("hidden", "num_topk", "num_experts"):
            if getattr(self, name) < 1:
                raise ValueError(f"Workload: {name} {getattr(self, name)}, expected >= 1")
        if self.mode == "normal" and self.weights_sent:
            raise ValueError("Workload: weights_sent is a low-latency dispatch's option, the mode is normal")
        if self.mode == "normal" and self.bf16_partial_sums and self.op != "combine":
            raise ValueError("Workload: a normal-mode bf16_partial_sums is the combine's, the op is a dispatch")

    def bytes_per_row(self) -> int:
        from largeep.bench.records import row_bytes

        return row_bytes(self.dtype if self.op == "dispatch" else "bf16", self.hidden)


@dataclass(frozen=True)
class RoutingStats:
    """ranks_per_token: E[distinct ranks a token needs]; nodes_per_token: E[distinct nodes]; imbalance: rows the
    busiest rank receives over the mean (1 for uniform routing); summed_rows_per_token: E[sum over ranks of
    min(distinct experts of the token there, 2)], the rows a low-latency combine returns per token when the dispatch
    carried the weights (a rank sums two or more of a token's experts into two rows; 0: not computed);
    node_imbalance: tokens the busiest node is needed by over the mean node's, which sets a GPU's NIC load in the
    hierarchical layout (a row lands on the same-index GPU of its destination node, so every GPU of a node takes
    its node's share). None: not given, which :func:`traffic` takes as uniform routing's 1 where ``imbalance`` is 1
    and refuses for the hierarchical NIC leg of a skewed routing across nodes (:func:`sampled_stats` counts both;
    :func:`routing_stats` gives 1); remote_nodes_per_token, remote_ranks_per_token: E[nodes other than the token's
    own] and E[ranks on other nodes than its own] that it needs, the rows a token sends over the NIC in the
    hierarchical and the flat layout, counted by :func:`sampled_stats` when given each token's source rank. None:
    ``nodes_per_token * (M-1)/M`` and ``ranks_per_token * (N-P)/N``, exact for a routing that treats every node
    alike (uniform, node-limited), not for one that prefers the token's own node (``Placement.route``'s replicas
    on the same GPU or node). Raises ValueError for values no routing can have (negative counts, a busiest
    share below 1)."""

    ranks_per_token: float
    nodes_per_token: float
    imbalance: float = 1.0
    summed_rows_per_token: float = 0.0
    node_imbalance: float | None = None
    remote_nodes_per_token: float | None = None
    remote_ranks_per_token: float | None = None

    def __post_init__(self) -> None:
        for name in ("ranks_per_token", "nodes_per_token", "summed_rows_per_token"):
            v = getattr(self, name)
            if not 0 <= v < math.inf:
                raise ValueError(f"RoutingStats: {name} {v}, expected a finite count >= 0")
        if not 1 <= self.imbalance < math.inf:
            raise ValueError(f"RoutingStats: imbalance {self.imbalance}, expected the busiest rank's rows over the "
                             "mean's, >= 1 (1: uniform)")
        for name, most in (("remote_nodes_per_token", self.nodes_per_token),
                           ("remote_ranks_per_token", self.ranks_per_token)):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= most * (1 + 1e-9):
                raise ValueError(f"RoutingStats: {name} {v:g}, expected a count in [0, {most:g}] (at most the "
                                 f"{name.split('_')[1]}_per_token, own node included)")
        if self.node_imbalance is not None and not 1 <= self.node_imbalance < math.inf:
            raise ValueError(f"RoutingStats: node_imbalance {self.node_imbalance}, expected the busiest node's share "
                             "over the mean's, >= 1 (1: uniform)")


def routing_problem(num_ranks: int, ranks_per_node: int, num_experts: int, num_topk: int, *,
                    max_nodes: int | None = None) -> str | None:
    """Why this group and routing cannot exist (None: they can). SPEC.md: experts are contiguous per rank and
    ``num_experts`` is divisible by the number of ranks; a group of more ranks than one node's holds whole nodes (its
    ranks per node divide its ranks); a token picks ``num_topk`` distinct experts, so at most ``num_experts``; node-
    limited routing (``max_nodes``) needs at least one node per token and at least ``num_topk`` experts on the nodes
    it allows."""
    if num_ranks < 1 or ranks_per_node < 1:
        return f"ranks ({num_ranks}) and ranks per node ({ranks_per_node}) must be positive"
    if num_topk < 1 or num_experts < 1:
        return f"experts ({num_experts}) and top-k ({num_topk}) must be positive"
    if num_experts % num_ranks:
        return (f"{num_experts} experts are not divisible by {num_ranks} ranks (SPEC.md: every rank holds the same "
                "number of experts)")
    if num_topk > num_experts:
        return f"top-{num_topk} needs at least {num_topk} experts, not {num_experts}"
    if ranks_per_node < num_ranks and num_ranks % ranks_per_node:
        return f"{ranks_per_node} ranks per node do not divide {num_ranks} ranks (a group holds whole nodes)"
    if max_nodes is not None:
        nodes = max(1, num_ranks // ranks_per_node)
        if max_nodes < 1:
            return f"node-limited routing to at most {max_nodes} nodes per token: it needs at least 1"
        allowed = min(max_nodes, nodes) * (num_experts // nodes)
        if allowed < num_topk:
            return (f"node-limited routing to at most {max_nodes} nodes per token leaves {allowed} experts at "
                    f"{num_ranks} ranks ({num_experts // nodes} per node), fewer than top-{num_topk}")
    return None


def check_routing(num_ranks: int, ranks_per_node: int, num_experts: int, num_topk: int, *,
                  max_nodes: int | None = None) -> None:
    """Raise ValueError saying why, where :func:`routing_problem` finds one."""
    why = routing_problem(num_ranks, ranks_per_node, num_experts, num_topk, max_nodes=max_nodes)
    if why:
        raise ValueError(why)


def _miss(num_experts: int, hit_experts: int, k: int) -> float:
    """P(none of k distinct uniform draws from E lands in a given set of ``hit_experts``) = C(E-h, k) / C(E, k)."""
    if num_experts - hit_experts < k:
        return 0.0
    return math.comb(num_experts - hit_experts, k) / math.comb(num_experts, k)


def routing_stats(num_ranks: int, ranks_per_node: int, num_experts: int, num_topk: int) -> RoutingStats:
    """Exact statistics of uniform top-K routing (every K-subset of experts equally likely). Raises ValueError for
    a group or routing that cannot exist (:func:`routing_problem`: e.g. experts not divisible by the ranks), so
    that d_r <= min(K, N) and d_n <= min(K, M) hold."""
    check_routing(num_ranks, ranks_per_node, num_experts, num_topk)
    nodes = max(1, num_ranks // ranks_per_node)
    h = num_experts // num_ranks
    p0 = _miss(num_experts, h, num_topk)
    d_r = num_ranks * (1.0 - p0)
    d_n = nodes * (1.0 - _miss(num_experts, num_experts // nodes, num_topk))
    # P(exactly one of the token's K distinct experts is on a given rank of h experts)
    p1 = h * math.comb(num_experts - h, num_topk - 1) / math.comb(num_experts, num_topk)
    summed = num_ranks * ((1.0 - p0) + max(0.0, 1.0 - p0 - p1))
    return RoutingStats(d_r, d_n, 1.0, summed, 1.0)


def sample_topk(
    num_tokens: int, num_experts: int, num_topk: int, *, seed: int = 0, num_nodes: int = 1,
    max_nodes: int | None = None, routing: str = "uniform", zipf_s: float = 1.0,
) -> torch.Tensor:
    """int64 [T, K] routings for Monte Carlo statistics; ``max_nodes`` limits each token to that many nodes
    (DeepSeek-V3's node-limited routing: pick nodes first, then experts among theirs). Raises ValueError where
    the experts do not divide among the nodes or the allowed nodes hold fewer than K experts."""
    from largeep.bench.routing import random_topk

    if num_topk > num_experts:
        raise ValueError(f"top-{num_topk} needs at least {num_topk} experts, not {num_experts}")
    if max_nodes is None or max_nodes >= num_nodes:
        return random_topk(num_tokens, num_experts, num_topk, seed=seed, routing=routing, zipf_s=zipf_s)
    check_routing(num_nodes, 1, num_experts, num_topk, max_nodes=max_nodes)  # (nodes as ranks of one per node)
    gen = torch.Generator().manual_seed(seed)
    per_node = num_experts // num_nodes
    nodes = torch.rand(num_tokens, num_nodes, generator=gen).topk(max_nodes, dim=1).indices  # [T, M']
    allowed = torch.zeros(num_tokens, num_nodes, dtype=torch.bool)
    allowed.scatter_(1, nodes, True)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    scores = scores.masked_fill(~allowed.repeat_interleave(per_node, dim=1), -1.0)
    return scores.topk(num_topk, dim=1).indices


def sampled_stats(topk_idx: torch.Tensor, num_ranks: int, ranks_per_node: int, num_experts: int, *,
                  src_rank: torch.Tensor | None = None) -> RoutingStats:
    """The same statistics counted on a routing int64 [T, K] (-1 = none), with the busiest rank's and the busiest
    node's shares (``imbalance``, ``node_imbalance``). A routing of no tokens (T = 0) moves nothing: no ranks or
    nodes per token, imbalances 1. ``num_experts`` are the ids dispatch sees: with a placement of replicas, its
    slots (``Placement.route``'s physical ids), not the gate's logical experts.

    src_rank: int64 [T], the rank each token comes from (e.g. ``RoutingTrace.src_gpu``). Given, the NIC legs are
    counted on it: ``remote_nodes_per_token`` / ``remote_ranks_per_token`` (the nodes / ranks other than the
    token's own node that it needs) and ``node_imbalance`` as the busiest node's remote rows, in or out, over the
    mean (every GPU of a node sends and receives its node's share). Without it a token's own node is taken to be
    among its nodes as often as any other, which overcounts the NIC rows of a routing that prefers local replicas.

    Raises ValueError as :func:`routing_stats` does, and for a ``topk_idx`` that is not [T, K] of integers or holds
    ids outside [-1, num_experts), or a ``src_rank`` that is not [T] of ranks in [0, num_ranks)."""
    from largeep.checks import integer_tensor

    if not integer_tensor(topk_idx) or topk_idx.dim() != 2:
        raise ValueError(f"sampled_stats: topk_idx of shape {tuple(topk_idx.shape)} and dtype {topk_idx.dtype}, "
                         "expected integer expert ids [T, K]")
    check_routing(num_ranks, ranks_per_node, num_experts, max(1, topk_idx.shape[1]))
    bad = topk_idx[(topk_idx < -1) | (topk_idx >= num_experts)]
    if bad.numel():
        raise ValueError(f"sampled_stats: topk_idx holds {bad.numel()} ids outside [-1, {num_experts}) (expert ids "
                         f"of {num_experts} experts, -1 = none), e.g. {', '.join(map(str, bad[:3].tolist()))}")
    if src_rank is not None and (not integer_tensor(src_rank) or tuple(src_rank.shape) != (topk_idx.shape[0],)
                                 or bool(((src_rank < 0) | (src_rank >= num_ranks)).any())):
        raise ValueError(f"sampled_stats: src_rank of shape {tuple(src_rank.shape)} and dtype {src_rank.dtype}, "
                         f"expected the source rank of each of the {topk_idx.shape[0]} tokens, in [0, {num_ranks})")
    ranks_per_node = min(ranks_per_node, num_ranks)
    per_rank = num_experts // num_ranks
    t = topk_idx.shape[0]
    if t == 0:
        return RoutingStats(0.0, 0.0, 1.0, 0.0, 1.0, *((0.0, 0.0) if src_rank is not None else ()))
    from largeep.bench.records import summed_rows_ll

    m = num_ranks // ranks_per_node
    # Counted in pieces of tokens and added (integer counts, so the same sums): one call's 2M tokens at EP 512 took
    # 12 GB at once
    per = torch.zeros(num_ranks, dtype=torch.float64)
    per_node = torch.zeros(m, dtype=torch.float64)
    node_in = torch.zeros(m, dtype=torch.float64)
    node_out = torch.zeros(m, dtype=torch.float64)
    pairs = node_pairs = summed = total = other_ranks = 0.0
    for start in range(0, t, 1 << 16):
        idx = topk_idx[start:start + (1 << 16)]
        n = idx.shape[0]
        hit = torch.zeros(n, num_ranks + 1, dtype=torch.bool)
        hit.scatter_(1, torch.where(idx >= 0, idx // per_rank, num_ranks), True)
        hit = hit[:, :num_ranks]
        nodes = hit.view(n, m, ranks_per_node).any(dim=2)
        per += hit.sum(0).double()
        per_node += nodes.sum(0).double()
        pairs += float(hit.sum())
        node_pairs += float(nodes.sum())
        # the rows of a weighted low-latency combine: the benchmark's own count (its floor)
        summed += float(summed_rows_ll(idx, num_experts, num_ranks).sum())
        if src_rank is not None:
            own = (src_rank[start:start + n] // ranks_per_node).long()
            remote = nodes.clone()
            remote[torch.arange(n), own] = False
            per_token = remote.sum(1).double()
            node_in += remote.sum(0).double()
            node_out.index_add_(0, own, per_token)
            total += float(per_token.sum())
            other_ranks += float((hit.view(n, m, ranks_per_node).sum(2) * remote).sum())
    d_r, summed = pairs / t, summed / t
    imbalance = float(per.max() / per.mean()) if per.sum() > 0 else 1.0
    if src_rank is None:
        return RoutingStats(d_r, node_pairs / t, imbalance, summed,
                            float(per_node.max() / per_node.mean()) if per_node.sum() > 0 else 1.0)
    node_share = max(float(node_in.max()), float(node_out.max())) / (total / m) if total > 0 else 1.0
    return RoutingStats(d_r, node_pairs / t, imbalance, summed, node_share, total / t, other_ranks / t)


# -- a load per expert, through a placement ---------------------------------------------------------------------
PLACEMENTS = ("contiguous", "greedy", "planned")


def read_load(path: str | Path) -> torch.Tensor:
    """float64 [E]: a load per expert from ``path``, a JSON list of numbers or a text file of numbers (separated by
    white space or commas; ``#`` starts a comment). Raises ValueError naming the file for one that does not read as
    that, or for loads that are negative, not finite or all 0."""
    text = Path(path).read_text()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if doc is not None:
        if not isinstance(doc, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in doc):
            raise ValueError(f"{path}: a JSON {type(doc).__name__}, expected a JSON list of numbers (a load per "
                             "expert)")
        values = [float(v) for v in doc]
    else:
        words = " ".join(line.split("#", 1)[0] for line in text.splitlines()).replace(",", " ").split()
        try:
            values = [float(v) for v in words]
        except ValueError:
            raise ValueError(f"{path}: not a JSON list and not a text file of numbers (a load per expert)") from None
    load = torch.tensor(values, dtype=torch.float64)
    if not load.numel() or not bool(torch.isfinite(load).all()) or bool((load < 0).any()) or not bool(load.sum() > 0):
        raise ValueError(f"{path}: {load.numel()} loads, expected a finite load >= 0 per expert, not all 0")
    return load


def load_topk(load: torch.Tensor, num_ranks: int, num_tokens: int, num_topk: int, *, seed: int = 0,
              chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """One call's routing drawn from a load per expert: ``num_ranks * num_tokens`` tokens, token i from rank
    ``i // num_tokens`` (the second tensor, int64), each picking ``num_topk`` distinct experts (int64 [T, K]) in
    proportion to ``load`` without replacement (the Gumbel top-k draw: the top K of log(load) + Gumbel noise).
    Drawn ``chunk`` tokens at a time from one generator, the same draws as in one piece. Raises ValueError for a
    load with fewer than ``num_topk`` experts of positive load."""
    load = load.detach().double().cpu()
    if int((load > 0).sum()) < num_topk:
        raise ValueError(f"load_topk: {int((load > 0).sum())} experts of positive load, expected at least "
                         f"top-{num_topk}")
    n = num_ranks * num_tokens
    gen = torch.Generator().manual_seed(seed)
    logs = load.log()
    parts = []
    for start in range(0, n, chunk):
        u = torch.rand(min(chunk, n - start), load.numel(), generator=gen, dtype=torch.float64)
        parts.append(torch.topk(logs - torch.log(-torch.log(u)), num_topk, dim=1).indices)
    idx = torch.cat(parts) if parts else torch.empty(0, num_topk, dtype=torch.int64)
    return idx, torch.arange(n) // num_tokens


@dataclass(frozen=True)
class PlacedRouting:
    """Routing statistics of a load through a placement (:func:`placed_stats`): ``stats`` counted on the physical
    ids with each token's source rank, ``num_slots`` the ids dispatch sees (``Workload.num_experts``),
    ``slots_per_gpu``, ``replicas`` (slots that hold a copy beyond each expert's first), ``tokens`` drawn."""

    placement: str
    stats: RoutingStats
    num_slots: int
    slots_per_gpu: int
    replicas: int
    tokens: int

    def describe(self) -> str:
        """The placement in words, e.g. "greedy, 5 slots per GPU, 64 replicas"."""
        n = self.slots_per_gpu
        if self.placement == "contiguous":
            return f"contiguous, {n} expert{'s' * (n != 1)} per GPU"
        return f"{self.placement}, {n} slot{'s' * (n != 1)} per GPU, {self.replicas} replicas"


def placed_stats(load: torch.Tensor, placement: str, num_ranks: int, ranks_per_node: int, num_tokens: int,
                 num_topk: int, *, slots_per_gpu: int | None = None, seed: int = 0, nvlink_gbps: float = 450.0,
                 nic_gbps: float = CX7_NIC_GBPS, trace_every: int = 8) -> PlacedRouting:
    """The statistics of one call's routing drawn from ``load`` (:func:`load_topk`: ``num_tokens`` tokens per rank)
    and routed through ``placement``: "contiguous" (expert e on rank e // (E / N), SPEC.md's layout, the ids as
    drawn), "greedy" (:func:`largeep.placement.greedy_placement`, EPLB-style) or "planned"
    (:func:`largeep.placement.plan_placement` with every ``trace_every``-th token as its trace). The last two fill
    ``slots_per_gpu`` slots on every GPU (default: the fewest that hold the E experts, ceil(E / N)) with the
    experts and replicas of the busiest, and route with ``Placement.route``; the statistics are
    :func:`sampled_stats` of the physical ids with each token's source rank. ``nvlink_gbps``, ``nic_gbps``: the
    links the planner weighs (GB/s per GPU). Raises ValueError for a placement not in :data:`PLACEMENTS`, a
    contiguous placement whose experts do not divide among the ranks, or slots that cannot hold the experts."""
    from largeep import placement as pl

    if placement not in PLACEMENTS:
        raise ValueError(f"placed_stats: placement {placement!r}, expected one of {', '.join(PLACEMENTS)}")
    e = load.numel()
    p = min(ranks_per_node, num_ranks)
    if placement == "contiguous":
        if slots_per_gpu is not None:
            raise ValueError("placed_stats: slots_per_gpu is a greedy or planned placement's (contiguous puts E / N "
                             "experts on each rank)")
        check_routing(num_ranks, p, e, num_topk)
    else:
        if num_ranks % p:
            raise ValueError(f"placed_stats: {p} ranks per node do not divide {num_ranks} ranks (a group holds "
                             "whole nodes)")
        slots_per_gpu = -(-e // num_ranks) if slots_per_gpu is None else slots_per_gpu
        if slots_per_gpu < 1 or slots_per_gpu * num_ranks < e:
            raise ValueError(f"placed_stats: slots_per_gpu {slots_per_gpu} on {num_ranks} GPUs, expected at least "
                             f"{-(-e // num_ranks)} (slots for the {e} experts)")
    idx, src = load_topk(load, num_ranks, num_tokens, num_topk, seed=seed)
    if placement == "contiguous" or slots_per_gpu is None:
        return PlacedRouting(placement, sampled_stats(idx, num_ranks, p, e, src_rank=src), e, e // num_ranks, 0,
                             idx.shape[0])
    topo = pl.Topology(num_nodes=num_ranks // p, gpus_per_node=p, nvlink_bw=nvlink_gbps * 1e9,
                       nic_bw=nic_gbps * 1e9, slots_per_gpu=slots_per_gpu)
    if placement == "greedy":
        plan = pl.greedy_placement(load, topo)
    else:
        plan = pl.plan_placement(load, topo, trace=pl.RoutingTrace(idx[::trace_every], src[::trace_every], e))
    # (Placement.route routes each source's tokens as that source alone would, so routing whole sources at a time is
    # the same; at once, one call's 2M tokens at EP 512 took 7 GB)
    step = max(1, (1 << 18) // max(1, num_tokens)) * num_tokens
    routed = torch.cat([plan.route(idx[i:i + step], src[i:i + step]) for i in range(0, idx.shape[0], step)])
    stats = sampled_stats(routed, num_ranks, p, topo.num_slots, src_rank=src)
    return PlacedRouting(placement, stats, topo.num_slots, slots_per_gpu, int((plan.phys_to_log >= 0).sum()) - e,
                         idx.shape[0])


# -- traffic ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Traffic:
    """Bytes one GPU moves in one call: logical (SPEC.md: received rows incl. local; low-latency mode: every
    (token, expert) copy), per leg, and through its SMs."""

    logical: float
    nvlink: float
    rdma: float
    sm: float
    copy: float = 0.0  # received rows in BF16 bytes: the receive-side pass (normal mode)
    reduced: float = 0.0  # this GPU's own tokens in BF16 bytes: what the fused combine's reduce blocks write


def traffic(
    w: Workload, num_ranks: int, ranks_per_node: int, stats: RoutingStats, *, hierarchical: bool = True
) -> Traffic:
    """Per-GPU bytes of one call (module docstring). The link, SM and copy terms are scaled by the busiest
    receiver's share: ``stats.imbalance`` (the busiest rank) for NVLink, the SMs, the receive pass and the flat
    layout's NIC leg; ``stats.node_imbalance`` (the busiest node) for the hierarchical layout's NIC leg, whose rows
    land on the same-index GPU of each destination node. ``logical`` is not scaled (SPEC.md's logical bytes: the
    mean rank's received rows). Raises ValueError for a group or routing that cannot exist
    (:func:`routing_problem`), or statistics this group cannot have (more ranks or nodes per token than top-K, the
    ranks or the nodes)."""
    check_routing(num_ranks, ranks_per_node, w.num_experts, w.num_topk)
    n, p = num_ranks, min(ranks_per_node, num_ranks)
    m = max(1, n // p)
    for name, v, most in (("ranks_per_token", stats.ranks_per_token, min(w.num_topk, n)),
                          ("nodes_per_token", stats.nodes_per_token, min(w.num_topk, m))):
        if v > most * (1 + 1e-9):
            raise ValueError(f"traffic: stats.{name} {v:g}, expected at most {most} (top-{w.num_topk} on {n} ranks, "
                             f"{m} node(s))")
    b = w.bytes_per_row() * stats.imbalance
    b16 = 2 * w.hidden * stats.imbalance
    t = w.num_tokens
    if w.mode == "normal":
        rows = t * stats.ranks_per_token
        if hierarchical and m > 1:
            # a GPU's NIC takes the rows for its node (the busiest node's share), NVLink the fan-out to its rank
            node_share = stats.node_imbalance
            if node_share is None:
                if stats.imbalance != 1:
                    raise ValueError(f"traffic: stats.imbalance {stats.imbalance:g} without stats.node_imbalance: the "
                                     f"hierarchical NIC leg of {n} ranks on {m} nodes takes the busiest node's share, "
                                     "which a skewed routing must give (sampled_stats counts it)")
                node_share = 1.0  # (uniform routing: every node alike)
            # (a combine's rows cross the network as the kernels' partial sums of the node, float32 or with
            # bf16_partial_sums BF16, with K float32 weights: docs/design.md, comb_send / comb_rdma; a dispatch's as
            # its rows)
            part = 2 if w.bf16_partial_sums else 4
            nic_row = part * w.hidden + 4 * w.num_topk if w.op == "combine" else w.bytes_per_row()
            remote = stats.nodes_per_token * (m - 1) / m if stats.remote_nodes_per_token is None \
                else stats.remote_nodes_per_token
            rdma = t * remote * nic_row * node_share
            nvl = rows * (p - 1) / p * b
        else:
            remote = stats.ranks_per_token * (n - p) / n if stats.remote_ranks_per_token is None \
                else stats.remote_ranks_per_token
            rdma = t * remote * b
            nvl = rows * (p - 1) / n * b
        # every rank sums its own T tokens whatever the routing's imbalance
        return Traffic(rows * w.bytes_per_row(), nvl, rdma, rows * b, rows * b16, t * 2 * w.hidden)
    copies = t * w.num_topk
    # low latency: dispatch crosses a link once per (token, destination rank), combine once per copy (with the
    # weights sent: once per (token, rank) with one expert there, twice with more; with bf16 partial sums once)
    if w.op == "dispatch" or (w.weights_sent and w.bf16_partial_sums):
        sent = t * stats.ranks_per_token
    elif w.weights_sent and stats.summed_rows_per_token > 0:
        sent = t * stats.summed_rows_per_token
    else:
        sent = copies
    return Traffic(copies * w.bytes_per_row(), sent * (p - 1) / n * b, sent * (n - p) / n * b, 0.0)


# -- parameters -------------------------------------------------------------------------------------------------
@dataclass
class Params:
    """Fitted constants. lat_us: fixed latency per "mode.op"; eff_*: fraction of the link bandwidth reached;
    sm_gbps: per-SM throughput cap of the send kernels (GB/s of logical bytes per SM, normal mode); copy_gbps:
    per-SM throughput of the receive-side pass run after the transfer (GB/s of BF16 row bytes per SM; None = no
    such pass); comb_gbps: per push block of the fused combine (GB/s of the rows pushed to this node's other
    ranks, counted at the busiest warp times 16; None = not known: combines are modelled as push + reduce);
    reduce_gbps: per reduce block of the fused combine (GB/s of this rank's own tokens in BF16, counted at the
    busiest warp times 16: one warp sums a token; None = never the bound);
    source: where the numbers come from; fitted: which constants the data determined (the rest are the prior's:
    :func:`calibrate`); no_term: those of ``fitted`` that the records drove to no term at all (a rate's inverse to 0:
    its rate is then None, but known, not missing). Raises ValueError for constants no fit can give (an efficiency
    or rate <= 0, a negative latency, the latencies of other calls than "mode.op")."""

    lat_us: dict[str, float]
    eff_nvlink: float
    eff_rdma: float
    sm_gbps: float
    copy_gbps: float | None = None
    source: str = ""
    fitted: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    comb_gbps: float | None = None  # per push block of the fused combine (GB/s of logical bytes); None = not known
    reduce_gbps: float | None = None  # per reduce block of the fused combine (GB/s of BF16 rows); None = not known
    # the low-latency combine with the weights sent: the experts' rank reads every copy it holds and sums a token's
    # copies before it sends them (fit_summing); in series with the rest. None = no such term (not fitted)
    sum_lat_us: float | None = None
    sum_gbps: float | None = None  # per GPU, GB/s of the BF16 copies read
    no_term: list[str] = field(default_factory=list)
    # of the others: those an earlier solve of the fit moved and no record binds at the end (kept: the fit's final
    # choice of terms was made with them; a rate there is a bound the records leave, not a measurement)
    unbound: list[str] = field(default_factory=list)
    # the model has the serial receive pass (copy_gbps; calibrate(copy_phase=True)). False: none (zero-copy, or the
    # model before the push design), and a two-kernel combine's reduction is its reduce kernel at reduce_gbps
    receive_pass: bool = True

    def __post_init__(self) -> None:
        if set(self.lat_us) != set(_LAT_KEYS):
            raise ValueError(f"Params: lat_us keys {sorted(self.lat_us)}, expected {', '.join(_LAT_KEYS)}")
        for key, v in self.lat_us.items():
            if not 0 <= v < math.inf:
                raise ValueError(f"Params: lat_us[{key!r}] {v}, expected a finite latency >= 0 (us)")
        for name in ("eff_nvlink", "eff_rdma", "sm_gbps"):
            v = getattr(self, name)
            if not 0 < v < math.inf:
                raise ValueError(f"Params: {name} {v}, expected a positive finite number")
        for name in ("copy_gbps", "comb_gbps", "reduce_gbps", "sum_gbps"):
            v = getattr(self, name)
            if v is not None and not 0 < v < math.inf:
                raise ValueError(f"Params: {name} {v}, expected a positive finite rate (or None: no such term)")
        if self.sum_lat_us is not None and not 0 <= self.sum_lat_us < math.inf:
            raise ValueError(f"Params: sum_lat_us {self.sum_lat_us}, expected a finite latency >= 0 (or None)")

    def rate_known(self, name: str) -> bool:
        """Whether the rate ``name`` (copy_gbps, comb_gbps, reduce_gbps) is known: a value, or fitted to no term."""
        return bool(getattr(self, name)) or name in self.no_term

    def vector(self) -> list[float]:
        inv_copy = 1 / self.copy_gbps if self.copy_gbps else 0.0
        inv_comb = 1 / self.comb_gbps if self.comb_gbps else 0.0
        inv_red = 1 / self.reduce_gbps if self.reduce_gbps else 0.0
        return [self.lat_us[k] for k in _LAT_KEYS] + [1 / self.eff_nvlink, 1 / self.eff_rdma, 1 / self.sm_gbps,
                                                      inv_copy, inv_comb, inv_red]

    @staticmethod
    def from_vector(v: Sequence[float], source: str, fitted: list[str], no_term: Sequence[str] = ()) -> Params:
        lat = {k: float(v[i]) for i, k in enumerate(_LAT_KEYS)}
        j = len(_LAT_KEYS)
        copy = 1 / float(v[j + 3]) if v[j + 3] > 1e-12 else None
        comb = 1 / float(v[j + 4]) if v[j + 4] > 1e-12 else None
        red = 1 / float(v[j + 5]) if v[j + 5] > 1e-12 else None
        return Params(lat, 1 / float(v[j]), 1 / float(v[j + 1]), 1 / float(v[j + 2]), copy, source, list(fitted),
                      comb_gbps=comb, reduce_gbps=red, no_term=list(no_term))


def placeholder() -> Params:
    """Constants from ANCHORS.md before any GPU record exists (labelled as such wherever they are used):
    eff_nvlink = 300/450 (NCCL's SM-driven all_to_all reached ~300 GB/s out of each H200, NVLink4 450 GB/s);
    sm_gbps = 11 (DeepEP's logical bandwidth grows ~11 GB/s per SM on the same machine: 89 GB/s at 8 SMs, 254 at
    24); eff_rdma = 0.9 (assumed: no RDMA measurement exists here); latencies ~15-18 us (DeepEP's 4-GPU low-latency
    times minus their NVLink transfer time at 300 GB/s); no serial receive pass (copy_gbps None)."""
    return Params(
        lat_us={"normal.dispatch": 15.0, "normal.combine": 15.0, "low_latency.dispatch": 15.0,
                "low_latency.combine": 18.0},
        eff_nvlink=300.0 / 450.0, eff_rdma=0.9, sm_gbps=11.0,
        source="PLACEHOLDER: ANCHORS.md link ceilings and DeepEP SM scaling (no largeep GPU records fitted)",
        fitted=[], receive_pass=False,
    )


def load_params(path: str | Path) -> Params:
    """The constants of an earlier fit, from the ``sim.json`` that ``python -m largeep.bench.sim --out DIR`` wrote
    (its "calibration"), e.g. the current fit's, ``bench/results/2026-12-03-session41/model/sim.json``: the fit's
    efficiencies apply to whatever links the :class:`Cluster` of a prediction has. Raises ValueError naming the
    file for a file that is not such a sim.json or holds constants no fit can give (:class:`Params`)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"load_params: {path}: cannot read it as JSON ({exc})") from exc
    cal = doc.get("calibration") if isinstance(doc, dict) else None
    names = {f.name for f in Params.__dataclass_fields__.values()}
    if not isinstance(cal, dict) or not {"lat_us", "eff_nvlink", "eff_rdma", "sm_gbps"} <= set(cal):
        raise ValueError(f"load_params: {path} has no \"calibration\" with the model's constants (expected the "
                         "sim.json of `python -m largeep.bench.sim --out DIR`)")
    unknown = sorted(set(cal) - names)
    if unknown:
        raise ValueError(f"load_params: {path}: constants {', '.join(unknown)} that this model does not have "
                         "(a sim.json of another version)")
    if "receive_pass" not in cal:
        # (written before Params had receive_pass: a fit's is its calibrate(copy_phase=...), which the run recorded
        # in calibrated_on; a run without records used the placeholder constants, which have none. Left to the
        # dataclass default (True), a --no-copy-phase fit's multi-node combine lost its reduce kernel's term)
        on = doc.get("calibrated_on")
        if not isinstance(on, dict) or not isinstance(on.get("copy_phase"), bool):
            raise ValueError(f"load_params: {path}: its \"calibration\" has no receive_pass and its \"calibrated_on\" "
                             "no copy_phase, so whether the fit had the serial receive pass is not known")
        cal = {**cal, "receive_pass": on["copy_phase"] and bool(on.get("records"))}
    try:
        params = Params(**cal)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"load_params: {path}: {exc}") from exc
    params.source = f"constants of {path} ({params.source})"
    return params


# -- prediction -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    """time_us and its terms; bandwidths in GB/s (logical per SPEC.md; per link: bytes on it / time; 0 where the
    modelled time is 0: nothing moved and no latency); efficiency: the busiest link's utilisation, its bytes / (time
    * its theoretical per-direction bandwidth), of the link named by ``busiest_link`` ("nvlink", "rdma" or "none"
    when no bytes cross a link): NVLink inside one node, the NIC beyond, so it is not a scaling efficiency (it can
    rise from EP 8 to 16 while every GB/s falls); bound: the overlapped term that decides the time ("nvlink",
    "rdma" or "sm"; the receive pass t_copy_us and the latency lat_us come on top), or for a call with no link or
    SM term (one GPU in low-latency mode, no tokens) the largest of the terms in series: "latency", "copy",
    "summing" or "rounds"."""

    time_us: float
    t_nvlink_us: float
    t_rdma_us: float
    t_sm_us: float
    t_copy_us: float
    lat_us: float
    logical_gbps: float
    nvlink_gbps: float
    rdma_gbps: float
    efficiency: float
    bound: str
    rounds: int = 1  # Buffer(tokens_per_round=...): the call in this many rounds
    t_rounds_us: float = 0.0  # what the rounds add: a latency per extra round, and the merge pass (in time_us)
    t_sum_us: float = 0.0  # the summing pass of a low-latency combine with the weights sent (in time_us)
    busiest_link: str = "none"  # the link whose utilisation ``efficiency`` is
    # constants this call's time needs that the fit does not have (no record it was fitted on exercised them): the
    # time leaves their terms out, so it is a lower bound, not a prediction (e.g. a one-GPU fused combine, all
    # reduce, from a fit on 2-GPU records none of which the reduce blocks bounded)
    unknown: tuple[str, ...] = ()


# Rows a Buffer in rounds merges into SPEC's order (dispatch: a scatter of the received rows; combine: a gather of
# its input), in bytes per us of rows: an index_copy_ of 29.4 MB of BF16 rows (2048 x H 7168, 8-byte words) took
# 19.5 us on an H200 (bench/results/2026-12-01-session20/r3, profile of a 2-round dispatch on one rank).
MERGE_BYTES_PER_US = 29.4e6 / 19.5


def push_blocks(num_sms: int, eighths: int) -> int:
    """Blocks of the fused combine that push (launch_combine_fused): the rest reduce. Raises ValueError for
    ``num_sms`` < 1 or ``eighths`` outside 1 to 7 (no fused combine runs so)."""
    if num_sms < 1:
        raise ValueError(f"push_blocks: num_sms {num_sms}, expected >= 1")
    if not 1 <= eighths <= 7:
        raise ValueError(f"push_blocks: eighths {eighths}, expected 1 to 7 (the fused combine's push share)")
    grid = max(2, num_sms)
    return min(grid - 1, max(1, (grid * eighths + 4) // 8))


COMB_CHUNK = 4  # rows per push unit of the fused combine (kCombChunk, csrc/kernels/api.cuh)
FUSED_WARPS = 16  # warps per block of the fused combine, push and reduce alike (kReduceThreads 512 / 32)


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-6)  # expected counts: 1021.0000001 is 1021


def fused_units(num_ranks: int, rows_per_source: float, num_tokens: int, num_sms: int,
                eighths: int) -> tuple[int, int]:
    """(chunks, tokens) of the fused combine's busiest push warp and busiest reduce warp (combine_fused_kernel).
    Push warp g of push_blocks * 16 takes units g, g + push_blocks * 16, ... of (N - 1) * ceil(rows per source / 4)
    (a unit: 4 rows for one source, pushed row by row, then a system fence and the chunk's flag); reduce warp w of
    the rest takes tokens w, w + reduce_blocks * 16, ... (one token at a time). No warp takes another's work, and
    each pushes or sums its units one after another, so the busiest warp's count sets the time."""
    pushing = push_blocks(num_sms, eighths)
    reducing = max(2, num_sms) - pushing
    units = (num_ranks - 1) * _ceil(rows_per_source / COMB_CHUNK) if num_ranks > 1 else 0
    return _ceil(units / (pushing * FUSED_WARPS)), _ceil(num_tokens / (reducing * FUSED_WARPS))


def _fused(w: Workload, num_ranks: int, ranks_per_node: int, num_sms: int | None, eighths: int) -> bool:
    return w.mode == "normal" and w.op == "combine" and ranks_per_node >= num_ranks and bool(num_sms) and eighths > 0


def _terms(tr: Traffic, w: Workload, cluster: Cluster, num_sms: int | None,
           fused_eighths: int = 0, num_ranks: int = 1) -> dict[str, tuple[float, float]]:
    """Each term as (coefficient on its inverse constant, constant us), so that time = lat + coef * inv + const.
    fused_eighths > 0: the fused combine's push and reduce terms ("comb", "reduce") instead of the SM and receive
    terms (num_ranks: the group's, all on one node)."""
    bw_nvl = cluster.nvlink_gbps * 1e3  # bytes per us
    bw_nic = cluster.nic_gbps * 1e3
    out = {
        "nvlink": (tr.nvlink / bw_nvl, cluster.nvlink_latency_us if tr.nvlink > 0 else 0.0),
        "rdma": (tr.rdma / bw_nic, cluster.nic_latency_us if tr.rdma > 0 else 0.0),
    }
    if w.mode == "normal" and num_sms and fused_eighths > 0:
        # Rates are per block (16 warps), the work is counted at the busiest warp (fused_units): a push block's
        # bytes are 16 x its busiest warp's chunks of 4 rows, a reduce block's 16 x its busiest warp's tokens.
        # Push: the rows for this node's other ranks (a rank's own stay), the same count for each source.
        row = w.bytes_per_row()
        per_source = tr.nvlink / (row * (num_ranks - 1)) if num_ranks > 1 else 0.0  # imbalance included
        chunks, tokens = fused_units(num_ranks, per_source, w.num_tokens, num_sms, fused_eighths)
        out["comb"] = (FUSED_WARPS * chunks * COMB_CHUNK * row / 1e3, 0.0)
        # one warp per token, waiting for its rows as they arrive: the time goes with the tokens summed (1 GPU:
        # 0.44 us per token and reduce block, one row each; 2 GPUs: 0.51 us, two rows each; session 6)
        out["reduce"] = (FUSED_WARPS * tokens * tr.reduced / max(1, w.num_tokens) / 1e3, 0.0)
    elif w.mode == "normal" and num_sms:
        out["sm"] = (tr.sm / (num_sms * 1e3), 0.0)
        out["copy"] = (tr.copy / (num_sms * 1e3), 0.0)
        if w.op == "combine":
            # the two-kernel combine (several nodes, or comb 0): the reduce kernel after the pushes, one warp per
            # token on all num_sms blocks, at the fused combine's reduce rate per block (counted at the busiest warp
            # times 16); the term the receive pass stands for where a fit has none (copy_gbps None)
            tokens = _ceil(w.num_tokens / (num_sms * FUSED_WARPS))
            out["reduce_pass"] = (FUSED_WARPS * tokens * tr.reduced / max(1, w.num_tokens) / 1e3, 0.0)
    return out


def predict(
    w: Workload, num_ranks: int, params: Params, cluster: Cluster, *, stats: RoutingStats | None = None,
    hierarchical: bool = True, overlap: bool = True, num_sms: int | None = -1, rounds: int = 1,
) -> Prediction:
    """Time and bandwidths of one call on ``num_ranks`` GPUs (``cluster.gpus_per_node`` per node).
    num_sms: -1 = the cluster's; None = no SM cap. rounds > 1 (normal mode, a Buffer with tokens_per_round): the
    same bytes in that many calls, each with its latency, plus the merge of the received rows
    (MERGE_BYTES_PER_US). A normal-mode combine of push + reduce kernels (several nodes, or
    ``cluster.combine_eighths`` 0) has its reduction in series: the receive pass at ``copy_gbps`` where the model
    has one (``params.receive_pass``), else the reduce kernel at ``reduce_gbps``; a rate it needs that is not known
    is named in ``unknown``. Raises
    ValueError for ``num_sms`` other than -1, None or >= 1, or ``rounds`` < 1."""
    if num_sms is not None and num_sms != -1 and num_sms < 1:
        raise ValueError(f"predict: num_sms {num_sms}, expected >= 1 (-1: the cluster's; None: no SM cap)")
    if rounds < 1:
        raise ValueError(f"predict: rounds {rounds}, expected >= 1")
    p = min(cluster.gpus_per_node, num_ranks)
    if stats is None:
        stats = routing_stats(num_ranks, p, w.num_experts, w.num_topk)
    sms = cluster.num_sms if num_sms == -1 else num_sms
    tr = traffic(w, num_ranks, p, stats, hierarchical=hierarchical)
    # the fused combine where the cluster runs it (one node, comb > 0), whatever the fit knows: a rate no fitted
    # record exercised leaves its term out and is named in ``unknown`` (a lower bound), rather than the time coming
    # from the two-kernel model, which is not what runs (its push at the dispatch's rate, no reduction at all)
    fused = _fused(w, num_ranks, p, sms, cluster.combine_eighths)
    terms = _terms(tr, w, cluster, sms, cluster.combine_eighths if fused else 0, num_ranks)
    t_nvl = terms["nvlink"][0] / params.eff_nvlink + terms["nvlink"][1]
    t_rdma = terms["rdma"][0] / params.eff_rdma + terms["rdma"][1]
    t_sm = terms["sm"][0] / params.sm_gbps if "sm" in terms else 0.0
    if fused:
        t_sm = terms["comb"][0] / params.comb_gbps if params.comb_gbps else 0.0
        if params.reduce_gbps:
            t_sm = max(t_sm, terms["reduce"][0] / params.reduce_gbps)
    unknown: tuple[str, ...] = ()
    if fused:
        unknown = tuple(name for name, term in (("comb_gbps", "comb"), ("reduce_gbps", "reduce"))
                        if terms[term][0] > 0 and not params.rate_known(name))
    t_copy = 0.0
    if params.receive_pass:  # the two-kernel combine's reduction is the receive pass
        if "copy" in terms and params.copy_gbps:
            t_copy = terms["copy"][0] / params.copy_gbps
        elif "reduce_pass" in terms and terms["reduce_pass"][0] > 0 and not params.rate_known("copy_gbps"):
            unknown = ("copy_gbps",)
    elif "reduce_pass" in terms:  # no receive pass: the combine still reduces, in its own kernel after the pushes
        if params.reduce_gbps:
            t_copy = terms["reduce_pass"][0] / params.reduce_gbps
        elif terms["reduce_pass"][0] > 0 and not params.rate_known("reduce_gbps"):
            unknown = ("reduce_gbps",)
    links = max(t_nvl, t_rdma) if overlap else t_nvl + t_rdma
    body = max(links, t_sm)
    lat = params.lat_us[f"{w.mode}.{w.op}"]
    rounds = rounds if w.mode == "normal" else 1
    # (the merge pass of the busiest rank: its received rows, tr.sm in normal mode)
    t_rounds = (rounds - 1) * lat + tr.sm / MERGE_BYTES_PER_US if rounds > 1 else 0.0
    t_sum = summing_us(w, params, stats.imbalance)
    if body > 0:
        bound = "sm" if t_sm >= links and t_sm > 0 else ("rdma" if t_rdma >= t_nvl else "nvlink")
    else:  # nothing crosses a link and no SM term: what is left in series decides (ties: the first named)
        serial = (("latency", lat), ("copy", t_copy), ("summing", t_sum), ("rounds", t_rounds))
        bound = max(serial, key=lambda kv: kv[1])[0]
    time_us = lat + body + t_copy + t_rounds + t_sum

    def gbps(nbytes: float) -> float:
        return nbytes / time_us / 1e3 if time_us > 0 else 0.0

    nvl_gbps, rdma_gbps = gbps(tr.nvlink), gbps(tr.rdma)
    use = {"nvlink": nvl_gbps / cluster.nvlink_gbps, "rdma": rdma_gbps / cluster.nic_gbps}
    link = max(use, key=lambda k: use[k]) if tr.nvlink > 0 or tr.rdma > 0 else "none"
    return Prediction(time_us, t_nvl, t_rdma, t_sm, t_copy, lat, gbps(tr.logical), nvl_gbps, rdma_gbps,
                      use.get(link, 0.0), bound, rounds, t_rounds, t_sum, link, unknown)


def _summed_bytes(w: Workload, imbalance: float) -> float:
    """BF16 bytes of the copies a rank sums in a low-latency combine with the weights sent (T * K copies on the
    mean rank, whatever the EP), 0 for any other call."""
    if w.mode != "low_latency" or w.op != "combine" or not w.weights_sent:
        return 0.0
    return w.num_tokens * w.num_topk * 2 * w.hidden * imbalance


def summing_us(w: Workload, params: Params, imbalance: float = 1.0) -> float:
    """The summing pass of a low-latency combine with the weights sent: sum_lat_us + its copies' bytes at
    sum_gbps; 0 where it does not apply or was not fitted."""
    b = _summed_bytes(w, imbalance)
    if b == 0.0 or not params.sum_gbps:
        return 0.0
    return (params.sum_lat_us or 0.0) + b / (params.sum_gbps * 1e3)


def fit_summing(params: Params, records: Iterable[dict[str, Any]], *, cluster: Cluster | None = None) -> Params:
    """``params`` with ``sum_lat_us`` and ``sum_gbps`` fitted on low-latency combine records whose dispatch carried
    the weights: least squares on relative error of what the per-copy constants leave unexplained (the other
    constants stay as they are). Raises ValueError with fewer than two such records of different sizes, or when the
    fit gives no positive rate."""
    import numpy as np

    cluster = cluster or Cluster()
    base = replace(params, sum_lat_us=None, sum_gbps=None)
    xs, ys, ms = [], [], []
    for r in records:
        if not (_usable(r, weighted=True) and r["mode"] == "low_latency" and r["op"] == "combine"
                and r.get("weights_sent")):
            continue
        w, pred = _predict_record(r, base, cluster)
        meas = float(r["time_us_median"])
        ys.append(meas - pred.time_us)
        xs.append(_summed_bytes(w, 1.0) / 1e3)
        ms.append(meas)
    if len(set(xs)) < 2:
        raise ValueError(f"fit_summing: {len(xs)} weighted low-latency combine records of {len(set(xs))} sizes; "
                         "need two sizes at least")
    m = np.array(ms)
    a = np.stack([np.ones(len(xs)), np.array(xs)], axis=1) / m[:, None]
    (lat, inv), *_ = np.linalg.lstsq(a, np.array(ys) / m, rcond=None)
    if lat < 0:  # no negative fixed cost: the rate alone, through the origin
        lat = 0.0
        inv = float(np.dot(a[:, 1], np.array(ys) / m) / np.dot(a[:, 1], a[:, 1]))
    if inv <= 0:
        raise ValueError(f"fit_summing: the records leave no time growing with the copies (rate {inv:g})")
    return replace(params, sum_lat_us=float(lat), sum_gbps=float(1 / inv),
                   fitted=[*params.fitted, "sum_lat_us", "sum_gbps"])


# -- record files -----------------------------------------------------------------------------------------------
def load(paths: str | Path | Sequence[str | Path], *, label: str | None = None,
         fused_combine: int = 0) -> list[dict[str, Any]]:
    """Records of result files in either layout (module docstring), as dicts with the SPEC keys plus ``timing``
    ("kernel": profiler kernel times; "events": device events around whole calls, host overhead included),
    ``file`` and ``label`` (``label``, else the file's folder name); the benchmark's per-record ``extras``
    (``bus_gbps``, ``phase_of``, ...) are merged in, and a kernel-time record's ``kernels`` kept; ``gpu`` (None:
    CPU processes) where the file says; ``emulated_nodes`` (:func:`emulates_nodes`). fused_combine: the
    ``combine_eighths`` of nvshmem records that do not say (files written before kernel_times.py recorded it); other
    backends' records get 0."""
    from largeep.bench.records import read_results_files

    out: list[dict[str, Any]] = []
    for f in read_results_files(paths):
        path, recs, extras, what, settings = f.path, f.records, f.extras, f.what, f.settings
        tune: dict[str, Any] = settings["tune"] if isinstance(settings.get("tune"), dict) else {}
        for i, r in enumerate(recs):
            row = dict(r)
            if extras and i < len(extras) and isinstance(extras[i], dict):
                row.update({k: v for k, v in extras[i].items() if k not in row})
            if f.layout == "object" and "gpu" in f.env:  # (a list file's records say it themselves)
                row.setdefault("gpu", None if settings.get("device") == "cpu" else f.env["gpu"])
            kernel = "kernels" in r or "kernel" in what.lower()
            row.setdefault("timing", "kernel" if kernel else "events")
            # the run's routing and device (the benchmark's settings), which a fit must know of
            for key in ("routing", "device"):
                if key in settings:
                    row.setdefault(key, settings[key])
            one_node = r.get("ranks_per_node") in (None, r["ep"])
            if "comb" in tune and r.get("backend") == "nvshmem" and r["mode"] == "normal" and one_node:
                row.setdefault("combine_eighths", int(tune["comb"]))  # (the benchmark's runs record LARGEEP_TUNE)
            # (largeep's own kernels only: another backend's combine is not the fused kernel whatever the flag says)
            row.setdefault("combine_eighths", fused_combine if r.get("backend") == "nvshmem" else 0)
            # fewer ranks per node than ranks on a host with a GPU for every rank: nodes emulated on one host
            # (bench/kernel_times.py --ranks-per-node)
            gpus = f.env.get("gpu_count")
            row.setdefault("emulated_nodes", int(r.get("ranks_per_node") or r["ep"]) < int(r["ep"])
                           and isinstance(gpus, int) and gpus >= int(r["ep"]))
            row["file"] = str(path)
            row["label"] = label or path.parent.name
            out.append(row)
        out += _hook_sums(out[len(out) - len(recs):])
    return out


def of_cpu(r: dict[str, Any]) -> bool:
    """A record of CPU processes: its run's device was the CPU, or its environment names no GPU."""
    return r.get("device") == "cpu" or ("gpu" in r and r["gpu"] is None)


# what makes two records of one file the same measurement, apart from how it was taken (``of``) and its op
_SHAPE_KEYS = ("ep", "num_tokens", "hidden", "num_topk", "num_experts", "dtype")


def _hook_sums(recs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Low-latency records of one file: for each hook-mode send and receive pair (``of`` "dispatch_hook" /
    "combine_hook", bench/low_latency_times.py) without its op record (files of session 6 before it wrote them),
    that record derived as the sum of the two medians (p10 and p90 likewise), marked ``derived``."""
    key = ("of", *_SHAPE_KEYS)
    have = {tuple(r.get(k) for k in key) for r in recs if str(r.get("of", "")).endswith("_hook") and r["op"] in OPS}
    parts: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in recs:
        if r.get("mode") == "low_latency" and str(r.get("of", "")).endswith("_hook") and r["op"] in ("send", "recv"):
            parts.setdefault(tuple(r.get(k) for k in key), {})[r["op"]] = r
    out = []
    for k, pair in parts.items():
        if k in have or len(pair) < 2:
            continue
        s, v = pair["send"], pair["recv"]
        row = dict(s)
        row["op"] = str(s["of"]).split("_")[0]
        for q in ("time_us_median", "time_us_p10", "time_us_p90"):
            row[q] = float(s[q]) + float(v[q])
        row["derived"] = "sum of the hook-mode send and receive medians"
        out.append(row)
    return out


def skew_free(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records a low-latency fit should use: where a file has hook-mode dispatch/combine records (send and
    receive with every rank's sends complete in between), those, and not the plain ones, whose receive also waits
    for the slower rank's sends (the ranks' launch skew, which no model term covers)."""
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r.get("file"), r["op"], *(r.get(k) for k in _SHAPE_KEYS))

    hooked = {key(r) for r in records if r.get("mode") == "low_latency" and str(r.get("of", "")).endswith("_hook")}
    return [r for r in records if not (r.get("mode") == "low_latency" and key(r) in hooked
                                      and not str(r.get("of", "")).endswith("_hook"))]


# -- calibration ------------------------------------------------------------------------------------------------
def _usable(r: dict[str, Any], *, weighted: bool = False) -> bool:
    """A dispatch/combine record with a time. Records of low-latency calls whose dispatch carried the weights
    (``weights_sent``) are not fitted (``weighted`` False): their combine moves the summed rows, which the model
    predicts from the constants of the per-copy combine; ``check`` takes them (``--check-weighted``). Nor are
    combines whose rows the copy engines moved (``comb=8`` on one node, :data:`COPY_ENGINES`): the model has no term
    for them."""
    return (r.get("mode") in MODES and r.get("op") in OPS and float(r.get("time_us_median") or 0) > 0
            and (weighted or not r.get("weights_sent"))
            and not (r.get("op") == "combine" and record_eighths(r) == COPY_ENGINES and _one_node(r)))


def _one_node(r: dict[str, Any]) -> bool:
    """Whether a record's group is one node (the fused and copy-engine combines run only there)."""
    ep = int(r.get("ep") or 1)
    return int(r.get("ranks_per_node") or ep) >= ep


# LARGEEP_TUNE's comb value of the copy-engine combine (not a push share)
COPY_ENGINES = 8


def record_eighths(r: dict[str, Any]) -> int:
    """The fused combine's push share a record ran with (0: push + reduce kernels; :data:`COPY_ENGINES`: the copy
    engines pushed): ``comb=`` in its ``tune``, else its ``combine_eighths`` (bench/kernel_times.py writes it;
    load(..., fused_combine=...) sets it for older files), else 0."""
    for item in str(r.get("tune") or "").split(","):
        key, _, value = item.strip().partition("=")
        if key == "comb" and value.isdigit():
            return int(value)
    return int(r.get("combine_eighths") or 0)


def _record_rows(
    records: Sequence[dict[str, Any]], cluster: Cluster, hierarchical: bool
) -> list[tuple[int, dict[str, tuple[float, float]], float]]:
    rows = []
    for r in records:
        # (a normal combine timed with bf16 partial sums, the benchmark's --bf16-partial-sums, moves BF16 partials
        # between nodes: counted as such, not as the float32 ones; records with the weights sent are not fitted)
        w = Workload(r["mode"], r["op"], int(r["num_tokens"]), int(r["hidden"]), int(r["num_topk"]),
                     int(r["num_experts"]), r["dtype"], bool(r.get("weights_sent")), bool(r.get("bf16_partial_sums")))
        n, p = int(r["ep"]), int(r["ranks_per_node"])
        stats = routing_stats(n, p, w.num_experts, w.num_topk)
        tr = traffic(w, n, p, stats, hierarchical=hierarchical)
        sms = r.get("num_sms")
        eighths = record_eighths(r)
        if not _fused(w, n, p, sms, eighths):
            eighths = 0
        rows.append((_LAT_KEYS.index(f"{w.mode}.{w.op}"), _terms(tr, w, cluster, sms, eighths, n),
                     float(r["time_us_median"])))
    return rows


def emulates_nodes(r: dict[str, Any]) -> bool:
    """A record whose nodes were emulated on one host, so that its "RDMA" leg ran over NVLink: its
    ``emulated_nodes``, which :func:`load` sets where a record has fewer ranks per node than ranks and its file's
    environment shows a host with a GPU for every rank (``gpu_count``; bench/kernel_times.py --ranks-per-node).
    Records made otherwise (the model's own, in tests) say it themselves or are not."""
    return bool(r.get("emulated_nodes"))


def _files_of(recs: Sequence[dict[str, Any]]) -> str:
    """"FILE (n records, EP 2 with 1 rank per node), ..." of ``recs``, for messages naming them."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        by.setdefault(str(r.get("file", "?")), []).append(r)
    return "; ".join(f"{f} ({len(rs)} records: " + ", ".join(
        f"EP {ep} with {rpn} per node" for ep, rpn in sorted({(int(r["ep"]), int(r["ranks_per_node"])) for r in rs}))
        + ")" for f, rs in by.items())


def _emulated_refusal(emulated: Sequence[dict[str, Any]], allow: str) -> str:
    """Why the records of emulated nodes are not fitted, naming their files, and what ``allow``s it."""
    return (f"{len(emulated)} records emulate nodes on one host (ranks_per_node < ep: their 'RDMA' leg ran over "
            f"NVLink), which would fit eff_rdma as a NIC figure: {_files_of(emulated)}; leave them out, or pass "
            f"{allow} to fit them knowingly (eff_rdma then describes NVLink)")


def calibrate(
    measurements: Iterable[dict[str, Any]], *, cluster: Cluster | None = None, prior: Params | None = None,
    hierarchical: bool = True, overlap: bool = True, max_iter: int = 100, copy_phase: bool = True,
    emulated_nodes: bool = False,
) -> Params:
    """Least-squares fit of the constants to benchmark records (dicts with the record keys; only "dispatch" and
    "combine" of modes "normal" and "low_latency" are used). The cluster must describe the machine the records
    came from (its ``gpus_per_node`` is ignored: each record's ``ranks_per_node`` is used). Minimises the relative
    error of each record's median time. A constant that no record exercises under the settled choice of terms is
    not in ``fitted`` and has ``prior``'s value (also where an earlier iteration's solve had moved it); one the
    records drive to no term (a rate's inverse to 0) is in ``fitted`` and ``no_term``. copy_phase=False leaves the
    receive pass out of the fit (``copy_gbps`` stays ``prior``'s, None for the placeholder): the model as it was
    before largeep's push design, kept for comparison; a two-kernel combine then has its reduce kernel in series
    at ``reduce_gbps`` (:func:`predict`).

    Records of fewer ranks per node than ranks (:func:`emulates_nodes`) emulate nodes on one host: their "RDMA" leg
    ran over NVLink, so they would fit ``eff_rdma`` as if it were a NIC's. They are refused (ValueError naming
    their files) unless ``emulated_nodes`` is True; then a fitted ``eff_rdma`` carries a warning saying it
    describes NVLink (fit them with a cluster whose ``nic_gbps`` is the NVLink figure to read it as such).

    The choice of the term that decides each record is repeated at most ``max_iter`` times; if it has not settled
    by then (the last solve's constants would choose differently), the fit warns (UserWarning, and in
    ``Params.warnings``): its constants are then those of the last solve, not a consistent fit."""
    import numpy as np

    cluster = cluster or Cluster()
    prior = prior or placeholder()
    recs = [r for r in measurements if _usable(r)]
    if not recs:
        raise ValueError("calibrate: no dispatch/combine records with a positive time")
    emulated = [r for r in recs if emulates_nodes(r)]
    if emulated and not emulated_nodes:
        raise ValueError("calibrate: " + _emulated_refusal(emulated, "emulated_nodes=True (CLI: --emulated-nodes)"))
    rows = _record_rows(recs, cluster, hierarchical)
    prior_vec = prior.vector()
    theta = np.array(prior_vec, dtype=np.float64)
    nlat = len(_LAT_KEYS)
    col = {"nvlink": nlat, "rdma": nlat + 1, "sm": nlat + 2, "copy": nlat + 3, "comb": nlat + 4,
           "reduce": nlat + 5, "reduce_pass": nlat + 5}
    # unknown: start the choice of active terms from a push block as fast as an SM and a reduce block half that
    # (every fused record starts reduce-bound; starting the reduction faster can leave it never chosen, unfitted)
    for key, scale in (("comb", 1.0), ("reduce", 2.0)):
        if theta[col[key]] == 0:
            theta[col[key]] = scale * theta[col["sm"]]
    # the receive pass, or without one the two-kernel combine's reduce kernel (predict)
    serial = ("copy",) if copy_phase else ("reduce_pass",)
    active: list[tuple[str, ...]] | None = None
    used: set[int] = set()
    to_prior: set[int] = set()  # (of the last solve) efficiencies the records drove to <= 0, back at prior's value
    zeroed: set[int] = set()  # (of the last solve) latencies and rate inverses the records drove to <= 0: now 0

    def choose() -> list[tuple[str, ...]]:
        """Which terms decide each record under the current constants."""
        choice: list[tuple[str, ...]] = []
        for _lat, terms, _t in rows:
            vals = {k: c * theta[col[k]] + k0 for k, (c, k0) in terms.items()}
            links: tuple[str, ...]
            if overlap:
                links = (max(("nvlink", "rdma"), key=lambda k: vals[k]),)
                link_val = vals[links[0]]
            else:
                links = ("nvlink", "rdma")
                link_val = vals["nvlink"] + vals["rdma"]
            # the send kernels' SMs, or the fused combine's push or reduce blocks, whichever is slowest
            smk = max((k for k in ("sm", "comb", "reduce") if k in terms), key=lambda k: vals[k], default="sm")
            ch: tuple[str, ...] = (smk,) if vals.get(smk, -1.0) > link_val else links
            choice.append(ch + tuple(k for k in serial if k in terms))
        return choice

    for _ in range(max_iter):
        choice = choose()
        if choice == active:
            break
        active = choice
        a = np.zeros((len(rows), len(theta)))
        b = np.zeros(len(rows))
        for i, ((lat, terms, t), ch) in enumerate(zip(rows, choice, strict=False)):
            a[i, lat] = 1.0
            const = 0.0
            for k in ch:
                a[i, col[k]] += terms[k][0]
                const += terms[k][1]
            b[i] = t - const
            a[i] /= t  # relative error
            b[i] /= t
        used = {j for j in range(len(theta)) if np.any(a[:, j] != 0)}
        # (a constant this choice does not use keeps the value an earlier solve gave it: put back to the prior's,
        # a rate the prior makes binding binds again and the choice never settles; it is reported as unbound)
        free = sorted(used)
        to_prior = set()
        zeroed = set()
        for _attempt in range(len(theta)):
            fixed = [j for j in range(len(theta)) if j not in free]
            rhs = b - a[:, fixed] @ theta[fixed] if fixed else b
            sol, *_ = np.linalg.lstsq(a[:, free], rhs, rcond=None)
            bad = [free[i] for i, v in enumerate(sol) if v <= 0 and free[i] >= nlat or v < 0]
            if not bad:
                theta[free] = sol
                break
            # a negative latency, inverse efficiency or receive pass: clamp it (latency 0, no receive pass,
            # efficiency its prior) and refit
            for j in bad:
                zero = j < nlat or j in (col["copy"], col["comb"], col["reduce"])
                theta[j] = 0.0 if zero else prior_vec[j]
                (zeroed if zero else to_prior).add(j)
            free = [j for j in free if j not in bad]
            if not free:
                break
    settled = active is not None and choose() == active  # (the last solve's constants keep its choice)
    for key in ("comb", "reduce"):
        if col[key] not in used:  # no record bound there: the rate stays unknown (or the prior's)
            theta[col[key]] = prior_vec[col[key]]
    names = [k.replace("inv_", "") for k in PARAM_KEYS]
    # constants no record binds under the settled choice that an earlier solve moved: kept (the settled choice was
    # made with them), reported as such rather than as the prior's
    unbound = [names[j] for j in range(len(theta)) if j not in used and theta[j] != prior_vec[j]]
    fitted = [names[j] for j in sorted(used - to_prior)]
    no_term = [names[j] for j in sorted(zeroed) if j >= nlat]
    params = Params.from_vector(theta.tolist(), f"fit of {len(recs)} records", fitted, no_term)
    params.receive_pass = copy_phase
    params.unbound = unbound
    for name in names:  # the others are the prior's, exactly (not through their inverses)
        if name not in fitted and name not in unbound:
            if name in prior.lat_us:
                params.lat_us[name] = prior.lat_us[name]
            else:
                setattr(params, name, getattr(prior, name))
    params.warnings = _fit_warnings(recs, params) + [
        f"{names[j]}: the records gave it no positive value, so it stays the placeholder {getattr(params, names[j])}"
        for j in sorted(to_prior)
    ]
    if emulated and "eff_rdma" in fitted:
        params.warnings.append(
            f"eff_rdma = {params.eff_rdma:.3f} is fitted on {len(emulated)} records whose nodes were emulated on one "
            "host: their 'RDMA' leg ran over NVLink, so it describes NVLink, not a NIC, and every prediction "
            "beyond one node uses it")
    if not settled:
        unsettled = (f"calibrate: the choice of each record's deciding term had not settled after max_iter={max_iter} "
                     "iterations; the constants are those of the last solve, under which some records would choose "
                     "another term")
        params.warnings.append(unsettled)
        warnings.warn(unsettled, stacklevel=2)
    return params


def _fit_warnings(recs: Sequence[dict[str, Any]], params: Params) -> list[str]:
    """What makes a fit untrustworthy: too few records, one token count per op, efficiencies above 1, records of
    a skewed routing or of CPU processes (their time is not the links')."""
    out = []
    skewed = sorted({str(r["routing"]) for r in recs if r.get("routing") not in (None, "uniform")})
    if skewed:
        out.append(f"records of {', '.join(skewed)} routing: the model's rows per token assume uniform routing, so "
                   "the fitted constants absorb the skew")
    if any(r.get("device") == "cpu" for r in recs):
        out.append("records of CPU processes: the constants describe that run's gloo transport, not GPU links")
    if len(recs) < 2 * max(1, len(params.fitted)):
        out.append(f"{len(recs)} records for {len(params.fitted)} constants: the fit is barely determined")
    for key in _LAT_KEYS:
        mode, op = key.split(".")
        sizes = {(r["num_tokens"], r["ep"], r.get("num_sms"), r["hidden"], r["num_topk"], r["num_experts"],
                  r["dtype"] if op == "dispatch" else "bf16") for r in recs if r["mode"] == mode and r["op"] == op}
        if len(sizes) == 1:
            out.append(f"{key}: one size only, so its latency and bandwidth cannot be separated (sweep --tokens)")
    for name in ("eff_nvlink", "eff_rdma"):
        if name in params.fitted and getattr(params, name) > 1.0:
            out.append(f"{name} = {getattr(params, name):.2f} > 1: the records do not fit this model (too few sizes, "
                       "or the cluster's link bandwidth is wrong)")
    return out


@dataclass(frozen=True)
class CheckResult:
    """Relative errors (predicted / measured - 1) on records not used for the fit."""

    n: int
    median_abs_err: float
    max_abs_err: float
    rows: list[dict[str, Any]]


def _predict_record(
    r: dict[str, Any], params: Params, cluster: Cluster, *, hierarchical: bool = True, overlap: bool = True,
) -> tuple[Workload, Prediction]:
    """The workload of a record (its sizes, dtype and low-latency weight options) and its prediction on the
    record's group (its ranks per node and fused-combine split)."""
    w = Workload(r["mode"], r["op"], int(r["num_tokens"]), int(r["hidden"]), int(r["num_topk"]),
                 int(r["num_experts"]), r["dtype"], bool(r.get("weights_sent")), bool(r.get("bf16_partial_sums")))
    # (comb=8 records that reach here ran no copy-engine combine: its dispatches, and the push + reduce combines of
    # several nodes; the model's split is 0 to 7)
    eighths = record_eighths(r)
    c = replace(cluster, gpus_per_node=int(r["ranks_per_node"]),
                combine_eighths=0 if eighths == COPY_ENGINES else eighths)
    return w, predict(w, int(r["ep"]), params, c, hierarchical=hierarchical, overlap=overlap,
                      num_sms=r.get("num_sms"))


def _placeholders(r: dict[str, Any], w: Workload, pred: Prediction, params: Params, overlap: bool) -> list[str]:
    """The constants a record's predicted time rests on that no fitted record determined (neither in
    ``params.fitted`` nor in ``params.unbound``): the call's latency ``lat_us[mode.op]``, and the rate of the term
    that decides it (the link efficiency of the bound link, of both links that carry bytes where the links bind
    without overlap; sm_gbps where the send kernels' SMs bind, with or without overlap). Such a record's error tests
    the placeholder, not the fit (e.g. low-latency records checked against a fit of normal-mode records only). The
    fused combine's rates are left to ``Prediction.unknown``."""
    known = set(params.fitted) | set(params.unbound)
    key = f"{w.mode}.{w.op}"
    out = [] if key in known else [f"lat_us[{key}]"]
    links = [("eff_nvlink", pred.t_nvlink_us), ("eff_rdma", pred.t_rdma_us)]
    if pred.bound in ("nvlink", "rdma"):  # (without overlap the links' sum decides: both links that carry bytes)
        used = [name for name, t in links if t > 0] if not overlap else [f"eff_{pred.bound}"]
    elif pred.bound == "sm" and not _fused(w, int(r["ep"]), min(int(r["ranks_per_node"]), int(r["ep"])),
                                           r.get("num_sms"), record_eighths(r)):
        used = ["sm_gbps"]
    else:
        used = []
    return out + [name for name in used if name not in known]


def check(
    params: Params, records: Iterable[dict[str, Any]], *, cluster: Cluster | None = None,
    hierarchical: bool = True, overlap: bool = True,
) -> CheckResult:
    """Prediction error of ``params`` on ``records`` (dispatch/combine records only). Each row names, in
    ``placeholders``, the constants its prediction rests on that no fitted record determined
    (:func:`_placeholders`), and in ``unknown`` those whose terms it leaves out (``Prediction.unknown``)."""
    cluster = cluster or Cluster()
    rows = []
    for r in records:
        if not _usable(r, weighted=True):
            continue
        w, pred = _predict_record(r, params, cluster, hierarchical=hierarchical, overlap=overlap)
        meas = float(r["time_us_median"])
        rows.append({**{k: r[k] for k in ("backend", "mode", "op", "ep", "num_tokens", "dtype", "num_sms")},
                     "measured_us": meas, "predicted_us": pred.time_us, "rel_err": pred.time_us / meas - 1,
                     "unknown": list(pred.unknown), "placeholders": _placeholders(r, w, pred, params, overlap)})
    errs = sorted(abs(x["rel_err"]) for x in rows)
    if not errs:
        return CheckResult(0, float("nan"), float("nan"), [])
    return CheckResult(len(errs), statistics.median(errs), errs[-1], rows)


def same_call(r: dict[str, Any]) -> tuple[Any, ...]:
    """What makes records the same call, whichever pass or file timed it: backend, mode, op, group, SMs, sizes,
    fused-combine split, low-latency weight options, and the dtype of the rows moved (a combine moves BF16 rows
    whatever the dispatch dtype its record is labelled with)."""
    dtype = r["dtype"] if r["op"] == "dispatch" else "bf16"
    return (r.get("backend"), r["mode"], r["op"], int(r["ep"]), int(r["ranks_per_node"]), r.get("num_sms"),
            int(r["num_tokens"]), int(r["hidden"]), int(r["num_topk"]), int(r["num_experts"]), dtype,
            record_eighths(r), bool(r.get("weights_sent")), bool(r.get("bf16_partial_sums")))


def split_holdout(
    records: Sequence[dict[str, Any]], *, eps: Sequence[int] = (), sms: Sequence[int] = (),
    tokens: Sequence[int] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(fit, held out, how). With ``eps``, ``sms`` or ``tokens``: hold out every record at one of those EPs, SM
    counts or tokens per rank. Otherwise: hold out the largest EP when there are several, else one call of each
    three, its place rotating (:func:`same_call`: the records of one call, e.g. the same BF16 combine timed in a
    BF16 and an FP8 pass, are held out or fitted together)."""
    if eps or sms or tokens:
        def is_held(r: dict[str, Any]) -> bool:
            return int(r["ep"]) in eps or r.get("num_sms") in sms or r.get("num_tokens") in tokens

        out = [r for r in records if is_held(r)]
        fit = [r for r in records if not is_held(r)]
        fit_eps = sorted({int(r["ep"]) for r in fit})
        fit_sms = sorted({r.get("num_sms") for r in fit}, key=lambda v: -1 if v is None else v)
        what = " and ".join(x for x in (f"EP {sorted(eps)}" if eps else "", f"{sorted(sms)} SMs" if sms else "",
                                        f"{sorted(tokens)} tokens" if tokens else "") if x)
        return fit, out, f"fit on EP {fit_eps} at {fit_sms} SMs, checked on every record at {what}"
    all_eps = sorted({int(r["ep"]) for r in records})
    if len(all_eps) > 1:
        top = all_eps[-1]
        return ([r for r in records if int(r["ep"]) != top], [r for r in records if int(r["ep"]) == top],
                f"fit on EP {all_eps[:-1]}, checked on EP {top}")
    calls = list(dict.fromkeys(same_call(r) for r in records))  # (in the order of their first record)
    # one call of each three, its place in the three rotating (a file times its ops in a fixed order for each SM
    # count: a fixed place would hold out the same op, e.g. every FP8 dispatch, and fit it nowhere)
    held_calls = {c for i, c in enumerate(calls) if i % 3 == (i // 3) % 3}
    fit = [r for r in records if same_call(r) not in held_calls]
    held = [r for r in records if same_call(r) in held_calls]
    return fit, held, ("fit on 2/3 of the calls, checked on one of each three, its place rotating (a call's records "
                       "together)")


def holdout_unmatched(
    records: Sequence[dict[str, Any]], *, eps: Sequence[int] = (), sms: Sequence[int] = (),
    tokens: Sequence[int] = (),
) -> list[str]:
    """Each ``--holdout-*`` value that matches no record (as :func:`split_holdout` compares them), as
    "--holdout-ep 16 matched no record (their EPs: 2, 4)"."""
    out = []
    for flag, values, key, what in (("--holdout-ep", eps, "ep", "EPs"), ("--holdout-sms", sms, "num_sms", "SM counts"),
                                    ("--holdout-tokens", tokens, "num_tokens", "tokens per rank")):
        have = {int(r[key]) for r in records if r.get(key) is not None}
        for v in values:
            if v not in have:
                listed = ", ".join(map(str, sorted(have))) or "none"
                out.append(f"{flag} {v} matched no record (their {what}: {listed})")
    return out


# -- the EP sweep -----------------------------------------------------------------------------------------------
VARIANTS = (("hierarchical", True), ("hierarchical", False), ("flat", True), ("flat", False))


def symmetric_memory(eps: Sequence[int], gpus_per_node: int, normal: tuple[int, int, int, int],
                     ll: tuple[int, int, int, int], zero_copy_slots: int = 2) -> list[dict[str, Any]] | str:
    """The symmetric memory one rank's Buffer takes at each EP, from the kernels' own layouts (largeep._C's
    normal_layout and low_latency_layout): normal mode at ``normal`` = (tokens per rank, hidden, top-k, experts),
    with zero-copy slots on one node, and low latency at ``ll``; experts rounded up to a multiple of EP. Whether the
    normal kernels take that group (the nvshmem backend's unsupported_reason). A str saying why not where the native
    module is missing."""
    import types

    from largeep import native
    from largeep.backends.nvshmem_backend import unsupported_reason

    try:
        C = native.module()
    except RuntimeError as exc:
        return f"not computed: {exc}"
    gib = float(1 << 30)
    t, h, k, e = normal
    lt, lh, lk, le = ll
    rows = []
    for ep in eps:
        p = min(gpus_per_node, ep)
        nodes = ep // p
        nb = C.normal_layout(ep, -(-e // ep) * ep, k, h, t, p, zero_copy_slots if nodes == 1 else 0)["total_bytes"]
        lb = C.low_latency_layout(ep, -(-le // ep) * ep, lk, lh, lt, p)["total_bytes"]
        rows.append({"ep": ep, "nodes": nodes, "ranks_per_node": p, "normal_tokens": t, "normal_gib": nb / gib,
                     "low_latency_tokens": lt, "low_latency_gib": lb / gib,
                     "normal_supported": unsupported_reason(types.SimpleNamespace(  # type: ignore[arg-type]
                         low_latency=False, num_ranks=ep, ranks_per_node=p, hidden=h, num_topk=k,
                         max_tokens_per_rank=t, num_experts=-(-e // ep) * ep)) is None})
    return rows


def sweep_ep(
    params: Params, cluster: Cluster, eps: Sequence[int], *, normal: tuple[int, int, int, int],
    ll: tuple[int, int, int, int], max_nodes: int | None = None, samples: int = 0, seed: int = 0,
    dispatch_dtypes: Sequence[str] = ("fp8",), tokens_per_round: int | None = None, modes: Sequence[str] = MODES,
    load: torch.Tensor | None = None, load_name: str = "", placements: Sequence[str] = (),
    slots_per_gpu: int | None = None,
) -> list[dict[str, Any]]:
    """Predictions for every EP, mode of ``modes``, op and variant. normal/ll: (tokens, hidden, topk, experts).
    samples > 0 counts routing statistics on that many sampled tokens (needed for ``max_nodes``) instead of the
    exact formulas. dispatch_dtypes: the dispatch dtypes of both modes (the low-latency ``use_fp8``); combine is
    BF16. tokens_per_round: normal-mode calls in rounds of that many tokens (Buffer(tokens_per_round=...)). Where
    ``params`` has a fitted summing pass, the low-latency combine with the weights sent too (rows with
    ``weights_sent`` True, two-row sums and ``bf16_partial_sums``); at EPs of several nodes the normal combine with
    its partial sums between nodes in BF16 too (``bf16_partial_sums`` True, ``weights_sent`` False).

    load (float [E], E = ``normal``'s experts; ``load_name`` names it in the rows) or placements (of
    :data:`PLACEMENTS`; default "contiguous" where a load is given): the normal mode's routing is one call's
    tokens drawn from that load (a uniform one where only placements are given) and routed through each placement
    (:func:`placed_stats`, with ``slots_per_gpu``), its statistics counted with each token's source rank and the
    busiest rank's and node's shares as drawn; one set of normal-mode rows per placement. The low-latency rows keep
    uniform routing over contiguous experts. Every row says its routing: ``load`` ("uniform" or ``load_name``),
    ``placement`` (:meth:`PlacedRouting.describe`, or "contiguous"), ``slots`` (the ids dispatch sees) and the
    busiest rank's and node's shares (``busiest_rank_share``, ``busiest_node_share``; None: not counted, 1 for
    uniform routing).

    A mode that cannot exist at an EP (:func:`routing_problem`: its experts not divisible by the EP, the EP not
    whole nodes, ...) is left out there, with a warning saying why (the CLI refuses such arguments before it gets
    here). Each row's ``throughput_vs_ref`` is the scaling efficiency against ``ref_ep``, the sweep's smallest EP:
    the same call's time there over its time here, i.e. a GPU's tokens per second relative to that EP (the same
    tokens per rank at every EP); None where the call has no row at ``ref_ep``."""
    if tokens_per_round is not None and tokens_per_round < 1:
        raise ValueError(f"sweep_ep: tokens_per_round {tokens_per_round}, expected >= 1 (or None: one round)")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"sweep_ep: modes {', '.join(modes) or 'none'}, expected some of {', '.join(MODES)}")
    bad = [pl_ for pl_ in placements if pl_ not in PLACEMENTS]
    if bad:
        raise ValueError(f"sweep_ep: placements {', '.join(bad)}, expected some of {', '.join(PLACEMENTS)}")
    if load is not None and load.numel() != normal[3]:
        raise ValueError(f"sweep_ep: load of {load.numel()} experts, expected normal's {normal[3]}")
    if (load is not None or placements) and (max_nodes or samples):
        raise ValueError("sweep_ep: a load or placements draw one call's routing; max_nodes and samples are the "
                         "uniform routing's")
    placed = load is not None or bool(placements)
    if placed:
        placements = list(placements) or ["contiguous"]
    rounds = -(-normal[0] // tokens_per_round) if tokens_per_round else 1
    out = []
    for ep in eps:
        p = min(cluster.gpus_per_node, ep)
        for mode, (t, h, k, e) in (("normal", normal), ("low_latency", ll)):
            if mode not in modes:
                continue
            routings: list[tuple[RoutingStats | None, int, str, str]] = []  # (stats, slots, load, placement)
            if mode == "normal" and placed:
                drawn = load if load is not None else torch.ones(e, dtype=torch.float64)
                for name in placements:
                    spg = slots_per_gpu if name != "contiguous" else None
                    why = routing_problem(ep, p, e, k) if name == "contiguous" else (
                        f"{spg} slots per GPU hold {spg * ep} experts, fewer than {e}"
                        if spg is not None and spg * ep < e else None)
                    if why:
                        warnings.warn(f"sweep_ep: no normal predictions with the {name} placement at EP {ep}: {why}",
                                      stacklevel=2)
                        continue
                    pr_ = placed_stats(drawn, name, ep, p, t, k, slots_per_gpu=spg, seed=seed,
                                       nvlink_gbps=cluster.nvlink_gbps, nic_gbps=cluster.nic_gbps)
                    routings.append((pr_.stats, pr_.num_slots, load_name if load is not None else "uniform",
                                     pr_.describe()))
            else:
                why = routing_problem(ep, p, e, k, max_nodes=max_nodes if mode == "normal" else None)
                if why:
                    warnings.warn(f"sweep_ep: no {mode} predictions at EP {ep}: {why}", stacklevel=2)
                    continue
                stats = None
                if mode == "normal" and (samples or max_nodes):
                    idx = sample_topk(max(samples, 4096), e, k, seed=seed, num_nodes=ep // p, max_nodes=max_nodes)
                    # The sample's busiest rank over the mean is sampling noise, not skew: its routing treats every
                    # rank alike, and a few thousand tokens over hundreds of ranks gave 7-26% (EP 64-256) where a
                    # whole batch of N * T tokens gives about 1%. So the rows per token come from the sample, and
                    # the imbalance stays 1 as for the exact formulas (the node's too).
                    stats = replace(sampled_stats(idx, ep, p, e), imbalance=1.0, node_imbalance=1.0)
                routings.append((stats, e, "uniform", "contiguous"))
            ops = [("dispatch", d, False, False) for d in dispatch_dtypes]
            ops.append(("combine", "bf16", False, False))
            if mode == "normal" and ep > p:  # (bf16 partial sums between nodes: only where there are several)
                ops.append(("combine", "bf16", False, True))
            if mode == "low_latency" and params.sum_gbps:
                ops += [("combine", "bf16", True, False), ("combine", "bf16", True, True)]
            for stats, slots, load_txt, where in routings:
                shares = (1.0, 1.0) if stats is None else (stats.imbalance, stats.node_imbalance)
                for op, dtype, sent, one in ops:
                    w = Workload(mode, op, t, h, k, slots, dtype, sent, one)
                    for layout, overlap in VARIANTS:
                        if mode == "low_latency" and layout == "hierarchical":
                            continue  # low-latency sends straight to every rank (no per-node hop)
                        pr = predict(w, ep, params, cluster, stats=stats, hierarchical=layout == "hierarchical",
                                     overlap=overlap, rounds=rounds)
                        out.append({"ep": ep, "nodes": ep // p, "mode": mode, "op": op, "dtype": dtype, "tokens": t,
                                    "layout": layout, "overlap": overlap, "source": "modelled", "weights_sent": sent,
                                    "bf16_partial_sums": one, "load": load_txt, "placement": where, "slots": slots,
                                    "busiest_rank_share": shares[0], "busiest_node_share": shares[1], **asdict(pr)})

    def same_call(r: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(r[k] for k in ("mode", "op", "dtype", "layout", "overlap", "weights_sent", "bf16_partial_sums",
                                    "load", "placement_kind"))

    for r in out:
        r["placement_kind"] = r["placement"].split(",")[0]
    ref_ep = min(eps) if eps else None
    at_ref = {same_call(r): r["time_us"] for r in out if r["ep"] == ref_ep}
    for r in out:
        # (a normal combine with bf16 partials between nodes against the plain combine where the reference EP is
        # one node, where the flag changes nothing)
        ref = at_ref.get(same_call(r))
        if ref is None and r["mode"] == "normal" and r["bf16_partial_sums"]:
            ref = at_ref.get(same_call({**r, "bf16_partial_sums": False}))
        r["ref_ep"] = ref_ep
        r["throughput_vs_ref"] = ref / r["time_us"] if ref is not None and r["time_us"] > 0 else None
    for r in out:
        del r["placement_kind"]
    return out


def deepep_ll_comparison(params: Params, cluster: Cluster) -> list[dict[str, Any]]:
    """The low-latency model at DeepEP's own configuration, beside its figures: :data:`DEEPEP_LL_SHAPE` (128 tokens,
    H 7168, top-8 of 288 experts; FP8 dispatch, BF16 combine), 8 GPUs per node, the cluster's links and latencies.
    One row per EP and op of :data:`DEEPEP_H200_LL` (DeepEP measured on our H200s) and :data:`DEEPEP_LL` (published,
    H800): ep, op, source, deepep_us, experts and model_us, these two None where 288 experts do not divide the EP
    (64 to 256: DeepEP's count there is not known), and caveat: DeepEP's published low-latency kernels send over
    RDMA even inside a node, so where the model's group is one node (EP 8) it runs over NVLink and the two are not
    like for like ("" elsewhere)."""
    t, h, k, e = DEEPEP_LL_SHAPE
    c = replace(cluster, gpus_per_node=DEEPEP_GPUS_PER_NODE)
    out = []
    for source, figures in (("measured on our H200s", DEEPEP_H200_LL), ("published, H800", DEEPEP_LL)):
        for ep in sorted(figures):
            ok = routing_problem(ep, min(c.gpus_per_node, ep), e, k) is None
            for i, op in enumerate(OPS):
                w = Workload("low_latency", op, t, h, k, e, "fp8" if op == "dispatch" else "bf16")
                model = predict(w, ep, params, c, hierarchical=False).time_us if ok else None
                caveat = (LL_RDMA_CAVEAT if figures is DEEPEP_LL and ep <= c.gpus_per_node and model is not None
                          else "")
                out.append({"ep": ep, "op": op, "source": source, "deepep_us": figures[ep][i],
                            "experts": e if ok else None, "model_us": model, "caveat": caveat})
    return out


LL_RDMA_CAVEAT = "DeepEP over RDMA, the model over NVLink: not like for like"


def deepep_left_out(cluster: Cluster) -> dict[str, str]:
    """Which of DeepEP's published figures a table or plot of a run on ``cluster`` leaves out, and why ("": shown,
    labelled with DeepEP's hardware). "nvl": its EP8 figure, one node of 8 H800s (NVLink 200 GB/s per direction),
    left out where a node has other than 8 GPUs (EP 8 is then not one node). "rdma": its internode normal-mode
    figures (EP16 and beyond) and its low-latency ones (which send over RDMA even inside a node), on 400 Gb/s NICs
    (50 GB/s per GPU) and 8 GPUs per node, left out where the cluster's NIC or GPUs per node differ: the NIC sets
    those times, so beside other links they compare hardware, not designs."""
    p = f"{DEEPEP_GPUS_PER_NODE} GPUs per node"
    nvl = "" if cluster.gpus_per_node == DEEPEP_GPUS_PER_NODE else \
        f"they ran on one node of {p} (H800), this run has {cluster.gpus_per_node} (--gpus-per-node)"
    differ = [f"{cluster.nic_gbps:g} GB/s per GPU (--nic-gbps)" if cluster.nic_gbps != CX7_NIC_GBPS else "",
              f"{cluster.gpus_per_node} GPUs per node (--gpus-per-node)" if cluster.gpus_per_node !=
              DEEPEP_GPUS_PER_NODE else ""]
    rdma = "" if not any(differ) else (f"they ran on H800s with {8 * CX7_NIC_GBPS:g} Gb/s NICs ({CX7_NIC_GBPS:g} GB/s "
                                       f"per GPU), {p}; this run has {' and '.join(d for d in differ if d)}")
    return {"nvl": nvl, "rdma": rdma}


def _main_variant(row: dict[str, Any], hierarchical: bool = True, overlap: bool = True) -> bool:
    """A row of the variant the CLI's table lists: the normal mode in this layout, either mode with this overlap
    (the low-latency mode has one layout, direct sends)."""
    return row["overlap"] == overlap and (row["layout"] == ("hierarchical" if hierarchical else "flat")
                                          or row["mode"] == "low_latency")


def _routing_txt(args: argparse.Namespace) -> str:
    """The routing the CLI's normal-mode rows assume, in words (the low-latency rows keep uniform routing)."""
    if args.load is not None or args.placement:
        return (f"top-{args.topk} of {args.experts} experts drawn from "
                + (f"the load of {args.load}" if args.load is not None else "a uniform load")
                + f", EP x {args.tokens} tokens (one call's) at each EP, counted with each token's source rank; "
                "the busiest rank's and node's shares as drawn; placement in the 'placement' column (normal mode"
                + ("; low-latency mode uniform, experts contiguous)" if "low_latency" in args.modes else ")"))
    if args.max_nodes is not None:
        return (f"node-limited to {args.max_nodes} nodes per token, uniform within them, counted on "
                f"{max(args.samples, 4096)} sampled tokens (normal mode; low-latency mode uniform)")
    if args.samples:
        return f"uniform top-{args.topk}, counted on {args.samples} sampled tokens (normal mode)"
    return f"uniform top-{args.topk} of {args.experts} experts (exact), experts contiguous per rank, no replicas"


def _plain(row: dict[str, Any]) -> bool:
    """A sweep row of a call as SPEC.md has it: no weights sent with a low-latency dispatch, no bf16 partial sums."""
    return not row.get("weights_sent") and not row.get("bf16_partial_sums")


_COLORS = {("dispatch", "fp8"): "tab:blue", ("dispatch", "bf16"): "tab:green", ("combine", "bf16"): "tab:orange"}


def _deepep_h200_us(ep: int, op: str, dtype: str) -> float:
    """DeepEP's normal-mode time on our H200s (ANCHORS.md "Measured") from its logical GB/s and the byte count of
    uniform routing at the configuration it was measured in, :data:`DEEPEP_H200_NORMAL_SHAPE` (4096 tokens, H 7168,
    top-8 of 256 experts), whatever the sweep's options: a measured point does not move with them."""
    t, h, k, e = DEEPEP_H200_NORMAL_SHAPE
    gbps_ = DEEPEP_H200_NORMAL[ep][0 if (op, dtype) == ("dispatch", "fp8") else 1 if op == "dispatch" else 2]
    w = Workload("normal", op, t, h, k, e, dtype)
    logical = traffic(w, ep, ep, routing_stats(ep, ep, e, k)).logical
    return logical / gbps_ / 1e3


def _timing_txt(recs: Sequence[dict[str, Any]]) -> str:
    """How ``recs`` were timed, for a label: "kernel time", "event time (whole calls)" or both."""
    what = {"kernel": "kernel time", "events": "event time (whole calls)"}
    return " and ".join(what.get(t, f"{t} time") for t in sorted({str(r["timing"]) for r in recs}))


def plot_sweep(
    rows: Sequence[dict[str, Any]], measured: Sequence[dict[str, Any]], params: Params, path: Path, *,
    shown: Sequence[dict[str, Any]] = (), num_sms: int | None = 24, normal: tuple[int, int, int, int] | None = None,
    ll_experts: int | None = None, deepep_ll: Sequence[dict[str, Any]] = (), cluster: Cluster | None = None,
) -> Path:
    """Time, bandwidth and efficiency against EP. Lines: the model. Points: our fitted records (filled circles, at
    ``num_sms``), records shown but not fitted (open markers, by label), DeepEP measured on our H200s (stars) and
    DeepEP's published H800 figures (open triangles, bandwidths in our byte count: :func:`deepep_normal_in_our_count`),
    and the low-latency model at DeepEP's configuration (crosses, ``deepep_ll``: :func:`deepep_ll_comparison`);
    ll_experts: the experts of the low-latency lines, for their labels; cluster: the links of the predictions, for
    the utilisation panel's label, and its GPUs per node, for the x axis and the one-node shading. Fitted records
    are labelled with how they were timed (kernel or event times)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = cluster or Cluster()
    g = links.gpus_per_node
    left_out = deepep_left_out(links)
    # (one placement's lines per mode: the first of the rows; the table and sim.json have every placement)
    kinds: dict[str, str] = {}
    for r in rows:
        kinds.setdefault(r["mode"], r.get("placement", "contiguous").split(",")[0])
    ll_keys = sorted({(r["op"], r["dtype"]) for r in rows if r["mode"] == "low_latency"},
                     key=lambda k: (k[0] != "dispatch", k[1] != "fp8"))
    ref_ep = next((r["ref_ep"] for r in rows if r.get("ref_ep") is not None), None)
    fig, axes = plt.subplots(2, 2, figsize=(19, 11))
    series_keys = sorted({(r["op"], r["dtype"]) for r in rows if r["mode"] == "normal"},
                         key=lambda k: (k[0] != "dispatch", k[1] != "fp8"))
    labels = sorted({r.get("label", "") for r in shown})
    shown_marks = dict(zip(labels, "sDvPx<>h", strict=False))

    def series(mode: str, op: str, dtype: str | None, layout: str, overlap: bool, key: str):  # noqa: ANN202
        sel = [r for r in rows if r["mode"] == mode and r["op"] == op and r["layout"] == layout
               and r["overlap"] == overlap and (dtype is None or r["dtype"] == dtype) and _plain(r)
               and r.get("placement", "").split(",")[0] == kinds.get(mode)]
        return [r["ep"] for r in sel], [r[key] for r in sel]

    def points(recs: Sequence[dict[str, Any]], mode: str, op: str, dtype: str | None) -> list[dict[str, Any]]:
        """Records of this mode and op at the sweep's token count; normal mode: this dispatch dtype (combine is
        BF16 whatever the record's dtype says) and the sweep's SM count."""
        return [r for r in recs if r["mode"] == mode and r["op"] == op
                and (dtype is None or op == "combine" or r["dtype"] == dtype)
                and (ll_tokens is None or int(r["num_tokens"]) == ll_tokens if mode == "low_latency" else
                     r.get("num_sms") in (num_sms, None) and (normal is None or int(r["num_tokens"]) == normal[0]))]

    ll_tokens = next((int(r["tokens"]) for r in rows if r["mode"] == "low_latency"), None)

    ll_src = "fitted" if "low_latency.dispatch" in params.fitted else "PLACEHOLDER constants"

    ax = axes[0, 0]
    for op, dtype in series_keys:
        c = _COLORS.get((op, dtype), "tab:gray")
        for layout, overlap, style in (("hierarchical", True, "-"), ("hierarchical", False, ":"), ("flat", True, "--")):
            xs, ys = series("normal", op, dtype, layout, overlap, "time_us")
            ax.plot(xs, ys, style, color=c, lw=1.2,
                    label=f"{op} {dtype} model, {layout}{'' if overlap else ', no overlap'}")
        pts = points(measured, "normal", op, dtype)
        if pts:
            ax.plot([r["ep"] for r in pts], [r["time_us_median"] for r in pts], "o", color=c, ms=6,
                    label=f"{op} {dtype} measured, {_timing_txt(pts)} (fitted)")
        for lab in labels:
            pts = points([r for r in shown if r.get("label") == lab], "normal", op, dtype)
            if pts:
                ax.plot([r["ep"] for r in pts], [r["time_us_median"] for r in pts], shown_marks[lab], color=c,
                        mfc="none", ms=7, label=f"{op} {dtype}: {lab} (not fitted)")
        xs = sorted(DEEPEP_H200_NORMAL)
        ax.plot(xs, [_deepep_h200_us(e, op, dtype) for e in xs], "*", color=c, ms=9,
                label=f"DeepEP {op} {dtype} on our H200 ({DEEPEP_H200_NORMAL_SHAPE[0]} tokens, "
                      f"{DEEPEP_H200_NORMAL_SHAPE[3]} experts)")
    part = [r for r in rows if r["mode"] == "normal" and r["op"] == "combine" and r.get("bf16_partial_sums")
            and _main_variant(r) and r.get("placement", "").split(",")[0] == kinds.get("normal")]
    if part:
        ax.plot([r["ep"] for r in part], [r["time_us"] for r in part], "-.", color=_COLORS[("combine", "bf16")],
                lw=1.2, label="combine bf16 model, hierarchical, bf16 partial sums between nodes")
    ax.set_title(f"normal mode, time per call ({num_sms} SMs; lines modelled, points measured)", fontsize=9)
    ax.set_ylabel("time per call (us)")

    ax = axes[0, 1]
    for op, dtype in series_keys:
        c = _COLORS.get((op, dtype), "tab:gray")
        xs, ys = series("normal", op, dtype, "hierarchical", True, "logical_gbps")
        ax.plot(xs, ys, "-", color=c, label=f"{op} {dtype} model, logical GB/s")
        xs, ys = series("normal", op, dtype, "hierarchical", True, "rdma_gbps")
        ax.plot(xs, ys, "--", color=c, label=f"{op} {dtype} model, RDMA GB/s (never measured)")
        pts = points(measured, "normal", op, dtype)
        if pts:
            ax.plot([r["ep"] for r in pts], [r["logical_gbps"] for r in pts], "o", color=c, ms=6,
                    label=f"{op} {dtype} measured logical GB/s")
        if dtype == "fp8" or op == "combine":
            ours = [deepep_normal_in_our_count(e, op) for e in sorted(DEEPEP_NORMAL)]
            ours = [d for d in ours if not left_out["nvl" if d["leg"] == "nvlink" else "rdma"]]
            one = [d for d in ours if d["leg"] == "nvlink"]
            if one:
                ax.plot([d["ep"] for d in one], [d["logical_gbps"] for d in one], "s", color=c, mfc="none",
                        label=f"DeepEP {op} EP8, H800: its NVL GB/s = logical (as the solid lines)")
            rdma = [d for d in ours if d["leg"] == "rdma"]
            if rdma:
                ax.plot([d["ep"] for d in rdma], [d["our_count_gbps"] for d in rdma], "^", color=c, mfc="none",
                        label=f"DeepEP {op} RDMA, H800, {8 * CX7_NIC_GBPS:g} Gb/s NICs: published x (M-1)/M = NIC "
                              "bytes as the dashed lines count")
        j = 0 if (op, dtype) == ("dispatch", "fp8") else 1 if op == "dispatch" else 2
        ax.plot(sorted(DEEPEP_H200_NORMAL), [DEEPEP_H200_NORMAL[e][j] for e in sorted(DEEPEP_H200_NORMAL)], "*",
                color=c, ms=9, label=f"DeepEP {op} {dtype} on our H200")
    ax.set_title("normal mode bandwidth; RDMA: rows leaving a token's node\n(DeepEP's published count its own "
                 "node too: shown x (M-1)/M, M = EP/8)", fontsize=8)
    ax.set_ylabel("GB/s")

    ax = axes[1, 0]
    lle = f", {ll_experts} experts" if ll_experts else ""
    dee = DEEPEP_LL_SHAPE[3]
    for op, dtype in ll_keys:
        xs, ys = series("low_latency", op, dtype, "flat", True, "time_us")
        ax.plot(xs, ys, "-", color=_COLORS.get((op, dtype), "tab:gray"), label=f"{op} {dtype} model{lle} ({ll_src})")
    for op in OPS:
        dtype = "fp8" if op == "dispatch" else "bf16"
        c = _COLORS[(op, dtype)]
        at = [d for d in deepep_ll if d["op"] == op and d["model_us"] is not None]
        if at:
            ax.plot([d["ep"] for d in at], [d["model_us"] for d in at], "x", color=c, ms=7,
                    label=f"{op} model at DeepEP's configuration ({dee} experts, EP {min(d['ep'] for d in at)}-"
                          f"{max(d['ep'] for d in at)})")
        i = OPS.index(op)
        if not left_out["rdma"]:
            ax.plot(list(DEEPEP_LL), [v[i] for v in DEEPEP_LL.values()], "^", color=c, mfc="none",
                    label=f"DeepEP {op} (published, H800, {8 * CX7_NIC_GBPS:g} Gb/s NICs, RDMA even at EP8; {dee} "
                          "experts to EP32, not stated beyond)")
        ax.plot(sorted(DEEPEP_H200_LL), [DEEPEP_H200_LL[e][i] for e in sorted(DEEPEP_H200_LL)], "*", color=c,
                ms=9, label=f"DeepEP {op}, measured on our H200 ({dee} experts)")
        for lab in labels:
            pts = points([r for r in shown if r.get("label") == lab], "low_latency", op, None)
            if pts:
                ax.plot([r["ep"] for r in pts], [r["time_us_median"] for r in pts], shown_marks[lab], color=c,
                        mfc="none", ms=7, label=f"largeep {op}: {lab} (not fitted)")
        pts = points(measured, "low_latency", op, None)
        if pts:
            ax.plot([r["ep"] for r in pts], [r["time_us_median"] for r in pts], "o", color=c,
                    label=f"{op} measured (fitted)")
    gaps = [abs(d["model_us"] / r["time_us"] - 1) for d in deepep_ll if d["model_us"] is not None for r in rows
            if _main_variant(r) and r["mode"] == "low_latency" and _plain(r) and r["ep"] == d["ep"]
            and r["op"] == d["op"] and (r["op"], r["dtype"]) != ("dispatch", "bf16")]
    gap = f", {100 * max(gaps):.2f}% from the lines at most" if gaps else ""
    ax.set_title(f"low-latency, {ll_tokens} tokens, time per call\nlines{lle}; crosses at DeepEP's {dee}{gap}\n"
                 "DeepEP's published EP8 ran over RDMA, the model's EP8 over NVLink: not like for like", fontsize=8)
    ax.set_ylabel("time per call (us)")
    ax.set_yscale("log")

    ax = axes[1, 1]
    for mode, style in (("normal", "-"), ("low_latency", "--")):
        for op, dtype in series_keys if mode == "normal" else ll_keys:
            layout = "hierarchical" if mode == "normal" else "flat"
            xs, ys = series(mode, op, dtype, layout, True, "efficiency")
            ax.plot(xs, ys, style, color=_COLORS.get((op, dtype), "tab:gray"),
                    label=f"{mode} {op} {dtype} model: busiest-link utilisation")
    for op, dtype in series_keys:  # the scaling efficiency, against the sweep's smallest EP
        xs, ys = series("normal", op, dtype, "hierarchical", True, "throughput_vs_ref")
        scaled = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if scaled:
            ax.plot([x for x, _ in scaled], [y for _, y in scaled], ":", color=_COLORS.get((op, dtype), "tab:gray"),
                    marker=".", label=f"normal {op} {dtype} model: per-GPU throughput / EP{ref_ep}'s")
    for op in OPS:
        c = _COLORS[(op, "fp8" if op == "dispatch" else "bf16")]
        ours = [deepep_normal_in_our_count(e, op) for e in sorted(DEEPEP_NORMAL)]
        ours = [d for d in ours if not left_out["nvl" if d["leg"] == "nvlink" else "rdma"]]
        one = [d for d in ours if d["leg"] == "nvlink"]
        if one:
            ax.plot([d["ep"] for d in one], [d["efficiency"] for d in one], "s", color=c, mfc="none",
                    label=f"DeepEP {op} EP8: published x 7/8 (local rows cross no link) / {H800_NVLINK_GBPS:g} "
                          "(H800 NVLink)")
        rdma = [d for d in ours if d["leg"] == "rdma"]
        if rdma:
            ax.plot([d["ep"] for d in rdma], [d["efficiency"] for d in rdma], "^", color=c, mfc="none",
                    label=f"DeepEP {op}: published RDMA x (M-1)/M (own node crosses no NIC) / {CX7_NIC_GBPS:g} (H800, "
                          f"{8 * CX7_NIC_GBPS:g} Gb/s NICs)")
    ax.set_title(f"busiest-link utilisation: its bytes / (time x its theoretical per-direction peak): NVLink "
                 f"{links.nvlink_gbps:g} GB/s (model),\n{H800_NVLINK_GBPS:g} (H800) to EP8, the {links.nic_gbps:g} "
                 f"GB/s NIC beyond, so it is no scaling efficiency;\ndotted: per-GPU throughput relative to EP{ref_ep} "
                 "(the scaling efficiency)", fontsize=8)
    ax.set_ylabel("busiest-link utilisation; dotted: throughput / the smallest EP's")
    ax.set_ylim(0, 1.1)

    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"EP (GPUs); {g} per node beyond {g}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (a panel of a mode left out by --modes may have no lines)
            ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        lo = min(min((r["ep"] for r in rows), default=g), g) / 1.3
        ax.set_xlim(lo, max((r["ep"] for r in rows), default=256) * 1.3)
        ax.axvspan(lo, g + 0.5, color="tab:gray", alpha=0.06)
    axes[0, 0].set_yscale("log")
    src = params.source if len(params.source) < 150 else params.source[:147] + "..."
    gone = "; ".join(f"DeepEP's published {'EP8' if k == 'nvl' else 'RDMA and low-latency'} figures left out: {why}"
                     for k, why in left_out.items() if why)
    where = "; ".join(f"{m} lines: {r['load']} load, {r['placement']}" for m in kinds
                      for r in [next(r for r in rows if r["mode"] == m)] if "load" in r)
    fig.suptitle(f"largeep EP model (shaded: one node, NVLink only; beyond: modelled, RDMA never measured)\n"
                 f"calibration: {src}" + (f"\n{where}" if where else "") + (f"\n{gone}" if gone else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- CLI --------------------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def _strs(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def _dispatch_dtypes(text: str) -> list[str]:
    """--dispatch-dtypes: a comma list of bf16, fp8 (an argparse error otherwise, not a traceback later)."""
    from largeep.bench.records import DTYPES

    got = _strs(text)
    bad = [v for v in got if v not in DTYPES]
    if bad or not got:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {', '.join(DTYPES)}")
    return got


def _choices(name: str, allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma list of ``allowed`` (an argparse error naming them otherwise)."""
    def parse(text: str) -> list[str]:
        got = _strs(text)
        bad = [v for v in got if v not in allowed]
        if bad or not got:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {', '.join(allowed)}")
        return list(dict.fromkeys(got))
    parse.__name__ = name  # (argparse names the type in its messages)
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m largeep.bench.sim",
        description="Fit the per-leg cost model to benchmark JSON and predict dispatch/combine at EP 8 to 256.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--calibrate", nargs="*", default=[], metavar="JSON",
                   help="result files of `python -m largeep.bench` or bench/kernel_times.py (none: placeholder "
                        "constants)")
    p.add_argument("--params", metavar="SIM_JSON",
                   help="predict with the constants of an earlier run's sim.json instead of fitting (the current "
                        "fit: bench/results/2026-12-03-session41/model/sim.json); not with --calibrate")
    p.add_argument("--allow-cpu", action="store_true",
                   help="fit records of CPU processes too (refused otherwise: their times are gloo's, not GPU links')")
    p.add_argument("--show", nargs="*", default=[], metavar="[LABEL=]JSON",
                   help="more result files, listed and plotted as measured points but never fitted; LABEL names "
                        "them in the table and plot (default: the file's folder)")
    p.add_argument("--backend", help="records of this backend only (default: nvshmem if present, else the most "
                                     "common one)")
    p.add_argument("--timing", choices=("auto", "kernel", "events", "any"), default="auto",
                   help="which records to fit: kernel-timed, event-timed (whole calls), any; auto = kernel-timed "
                        "when there are any, else any. The rest are shown, not fitted")
    p.add_argument("--holdout-ep", type=_ints, default=[], help="hold these EPs out of the check fit")
    p.add_argument("--holdout-sms", type=_ints, default=[], help="hold these SM counts out of the check fit")
    p.add_argument("--holdout-tokens", type=_ints, default=[], help="hold these tokens per rank out of the check fit")
    p.add_argument("--no-copy-phase", action="store_true",
                   help="fit without the serial receive pass (zero-copy dispatch has none; also the model before "
                        "the push design)")
    p.add_argument("--fused-combine", type=int, default=0, metavar="EIGHTHS",
                   help="records that do not say which combine ran were taken with the fused combine pushing on "
                        "EIGHTHS/8 of its blocks (largeep's default since session 5: 3); 0 = push + reduce kernels")
    p.add_argument("--emulated-nodes", action="store_true",
                   help="fit records of fewer ranks per node than ranks (nodes emulated on one host: their 'RDMA' "
                        "leg ran over NVLink, so eff_rdma then describes NVLink); refused otherwise")
    p.add_argument("--combine-eighths", type=int, default=3,
                   help="the fused combine's push share in the predictions (one node; 0 = push + reduce)")
    p.add_argument("--check-weighted", nargs="*", default=[], metavar="JSON",
                   help="low-latency records with the weights sent (bench/low_latency_times.py --weighted): "
                        "predicted with the fitted constants and compared, not fitted")
    p.add_argument("--fit-weighted", nargs="*", default=[], metavar="JSON",
                   help="low-latency records with the weights sent on which to fit the combine's summing pass "
                        "(sum_lat_us, sum_gbps; the other constants as fitted without them); --check-weighted then "
                        "checks it, and the predictions list the combine with the weights sent")
    p.add_argument("--out", help="folder for sim.json and sim.png")
    p.add_argument("--eps", type=_ints, default=[8, 16, 32, 64, 128, 256],
                   help="EP sizes (GPUs in the group) to predict, comma list; each must divide --experts")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node (one NVLink domain); a larger EP spans whole nodes, joined by the NICs")
    p.add_argument("--nvlink-gbps", type=float, default=450.0,
                   help="NVLink of the predicted cluster, GB/s (bytes) per GPU per direction (default 450: H100 and "
                        "H200 SXM, whose spec sheets say 900 GB/s, both directions together); the fitted "
                        "efficiency is applied to it (the machine the records came from is --records-nvlink-gbps)")
    p.add_argument("--records-nvlink-gbps", type=float, default=450.0,
                   help="NVLink of the machine the --calibrate records came from, GB/s per GPU per direction "
                        "(default 450: the H200s every committed record ran on); the fit's efficiency is over it")
    p.add_argument("--nic-gbps", type=float, default=50.0,
                   help="NIC of the predicted cluster, GB/s (bytes, not bits) per GPU per direction: a 400 Gb/s NIC "
                        "per GPU is 50, 200 Gb/s is 25")
    p.add_argument("--nvlink-latency-us", type=float, default=1.0,
                   help="latency added to a call whose NVLink leg carries bytes, in us")
    p.add_argument("--nic-latency-us", type=float, default=3.0,
                   help="latency added to a call whose RDMA (NIC) leg carries bytes, in us (a placeholder: no RDMA "
                        "leg has been measured)")
    p.add_argument("--num-sms", type=int, default=24,
                   help="SMs of the normal-mode kernels in the predictions; the measured normal-mode rows listed are "
                        "those of this SM count")
    p.add_argument("--tokens", type=int, default=4096, help="normal mode tokens per rank")
    p.add_argument("--tokens-per-round", type=int, default=None,
                   help="normal mode in rounds (Buffer(tokens_per_round=...)): memory for this many tokens per rank, "
                        "and each call in ceil(tokens / this) rounds")
    p.add_argument("--ll-tokens", type=int, default=128, help="low-latency tokens per rank")
    p.add_argument("--hidden", type=int, default=7168, help="hidden size of a token row, a multiple of 128")
    p.add_argument("--topk", type=int, default=8, help="experts per token, at most --experts")
    p.add_argument("--experts", type=int, default=None,
                   help="experts in the group, divisible by every EP of --eps (with replicas: --placement); default "
                        "256, or the count of --load")
    p.add_argument("--dispatch-dtypes", type=_dispatch_dtypes, default=["fp8"],
                   help="dispatch dtypes to predict (bf16, fp8), both modes (the low-latency use_fp8)")
    p.add_argument("--modes", type=_choices("modes", MODES), default=list(MODES),
                   help="modes to predict, comma list of normal, low_latency")
    p.add_argument("--load", metavar="FILE",
                   help="a load per expert (a JSON list of numbers, or a text file of numbers): the normal mode's "
                        "routing is one call's tokens (EP x --tokens) drawn from it, each token's top-k distinct "
                        "experts in proportion to their loads; --experts is its length")
    p.add_argument("--placement", type=_choices("placement", PLACEMENTS), default=[],
                   help="normal-mode placements of the experts, comma list: contiguous (expert e on GPU e // (E / "
                        "EP), SPEC.md's), greedy (largeep.placement.greedy_placement, EPLB-style), planned "
                        "(plan_placement, topology-aware); rows for each. Default with --load: contiguous. Without "
                        "--load, the tokens are drawn from a uniform load")
    p.add_argument("--slots-per-gpu", type=int, default=None,
                   help="expert slots per GPU of the greedy and planned placements; those beyond the experts hold "
                        "replicas of the busiest (default: the fewest that hold the experts, ceil(E / EP))")
    p.add_argument("--max-nodes", type=int, help="node-limited routing: at most this many nodes per token")
    p.add_argument("--samples", type=int, default=0,
                   help="sample routing statistics (normal mode) on this many tokens (at least 4096; --max-nodes "
                        "samples 4096 by itself)")
    p.add_argument("--eff-rdma", type=float, default=None,
                   help="set the NIC efficiency of the predictions to this (a what-if: no RDMA leg has been "
                        "measured; default: the fit's, else the placeholder 0.9)")
    p.add_argument("--flat", action="store_true",
                   help="the flat layout (every remote (token, rank) pair crosses the NIC) instead of the hierarchical "
                        "one, for the fit and the table's normal-mode rows (sim.json has both either way)")
    p.add_argument("--no-overlap", action="store_true",
                   help="legs in sequence instead of overlapped, for the fit and the table (sim.json has both)")
    return p


def _rate_txt(v: float | None, name: str = "", no_term: Sequence[str] = ()) -> str:
    """A fitted rate; "no term (fitted)" where the records drove its term to nothing (``Params.no_term``); "none"
    where no record pinned it down (not a rate of 0)."""
    if name in no_term:
        return "no term (fitted: the records leave it no time)"
    return "none" if not v else f"{v:.2f}"


def _rates_txt(value: Callable[[str], float | None], no_term: Sequence[str]) -> str:
    """ "copy_gbps=... comb_gbps=... reduce_gbps=..." (:func:`_rate_txt`), each rate read by ``value``."""
    return " ".join(f"{name}={_rate_txt(value(name), name, no_term)}"
                    for name in ("copy_gbps", "comb_gbps", "reduce_gbps"))


def check_args(args: argparse.Namespace) -> str | None:
    """Why the sweep's arguments describe groups or routings that cannot exist (argparse's error message, naming the
    arguments), or None. SPEC.md: --experts divisible by every EP of --eps; a group of more GPUs than a node's holds
    whole nodes (--gpus-per-node divides it); --topk at most --experts; --max-nodes at least 1 and leaving --topk
    experts; --load a file of loads, --experts (if given) its length; --placement and --slots-per-gpu slots for the
    experts. Reads --load into ``args.load_values`` (float64 [E], None without) and sets ``args.experts`` where it
    was left out (256, or the load's length)."""
    args.load_values = None
    if args.load is not None:
        try:
            args.load_values = read_load(args.load)
        except (OSError, ValueError) as exc:
            return f"--load: {exc}"
        e = args.load_values.numel()
        if args.experts is not None and args.experts != e:
            return f"--experts {args.experts}: --load {args.load} gives {e} loads, one per expert"
        args.experts = e
    elif args.experts is None:
        args.experts = 256
    if args.load_values is not None and int((args.load_values > 0).sum()) < args.topk:
        return (f"--load {args.load}: {int((args.load_values > 0).sum())} experts of positive load, fewer than "
                f"--topk {args.topk} (a token picks distinct experts)")
    if args.gpus_per_node < 1:
        return f"--gpus-per-node {args.gpus_per_node}: must be positive"
    if args.num_sms < 1:
        return f"--num-sms {args.num_sms}: must be positive"
    if not args.eps or any(ep < 1 for ep in args.eps):
        return f"--eps {','.join(map(str, args.eps))}: every EP must be positive"
    if args.topk < 1 or args.topk > args.experts:
        return f"--topk {args.topk}: must be between 1 and --experts {args.experts}"
    placed = args.load is not None or bool(args.placement)
    if placed and (args.max_nodes is not None or args.samples):
        return (f"--{'max-nodes' if args.max_nodes is not None else 'samples'}: the uniform routing's option; with "
                "--load or --placement the normal mode's routing is one call's tokens drawn from the load")
    if placed and "normal" not in args.modes:
        return (f"--{'load' if args.load is not None else 'placement'}: the normal mode's routing, and --modes "
                f"{','.join(args.modes)} has no normal mode (the low-latency mode keeps uniform routing over "
                "contiguous experts)")
    placements = args.placement or (["contiguous"] if placed else [])
    slotted = [v for v in placements if v != "contiguous"]
    if args.slots_per_gpu is not None:
        if not slotted:
            return (f"--slots-per-gpu {args.slots_per_gpu}: the greedy and planned placements' (--placement "
                    f"{','.join(placements) or 'not given'}; contiguous puts E / EP experts on each GPU)")
        few = [ep for ep in args.eps if args.slots_per_gpu * ep < args.experts]
        if args.slots_per_gpu < 1 or few:
            return (f"--slots-per-gpu {args.slots_per_gpu}: {args.experts} experts need at least "
                    f"{-(-args.experts // min(args.eps))} slots per GPU at EP {min(args.eps)}")
    # (the experts are placed contiguously, SPEC.md's layout, in the low-latency mode and the contiguous placement)
    contiguous = "low_latency" in args.modes or "contiguous" in placements or not placed
    bad = [ep for ep in args.eps if args.experts % ep] if contiguous else []
    if bad:
        uses = [what for what, on in (("--modes low_latency", "low_latency" in args.modes),
                                      ("--placement contiguous", "contiguous" in placements),
                                      ("the normal mode's contiguous experts", not placed)) if on]
        return (f"--experts {args.experts} is not divisible by --eps {', '.join(map(str, bad))} (SPEC.md: every rank "
                "holds the same number of experts; for more GPUs than experts, place replicas: --placement greedy or "
                f"planned, with --modes normal; here {' and '.join(uses)} place the experts contiguously)")
    g = args.gpus_per_node
    bad = [ep for ep in args.eps if ep > g and ep % g]
    if bad:
        return (f"--gpus-per-node {g} does not divide --eps {', '.join(map(str, bad))}: a group of more GPUs than "
                f"a node holds whole nodes (EP {bad[0]} would be {bad[0] / g:.3g} nodes)")
    if args.max_nodes is not None:
        for ep in args.eps:
            why = routing_problem(ep, min(g, ep), args.experts, args.topk, max_nodes=args.max_nodes)
            if why:
                return f"--max-nodes {args.max_nodes} at EP {ep}: {why}"
    if args.eff_rdma is not None and not 0 < args.eff_rdma <= 1:
        return f"--eff-rdma {args.eff_rdma}: must be in (0, 1]"
    for name in ("nvlink_gbps", "records_nvlink_gbps", "nic_gbps"):
        v = getattr(args, name)
        if not 0 < v < math.inf:
            return f"--{name.replace('_', '-')} {v}: must be a positive number"
    for name in ("nvlink_latency_us", "nic_latency_us"):
        v = getattr(args, name)
        if not 0 <= v < math.inf:
            return f"--{name.replace('_', '-')} {v}: must be a finite number >= 0"
    if args.tokens_per_round is not None and args.tokens_per_round < 1:
        return f"--tokens-per-round {args.tokens_per_round}: must be positive"
    if not 0 <= args.combine_eighths <= 7:
        return f"--combine-eighths {args.combine_eighths}: must be in [0, 7] (0: push + reduce kernels)"
    if not 0 <= args.fused_combine <= 7:
        return f"--fused-combine {args.fused_combine}: must be in [0, 7] (0: push + reduce kernels)"
    if args.samples < 0:
        return f"--samples {args.samples}: must be >= 0"
    if args.hidden < 1 or args.tokens < 1 or args.ll_tokens < 1:
        return "--hidden, --tokens and --ll-tokens must be positive"
    if args.hidden % 128:
        return f"--hidden {args.hidden}: must be a multiple of 128 (FP8 rows: the low-latency dispatch is FP8)"
    return None


def _show_file(arg: str) -> tuple[str, str]:
    """A --show argument -> (label or "", path): LABEL=JSON, or a path (one that exists, even with a "=")."""
    label, _, path = arg.partition("=") if "=" in arg and not Path(arg).exists() else ("", "", arg)
    return label, path


def check_inputs(args: argparse.Namespace) -> str | None:
    """Why the files named cannot serve (argparse's error message, naming the option), or None, before any work:
    each file of --calibrate, --show, --fit-weighted and --check-weighted exists and reads as records; --holdout-*
    come with --calibrate; --backend is the backend of a record of the files it picks from (--calibrate,
    --fit-weighted, --check-weighted); --out is a folder that can be written in (or made)."""
    from largeep.bench.records import folder_problem

    backends: set[str] = set()
    for flag, files in (("--calibrate", args.calibrate), ("--show", [_show_file(a)[1] for a in args.show]),
                        ("--fit-weighted", args.fit_weighted), ("--check-weighted", args.check_weighted)):
        for f in files:
            if not Path(f).is_file():
                return f"{flag} {f}: no such file (expected a results file of the benchmark or bench/*.py)"
        try:
            recs = load(files) if files else []
        except (OSError, ValueError) as exc:
            return f"{flag}: {exc}"
        if flag == "--calibrate" or (flag != "--show" and not args.calibrate):  # (the records fitted)
            backends |= {str(r.get("backend")) for r in recs}
    if args.params is not None:
        if args.calibrate or args.fit_weighted:
            return (f"--params {args.params}: it gives the constants, which --calibrate / --fit-weighted would fit; "
                    "give one or the other")
        try:
            load_params(args.params)
        except ValueError as exc:
            return f"--params: {exc}"
        fitting = [flag for flag, given in (("--no-copy-phase", args.no_copy_phase),
                                            ("--fused-combine", args.fused_combine != 0),
                                            ("--timing", args.timing != "auto")) if given]
        if fitting:
            return (f"--params {args.params} with {', '.join(fitting)}: those choose how --calibrate fits records, "
                    "and --params takes a fit's constants as they are (its receive pass as that fit had it)")
    for flag, values in (("--holdout-ep", args.holdout_ep), ("--holdout-sms", args.holdout_sms),
                         ("--holdout-tokens", args.holdout_tokens)):
        if values and not args.calibrate:
            return (f"{flag} {','.join(map(str, values))}: it holds records of --calibrate out of the check fit, and "
                    "no --calibrate file was given")
    if args.backend is not None:
        if not (args.calibrate or args.fit_weighted or args.check_weighted):
            return f"--backend {args.backend}: it picks the records to fit, and no --calibrate file was given"
        if args.backend not in backends:
            return (f"--backend {args.backend}: no record of that backend in the files given (expected one of "
                    f"{', '.join(sorted(backends)) or 'none: they hold no record'})")
    if args.out is not None:
        problem = folder_problem(args.out) if args.out.strip() else "an empty path (give a folder)"
        if problem:
            return f"--out {args.out}: {problem}"
    return None


def _pick_backend(records: Sequence[dict[str, Any]], wanted: str | None) -> str | None:
    """The backend whose records are fitted: ``wanted`` (--backend), else "nvshmem" where any record is of it, else
    the one with the most records; a tie goes to the first name in sorted order, with a UserWarning naming the tied
    backends and --backend. None without records."""
    names = [r["backend"] for r in records]
    if wanted:
        return wanted
    if "nvshmem" in names:
        return "nvshmem"
    if not names:
        return None
    counts = {n: names.count(n) for n in sorted(set(names))}
    most = max(counts.values())
    tied = [n for n, c in counts.items() if c == most]
    if len(tied) > 1:
        warnings.warn(f"records of backends {', '.join(tied)} in equal numbers ({most} each): fitting {tied[0]!r}, "
                      "the first by name; pass --backend to choose", stacklevel=2)
    return tied[0]


def _check_doc(res: CheckResult, how: str, params: Params) -> dict[str, Any]:
    """The check's figures; ``of_fitted`` the same over the rows that rest on no placeholder constant (None where
    every row does one or none does)."""
    within = sum(abs(r["rel_err"]) <= 0.15 for r in res.rows)
    errs = sorted(abs(r["rel_err"]) for r in res.rows if not r.get("placeholders"))
    of_fitted = None
    if errs and len(errs) < res.n:
        of_fitted = {"n": len(errs), "median_abs_err": statistics.median(errs), "max_abs_err": errs[-1],
                     "within_15pct": sum(e <= 0.15 for e in errs)}
    return {"how": how, "n": res.n, "median_abs_err": res.median_abs_err, "max_abs_err": res.max_abs_err,
            "within_15pct": within, "of_fitted": of_fitted, "constants": asdict(params), "rows": res.rows}


def _print_check(title: str, doc: dict[str, Any]) -> None:
    from tabulate import tabulate

    print(f"{title} ({doc['how']}): {doc['n']} records, median |error| {100 * doc['median_abs_err']:.1f}%, "
          f"max {100 * doc['max_abs_err']:.1f}%, {doc['within_15pct']}/{doc['n']} within 15%")
    lacking = sorted({u for r in doc["rows"] for u in r.get("unknown", [])})
    if lacking:
        n = sum(bool(r.get("unknown")) for r in doc["rows"])
        print(f"  {n} of them need {', '.join(lacking)}, which no fitted record exercised: their times leave those "
              "terms out (lower bounds, marked below)")
    held = sorted({u for r in doc["rows"] for u in r.get("placeholders", [])})
    if held:
        n = sum(bool(r.get("placeholders")) for r in doc["rows"])
        rest = doc.get("of_fitted")
        print(f"  {n} of them rest on {', '.join(held)}, which no fitted record determined (the placeholder's "
              "values, marked below): their errors test those, not the fit"
              + (f"; the other {rest['n']}: median |error| {100 * rest['median_abs_err']:.1f}%, max "
                 f"{100 * rest['max_abs_err']:.1f}%, {rest['within_15pct']}/{rest['n']} within 15%" if rest else ""))

    def note(r: dict[str, Any]) -> str:
        return "; ".join(x for x in (f"no {', '.join(r['unknown'])}" if r.get("unknown") else "",
                                     f"placeholder {', '.join(r['placeholders'])}" if r.get("placeholders") else "")
                         if x)

    table = [[r["ep"], r["mode"], r["op"], r["dtype"], r["num_sms"], r["num_tokens"], f"{r['measured_us']:.1f}",
              f"{r['predicted_us']:.1f}", f"{100 * r['rel_err']:+.1f}%", note(r)] for r in doc["rows"]]
    print(tabulate(table, headers=["ep", "mode", "op", "dtype", "sms", "tokens", "measured us", "predicted us",
                                   "error", "note"], tablefmt="simple", disable_numparse=True))


def main(argv: Sequence[str] | None = None) -> int:
    from tabulate import tabulate

    parser = build_parser()
    args = parser.parse_args(argv)
    problem = check_args(args) or check_inputs(args)
    if problem:
        parser.error(problem)
    if not args.allow_cpu:
        for flag, files in (("--calibrate", args.calibrate), ("--fit-weighted", args.fit_weighted)):
            cpu = sorted({r["file"] for r in load(files) if of_cpu(r)}) if files else []
            if cpu:
                parser.error(f"{flag}: {', '.join(cpu)} hold records of CPU processes (no GPU in their environment): "
                             "their times are gloo's, not GPU links'; pass --allow-cpu to fit them anyway")
    # the machine the records came from (the fit's efficiencies are over its links); the prediction's is `cluster`
    measured_cluster = Cluster(nvlink_gbps=args.records_nvlink_gbps, nic_gbps=args.nic_gbps,
                               nvlink_latency_us=args.nvlink_latency_us, nic_latency_us=args.nic_latency_us)
    hier, ovl, copy = not args.flat, not args.no_overlap, not args.no_copy_phase
    usable = skew_free([r for r in load(args.calibrate, fused_combine=args.fused_combine) if _usable(r)]) \
        if args.calibrate else []
    backend = _pick_backend(usable, args.backend)
    pool = [r for r in usable if r["backend"] == backend]
    timing = args.timing
    if timing == "auto":
        timing = "kernel" if any(r["timing"] == "kernel" for r in pool) else "any"
    records = [r for r in pool if timing == "any" or r["timing"] == timing]
    emulated = [r for r in records if emulates_nodes(r)]
    if emulated and not args.emulated_nodes:
        parser.error("--calibrate: " + _emulated_refusal(emulated, "--emulated-nodes"))
    fitted_ids = {id(r) for r in records}
    shown = [r for r in usable if id(r) not in fitted_ids]
    for arg in args.show:
        label, path = _show_file(arg)
        shown += skew_free([r for r in load(path, label=label or None) if _usable(r)])
    kw: dict[str, Any] = {"cluster": measured_cluster, "hierarchical": hier, "overlap": ovl}
    fit_kw: dict[str, Any] = {**kw, "emulated_nodes": args.emulated_nodes}
    holdout: dict[str, Any] | None = None
    holdout_alt: dict[str, Any] | None = None
    unmatched: list[str] = []
    no_holdout = "too few records to hold any out"
    if records:
        fit, held, how = split_holdout(records, eps=args.holdout_ep, sms=args.holdout_sms,
                                       tokens=args.holdout_tokens)
        unmatched = holdout_unmatched(records, eps=args.holdout_ep, sms=args.holdout_sms, tokens=args.holdout_tokens)
        if not held and unmatched:
            no_holdout = "; ".join(unmatched)
        elif not fit:
            no_holdout = "every record was held out: none left to fit"
        if fit and held:
            p_fit = calibrate(fit, copy_phase=copy, **fit_kw)
            holdout = _check_doc(check(p_fit, held, **kw), how, p_fit)
            if any(r.get("num_sms") for r in fit):  # the other model variant, for comparison
                p_alt = calibrate(fit, copy_phase=not copy, **fit_kw)
                holdout_alt = _check_doc(check(p_alt, held, **kw), how, p_alt)
                holdout_alt["variant"] = "without the receive pass" if copy else "with the receive pass"
        params = calibrate(records, copy_phase=copy, **fit_kw)
        params.source = (f"fit of {len(records)} '{backend}' {timing}-timed records from "
                         f"{', '.join(sorted({r['file'] for r in records}))}")
    elif args.params is not None:
        params = load_params(args.params)
    else:
        params = placeholder()
        if args.calibrate and pool:  # (--timing left none of them)
            have = ", ".join(f"{sum(r['timing'] == t for r in pool)} {t}-timed" for t in sorted({r["timing"]
                                                                                                 for r in pool}))
            params.source += (f" (no {timing}-timed '{backend}' dispatch/combine records in "
                              f"{', '.join(args.calibrate)}: its {len(pool)} usable ones are {have}; --timing "
                              "chooses which are fitted)")
        elif args.calibrate:
            params.source += f" (no usable dispatch/combine records in {', '.join(args.calibrate)})"
    if args.eff_rdma is not None:
        params = replace(params, eff_rdma=args.eff_rdma, fitted=[k for k in params.fitted if k != "eff_rdma"],
                         source=f"{params.source}; eff_rdma set to {args.eff_rdma:g} by --eff-rdma")
    print(f"calibration: {params.source}")
    print(f"  constants fitted: {', '.join(params.fitted) or 'none'}; "
          + (f"left where an earlier solve put them, binding no record: {', '.join(params.unbound)}; "
             if params.unbound else "")
          + "the others are placeholders")
    print(f"  lat_us={ {k: round(v, 2) for k, v in params.lat_us.items()} } eff_nvlink={params.eff_nvlink:.3f} "
          f"eff_rdma={params.eff_rdma:.3f} sm_gbps={params.sm_gbps:.2f} "
          + _rates_txt(lambda name: getattr(params, name), params.no_term))
    for warning in params.warnings:
        print(f"  WARNING: {warning}")
    if shown:
        ev = sum(r["timing"] == "events" for r in shown)
        print(f"shown, not fitted: {len(shown)} records ({ev} event-timed: whole Python calls, incl. a few hundred "
              "us of host work per call that no model term covers)")
    in_sample = None
    if records:
        in_sample = _check_doc(check(params, records, **kw), "in sample: every fitted record", params)
        print(f"in-sample fit: median |error| {100 * in_sample['median_abs_err']:.1f}%, "
              f"max {100 * in_sample['max_abs_err']:.1f}%")
    if holdout:
        for line in unmatched:
            print(f"held-out check: note: {line}")
        c = holdout["constants"]
        print(f"held-out constants: lat_us={ {k: round(v, 1) for k, v in c['lat_us'].items()} } "
              f"eff_nvlink={c['eff_nvlink']:.3f} sm_gbps={c['sm_gbps']:.2f} " + _rates_txt(c.get, c["no_term"]))
        _print_check("held-out check", holdout)
    elif records:
        print(f"held-out check: {no_holdout}")
    weighted_doc = None

    def weighted(files: Sequence[str]) -> list[dict[str, Any]]:
        """The low-latency records of ``files`` whose dispatch carried the weights, of the fitted backend."""
        return [r for r in skew_free([r for r in load(files) if _usable(r, weighted=True)])
                if r.get("weights_sent") and r.get("backend", backend) == backend]

    if args.fit_weighted:
        frecs = weighted(args.fit_weighted)
        if not frecs:
            parser.error(f"--fit-weighted {' '.join(args.fit_weighted)}: no record with the weights sent "
                         f"(weights_sent) of backend {backend} there")
        params = fit_summing(params, frecs, cluster=measured_cluster)
        params.source += f"; summing pass fitted on {len(frecs)} records of {', '.join(args.fit_weighted)}"
        print(f"summing pass of the low-latency combine with the weights sent: sum_lat_us={params.sum_lat_us:.2f} "
              f"sum_gbps={params.sum_gbps:.0f} (fitted on {', '.join(args.fit_weighted)})")
    if args.check_weighted:
        wrecs = weighted(args.check_weighted)
        how = ("low-latency calls with the weights sent (not fitted: predicted from the per-copy constants with the "
               "summed combine rows" + (", and the summing pass fitted on --fit-weighted" if args.fit_weighted
                                        else "; no summing pass") + ")")
        weighted_doc = _check_doc(check(params, wrecs, **kw), how, params)
        _print_check("weighted check", weighted_doc)
    if holdout_alt:
        print(f"the same check {holdout_alt['variant']}: median |error| {100 * holdout_alt['median_abs_err']:.1f}%, "
              f"max {100 * holdout_alt['max_abs_err']:.1f}%, {holdout_alt['within_15pct']}/{holdout_alt['n']} "
              "within 15%")
    cluster = Cluster(args.gpus_per_node, args.nvlink_gbps, args.nic_gbps, args.nvlink_latency_us,
                      args.nic_latency_us, args.num_sms, args.combine_eighths)
    normal = (args.tokens, args.hidden, args.topk, args.experts)
    rows = sweep_ep(params, cluster, args.eps, normal=normal, ll=(args.ll_tokens, args.hidden, args.topk,
                    args.experts), max_nodes=args.max_nodes, samples=args.samples,
                    dispatch_dtypes=args.dispatch_dtypes, tokens_per_round=args.tokens_per_round, modes=args.modes,
                    load=args.load_values, load_name=args.load or "", placements=args.placement,
                    slots_per_gpu=args.slots_per_gpu)
    deepep_ll = deepep_ll_comparison(params, cluster)
    left_out = deepep_left_out(cluster)
    ll_at = {(d["ep"], d["op"]): d for d in deepep_ll if d["source"].startswith("published")}
    placed = args.load is not None or bool(args.placement)
    ref_ep = min(args.eps)
    table = []
    for r in rows:
        if not _main_variant(r, hier, ovl) or (not hier and r["mode"] == "normal" and r["bf16_partial_sums"]):
            continue  # (flat: no partial sums between nodes, the same rows as the plain combine)
        pub = ""
        # (DeepEP's figures: FP8 dispatch, BF16 combine, uniform or node-limited routing over contiguous experts)
        # ("contiguous, 32 experts per GPU": --placement contiguous without --load, a uniform routing drawn)
        like = _plain(r) and r["load"] == "uniform" and r["placement"].split(",")[0] == "contiguous" and \
            (r["op"], r["dtype"]) != ("dispatch", "bf16")
        if like and r["mode"] == "normal" and r["ep"] in DEEPEP_NORMAL:
            d = deepep_normal_in_our_count(r["ep"], r["op"])
            if d["leg"] == "nvlink" and not left_out["nvl"]:
                pub = (f"{d['logical_gbps']:g} GB/s logical ({d['our_count_gbps']:.1f} NVLink; H800, NVLink "
                       f"{H800_NVLINK_GBPS:g} GB/s)")
            elif d["leg"] == "rdma" and not left_out["rdma"]:
                pub = (f"{d['our_count_gbps']:.1f} GB/s RDMA (published {d['published_gbps']:g}; H800, "
                       f"{8 * CX7_NIC_GBPS:g} Gb/s NIC)")
        if like and r["mode"] == "low_latency" and (r["ep"], r["op"]) in ll_at and not left_out["rdma"]:
            d = ll_at[(r["ep"], r["op"])]
            at = f"model at {d['experts']} experts {d['model_us']:.1f}" if d["model_us"] is not None else \
                "experts not stated"
            pub = (f"{d['deepep_us']:g} us ({at}{'; ' + d['caveat'] if d['caveat'] else ''}; H800, "
                   f"{8 * CX7_NIC_GBPS:g} Gb/s NIC)")
        tokens = f"{r['tokens']} ({r['rounds']} rounds)" if r["rounds"] > 1 else r["tokens"]
        op = r["op"] + ((" (bf16 partial sums)" if r["bf16_partial_sums"] else " (weights sent)")
                        if r.get("weights_sent") else " (bf16 partials between nodes)" if r["bf16_partial_sums"]
                        else "")
        use = f"{r['efficiency']:.2f} {r['busiest_link']}" if r["busiest_link"] != "none" else "-"
        where = [r["load"], r["placement"], f"{r['busiest_rank_share']:.2f} / {r['busiest_node_share']:.2f}"] \
            if placed else []
        table.append([r["ep"], r["nodes"], r["mode"], op, r["dtype"], tokens, *where, f"{r['time_us']:.1f}",
                      f"{r['logical_gbps']:.1f}", f"{r['nvlink_gbps']:.1f}", f"{r['rdma_gbps']:.1f}", use,
                      "" if r["throughput_vs_ref"] is None else f"{r['throughput_vs_ref']:.2f}",
                      r["bound"] + (f" (lower bound: no {', '.join(r['unknown'])})" if r["unknown"] else ""),
                      "modelled", pub])
    meas = [r for r in records + shown if r.get("num_sms") in (args.num_sms, None) or r["mode"] == "low_latency"]
    for r in sorted(meas, key=lambda r: (r["timing"], r["label"], r["mode"], int(r["ep"]), r["op"])):
        nodes = int(r["ep"]) // int(r["ranks_per_node"])
        src = (f"measured ({r['backend']}, {r['timing']}, {r['label']}, "
               f"{'fitted' if id(r) in fitted_ids else 'not fitted'})")
        table.append([r["ep"], nodes, r["mode"], r["op"], r["dtype"], r["num_tokens"],
                      *(["uniform", "contiguous", ""] if placed else []), f"{r['time_us_median']:.1f}",
                      f"{(r.get('logical_gbps') or 0):.1f}", "", "", "", "", "", src, ""])
    print(tabulate(table, headers=["ep", "nodes", "mode", "op", "dtype", "tokens",
                                   *(["load", "placement", "busiest rank / node share"] if placed else []),
                                   "time(us)", "logical GB/s", "NVLink GB/s", "RDMA GB/s", "busiest-link use",
                                   f"vs EP{ref_ep}", "bound", "source", "DeepEP published (H800), in our byte count"],
                   tablefmt="simple", disable_numparse=True))
    print(f"modelled rows: {'flat' if args.flat else 'hierarchical'} layout (normal), direct sends (low-latency), "
          f"legs {'in sequence' if args.no_overlap else 'overlapped'} (--flat, --no-overlap), {args.num_sms} SMs; "
          f"routing: {_routing_txt(args)}; sim.json has every variant (hierarchical and flat, with and without "
          "overlap). Measured rows: one host, NVLink only; no RDMA leg has ever been measured")
    for key, why in left_out.items():
        if why:
            print(f"DeepEP published {'EP8 (one node)' if key == 'nvl' else 'RDMA and low-latency'} figures left "
                  f"out: {why}")
    if "bf16" in args.dispatch_dtypes and "low_latency" in args.modes:
        print("low-latency bf16 dispatch (use_fp8=False): modelled from its bytes, 2H a row against FP8's H + H/32; "
              "the committed fits' low-latency records are FP8 dispatches only")
    if any(row[-1] for row in table):
        print("DeepEP published, in our byte count (the bytes that cross a link): its internode RDMA GB/s count a row "
              "for every node a token's experts are on, its own node included; ours only the nodes it leaves for, so "
              "its figures are shown x (M-1)/M (M = EP/8 of its nodes; published in brackets). Its EP8 NVL GB/s count "
              "every received row, local ones included, as our logical GB/s do (x 7/8 on NVLink, in brackets). "
              "Low-latency: the model at DeepEP's configuration (128 tokens, H 7168, top-8, 288 experts) in brackets; "
              "DeepEP's published low-latency kernels send over RDMA even inside a node, so at EP 8 they are not like "
              "for like with the model's NVLink figure")
    print(f"busiest-link use: bytes on the busier link / (time x its theoretical per-direction peak: NVLink "
          f"{cluster.nvlink_gbps:g} GB/s, NIC {cluster.nic_gbps:g}), the NVLink inside one node and mostly the NIC "
          "beyond, so it can rise while every GB/s falls; "
          f"vs EP{ref_ep}: the scaling efficiency against the sweep's smallest EP, EP {ref_ep}'s time for the same "
          f"call over this EP's (a GPU's tokens per second relative to EP {ref_ep})")
    swept = {(r["ep"], r["op"]): r["time_us"] for r in rows  # (DeepEP's low-latency dispatch is FP8)
             if _main_variant(r, hier, ovl) and r["mode"] == "low_latency" and _plain(r)
             and (r["op"], r["dtype"]) != ("dispatch", "bf16")}
    ll_table = [[d["ep"], d["op"], d["source"], f"{d['deepep_us']:g}", d["experts"] or "not stated",
                 "" if d["model_us"] is None else f"{d['model_us']:.1f}",
                 "" if d["model_us"] is None else f"{100 * (d['model_us'] / d['deepep_us'] - 1):+.0f}%"
                 + (f" ({d['caveat']})" if d["caveat"] else ""),
                 f"{swept[(d['ep'], d['op'])]:.1f}" if (d["ep"], d["op"]) in swept else ""]
                for d in deepep_ll if not (left_out["rdma"] and d["source"].startswith("published"))]
    if "low_latency" in args.modes:
        print(tabulate(ll_table, headers=["ep", "op", "DeepEP", "DeepEP us", "DeepEP experts", "model us there",
                                          "model vs DeepEP", f"model us, the sweep's {args.experts} experts"],
                       tablefmt="simple", disable_numparse=True))
        print(f"low-latency beside DeepEP, at its configuration ({DEEPEP_LL_SHAPE[0]} tokens, H "
              f"{DEEPEP_LL_SHAPE[1]}, top-{DEEPEP_LL_SHAPE[2]}, {DEEPEP_LL_SHAPE[3]} experts, FP8 dispatch, 8 GPUs per "
              f"node) on this cluster's links (modelled); {DEEPEP_LL_SHAPE[3]} experts do not divide EP 64-256, so "
              "DeepEP's published figures there used a count it does not state; the last column is the sweep's own "
              "configuration (FP8 dispatch)" + ("; DeepEP's published rows left out (above)" if left_out["rdma"]
                                                else ""))
    if args.tokens_per_round:
        print(f"normal mode in rounds of {args.tokens_per_round} tokens per rank: each extra round adds the call's "
              "fitted latency, and the rows are merged at about "
              f"{MERGE_BYTES_PER_US / 1e3:.0f} GB/s (measured on one H200; modelled here)")
    sized = min(args.tokens, args.tokens_per_round or args.tokens)
    memory = symmetric_memory(args.eps, args.gpus_per_node, (sized, *normal[1:]),
                              (args.ll_tokens, args.hidden, args.topk, args.experts))
    if isinstance(memory, str):
        print(f"symmetric memory per GPU: {memory}")
    else:
        print(tabulate([[m["ep"], m["nodes"], m["normal_tokens"], f"{m['normal_gib']:.2f}",
                         "" if m["normal_supported"] else "beyond the normal kernels' limits",
                         m["low_latency_tokens"], f"{m['low_latency_gib']:.2f}"] for m in memory],
                       headers=["ep", "nodes", "normal buffer tokens", "normal GiB", "", "low-latency tokens",
                                "low-latency GiB"], tablefmt="simple", disable_numparse=True))
        print("symmetric memory per GPU of one Buffer, from the kernels' layouts (not modelled): the normal mode's "
              "receive buffers hold ep x tokens rows")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "calibration": asdict(params), "holdout_check": holdout, "holdout_check_other_variant": holdout_alt,
            "in_sample": in_sample, "weighted_check": weighted_doc, "cluster": asdict(cluster),
            "calibrated_on": {"files": args.calibrate, "backend": backend, "timing": timing, "records": len(records),
                              "hierarchical": hier, "overlap": ovl, "copy_phase": copy,
                              "records_nvlink_gbps": args.records_nvlink_gbps, "params_file": args.params},
            "routing": _routing_txt(args), "load": args.load, "placements": args.placement,
            "slots_per_gpu": args.slots_per_gpu, "modes": args.modes, "scaling_ref_ep": ref_ep,
            "predictions": rows, "measured": records, "shown_not_fitted": shown, "symmetric_memory": memory,
            "deepep_published": {"normal_gbps": DEEPEP_NORMAL, "low_latency_us": DEEPEP_LL,
                                 "left_out_of_table_and_plot": left_out,
                                 "note": "H800 + CX7 400 Gb/s, as published: EP8 NVL (logical, local rows "
                                         "included), EP16+ RDMA counting every node a token reaches, its own "
                                         "included",
                                 "normal_in_our_count": [deepep_normal_in_our_count(e, op) for e in DEEPEP_NORMAL
                                                         for op in OPS],
                                 "normal_in_our_count_note": "the bytes that cross a link: RDMA x (M-1)/M, M = "
                                                             "EP/8 nodes; EP8 on NVLink x 7/8 (logical as "
                                                             "published); efficiency over the theoretical "
                                                             f"per-direction peak, {H800_NVLINK_GBPS:g} GB/s "
                                                             "(H800 NVLink) or "
                                                             f"{CX7_NIC_GBPS:g} GB/s (NIC), as the model's"},
            "deepep_low_latency_comparison": deepep_ll,
            "deepep_measured_h200": {"normal_gbps_fp8_bf16_combine": DEEPEP_H200_NORMAL,
                                     "normal_shape": DEEPEP_H200_NORMAL_SHAPE,
                                     "normal_us_fp8_bf16_combine": {
                                         e: [_deepep_h200_us(e, op, dt) for op, dt in
                                             (("dispatch", "fp8"), ("dispatch", "bf16"), ("combine", "bf16"))]
                                         for e in sorted(DEEPEP_H200_NORMAL)},
                                     "low_latency_us": DEEPEP_H200_LL,
                                     "note": "ANCHORS.md: DeepEP V1's own tests on our 4x H200, 24 SMs; EP4 "
                                             "low-latency is the midpoint of 32-37 / 55-56 us; the normal-mode "
                                             "times are its GB/s at normal_shape (4096 tokens, 256 experts, "
                                             "uniform byte count), whatever the sweep's options"},
            "notes": {
                "modelled": f"every row of 'predictions'; beyond {args.gpus_per_node} GPUs the RDMA leg uses "
                            + ("eff_rdma fitted on records whose nodes were emulated on one host (an NVLink figure, "
                               "not a NIC's)" if "eff_rdma" in params.fitted else
                               f"eff_rdma {params.eff_rdma:g} as given by --eff-rdma" if args.eff_rdma is not None
                               else "the eff_rdma placeholder")
                            + " and the nic latency placeholder: no RDMA leg has ever been measured (no InfiniBand "
                            "here)",
                "measured": "'measured' (fitted) and 'shown_not_fitted' records; 'timing' says kernel-timed "
                            "(profiler) or events (whole Python calls incl. host overhead)",
            },
            "command": shlex.join(["python", "-m", "largeep.bench.sim",
                                   *(sys.argv[1:] if argv is None else argv)]),
        }
        (out / "sim.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        same = [r for r in shown if r["backend"] == backend]  # other backends stay in sim.json and the table
        png = plot_sweep(rows, records, params, out / "sim.png", shown=same, num_sms=args.num_sms, normal=normal,
                         ll_experts=args.experts, deepep_ll=deepep_ll, cluster=cluster)
        print(f"wrote {out / 'sim.json'}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
