"""Randomised checks of SPEC.md's rules on the torch backend over gloo (CPU), 1 to 4 ranks.

Spawning ranks is costly, so hypothesis draws a *list* of cases in the parent and every rank runs the whole list in
one body (``random_bodies.run_cases``); each case gets its own Buffer. Checked per case: the layout, dispatch (rows,
order, local ids, weights, counts, the cached path) and combine against ``reference.py``; combine is the adjoint
of dispatch (summed over ranks in the parent); low-latency counts, rows and the weighted combine. Settings are
derandomized, so CI draws the same cases every run.

The strategies take only the world size, so a GPU run can drive any backend with them: the tests marked
``gpu`` run the nvshmem backend against the reference and against the torch backend (over NCCL) on the same cases.
"""

from __future__ import annotations

import os

import pytest
import random_bodies
from checked_calls import LowLatencyCase, NormalCase, adjoint_ok
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from largeep import native

WORLDS = [1, 2, 3, 4]
CASES_PER_EXAMPLE = 25
EXAMPLES = 8

# No shrinking: a library exception ends the pool, and every shrink step would respawn it (seconds each); the
# failure message names the case instead.
SETTINGS = settings(
    max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def normal_cases(draw: st.DrawFn, world: int) -> NormalCase:
    """Uneven tokens (0..40 per rank), hidden 128/256, E = (1..8) * N, K in 1..min(8, E), a -1 fraction, the three
    dispatch dtypes, expert_alignment, num_worst_tokens, emulated nodes, repeated experts in a token."""
    tokens = tuple(draw(st.lists(st.integers(0, 40), min_size=world, max_size=world)))
    experts = world * draw(st.integers(1, 8))
    distinct = draw(st.booleans())
    return NormalCase(
        tokens=tokens,
        hidden=draw(st.sampled_from([128, 256])),
        num_experts=experts,
        num_topk=draw(st.integers(1, min(8, experts))),
        seed=draw(st.integers(0, 2**20)),
        dtype=(dtype := draw(st.sampled_from(["bfloat16", "float32"]))),
        use_fp8=dtype == "bfloat16" and draw(st.booleans()),
        alignment=draw(st.sampled_from([1, 1, 2, 3, 8])),
        worst=draw(st.booleans()),
        minus_one=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        distinct=distinct,
        max_tokens=max(max(tokens), 1) + draw(st.integers(0, 8)),
        ranks_per_node=draw(st.sampled_from(divisors(world))),
    )


@st.composite
def low_latency_cases(draw: st.DrawFn, world: int) -> LowLatencyCase:
    max_tokens = draw(st.integers(1, 40))
    experts = world * draw(st.integers(1, 8))
    hidden = draw(st.sampled_from([128, 256]))
    return LowLatencyCase(
        tokens=tuple(draw(st.lists(st.integers(0, max_tokens), min_size=world, max_size=world))),
        max_tokens=max_tokens,
        hidden=hidden,
        num_experts=experts,
        num_topk=draw(st.integers(1, min(8, experts))),
        seed=draw(st.integers(0, 2**20)),
        use_fp8=draw(st.booleans()),
        round_scale=draw(st.booleans()),
        use_ue8m0=draw(st.booleans()),
        hook=draw(st.booleans()),
        minus_one=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        ranks_per_node=draw(st.sampled_from(divisors(world))),
        distinct=draw(st.booleans()),
        weighted=draw(st.sampled_from(["none", "all", "some"])),
        bf16_sums=draw(st.booleans()),
    )


def case_lists(world: int, n: int = CASES_PER_EXAMPLE) -> st.SearchStrategy[list[NormalCase | LowLatencyCase]]:
    return st.lists(st.one_of(normal_cases(world), low_latency_cases(world)), min_size=n, max_size=n)


def edge_cases(world: int) -> list[NormalCase | LowLatencyCase]:
    """Fixed corners the random draw may miss."""
    zeros = (0,) * world
    full = (16,) * world
    one_empty = tuple(0 if r == world - 1 else 5 + r for r in range(world))
    e = 2 * world
    return [
        NormalCase(zeros, 128, e, 2, 1),  # no tokens anywhere
        NormalCase(one_empty, 128, e, 2, 2, minus_one=1.0),  # every entry -1
        NormalCase(full, 256, e, min(8, e), 3, max_tokens=16),  # T == max_tokens, K == E up to 8
        NormalCase(one_empty, 128, world, 1, 4, distinct=False, worst=True, alignment=5),  # 1 expert per rank
        NormalCase(full, 128, e, min(8, e), 5, distinct=False, use_fp8=True, max_tokens=16),  # repeated experts
        LowLatencyCase(zeros, 4, 128, e, 2, 6, hook=True),
        LowLatencyCase(full, 16, 256, e, 2, 7, minus_one=1.0),
        LowLatencyCase(full, 16, 128, world, 1, 8, use_fp8=False),
        # repeated experts: every expert named several times by most tokens (once sent, read back for each k)
        LowLatencyCase(full, 16, 128, e, e, 9, minus_one=0.0, distinct=False),
        LowLatencyCase(full, 16, 128, e, min(8, e), 10, distinct=False, hook=True),
        # weights sent with the dispatch: sums on the experts' ranks, with repeated experts, from some ranks only
        LowLatencyCase(full, 16, 128, e, min(8, e), 11, distinct=False, weighted="all"),
        LowLatencyCase(one_empty, 16, 256, world, min(4, world), 12, hook=True, weighted="some", bf16_sums=True),
    ]


def assert_results(world: int, cases: list[NormalCase | LowLatencyCase], results: list[list[dict]]) -> int:
    """Every rank's failures, and the adjoint identity of each normal case summed over ranks. Returns the number of
    checks made."""
    problems: list[str] = []
    checks = 0
    for i, case in enumerate(cases):
        for r in range(world):
            problems += results[r][i]["failures"]
            checks += results[r][i]["checks"]
        if isinstance(case, NormalCase):
            ok, msg = adjoint_ok([results[r][i]["adjoint"] for r in range(world)], case.dtype, case.use_fp8)
            checks += 1
            if not ok:
                problems.append(f"case {i} {case}: {msg}")
    assert not problems, f"{len(problems)} failed checks:\n" + "\n".join(problems[:30])
    return checks


@pytest.mark.parametrize("world", WORLDS)
@SETTINGS
@given(data=st.data())
def test_random_cases(pools, world: int, data: st.DataObject) -> None:
    cases = data.draw(case_lists(world), label="cases")
    assert_results(world, cases, pools(world).run(random_bodies.run_cases, "torch", cases))


@pytest.mark.parametrize("world", WORLDS)
def test_edge_cases(pools, world: int) -> None:
    cases = edge_cases(world)
    assert_results(world, cases, pools(world).run(random_bodies.run_cases, "torch", cases))


@pytest.mark.parametrize("dtype,use_fp8", [("bfloat16", False), ("float32", False), ("bfloat16", True)])
def test_single_received_row(pools, dtype: str, use_fp8: bool) -> None:
    """Exactly one received row whose packed bytes (x, scales, int64 ids, float32 weights; K odd) are no multiple
    of 8. The torch backend's ``_unpack`` views a one-row byte slice as int64: ``.contiguous()`` keeps a one-row
    slice's offset and row stride, so the view fails ("must be divisible by 8")."""
    cases: list[NormalCase | LowLatencyCase] = [
        NormalCase((1,), 128, 2, 1, 11, dtype=dtype, use_fp8=use_fp8, minus_one=0.0),
        NormalCase((1,), 256, 4, 3, 12, dtype=dtype, use_fp8=use_fp8, minus_one=0.0, worst=True),
    ]
    assert_results(1, cases, pools(1).run(random_bodies.run_cases, "torch", cases))


# -- GPU: the same cases on the native backend, against the reference and the torch backend over NCCL ------------
NEEDS_NATIVE = pytest.mark.skipif(native.unavailable_reason() is not None, reason=str(native.unavailable_reason()))
GPU_SETTINGS = settings(SETTINGS, max_examples=10)


@NEEDS_NATIVE
@pytest.mark.parametrize(
    "world", [pytest.param(2, marks=pytest.mark.gpu(2)), pytest.param(4, marks=pytest.mark.gpu(4))]
)
@GPU_SETTINGS
@given(data=st.data())
def test_random_cases_nvshmem_against_torch(pools, world: int, data: st.DataObject) -> None:
    cases = data.draw(case_lists(world), label="cases")
    assert_results(world, cases, pools(world, "nccl").run(random_bodies.run_cases, "nvshmem", cases, "torch"))


@NEEDS_NATIVE
@pytest.mark.parametrize(
    "world", [pytest.param(2, marks=pytest.mark.gpu(2)), pytest.param(4, marks=pytest.mark.gpu(4))]
)
def test_edge_cases_nvshmem_against_torch(pools, world: int) -> None:
    cases = edge_cases(world)
    assert_results(world, cases, pools(world, "nccl").run(random_bodies.run_cases, "nvshmem", cases, "torch"))


ONE_GPU = pytest.mark.skipif(os.environ.get("LARGEEP_TEST_SHARED_GPUS") != "1",
                             reason="LARGEEP_TEST_SHARED_GPUS=1 runs several ranks on one GPU (NVSHMEM's several PEs "
                             "per GPU)")


@pytest.mark.gpu(1)
@NEEDS_NATIVE
@ONE_GPU
@pytest.mark.parametrize("world", [2, 3])
def test_edge_cases_nvshmem_one_gpu(pools, world: int) -> None:
    """The edge cases on the nvshmem backend with every rank on one GPU (a gloo group; for machines of one GPU; 3
    ranks: a group size no power of 2), against the reference."""
    cases = edge_cases(world)
    assert_results(world, cases, pools(world, "gloo-cuda0").run(random_bodies.run_cases, "nvshmem", cases))


@pytest.mark.gpu(1)
@NEEDS_NATIVE
@ONE_GPU
@settings(GPU_SETTINGS, max_examples=4)
@given(data=st.data())
def test_random_cases_nvshmem_one_gpu_three_ranks(pools, data: st.DataObject) -> None:
    """Random cases on 3 ranks of one GPU (no GPU machine here has 3 GPUs), against the reference."""
    cases = data.draw(case_lists(3), label="cases")
    assert_results(3, cases, pools(3, "gloo-cuda0").run(random_bodies.run_cases, "nvshmem", cases))
