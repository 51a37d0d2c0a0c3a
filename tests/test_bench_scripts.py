"""The standalone scripts in bench/: their launcher and the arithmetic behind their records, on the CPU."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return ROOT / "bench"


def test_run_ranks_refuses_no_ranks_at_once(bench_dir: Path) -> None:
    """No GPU visible gives the GPU scripts 0 ranks: run_ranks says so at once instead of waiting out its timeout
    for a result no process will send."""
    import _launch

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="0 ranks"):
        _launch.run_ranks(print, 0, None, backend="gloo", timeout_s=30.0)
    assert time.monotonic() - t0 < 5.0


class _FakeGPU:
    """One stream's timeline (us): the host's clock, and when the queued GPU work ends. A launch costs the host
    ``host_us`` and runs ``gpu_us`` on the GPU once the host has issued it and the work before it ended; an event
    marks where the queue stands when the host records it (the host's time if the GPU is idle)."""

    def __init__(self) -> None:
        self.host = 0.0
        self.free = 0.0

    def launch(self, host_us: float, gpu_us: float) -> None:
        self.host += host_us
        self.free = max(self.free, self.host) + gpu_us

    def sync(self, *args: object, **kwargs: object) -> None:
        self.host = max(self.host, self.free)

    def event(self) -> object:
        gpu = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                self.at = float("nan")

            def record(self) -> None:
                gpu.free = self.at = max(gpu.free, gpu.host)

            def synchronize(self) -> None:
                gpu.host = max(gpu.host, self.at)

            def elapsed_time(self, end: Event) -> float:
                return (end.at - self.at) / 1e3  # ms, as torch.cuda.Event's

        return Event


def test_low_latency_graph_times_leave_out_the_host_launch(bench_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """low_latency_times.py's CUDA-graph times are the GPU's: a replay whose launch costs the host 12 us and whose
    kernels run 40 us times 40 us, alone and back to back (the start event must not fire on an idle GPU before the
    host has launched the graph)."""
    import low_latency_times as llt
    import torch
    import torch.distributed as dist

    gpu = _FakeGPU()
    monkeypatch.setattr(torch.cuda, "Event", gpu.event())
    monkeypatch.setattr(torch.cuda, "synchronize", gpu.sync)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: gpu.launch(2.0, cycles / 1800))
    monkeypatch.setattr(dist, "barrier", gpu.sync)  # (NCCL's barrier waits for the stream's work)

    class Flush:
        def zero_(self) -> None:
            gpu.launch(3.0, 150.0)

    alone, b2b = llt._graph_times(lambda: gpu.launch(12.0, 40.0), Flush(), 5, 4)
    assert alone == pytest.approx([40.0] * 5) and b2b == pytest.approx([40.0] * 5)


@pytest.mark.parametrize(("argv", "says"), [
    (["--cpu", "--variants", "gate_only", "--profile", "gate_only"], "not with --cpu"),
    (["--profile", "gate_onyl"], "['gate_onyl'] not among the variants timed"),
    (["--variants", "gate_only", "--profile", "comm_only"], "['comm_only'] not among the variants timed"),
    (["--variants", "gate_only", "--sync-debug"], "take the variants of --profile"),
    (["--backward", "--profile", "comm_beside_experts"],
     "['comm_beside_experts'] not among the variants timed (comm_beside_experts does not run with --backward)"),
    (["--backward", "--profile", "no_overlap,stack_pipeline_graph"], "['stack_pipeline_graph'] not among"),
    (["--cpu", "--variants", "stack_pipeline_graph"], "stack_pipeline_graph does not run with --cpu"),
    (["--cpu", "--backward", "--variants", "no_overlap,comm_beside_experts"],
     "comm_beside_experts does not run with --backward"),
    (["--backward", "--variants", "stack_sequential_graph"], "stack_sequential_graph does not run with --backward"),
])
def test_layer_times_refuses_what_it_cannot_run(bench_dir: Path, capsys: pytest.CaptureFixture[str],
                                                argv: list[str], says: str) -> None:
    """layer_times.py profiles after timing every variant: a profile that cannot run (the CPU has no CUDA profiler)
    or names no timed variant is refused before any rank starts, not after the timing (which crashed and wrote no
    file) or not at all (nothing profiled, nothing said). So is a variant named in --variants that the run cannot
    time (the graphs on the CPU or with --backward, comm_beside_experts with --backward), which was left out of the
    file without a word (a file of no records)."""
    import layer_times

    with pytest.raises(SystemExit) as exc:
        layer_times.main([*argv, "--nprocs", "2", "--iters", "1", "--warmup", "0", "--out", "/nonexistent"])
    assert exc.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "says"), [
    (["--dtypes", "bf16,BF16"], "--dtypes: ['BF16']"),
    (["--ranks-per-node", "3"], "--ranks-per-node 3 does not divide 4 ranks"),
    (["--ranks-per-node", "2", "--node-limit", "3"], "--node-limit 3: between 1 and the 2 nodes"),
    (["--ranks-per-node", "1", "--node-limit", "0"], "--node-limit 0: between 1 and the 4 nodes"),
])
def test_kernel_times_refuses_impossible_options(bench_dir: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch, argv: list[str], says: str) -> None:
    """kernel_times.py refuses what its ranks cannot run, or would record under a name that is not what ran (a
    dtype other than bf16/fp8 reached the ranks as a BF16 dispatch and a combine of 1-D rows; --node-limit 0
    routed every token anywhere and tagged the file as unlimited), before any rank starts."""
    import kernel_times

    monkeypatch.setattr(sys, "argv", ["kernel_times.py", *argv, "--nprocs", "4", "--out", "/nonexistent"])
    with pytest.raises(SystemExit) as exc:
        kernel_times.main()
    assert exc.value.code == 2 and says in capsys.readouterr().err


def test_kernel_times_legs_take_the_slowest_rank_per_iteration(bench_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel_times.py's per-leg times follow its records: per iteration the slowest rank, then the median over
    iterations (two ranks whose slow iterations alternate: 30 us, where the larger of the ranks' own medians is 10);
    bytes are summed over ranks."""
    import argparse

    import kernel_times
    import torch
    import torch.distributed as dist

    args = argparse.Namespace(experts=4, topk=1, hidden=128, node_limit=None)
    idx = [torch.tensor([[0], [1], [3]]), torch.tensor([[2], [2], [0]])]  # ranks 0, 1; experts 2 per rank
    push = [[10.0, 30.0, 10.0], [30.0, 10.0, 10.0]]
    copyout = [[5.0, 6.0, 7.0], [8.0, 2.0, 1.0]]
    sent: dict[int, torch.Tensor] = {}

    def gather(out: torch.Tensor, mine: torch.Tensor) -> None:
        sent[len(sent)] = mine.clone()
        rows = out.view(2, -1)
        rows[len(sent) - 1] = mine
        if 0 in sent and len(sent) == 2:
            rows[0] = sent[0]

    monkeypatch.setattr(dist, "all_gather_into_tensor", gather)
    for rank in (0, 1):  # (rank 1's call sees both ranks' values)
        per_kernel = {"dispatch_push_kernel": push[rank], "dispatch_copyout_kernel": copyout[rank]}
        leg = kernel_times._legs(idx[rank], args, 2, 1, rank, 3, 24, "bf16", per_kernel)
    # per iteration max: push 30, 30, 10 -> 30; copyout 8, 6, 7 -> 7
    assert leg["push_us"] == 30.0 and leg["copyout_us"] == 7.0 and leg["rdma_us"] == 0.0
    # one node per rank: every row to the other rank crosses nodes; rank 0 sends 1 token to rank 1, rank 1 sends 1
    # to rank 0 (2 of its tokens' experts on rank 1 itself)
    row = 2 * 128
    assert leg["rdma_bytes"] == 2 * row and leg["direct_cross_node_bytes"] == 2 * row
    assert leg["nvlink_push_bytes"] == 4 * row


def test_host_profile_files_say_their_settings(bench_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """host_profile.py wrote host_profile_t{T}.json whatever --layout, the rank count and the sizes were, with no
    settings inside: a --no-layout run in the folder of a --layout one overwrote it. Each run now has its own file,
    which names its settings."""
    import json

    import host_profile

    monkeypatch.setattr(host_profile, "run_ranks", lambda body, ranks, args: {
        "host_us_median": {}, "native_call_us_median": {}, "native_call_us_mean_p90": {},
        "python_pieces_us_median_mean_calls": {}, "host_us_median_profiled": {}, "profile": ""})
    for extra in ([], ["--no-layout"], ["--nprocs", "4"]):
        monkeypatch.setattr(sys, "argv", ["host_profile.py", "--nprocs", "2", "--tokens", "64", "--out",
                                          str(tmp_path), *extra])
        host_profile.main()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["host_profile_ep2_t64.json", "host_profile_ep2_t64_nolayout.json",
                     "host_profile_ep4_t64.json"], names
    got = json.loads((tmp_path / "host_profile_ep2_t64_nolayout.json").read_text())
    assert got["settings"]["layout"] is False and got["settings"]["ranks"] == 2 and got["settings"]["tokens"] == 64
    assert "--no-layout" in got["command"]
