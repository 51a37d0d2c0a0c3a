"""A cost model of dispatch and combine at large expert parallelism, calibrated on benchmark records.

Model (per GPU, per call; T tokens per rank, N ranks, P GPUs per node, M = N/P nodes, b bytes per row):

Routing statistics (:class:`RoutingStats`): for top-K distinct experts out of E, with experts contiguous per rank,
the expected distinct ranks a token needs ``d_r = N * (1 - C(E - E/N, K) / C(E, K))`` and distinct nodes
``d_n = M * (1 - C(E - E/M, K) / C(E, K))`` (exact, hypergeometric), or the same counted on sampled routings (any
distribution, e.g. node-limited or skewed; ``imbalance`` = busiest rank over the mean).

Rows per leg, normal mode (a token goes to a rank once):
- received rows (the logical bytes of SPEC.md) ``R = T * d_r``;
- flat: NVLink ``T * d_r * (P-1)/N``, RDMA ``T * d_r * (N-P)/N`` (every remote (token, rank) pair crosses the NIC);
- hierarchical: RDMA ``T * d_n * (M-1)/M`` (a token crosses the network once per remote node, landing on the GPU
  with the same index), NVLink ``T * d_r * (P-1)/P`` (local pairs plus the fan-out of landed rows).
Low-latency mode: every (token, expert) copy, ``C = T * K``; NVLink ``C * (P-1)/N``, RDMA ``C * (N-P)/N``.
Combine moves the same rows back in BF16.

Time: ``lat[mode, op] + max(t_nvl, t_rdma, t_sm)`` with overlap, ``lat + max(t_nvl + t_rdma, t_sm)`` without, where
``t_leg = link latency + bytes * imbalance / (eff_leg * link bandwidth)`` (0 for a leg that carries nothing) and
``t_sm = R * b * imbalance / (num_sms * sm_gbps)`` (normal mode only: the SM-driven kernels' throughput cap; records
without an SM count have none).

Constants fitted by :func:`calibrate` (least squares on relative error; the active term of each record is chosen by
the current fit and the fit repeated until that choice settles): ``lat`` per (mode, op), ``eff_nvlink``,
``eff_rdma``, ``sm_gbps``. A constant that no record exercises keeps its placeholder value and is reported as such.
:func:`placeholder` gives the constants ANCHORS.md's measured link ceilings suggest, for use before GPU records
exist. Everything the CLI prints says which numbers are measured and which modelled.

CLI: ``python -m largeep.bench.sim --calibrate results.json [...] --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

MODES = ("normal", "low_latency")
OPS = ("dispatch", "combine")
_LAT_KEYS = tuple(f"{m}.{o}" for m in MODES for o in OPS)
_INV_KEYS = ("inv_eff_nvlink", "inv_eff_rdma", "inv_sm_gbps")
PARAM_KEYS = _LAT_KEYS + _INV_KEYS

# DeepEP V1 published on H800 + ConnectX-7 400 Gb/s (ANCHORS.md "Published").
DEEPEP_NORMAL = {  # EP: (dispatch, combine) GB/s; EP8 is NVLink logical bandwidth, the rest RDMA bandwidth
    8: (153.0, 158.0), 16: (43.0, 43.0), 32: (58.0, 57.0), 64: (51.0, 50.0),
}
DEEPEP_LL = {  # EP: (dispatch, combine) us, 128 tokens, H 7168, top-8, FP8 dispatch, BF16 combine
    8: (77.0, 114.0), 16: (118.0, 195.0), 32: (155.0, 273.0), 64: (173.0, 314.0), 128: (192.0, 369.0),
    256: (194.0, 360.0),
}


# -- cluster, workload, routing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """Hardware: GPUs per node, per-GPU one-way link bandwidths (GB/s) and latencies (us), SMs per kernel."""

    gpus_per_node: int = 8
    nvlink_gbps: float = 450.0  # NVLink4 per direction per GPU (H100/H200)
    nic_gbps: float = 50.0  # 400 Gb/s ConnectX-7 per GPU
    nvlink_latency_us: float = 1.0
    nic_latency_us: float = 3.0
    num_sms: int | None = 24


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

    def bytes_per_row(self) -> int:
        from largeep.bench.records import row_bytes

        return row_bytes(self.dtype if self.op == "dispatch" else "bf16", self.hidden)


@dataclass(frozen=True)
class RoutingStats:
    """ranks_per_token: E[distinct ranks a token needs]; nodes_per_token: E[distinct nodes]; imbalance: rows the
    busiest rank receives over the mean (1 for uniform routing)."""

    ranks_per_token: float
    nodes_per_token: float
    imbalance: float = 1.0


def _miss(num_experts: int, hit_experts: float, k: int) -> float:
    """P(none of k distinct uniform draws from E lands in a given set of ``hit_experts``) = C(E-h, k) / C(E, k)."""
    h = hit_experts
    if abs(h - round(h)) < 1e-9:
        h = int(round(h))
        if num_experts - h < k:
            return 0.0
        return math.comb(num_experts - h, k) / math.comb(num_experts, k)
    # fractional experts per rank (E not divisible): the product form of the same ratio
    p = 1.0
    for i in range(k):
        p *= max(0.0, (num_experts - h - i) / (num_experts - i))
    return p


def routing_stats(num_ranks: int, ranks_per_node: int, num_experts: int, num_topk: int) -> RoutingStats:
    """Exact statistics of uniform top-K routing (every K-subset of experts equally likely)."""
    nodes = max(1, num_ranks // ranks_per_node)
    d_r = num_ranks * (1.0 - _miss(num_experts, num_experts / num_ranks, num_topk))
    d_n = nodes * (1.0 - _miss(num_experts, num_experts / nodes, num_topk))
    return RoutingStats(d_r, d_n, 1.0)


def sample_topk(
    num_tokens: int, num_experts: int, num_topk: int, *, seed: int = 0, num_nodes: int = 1,
    max_nodes: int | None = None, routing: str = "uniform", zipf_s: float = 1.0,
) -> torch.Tensor:
    """int64 [T, K] routings for Monte Carlo statistics; ``max_nodes`` limits each token to that many nodes
    (DeepSeek-V3's node-limited routing: pick nodes first, then experts among theirs)."""
    from largeep.bench.routing import random_topk

    if max_nodes is None or max_nodes >= num_nodes:
        return random_topk(num_tokens, num_experts, num_topk, seed=seed, routing=routing, zipf_s=zipf_s)
    gen = torch.Generator().manual_seed(seed)
    per_node = num_experts // num_nodes
    nodes = torch.rand(num_tokens, num_nodes, generator=gen).topk(max_nodes, dim=1).indices  # [T, M']
    allowed = torch.zeros(num_tokens, num_nodes, dtype=torch.bool)
    allowed.scatter_(1, nodes, True)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    scores = scores.masked_fill(~allowed.repeat_interleave(per_node, dim=1), -1.0)
    return scores.topk(num_topk, dim=1).indices


def sampled_stats(topk_idx: torch.Tensor, num_ranks: int, ranks_per_node: int, num_experts: int) -> RoutingStats:
    """The same statistics counted on a routing int64 [T, K] (-1 = none)."""
    per_rank = num_experts // num_ranks
    t = topk_idx.shape[0]
    ranks = torch.where(topk_idx >= 0, topk_idx // per_rank, num_ranks)
    hit = torch.zeros(t, num_ranks + 1, dtype=torch.bool)
    hit.scatter_(1, ranks, True)
    hit = hit[:, :num_ranks]
    nodes = hit.view(t, num_ranks // ranks_per_node, ranks_per_node).any(dim=2)
    per = hit.sum(0).double()
    d_r = float(hit.sum()) / t
    return RoutingStats(d_r, float(nodes.sum()) / t, float(per.max() / per.mean()) if per.sum() > 0 else 1.0)


# -- traffic ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Traffic:
    """Bytes one GPU moves in one call: logical (received rows incl. local), per leg, and through its SMs."""

    logical: float
    nvlink: float
    rdma: float
    sm: float


def traffic(
    w: Workload, num_ranks: int, ranks_per_node: int, stats: RoutingStats, *, hierarchical: bool = True
) -> Traffic:
    """Per-GPU bytes of one call (module docstring). Scaled by ``stats.imbalance`` (the busiest rank decides)."""
    n, p = num_ranks, min(ranks_per_node, num_ranks)
    m = max(1, n // p)
    b = w.bytes_per_row() * stats.imbalance
    t = w.num_tokens
    if w.mode == "normal":
        rows = t * stats.ranks_per_token
        if hierarchical and m > 1:
            rdma = t * stats.nodes_per_token * (m - 1) / m
            nvl = rows * (p - 1) / p
        else:
            rdma = rows * (n - p) / n
            nvl = rows * (p - 1) / n
        return Traffic(rows * b, nvl * b, rdma * b, rows * b)
    copies = t * w.num_topk
    return Traffic(copies * b, copies * (p - 1) / n * b, copies * (n - p) / n * b, 0.0)


# -- parameters -------------------------------------------------------------------------------------------------
@dataclass
class Params:
    """Fitted constants. lat_us: fixed latency per "mode.op"; eff_*: fraction of the link bandwidth reached;
    sm_gbps: per-SM throughput cap (GB/s per SM, normal mode); source: where the numbers come from;
    fitted: which constants the data determined (the rest are placeholders)."""

    lat_us: dict[str, float]
    eff_nvlink: float
    eff_rdma: float
    sm_gbps: float
    source: str = ""
    fitted: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def vector(self) -> list[float]:
        return [self.lat_us[k] for k in _LAT_KEYS] + [1 / self.eff_nvlink, 1 / self.eff_rdma, 1 / self.sm_gbps]

    @staticmethod
    def from_vector(v: Sequence[float], source: str, fitted: list[str]) -> Params:
        lat = {k: float(v[i]) for i, k in enumerate(_LAT_KEYS)}
        j = len(_LAT_KEYS)
        return Params(lat, 1 / float(v[j]), 1 / float(v[j + 1]), 1 / float(v[j + 2]), source, list(fitted))


def placeholder() -> Params:
    """Constants from ANCHORS.md before any GPU record exists (labelled as such wherever they are used):
    eff_nvlink = 300/450 (NCCL's SM-driven all_to_all reached ~300 GB/s out of each H200, NVLink4 450 GB/s);
    sm_gbps = 11 (DeepEP's logical bandwidth grows ~11 GB/s per SM on the same machine: 89 GB/s at 8 SMs, 254 at
    24); eff_rdma = 0.9 (assumed: no RDMA measurement exists here); latencies ~15-18 us (DeepEP's 4-GPU low-latency
    times minus their NVLink transfer time at 300 GB/s)."""
    return Params(
        lat_us={"normal.dispatch": 15.0, "normal.combine": 15.0, "low_latency.dispatch": 15.0,
                "low_latency.combine": 18.0},
        eff_nvlink=300.0 / 450.0, eff_rdma=0.9, sm_gbps=11.0,
        source="PLACEHOLDER: ANCHORS.md link ceilings and DeepEP SM scaling (no largeep GPU records fitted)",
        fitted=[],
    )


# -- prediction -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    """time_us and its legs; bandwidths in GB/s (logical per SPEC.md; per link: bytes on it / time);
    efficiency: the busiest link's bytes / (time * its bandwidth); bound: the term that decides the time."""

    time_us: float
    t_nvlink_us: float
    t_rdma_us: float
    t_sm_us: float
    logical_gbps: float
    nvlink_gbps: float
    rdma_gbps: float
    efficiency: float
    bound: str


def _terms(tr: Traffic, w: Workload, cluster: Cluster, num_sms: int | None) -> dict[str, tuple[float, float]]:
    """Each term as (coefficient on its inverse constant, constant us), so that time = lat + coef * inv + const."""
    bw_nvl = cluster.nvlink_gbps * 1e3  # bytes per us
    bw_nic = cluster.nic_gbps * 1e3
    out = {
        "nvlink": (tr.nvlink / bw_nvl, cluster.nvlink_latency_us if tr.nvlink > 0 else 0.0),
        "rdma": (tr.rdma / bw_nic, cluster.nic_latency_us if tr.rdma > 0 else 0.0),
    }
    if w.mode == "normal" and num_sms:
        out["sm"] = (tr.sm / (num_sms * 1e3), 0.0)
    return out


def predict(
    w: Workload, num_ranks: int, params: Params, cluster: Cluster, *, stats: RoutingStats | None = None,
    hierarchical: bool = True, overlap: bool = True, num_sms: int | None = -1,
) -> Prediction:
    """Time and bandwidths of one call on ``num_ranks`` GPUs (``cluster.gpus_per_node`` per node).
    num_sms: -1 = the cluster's; None = no SM cap."""
    p = min(cluster.gpus_per_node, num_ranks)
    if stats is None:
        stats = routing_stats(num_ranks, p, w.num_experts, w.num_topk)
    sms = cluster.num_sms if num_sms == -1 else num_sms
    tr = traffic(w, num_ranks, p, stats, hierarchical=hierarchical)
    terms = _terms(tr, w, cluster, sms)
    t_nvl = terms["nvlink"][0] / params.eff_nvlink + terms["nvlink"][1]
    t_rdma = terms["rdma"][0] / params.eff_rdma + terms["rdma"][1]
    t_sm = terms["sm"][0] / params.sm_gbps if "sm" in terms else 0.0
    links = max(t_nvl, t_rdma) if overlap else t_nvl + t_rdma
    body = max(links, t_sm)
    bound = "sm" if t_sm >= links and t_sm > 0 else ("rdma" if t_rdma >= t_nvl else "nvlink")
    time_us = params.lat_us[f"{w.mode}.{w.op}"] + body
    nvl_gbps = tr.nvlink / time_us / 1e3
    rdma_gbps = tr.rdma / time_us / 1e3
    eff = max(nvl_gbps / cluster.nvlink_gbps, rdma_gbps / cluster.nic_gbps)
    return Prediction(time_us, t_nvl, t_rdma, t_sm, tr.logical / time_us / 1e3, nvl_gbps, rdma_gbps, eff, bound)


# -- calibration ------------------------------------------------------------------------------------------------
def _usable(r: dict[str, Any]) -> bool:
    return r.get("mode") in MODES and r.get("op") in OPS and float(r.get("time_us_median") or 0) > 0


def _record_rows(
    records: Sequence[dict[str, Any]], cluster: Cluster, hierarchical: bool
) -> list[tuple[int, dict[str, tuple[float, float]], float]]:
    rows = []
    for r in records:
        w = Workload(r["mode"], r["op"], int(r["num_tokens"]), int(r["hidden"]), int(r["num_topk"]),
                     int(r["num_experts"]), r["dtype"])
        n, p = int(r["ep"]), int(r["ranks_per_node"])
        stats = routing_stats(n, p, w.num_experts, w.num_topk)
        tr = traffic(w, n, p, stats, hierarchical=hierarchical)
        rows.append((_LAT_KEYS.index(f"{w.mode}.{w.op}"), _terms(tr, w, cluster, r.get("num_sms")),
                     float(r["time_us_median"])))
    return rows


def calibrate(
    measurements: Iterable[dict[str, Any]], *, cluster: Cluster | None = None, prior: Params | None = None,
    hierarchical: bool = True, overlap: bool = True, max_iter: int = 100,
) -> Params:
    """Least-squares fit of the constants to benchmark records (dicts with the record keys; only "dispatch" and
    "combine" of modes "normal" and "low_latency" are used). The cluster must describe the machine the records
    came from (its ``gpus_per_node`` is ignored: each record's ``ranks_per_node`` is used). Minimises the relative
    error of each record's median time. Constants no record exercises keep ``prior``'s values.

    Records taken with ``--ranks-per-node`` below the GPUs of one host emulate nodes: their "RDMA" leg ran over
    NVLink, so fit them with a cluster whose ``nic_gbps`` is the NVLink figure, or leave them out."""
    import numpy as np

    cluster = cluster or Cluster()
    prior = prior or placeholder()
    recs = [r for r in measurements if _usable(r)]
    if not recs:
        raise ValueError("calibrate: no dispatch/combine records with a positive time")
    rows = _record_rows(recs, cluster, hierarchical)
    theta = np.array(prior.vector(), dtype=np.float64)
    nlat = len(_LAT_KEYS)
    col = {"nvlink": nlat, "rdma": nlat + 1, "sm": nlat + 2}
    active: list[tuple[str, ...]] | None = None
    used: set[int] = set()
    for _ in range(max_iter):
        # which term decides each record under the current constants
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
            choice.append(("sm",) if vals.get("sm", -1.0) > link_val else links)
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
        free = sorted(used)
        for _attempt in range(len(theta)):
            fixed = [j for j in range(len(theta)) if j not in free]
            rhs = b - a[:, fixed] @ theta[fixed] if fixed else b
            sol, *_ = np.linalg.lstsq(a[:, free], rhs, rcond=None)
            bad = [free[i] for i, v in enumerate(sol) if v <= 0 and free[i] >= nlat or v < 0]
            if not bad:
                theta[free] = sol
                break
            # a negative latency or inverse efficiency: clamp it (latency 0, efficiency its prior) and refit
            for j in bad:
                theta[j] = 0.0 if j < nlat else prior.vector()[j]
            free = [j for j in free if j not in bad]
            if not free:
                break
    names = list(PARAM_KEYS)
    fitted = [names[j].replace("inv_", "") for j in sorted(used)]
    params = Params.from_vector(theta.tolist(), f"fit of {len(recs)} records", fitted)
    params.warnings = _fit_warnings(recs, params)
    return params


def _fit_warnings(recs: Sequence[dict[str, Any]], params: Params) -> list[str]:
    """What makes a fit untrustworthy: too few records, one token count per op, efficiencies above 1."""
    out = []
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


def check(
    params: Params, records: Iterable[dict[str, Any]], *, cluster: Cluster | None = None,
    hierarchical: bool = True, overlap: bool = True,
) -> CheckResult:
    """Prediction error of ``params`` on ``records`` (dispatch/combine records only)."""
    cluster = cluster or Cluster()
    rows = []
    for r in records:
        if not _usable(r):
            continue
        w = Workload(r["mode"], r["op"], int(r["num_tokens"]), int(r["hidden"]), int(r["num_topk"]),
                     int(r["num_experts"]), r["dtype"])
        c = replace(cluster, gpus_per_node=int(r["ranks_per_node"]))
        pred = predict(w, int(r["ep"]), params, c, hierarchical=hierarchical, overlap=overlap,
                       num_sms=r.get("num_sms"))
        meas = float(r["time_us_median"])
        rows.append({**{k: r[k] for k in ("backend", "mode", "op", "ep", "num_tokens", "dtype", "num_sms")},
                     "measured_us": meas, "predicted_us": pred.time_us, "rel_err": pred.time_us / meas - 1})
    errs = sorted(abs(x["rel_err"]) for x in rows)
    if not errs:
        return CheckResult(0, float("nan"), float("nan"), [])
    return CheckResult(len(errs), errs[len(errs) // 2], errs[-1], rows)


def split_holdout(records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(fit, held out, how): hold out the largest EP when there are several, else every third record."""
    eps = sorted({int(r["ep"]) for r in records})
    if len(eps) > 1:
        top = eps[-1]
        return ([r for r in records if int(r["ep"]) != top], [r for r in records if int(r["ep"]) == top],
                f"fit on EP {eps[:-1]}, checked on EP {top}")
    fit = [r for i, r in enumerate(records) if i % 3 != 2]
    held = [r for i, r in enumerate(records) if i % 3 == 2]
    return fit, held, "fit on 2/3 of the records, checked on every third"


# -- the EP sweep -----------------------------------------------------------------------------------------------
VARIANTS = (("hierarchical", True), ("hierarchical", False), ("flat", True), ("flat", False))


def sweep_ep(
    params: Params, cluster: Cluster, eps: Sequence[int], *, normal: tuple[int, int, int, int],
    ll: tuple[int, int, int, int], max_nodes: int | None = None, samples: int = 0, seed: int = 0,
) -> list[dict[str, Any]]:
    """Predictions for every EP, op and variant. normal/ll: (tokens, hidden, topk, experts). samples > 0 counts
    routing statistics on that many sampled tokens (needed for ``max_nodes``) instead of the exact formulas."""
    out = []
    for ep in eps:
        p = min(cluster.gpus_per_node, ep)
        for mode, (t, h, k, e) in (("normal", normal), ("low_latency", ll)):
            stats = None
            if mode == "normal" and (samples or max_nodes):
                idx = sample_topk(max(samples, 4096), e, k, seed=seed, num_nodes=ep // p, max_nodes=max_nodes)
                stats = sampled_stats(idx, ep, p, e)
            for op, dtype in (("dispatch", "fp8"), ("combine", "bf16")):
                w = Workload(mode, op, t, h, k, e, dtype)
                for layout, overlap in VARIANTS:
                    if mode == "low_latency" and layout == "hierarchical":
                        continue  # low-latency sends every copy directly
                    pr = predict(w, ep, params, cluster, stats=stats, hierarchical=layout == "hierarchical",
                                 overlap=overlap)
                    out.append({"ep": ep, "nodes": ep // p, "mode": mode, "op": op, "dtype": dtype, "tokens": t,
                                "layout": layout, "overlap": overlap, "source": "modelled", **asdict(pr)})
    return out


def _main_variant(row: dict[str, Any]) -> bool:
    return row["overlap"] and (row["layout"] == "hierarchical" or row["mode"] == "low_latency")


def plot_sweep(
    rows: Sequence[dict[str, Any]], measured: Sequence[dict[str, Any]], params: Params, path: Path
) -> Path:
    """Time, bandwidth and efficiency against EP; DeepEP's published figures and our measurements as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    colors = {"dispatch": "tab:blue", "combine": "tab:orange"}

    def series(mode: str, op: str, layout: str, overlap: bool, key: str) -> tuple[list[int], list[float]]:
        sel = [r for r in rows if r["mode"] == mode and r["op"] == op and r["layout"] == layout
               and r["overlap"] == overlap]
        return [r["ep"] for r in sel], [r[key] for r in sel]

    ax = axes[0, 0]
    for op in OPS:
        for layout, overlap, style in (("hierarchical", True, "-"), ("hierarchical", False, ":"), ("flat", True, "--")):
            xs, ys = series("normal", op, layout, overlap, "time_us")
            ax.plot(xs, ys, style, color=colors[op],
                    label=f"{op} model, {layout}{'' if overlap else ', no overlap'}")
        pts = [r for r in measured if r["mode"] == "normal" and r["op"] == op]
        if pts:
            ax.plot([r["ep"] for r in pts], [r["time_us_median"] for r in pts], "o", color=colors[op],
                    label=f"{op} measured (largeep)")
    ax.set_title("normal mode time (modelled lines, measured points)", fontsize=10)
    ax.set_ylabel("time per call (us)")

    ax = axes[0, 1]
    for op in OPS:
        xs, ys = series("normal", op, "hierarchical", True, "logical_gbps")
        ax.plot(xs, ys, "-", color=colors[op], label=f"{op} model, logical GB/s")
        xs, ys = series("normal", op, "hierarchical", True, "rdma_gbps")
        ax.plot(xs, ys, "--", color=colors[op], label=f"{op} model, RDMA GB/s")
        i = OPS.index(op)
        ax.plot([8], [DEEPEP_NORMAL[8][i]], "s", color=colors[op], mfc="none",
                label=f"DeepEP {op} EP8 NVLink (published, H800)")
        eps = [e for e in DEEPEP_NORMAL if e > 8]
        ax.plot(eps, [DEEPEP_NORMAL[e][i] for e in eps], "^", color=colors[op], mfc="none",
                label=f"DeepEP {op} RDMA (published, H800)")
    ax.set_title("normal mode bandwidth", fontsize=10)
    ax.set_ylabel("GB/s")

    ax = axes[1, 0]
    for op in OPS:
        xs, ys = series("low_latency", op, "flat", True, "time_us")
        ax.plot(xs, ys, "-", color=colors[op], label=f"{op} model")
        i = OPS.index(op)
        ax.plot(list(DEEPEP_LL), [v[i] for v in DEEPEP_LL.values()], "^", color=colors[op], mfc="none",
                label=f"DeepEP {op} (published, H800)")
        pts = [r for r in measured if r["mode"] == "low_latency" and r["op"] == op]
        if pts:
            ax.plot([r["ep"] for r in pts], [r["time_us_median"] for r in pts], "o", color=colors[op],
                    label=f"{op} measured (largeep)")
    ax.set_title("low-latency time (modelled lines, published/measured points)", fontsize=10)
    ax.set_ylabel("time per call (us)")

    ax = axes[1, 1]
    for mode, style in (("normal", "-"), ("low_latency", "--")):
        for op in OPS:
            layout = "hierarchical" if mode == "normal" else "flat"
            xs, ys = series(mode, op, layout, True, "efficiency")
            ax.plot(xs, ys, style, color=colors[op], label=f"{mode} {op}")
    ax.set_title("efficiency: busiest link's bytes / (time x its bandwidth)", fontsize=10)
    ax.set_ylabel("fraction of link peak")
    ax.set_ylim(0, 1.05)

    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("EP (GPUs)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5)
    axes[0, 0].set_yscale("log")
    fig.suptitle(f"largeep EP model - calibration: {params.source}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- CLI --------------------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m largeep.bench.sim",
        description="Fit the per-leg cost model to benchmark JSON and predict dispatch/combine at EP 8 to 256.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--calibrate", nargs="*", default=[], metavar="JSON",
                   help="result files of `python -m largeep.bench` (none: placeholder constants)")
    p.add_argument("--backend", help="records of this backend only (default: nvshmem if present, else the most "
                                     "common one)")
    p.add_argument("--out", help="folder for sim.json and sim.png")
    p.add_argument("--eps", type=_ints, default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink-gbps", type=float, default=450.0, help="per GPU, per direction")
    p.add_argument("--nic-gbps", type=float, default=50.0, help="per GPU (400 Gb/s = 50)")
    p.add_argument("--nvlink-latency-us", type=float, default=1.0)
    p.add_argument("--nic-latency-us", type=float, default=3.0)
    p.add_argument("--num-sms", type=int, default=24)
    p.add_argument("--tokens", type=int, default=4096, help="normal mode tokens per rank")
    p.add_argument("--ll-tokens", type=int, default=128, help="low-latency tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--max-nodes", type=int, help="node-limited routing: at most this many nodes per token")
    p.add_argument("--samples", type=int, default=0, help="sample routing statistics on this many tokens")
    p.add_argument("--flat", action="store_true", help="calibrate with the flat (non-hierarchical) layout")
    p.add_argument("--no-overlap", action="store_true", help="calibrate with legs in sequence")
    return p


def _pick_backend(records: Sequence[dict[str, Any]], wanted: str | None) -> str | None:
    names = [r["backend"] for r in records]
    if wanted:
        return wanted
    if "nvshmem" in names:
        return "nvshmem"
    return max(set(names), key=names.count) if names else None


def main(argv: Sequence[str] | None = None) -> int:
    from tabulate import tabulate

    from largeep.bench.records import load_records

    args = build_parser().parse_args(argv)
    measured_cluster = Cluster(nvlink_gbps=args.nvlink_gbps, nic_gbps=args.nic_gbps,
                               nvlink_latency_us=args.nvlink_latency_us, nic_latency_us=args.nic_latency_us)
    hier, ovl = not args.flat, not args.no_overlap
    records = [r for r in load_records(args.calibrate) if _usable(r)] if args.calibrate else []
    backend = _pick_backend(records, args.backend)
    records = [r for r in records if r["backend"] == backend]
    holdout: dict[str, Any] | None = None
    if records:
        fit, held, how = split_holdout(records)
        if fit and held:
            p_fit = calibrate(fit, cluster=measured_cluster, hierarchical=hier, overlap=ovl)
            res = check(p_fit, held, cluster=measured_cluster, hierarchical=hier, overlap=ovl)
            holdout = {"how": how, "n": res.n, "median_abs_err": res.median_abs_err,
                       "max_abs_err": res.max_abs_err, "rows": res.rows}
        params = calibrate(records, cluster=measured_cluster, hierarchical=hier, overlap=ovl)
        params.source = f"fit of {len(records)} '{backend}' records from {', '.join(args.calibrate)}"
    else:
        params = placeholder()
        if args.calibrate:
            params.source += f" (no usable '{backend}' dispatch/combine records in {', '.join(args.calibrate)})"
    print(f"calibration: {params.source}")
    print(f"  constants fitted: {', '.join(params.fitted) or 'none'}; the others are placeholders")
    print(f"  lat_us={ {k: round(v, 2) for k, v in params.lat_us.items()} } eff_nvlink={params.eff_nvlink:.3f} "
          f"eff_rdma={params.eff_rdma:.3f} sm_gbps={params.sm_gbps:.2f}")
    for warning in params.warnings:
        print(f"  WARNING: {warning}")
    if holdout:
        print(f"held-out check ({holdout['how']}): {holdout['n']} records, median |error| "
              f"{100 * holdout['median_abs_err']:.1f}%, max {100 * holdout['max_abs_err']:.1f}%")
    elif records:
        print("held-out check: too few records to hold any out")
    cluster = Cluster(args.gpus_per_node, args.nvlink_gbps, args.nic_gbps, args.nvlink_latency_us,
                      args.nic_latency_us, args.num_sms)
    rows = sweep_ep(params, cluster, args.eps, normal=(args.tokens, args.hidden, args.topk, args.experts),
                    ll=(args.ll_tokens, args.hidden, args.topk, args.experts), max_nodes=args.max_nodes,
                    samples=args.samples)
    table = []
    for r in rows:
        if not _main_variant(r):
            continue
        pub = ""
        if r["mode"] == "normal" and r["ep"] in DEEPEP_NORMAL:
            v = DEEPEP_NORMAL[r["ep"]][OPS.index(r["op"])]
            pub = f"{v:g} GB/s {'NVLink' if r['ep'] == 8 else 'RDMA'}"
        if r["mode"] == "low_latency" and r["ep"] in DEEPEP_LL:
            pub = f"{DEEPEP_LL[r['ep']][OPS.index(r['op'])]:g} us"
        table.append([r["ep"], r["nodes"], r["mode"], r["op"], r["dtype"], r["tokens"], f"{r['time_us']:.1f}",
                      f"{r['logical_gbps']:.1f}", f"{r['nvlink_gbps']:.1f}", f"{r['rdma_gbps']:.1f}",
                      f"{r['efficiency']:.2f}", r["bound"], "modelled", pub])
    meas_points = [r for r in records if int(r["ep"]) in args.eps or int(r["ep"]) < min(args.eps)]
    for r in meas_points:
        nodes = int(r["ep"]) // int(r["ranks_per_node"])
        table.append([r["ep"], nodes, r["mode"], r["op"], r["dtype"], r["num_tokens"], f"{r['time_us_median']:.1f}",
                      f"{(r.get('logical_gbps') or 0):.1f}", "", "", "", "", "measured", ""])
    print(tabulate(table, headers=["ep", "nodes", "mode", "op", "dtype", "tokens", "time(us)", "logical GB/s",
                                   "NVLink GB/s", "RDMA GB/s", "efficiency", "bound", "source",
                                   "DeepEP published (H800)"],
                   tablefmt="simple", disable_numparse=True))
    print("modelled rows: hierarchical layout with overlap (normal), direct sends (low-latency); sim.json has "
          "every variant (flat, no overlap)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "calibration": asdict(params), "holdout_check": holdout, "cluster": asdict(cluster),
            "calibrated_on": {"files": args.calibrate, "backend": backend, "records": len(records),
                              "hierarchical": hier, "overlap": ovl},
            "predictions": rows, "measured": records,
            "deepep_published": {"normal_gbps": DEEPEP_NORMAL, "low_latency_us": DEEPEP_LL,
                                 "note": "H800 + CX7 400 Gb/s; EP8 NVLink logical, EP16+ RDMA bandwidth"},
            "command": " ".join(["python -m largeep.bench.sim", *(sys.argv[1:] if argv is None else argv)]),
        }
        (out / "sim.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        png = plot_sweep(rows, records, params, out / "sim.png")
        print(f"wrote {out / 'sim.json'}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
