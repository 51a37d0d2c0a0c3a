#!/usr/bin/env python3
"""Topology-aware placement vs the greedy (EPLB-style) baseline on synthetic skewed traces.

For each topology, Zipf exponent and seed: draw a planning trace, build the greedy and the topology-aware plans from
it, and compare the bottleneck link (largest bytes / bandwidth over every NIC and NVLink direction, hierarchical
dispatch) and the compute imbalance (max / mean (token, expert) choices per GPU), on the planning trace and on a
held-out trace of the same router. Prints a table and writes bench/results/placement_report.json.

    PYTHONPATH=python python3 scripts/placement_report.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from largeep.placement import (
    Topology,
    contiguous_placement,
    greedy_placement,
    plan_placement,
    simulate_links,
    synthetic_trace,
)
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One (topology, zipf_s, seed) comparison. Times in microseconds, bytes in MB (1e6)."""

    nodes: int
    gpus_per_node: int
    slots_per_gpu: int
    num_experts: int
    topk: int
    tokens_per_gpu: int
    zipf_s: float
    seed: int
    contiguous_max_link_us: float
    greedy_max_link_us: float
    topo_max_link_us: float
    link_cut: float
    greedy_bottleneck: str
    topo_bottleneck: str
    greedy_max_nic_mb: float
    topo_max_nic_mb: float
    greedy_imbalance: float
    topo_imbalance: float
    imbalance_ratio: float
    flat_link_cut: float
    heldout_link_cut: float
    heldout_imbalance_ratio: float
    plan_seconds: float


def compare(topo: Topology, zipf_s: float, seed: int, args: argparse.Namespace) -> Row:
    tokens = args.tokens_per_gpu * topo.num_gpus
    trace = synthetic_trace(tokens, args.experts, args.topk, topo, zipf_s=zipf_s, seed=seed)
    held = synthetic_trace(tokens, args.experts, args.topk, topo, zipf_s=zipf_s, seed=seed, sample_seed=seed + 10_000)
    greedy = greedy_placement(trace.expert_load(), topo)
    t0 = time.perf_counter()
    plan = plan_placement(None, topo, trace=trace)
    plan_s = time.perf_counter() - t0

    def sim(tr, p, hierarchical=True):
        return simulate_links(tr, p, hidden=args.hidden, bytes_per_elem=2, hierarchical=hierarchical)

    g, t = sim(trace, greedy), sim(trace, plan)
    gf, tf = sim(trace, greedy, False), sim(trace, plan, False)
    gh, th = sim(held, greedy), sim(held, plan)
    c = sim(trace, contiguous_placement(args.experts, topo))
    return Row(
        topo.num_nodes,
        topo.gpus_per_node,
        topo.slots_per_gpu,
        args.experts,
        args.topk,
        args.tokens_per_gpu,
        zipf_s,
        seed,
        c.max_link_time_s * 1e6,
        g.max_link_time_s * 1e6,
        t.max_link_time_s * 1e6,
        g.max_link_time_s / t.max_link_time_s,
        g.bottleneck,
        t.bottleneck,
        float(torch.maximum(g.nic_in, g.nic_out).max()) / 1e6,
        float(torch.maximum(t.nic_in, t.nic_out).max()) / 1e6,
        g.compute_imbalance,
        t.compute_imbalance,
        t.compute_imbalance / g.compute_imbalance,
        gf.max_link_time_s / tf.max_link_time_s,
        gh.max_link_time_s / th.max_link_time_s,
        th.compute_imbalance / gh.compute_imbalance,
        plan_s,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--tokens-per-gpu", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one seed, zipf 1.0 only")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the tensors are small)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "placement_report.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    exps = [1.0] if args.quick else [0.8, 1.0, 1.2]
    seeds = range(1 if args.quick else args.seeds)
    # (nodes, gpus per node, slots per GPU): with spare slots for replicas (64 resp. 256), and without any.
    topos = [Topology(8, 8, slots_per_gpu=5), Topology(32, 8, slots_per_gpu=2)]
    no_spare = [Topology(8, 8, slots_per_gpu=4), Topology(32, 8, slots_per_gpu=1)]
    rows: list[Row] = []
    for topo in topos:
        for s in exps:
            for seed in seeds:
                rows.append(compare(topo, s, seed, args))
    for topo in no_spare:
        for s in [0.8, 1.2] if not args.quick else [1.0]:
            rows.append(compare(topo, s, 0, args))
    table = [
        [
            f"{r.nodes}x{r.gpus_per_node}",
            r.slots_per_gpu,
            r.zipf_s,
            r.seed,
            f"{r.contiguous_max_link_us:.0f}",
            f"{r.greedy_max_link_us:.0f}",
            f"{r.topo_max_link_us:.0f}",
            f"{r.link_cut:.2f}x",
            f"{r.greedy_max_nic_mb:.0f}/{r.topo_max_nic_mb:.0f}",
            f"{r.greedy_imbalance:.3f}/{r.topo_imbalance:.3f}",
            f"{(r.imbalance_ratio - 1) * 100:+.1f}%",
            f"{r.flat_link_cut:.2f}x",
            f"{r.heldout_link_cut:.2f}x",
            f"{(r.heldout_imbalance_ratio - 1) * 100:+.1f}%",
            f"{r.plan_seconds:.2f}",
        ]
        for r in rows
    ]
    headers = [
        "GPUs",
        "slots/GPU",
        "zipf s",
        "seed",
        "contig us",
        "greedy us",
        "topo us",
        "link cut",
        "max NIC MB g/t",
        "imbalance g/t",
        "imb vs g",
        "flat cut",
        "held-out cut",
        "held-out imb",
        "plan s",
    ]
    print(
        f"{args.experts} experts, top-{args.topk}, {args.tokens_per_gpu} tokens per GPU, hidden {args.hidden} BF16; "
        "bottleneck link time (hierarchical dispatch) of contiguous / greedy (EPLB-style) / topology-aware plans"
    )
    print(tabulate(table, headers=headers, tablefmt="github"))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "git_revision": rev,
        },
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "records": [asdict(r) for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
