"""The cost model's guards against groups and routings that cannot exist (largeep.bench.sim), on the CPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
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
                 ["--gpus-per-node", "32", "--eps", "8,16,32,64,128,256"]):
        assert sim.check_args(parser.parse_args(args)) is None, args
