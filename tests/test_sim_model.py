"""The cost model (largeep.bench.sim) on the CPU: its guards against groups and routings that cannot exist, and
DeepEP's figures beside it in our byte count and at its configuration."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from largeep.bench import sim


# -- groups and routings that cannot exist ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,p,e,k,match",
    [
        (32, 8, 16, 8, "16 experts are not divisible by 32 ranks"),  # fewer experts than ranks
        (256, 8, 16, 8, "not divisible"),
        (64, 8, 288, 8, "288 experts are not divisible by 64 ranks"),
        (16, 6, 96, 8, "6 ranks per node do not divide 16 ranks"),
        (4, 4, 4, 8, "top-8 needs at least 8 experts"),
        (0, 8, 256, 8, "must be positive"),
    ],
)
def test_routing_stats_refuses_what_cannot_exist(n: int, p: int, e: int, k: int, match: str) -> None:
    """routing_stats(32, 8, 16, 8) gave 9.2 ranks per token with top-8; now every such input raises, naming why."""
    assert sim.routing_problem(n, p, e, k) is not None
    with pytest.raises(ValueError, match=match):
        sim.routing_stats(n, p, e, k)
    if n > 0 and e >= k:
        w = sim.Workload("normal", "dispatch", 16, 256, k, e, "bf16")
        with pytest.raises(ValueError, match=match):
            sim.traffic(w, n, p, sim.RoutingStats(1.0, 1.0))


def test_sampled_routing_refuses_what_cannot_exist() -> None:
    """sampled_stats divided by E // N = 0 and node-limited sampling broke on experts not divisible by the nodes;
    node-limited routing that leaves fewer than K experts chose experts outside its nodes."""
    idx = sim.sample_topk(64, 16, 8, seed=1)
    with pytest.raises(ValueError, match="not divisible"):
        sim.sampled_stats(idx, 32, 8, 16)
    with pytest.raises(ValueError, match="do not divide"):
        sim.sampled_stats(sim.sample_topk(64, 96, 8, seed=1), 16, 6, 96)
    with pytest.raises(ValueError, match="not divisible"):
        sim.sample_topk(64, 20, 8, num_nodes=8, max_nodes=4)
    with pytest.raises(ValueError, match="fewer than top-9"):
        sim.sample_topk(64, 256, 9, num_nodes=32, max_nodes=1)  # 8 experts per node
    with pytest.raises(ValueError, match="at least 1"):
        sim.sample_topk(64, 256, 8, num_nodes=32, max_nodes=0)
    with pytest.raises(ValueError, match="top-8 needs"):
        sim.sample_topk(64, 4, 8)
    # what can exist still samples: 8 experts per node, one node per token
    one = sim.sample_topk(500, 256, 8, num_nodes=32, max_nodes=1, seed=3)
    assert sim.sampled_stats(one, 256, 8, 256).nodes_per_token == pytest.approx(1.0)


@pytest.mark.parametrize(
    "n,p,e,k",
    [(1, 8, 8, 8), (2, 8, 256, 8), (8, 8, 8, 8), (16, 8, 16, 8), (64, 8, 64, 8), (256, 8, 256, 8), (256, 32, 256, 8),
     (32, 8, 288, 8), (64, 8, 128, 4), (16, 2, 32, 3)],
)
def test_routing_stats_stay_within_top_k(n: int, p: int, e: int, k: int) -> None:
    """A token reaches at most min(K, N) ranks and min(K, M) nodes; with one expert per rank it reaches exactly K
    ranks; the sampled counts agree."""
    st = sim.routing_stats(n, p, e, k)
    m = max(1, n // p)
    assert 0 < st.ranks_per_token <= min(k, n) + 1e-9
    assert 0 < st.nodes_per_token <= min(k, m) + 1e-9 and st.nodes_per_token <= st.ranks_per_token + 1e-9
    assert st.ranks_per_token <= st.summed_rows_per_token <= min(2 * st.ranks_per_token, k) + 1e-9
    if e == n:
        assert st.ranks_per_token == pytest.approx(k)
    mc = sim.sampled_stats(sim.sample_topk(20000, e, k, seed=7), n, p, e)
    assert mc.ranks_per_token == pytest.approx(st.ranks_per_token, rel=0.02)
    assert mc.nodes_per_token == pytest.approx(st.nodes_per_token, rel=0.02)


def test_sweep_leaves_out_a_mode_that_cannot_exist() -> None:
    """288 low-latency experts divide EP 32, not EP 64: the sweep predicts both modes at 32, only the normal mode at
    64, and warns about the low-latency mode there."""
    with pytest.warns(UserWarning, match="no low_latency predictions at EP 64: 288 experts are not divisible"):
        rows = sim.sweep_ep(sim.placeholder(), sim.Cluster(), [32, 64], normal=(4096, 7168, 8, 256),
                            ll=(128, 7168, 8, 288))
    assert {(r["ep"], r["mode"]) for r in rows} == {(32, "normal"), (32, "low_latency"), (64, "normal")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sim.sweep_ep(sim.placeholder(), sim.Cluster(), [8, 16, 32], normal=(4096, 7168, 8, 256),
                     ll=(128, 7168, 8, 288))


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--experts", "16", "--eps", "256"], "--experts 16 is not divisible by --eps 256"),
        (["--experts", "16", "--eps", "256", "--max-nodes", "4"], "--experts 16 is not divisible by --eps 256"),
        (["--eps", "8,16,512"], "--experts 256 is not divisible by --eps 512"),
        (["--gpus-per-node", "6", "--eps", "16"], "--gpus-per-node 6 does not divide --eps 16"),
        (["--gpus-per-node", "0"], "--gpus-per-node 0"),
        (["--topk", "300"], "--topk 300"),
        (["--eps", "0,8"], "--eps 0,8"),
        (["--eps", "256", "--max-nodes", "1", "--topk", "16"], "--max-nodes 1 at EP 256"),
        (["--eps", "64", "--max-nodes", "0"], "--max-nodes 0"),
        (["--eff-rdma", "0"], "--eff-rdma 0"),
        (["--dispatch-dtypes", "fp8,bf8"], "argument --dispatch-dtypes: 'fp8,bf8': expected a comma list of bf16, fp8"),
    ],
)
def test_cli_refuses_what_cannot_exist(args: list[str], msg: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`--experts 16 --eps 256` predicted silently and adding `--max-nodes 4` crashed; a GPUs per node that does not
    divide the EP gave "1 node" with an RDMA leg. Each is an argparse error naming the argument, before any work."""
    with pytest.raises(SystemExit) as e:
        sim.main([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err, err
    assert not (tmp_path / "out").exists()


def test_cli_takes_what_can_exist() -> None:
    """EPs below one node, node-limited routing that leaves enough experts, one expert per rank."""
    parser = sim.build_parser()
    for args in ([], ["--eps", "1,2,4,8"], ["--eps", "2,4,8,16,32,64,128,256", "--max-nodes", "4", "--samples",
                                                "16384"], ["--eps", "256,512", "--experts", "512"],
                 ["--gpus-per-node", "32", "--eps", "8,16,32,64,128,256"], ["--eff-rdma", "0.75"]):
        assert sim.check_args(parser.parse_args(args)) is None, args


# -- DeepEP's figures in our byte count -------------------------------------------------------------------------
def test_deepep_normal_figures_in_our_count() -> None:
    """DeepEP's internode RDMA figure counts every node a token reaches, its own included: (M-1)/M of it crosses a
    NIC (x1/2 at EP16); its EP8 figure is logical (local rows included), 7/8 of it on NVLink."""
    got = {(ep, op): sim.deepep_normal_in_our_count(ep, op) for ep in sim.DEEPEP_NORMAL for op in sim.OPS}
    assert got[(16, "dispatch")]["our_count_gbps"] == pytest.approx(43.0 / 2)
    assert got[(32, "dispatch")]["our_count_gbps"] == pytest.approx(58.0 * 3 / 4)
    assert got[(64, "combine")]["our_count_gbps"] == pytest.approx(50.0 * 7 / 8)
    assert all(d["leg"] == "rdma" and d["logical_gbps"] is None and d["our_count_gbps"] < 50.0
               for (ep, _), d in got.items() if ep > 8)  # (58 GB/s published at EP32 is above the NIC's 50)
    eight = got[(8, "dispatch")]
    assert eight["leg"] == "nvlink" and eight["logical_gbps"] == 153.0
    assert eight["our_count_gbps"] == pytest.approx(153.0 * 7 / 8)
    assert eight["efficiency"] == pytest.approx(153.0 * 7 / 8 / sim.H800_NVLINK_GBPS)
    assert got[(16, "combine")]["efficiency"] == pytest.approx(21.5 / 50.0)


@pytest.mark.parametrize("ep", [16, 32, 64])
def test_deepep_rdma_count_against_ours_on_a_routing(ep: int) -> None:
    """Counted on DeepEP's kind of routing (node-limited to 4 of M nodes, 8 GPUs per node): DeepEP's rows (for each
    token, every node its experts are on) times (M-1)/M match the rows that leave the token's node, which are what the
    model's NIC leg carries (traffic with the sampled statistics)."""
    nodes = ep // 8
    idx = sim.sample_topk(40000, 256, 8, seed=5, num_nodes=nodes, max_nodes=4)
    hit = torch.zeros(idx.shape[0], nodes, dtype=torch.bool)
    hit.scatter_(1, idx // (256 // nodes), True)
    t = idx.shape[0]
    deepep_rows = float(hit.sum())  # rdma_idx.ne(-1).sum() of DeepEP's test, rank 0's tokens
    leaving = float(hit[:, 1:].sum())  # rank 0 is on node 0: the rows that cross its NIC
    assert leaving == pytest.approx(deepep_rows * (nodes - 1) / nodes, rel=0.01)
    stats = sim.sampled_stats(idx, ep, 8, 256)
    stats = sim.RoutingStats(stats.ranks_per_token, stats.nodes_per_token)  # (no imbalance: the rows as counted)
    w = sim.Workload("normal", "dispatch", t, 7168, 8, 256, "bf16")
    model_rows = sim.traffic(w, ep, 8, stats).rdma / w.bytes_per_row()
    assert model_rows == pytest.approx(leaving, rel=0.01)
    assert stats.nodes_per_token * t == pytest.approx(deepep_rows)


def test_deepep_low_latency_at_its_configuration() -> None:
    """The low-latency model beside DeepEP is taken at DeepEP's 288 experts where they divide the EP (2 to 32) and
    left out where they do not (64 to 256); 288 against 256 experts moves the model's dispatch by under 0.2% and its
    combine not at all."""
    params, cluster = sim.placeholder(), sim.Cluster()
    rows = sim.deepep_ll_comparison(params, cluster)
    assert {(d["ep"], d["source"].split(",")[0]) for d in rows} == {
        (2, "measured on our H200s"), (4, "measured on our H200s"), *((e, "published") for e in sim.DEEPEP_LL)}
    for d in rows:
        if d["ep"] in (64, 128, 256):
            assert d["experts"] is None and d["model_us"] is None
            continue
        assert d["experts"] == 288
        dtype = "fp8" if d["op"] == "dispatch" else "bf16"
        w = sim.Workload("low_latency", d["op"], 128, 7168, 8, 288, dtype)
        assert d["model_us"] == pytest.approx(sim.predict(w, d["ep"], params, cluster).time_us)
        at256 = sim.predict(sim.Workload("low_latency", d["op"], 128, 7168, 8, 256, dtype), d["ep"], params,
                            cluster).time_us
        if d["op"] == "combine":
            assert d["model_us"] == pytest.approx(at256)
        else:
            assert abs(d["model_us"] / at256 - 1) < 0.002
        table = sim.DEEPEP_H200_LL if d["source"].startswith("measured") else sim.DEEPEP_LL
        assert d["deepep_us"] == table[d["ep"]][sim.OPS.index(d["op"])]


def test_cli_compares_with_deepep_in_our_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The table's DeepEP column and sim.json give DeepEP's figures in our byte count and the low-latency model at
    DeepEP's configuration; --eff-rdma sets the NIC efficiency of the predictions and says so."""
    assert sim.main(["--eps", "8,16,64", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "DeepEP published (H800), in our byte count" in out
    assert "153 GB/s logical (133.9 NVLink)" in out and "21.5 GB/s RDMA (published 43)" in out
    assert "44.6 GB/s RDMA (published 51)" in out and "173 us (experts not stated)" in out
    assert "77 us (model at 288 experts" in out
    doc = json.loads((tmp_path / "a" / "sim.json").read_text())
    ours = {(d["ep"], d["op"]): d for d in doc["deepep_published"]["normal_in_our_count"]}
    assert ours[(16, "dispatch")]["our_count_gbps"] == pytest.approx(21.5)
    ll = {(d["ep"], d["op"]): d for d in doc["deepep_low_latency_comparison"]}
    assert ll[(8, "dispatch")]["experts"] == 288 and ll[(64, "dispatch")]["model_us"] is None
    assert (tmp_path / "a" / "sim.png").stat().st_size > 0
    assert doc["calibration"]["eff_rdma"] == pytest.approx(0.9)
    t09 = {(r["ep"], r["mode"], r["op"]): r["time_us"] for r in doc["predictions"] if sim._main_variant(r)}
    assert sim.main(["--eps", "8,16,64", "--eff-rdma", "0.75", "--out", str(tmp_path / "b")]) == 0
    doc = json.loads((tmp_path / "b" / "sim.json").read_text())
    assert doc["calibration"]["eff_rdma"] == 0.75 and "--eff-rdma" in doc["calibration"]["source"]
    t75 = {(r["ep"], r["mode"], r["op"]): r["time_us"] for r in doc["predictions"] if sim._main_variant(r)}
    assert t75[(8, "normal", "dispatch")] == pytest.approx(t09[(8, "normal", "dispatch")])  # one node: no NIC
    assert t75[(64, "normal", "dispatch")] > t09[(64, "normal", "dispatch")]
