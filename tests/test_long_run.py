"""Long runs: many rounds of random sizes on the same Buffers with every result checked, memory flat after warm-up;
Buffers made and destroyed 100 times; two Buffers on two process groups used side by side.

LARGEEP_TEST_ROUNDS sets the number of rounds (200 by default; e.g. 10000 on the GPU machine). Memory is flat when,
from the end of warm-up to the end, live tensors do not grow, CUDA allocations (GPU runs) do not grow, and the
resident set grows by at most RSS_SLACK (allocator noise; a leak of one 16 KiB row per round passes 16 MiB after
1000 rounds, and Python-held tensors show in the tensor count at once).
"""

from __future__ import annotations

import os

import pytest
import random_bodies
from checked_calls import adjoint_ok
from dist_pool import DistPool

ROUNDS = int(os.environ.get("LARGEEP_TEST_ROUNDS", "200"))
RSS_SLACK = 16 << 20


def runs(world: int) -> list:
    """(world, backend, process-group backend) for every backend available; the NCCL ones need ``world`` GPUs."""
    gpu = pytest.mark.gpu(world)
    return [
        pytest.param(world, "torch", "gloo", id=f"{world}-torch-gloo"),
        pytest.param(world, "torch", "nccl", marks=gpu, id=f"{world}-torch-nccl"),
        pytest.param(world, "nvshmem", "nccl", marks=gpu, id=f"{world}-nvshmem-nccl"),
    ]

def assert_flat(samples_per_rank: list[list[dict[str, int]]], what: str) -> None:
    for rank, samples in enumerate(samples_per_rank):
        first, last = samples[0], samples[-1]
        grew = {k: last[k] - first[k] for k in first}
        assert grew["tensors"] <= 0, f"{what}, rank {rank}: {grew['tensors']} more live tensors ({first} -> {last})"
        assert grew.get("cuda_allocated", 0) <= 0, f"{what}, rank {rank}: CUDA memory grew ({first} -> {last})"
        assert grew["rss"] <= RSS_SLACK, f"{what}, rank {rank}: RSS grew by {grew['rss'] >> 10} KiB ({first} -> {last})"


@pytest.mark.parametrize("world,backend,pg", runs(2) + [p for p in runs(4) if p.values[2] == "nccl"])
def test_long_run(pools, world: int, backend: str, pg: str) -> None:
    warmup = min(max(ROUNDS // 5, 10), 500)
    # long runs outgrow the shared pool's per-call timeout: give them a pool of their own
    own = ROUNDS > 1000
    pool = DistPool(world, pg, timeout_s=120 + 0.2 * ROUNDS) if own else pools(world, pg)
    try:
        results = pool.run(random_bodies.long_run, backend, ROUNDS, 1234, warmup)
    finally:
        if own:
            pool.close(force=pool.broken)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, f"{len(failures)} failed checks (first 50 per rank):\n" + "\n".join(failures[:40])
    kinds = results[0]["kinds"]
    assert sum(kinds.values()) == ROUNDS and all(kinds.values()), kinds
    # combine is the adjoint of dispatch, round by round (shares summed over ranks)
    for i, per_round in enumerate(zip(*(r["adjoints"] for r in results), strict=True)):
        _, dtype, use_fp8 = per_round[0]
        ok, msg = adjoint_ok([a for a, _, _ in per_round], dtype, use_fp8)
        assert ok, f"normal round {i}: {msg}"
    assert_flat([r["samples"] for r in results], f"{ROUNDS} rounds")
    # (the counts, for a run's log: pytest -s prints them)
    print(f"long run {world}-{backend}-{pg}: {ROUNDS} rounds {kinds}, {sum(r['checks'] for r in results)} checks, "
          f"0 failed; memory (after warm-up -> end) per rank: {[(r['samples'][0], r['samples'][-1]) for r in results]}")


@pytest.mark.parametrize("world,backend,pg", runs(2))
def test_create_destroy(pools, world: int, backend: str, pg: str) -> None:
    results = pools(world, pg).run(random_bodies.create_destroy, backend, 100, 10)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    assert_flat([r["samples"] for r in results], "100 create/destroy cycles")


# 4 ranks of a gloo group on 2 GPUs, 2 per GPU (NVSHMEM's several PEs per GPU): the 4-rank paths of the long run
# and of the create/destroy cycles where no 4-GPU machine is lent; LARGEEP_TEST_SHARED_GPUS=1 on the GPU machine.
shared_gpus = [
    pytest.mark.gpu(2),
    pytest.mark.skipif(os.environ.get("LARGEEP_TEST_SHARED_GPUS") != "1",
                       reason="LARGEEP_TEST_SHARED_GPUS=1 runs 4 ranks on 2 GPUs (NVSHMEM's several PEs per GPU)"),
]


@pytest.mark.parametrize("world,backend,pg", [pytest.param(4, "nvshmem", "gloo-cuda", marks=shared_gpus)])
def test_long_run_four_ranks_shared_gpus(pools, world: int, backend: str, pg: str) -> None:
    test_long_run(pools, world, backend, pg)


@pytest.mark.parametrize("world,backend,pg", [pytest.param(4, "nvshmem", "gloo-cuda", marks=shared_gpus)])
def test_create_destroy_four_ranks_shared_gpus(pools, world: int, backend: str, pg: str) -> None:
    test_create_destroy(pools, world, backend, pg)


@pytest.mark.parametrize("world,backend,pg", runs(2) + runs(4))
def test_two_groups_side_by_side(pools, world: int, backend: str, pg: str) -> None:
    results = pools(world, pg).run(random_bodies.two_groups, backend, 17)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
