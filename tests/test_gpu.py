"""GPU tests: the nvshmem backend against the independent reference, and the torch backend on NCCL.

Run on the GPU machine (scripts/device_check.sh); skipped without GPUs. The nvshmem pool is created after the
torch/NCCL one so that each process joins NVSHMEM once.
"""

from __future__ import annotations

import os

import bodies
import error_bodies
import gpu_bodies
import ops_bodies
import pytest
import torch
from dist_pool import run_in_own_pool
from largeep import native

needs_native = pytest.mark.skipif(native.unavailable_reason() is not None, reason=str(native.unavailable_reason()))


# the 4-rank case of a test parametrized by world (its gpu(4) mark: conftest skips it where fewer GPUs are seen)
FOUR = pytest.param(4, marks=pytest.mark.gpu(4), id="4")


def _tokens(world: int, base: int) -> list[int]:
    return [0 if (r == 1 and world > 1) else base + 37 * r for r in range(world)]


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("world", [2, FOUR])
def test_runtime_cycles(pools, world: int) -> None:
    pools(world, "nccl").run(gpu_bodies.runtime_and_cycles, 20)


@pytest.mark.gpu(2)
@needs_native
def test_layout_id_check(pools) -> None:
    pools(2, "nccl").run(gpu_bodies.layout_id_check)


@pytest.mark.gpu(2)
@needs_native
def test_finished_calls_on_streams(pools) -> None:
    pools(2, "nccl").run(gpu_bodies.finished_calls_on_streams, 12)


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("call,name", error_bodies.LONE_REFUSAL_CASES,
                         ids=[f"{c}-{n}" for c, n in error_bodies.LONE_REFUSAL_CASES])
def test_lone_refusal_nvshmem(pools, call: str, name: str) -> None:
    """test_errors.test_lone_refusal on the nvshmem backend: rank 0's call refused for an argument, rank 1's good.
    A fresh dispatch's refusal voids the round (rank 1: PeerRefusedError naming rank 0); the other calls carry no
    host wait to raise from, so rank 1's call returns and rank 0 repeats it with good arguments, which pairs with it
    (error_bodies.lone_refusal_told): every result is right against the reference, and so is a round trip after."""
    results = pools(2, "nccl").run(error_bodies.lone_refusal, "nvshmem", call, name)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


@pytest.mark.gpu(2)
@needs_native
def test_second_group_refused(pools) -> None:
    pools(2, "nccl").run(gpu_bodies.second_group_refused)


CASES = [
    # hidden, experts, topk, dtype, fp8, alignment, worst
    (7168, 256, 8, "bfloat16", False, 1, 0),
    (7168, 256, 8, "bfloat16", True, 1, 0),
    (2048, 32, 1, "bfloat16", False, 4, 0),
    (4096, 64, 5, "float32", False, 1, 0),
    (2048, 64, 8, "bfloat16", False, 1, 4096),
    (4096, 16, 3, "float32", False, 8, 3000),
]


CASE_IDS = [f"h{c[0]}-e{c[1]}-k{c[2]}-{c[3]}-fp8{int(c[4])}-w{c[6]}" for c in CASES]


def _normal_case(pools, world: int, backend: str, case: tuple, seed: int, ranks_per_node: int | None) -> None:
    """bodies.normal_roundtrip of one CASES entry (rank 1 holds no tokens)."""
    hidden, experts, topk, dtype, fp8, align, worst = case
    if experts % world:
        pytest.skip("experts not divisible")
    tokens = _tokens(world, 700) if not worst else _tokens(world, 300)
    pools(world, "nccl").run(
        bodies.normal_roundtrip, backend, tokens, hidden, experts, topk, dtype, fp8, align, seed, ranks_per_node,
        worst,
    )


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("world", [2, FOUR])
@pytest.mark.parametrize("backend", ["nvshmem", "torch"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_normal_gpu(pools, world: int, backend: str, case: tuple) -> None:
    _normal_case(pools, world, backend, case, 11 + world, None)


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("world", [2, FOUR])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_normal_gpu_copy_engines(pools, world: int, case: tuple) -> None:
    """LARGEEP_TUNE comb=8: every case of test_normal_gpu on the nvshmem backend, checked as there (rank 1 holds no
    tokens). The combines of variable-size dispatches move their rows with the copy engines (counted on every
    rank, the one without tokens too); those of num_worst_tokens dispatches take the fused kernel."""
    hidden, experts, topk, dtype, fp8, align, worst = case
    if experts % world:
        pytest.skip("experts not divisible")
    tokens = _tokens(world, 700) if not worst else _tokens(world, 300)
    results = pools(world, "nccl").run(
        gpu_bodies.with_tune, "comb=8", bodies.normal_roundtrip, "nvshmem", tokens, hidden, experts, topk, dtype,
        fp8, align, 17 + world, None, worst,
    )
    counts = [r["ce"] for r in results]
    assert all(n == 0 for n in counts) if worst else all(n > 0 for n in counts), counts


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("world", [2, FOUR])
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASE_IDS[0], CASE_IDS[3]])
def test_normal_gpu_copy_engines_mixed(pools, world: int, case: tuple) -> None:
    """Rank 0 combines with the copy engines (comb=8), the others with the fused kernel (comb=3, comb=5): the rows
    and flags land alike, so the results are those of test_normal_gpu."""
    hidden, experts, topk, dtype, fp8, align, worst = case
    tunes = ["comb=8", "comb=3", "comb=5", "comb=3"][:world]
    results = pools(world, "nccl").run(
        gpu_bodies.with_tunes, tunes, bodies.normal_roundtrip, "nvshmem", _tokens(world, 700), hidden, experts,
        topk, dtype, fp8, align, 29 + world, None, worst,
    )
    assert results[0]["ce"] > 0 and all(r["ce"] == 0 for r in results[1:]), [r["ce"] for r in results]


@pytest.mark.gpu(1)
@needs_native
@pytest.mark.parametrize("backend", ["nvshmem", "torch"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=[CASE_IDS[0], CASE_IDS[1], CASE_IDS[3]])
def test_normal_gpu_one_rank(pools, backend: str, case: tuple) -> None:
    """A group of one rank: nothing crosses NVLink (the fused combine's push blocks have no peer; every row is
    this rank's own). The torch backend on a one-rank NCCL group: its CUDA paths (FP8 pairs, the worst-size
    dispatch without a host wait) where ranks sharing a GPU cannot run it."""
    _normal_case(pools, 1, backend, case, 5, None)


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("num_sms,ranks_per_node", [(1, None), (3, None), (5, 1)])
def test_normal_gpu_odd_sms(pools, num_sms: int, ranks_per_node: int | None) -> None:
    """An odd number of SMs per kernel (no kernel pairs its blocks), on one node (push + reduce or fused combine)
    and on two nodes of one rank (the inter-node kernels)."""
    hidden, experts, topk, dtype, fp8, align, worst = CASES[0]
    pools(2, "nccl").run(
        bodies.normal_roundtrip, "nvshmem", _tokens(2, 300), hidden, experts, topk, dtype, fp8, align, 23,
        ranks_per_node, worst, None, None, num_sms,
    )


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("tokens,num_sms,ranks_per_node,fp8", [
    ([3000, 1025], None, None, False),  # 3 and 2 prepare blocks per rank (24 SMs)
    ([2049, 4000], 5, None, True),      # 2 (the SM budget), chunks of 1056 and 2016 tokens
    ([4100, 0], 3, None, False),        # one block per rank (3 SMs for 2 ranks), 5 iterations
    ([2500, 1800], None, 1, False),     # two nodes of one rank: rank and node targets, 3 and 2 blocks each
    ([1024, 1023], 24, None, False),    # one block: kThreads tokens exactly, and one fewer
])
def test_normal_prepare_chunks(pools, tokens: list[int], num_sms: int | None, ranks_per_node: int | None,
                               fp8: bool) -> None:
    """Calls of more than 1024 tokens: the prepare kernel runs several blocks per destination (chunks of tokens
    whose positions meet through a look-back), as many as the SM budget allows; positions, counts, the tokens a
    rank keeps for itself and the node positions must equal the reference's (bodies.normal_roundtrip checks the
    layout, every dispatched row and the combine)."""
    pools(2, "nccl").run(
        bodies.normal_roundtrip, "nvshmem", tokens, 2048, 64, 8, "bfloat16", fp8, 1, 41, ranks_per_node, 0, None,
        None, num_sms,
    )


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("world", [2, FOUR])
def test_normal_gpu_repeat_identical(pools, world: int) -> None:
    for seed in range(3):  # each seed twice: the combine bit for bit the same (float32 sums in a fixed order)
        runs = [pools(world, "nccl").run(
            bodies.normal_roundtrip, "nvshmem", _tokens(world, 4096 - 37 * world), 7168, 256, 8, "bfloat16",
            False, 1, 100 + seed,
        ) for _ in range(2)]
        assert runs[0] == runs[1], f"seed {100 + seed}: a rerun gave other bits"


LL_CASES = [
    # max tokens, hidden, experts, topk, fp8, round_scale, hook
    (128, 7168, 288, 8, True, False, False),
    (128, 7168, 288, 8, False, False, True),
    (64, 2048, 32, 3, True, True, True),
    (16, 4096, 8, 1, True, "ue8m0", False),  # (scales rounded through use_ue8m0)
    # more tokens than the send's blocks (2 per SM), rows of more 16-byte vectors than a block loads ahead, more
    # than 64 scales per row
    (512, 16384, 16, 4, True, False, False),
    (320, 16384, 16, 4, False, False, True),
]


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("world", [2, FOUR])
@pytest.mark.parametrize("case", LL_CASES, ids=[f"m{c[0]}-h{c[1]}-e{c[2]}-k{c[3]}-fp8{int(c[4])}-hook{int(c[6])}"
                                                for c in LL_CASES])
def test_low_latency_gpu(pools, world: int, case: tuple) -> None:
    m, hidden, experts, topk, fp8, round_scale, hook = case
    if experts % world:
        pytest.skip("experts not divisible")
    tokens = [m - 3 * r if r != 1 else 0 for r in range(world)]
    tokens[0] = m
    pools(world, "nccl").run(
        bodies.low_latency_roundtrip, "nvshmem", tokens, m, hidden, experts, topk, fp8, round_scale, hook, 5 + world
    )


@pytest.mark.gpu(2)
@needs_native
def test_low_latency_ops_weighted(pools) -> None:
    """The custom-op path (and torch.compile) of a low-latency dispatch given topk_weights, on the nvshmem
    kernels: equal to the eager calls bit for bit, a copy of the weights refused at the combine."""
    pools(2, "nccl").run(bodies.low_latency_ops_weighted, "nvshmem", [40, 23], 40, 2048, 16, 8, 29)


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("tune", ["", "ll_fuse=1", "ll_spread=0"])
@pytest.mark.parametrize("world", [2, FOUR])
def test_low_latency_weighted(pools, world: int, tune: str) -> None:
    """low_latency_dispatch given topk_weights: the combine sums each token's rows on the experts' ranks (float32,
    sent as two bf16 rows where a token has two or more experts on a rank) and equals the reference, with every
    rank or only some giving weights, FP8 and BF16, hooks, repeated experts (the property tests), the put path and
    a CUDA graph whose replays change the weights in place; under each LARGEEP_TUNE low-latency path."""
    pool = pools(world, "nccl")
    for i, (m, hidden, experts, topk, fp8, round_scale, hook) in enumerate(LL_CASES[:4]):
        tokens = [max(1, m - 3 * r) if r != 1 else min(m, 40) for r in range(world)]
        pool.run(gpu_bodies.with_tune, tune, bodies.low_latency_roundtrip, "nvshmem", tokens, m, hidden, experts,
                 topk, fp8, round_scale, hook and tune != "ll_fuse=1", 11 + i, None, ("all", "some")[i % 2])
    # top-16 of 32 experts: about 8 entries per received row (more than the 8 loads a warp keeps in flight), and the
    # combine receive's path for K > 8
    pool.run(gpu_bodies.with_tune, tune, bodies.low_latency_roundtrip, "nvshmem", [40 - r for r in range(world)], 40,
             1024, 32, 16, False, False, False, 23, None, "some")
    # the put path: 2 nodes emulated (ranks_per_node world // 2)
    pool.run(gpu_bodies.with_tune, tune, bodies.low_latency_roundtrip, "nvshmem", [128 - 5 * r for r in range(world)],
             128, 7168, 288, 8, True, False, False, 9, world // 2, "some")
    pool.run(gpu_bodies.with_tune, tune, gpu_bodies.low_latency_graph, 20, 128, 7168, 288, 8, True)
    pool.run(gpu_bodies.with_tune, tune, bodies.low_latency_roundtrip_inference, "nvshmem", [64] * world, 64, 2048,
             32, 4, False, False, True, 19, None, "all")
    # ids set to -1 in place after the dispatch, unseen (inference mode): the combine keeps the dispatch's
    pool.run(gpu_bodies.with_tune, tune, bodies.low_latency_roundtrip_inference, "nvshmem", [64] * world, 64, 2048,
             32, 4, False, False, True, 19, None, "all", True)


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("tune", ["", "ll_fuse=1", "ll_spread=0"])
@pytest.mark.parametrize("world", [2, FOUR])
def test_low_latency_bf16_partial_sums(pools, world: int, tune: str) -> None:
    """bf16_partial_sums on the nvshmem kernels: bit for bit against the float64 reference of exact values (each
    rank's sum of a token's experts rounded to bf16 where it has two or more there), at SPEC's low-latency size with
    a hook, FP8; with ranks in the three modes mixed, repeated experts, and over the put path (2 nodes emulated);
    a CUDA graph replayed on fresh weights; under each LARGEEP_TUNE low-latency path."""
    pool = pools(world, "nccl")
    hook = tune != "ll_fuse=1"
    mixed = ["bf16", "split", "none", "bf16"][:world]
    body = bodies.low_latency_partial_sums
    pool.run(gpu_bodies.with_tune, tune, body, "nvshmem", [128 - 5 * r for r in range(world)], 128, 7168, 288, 8, 61,
             ["bf16"] * world, hook, None, True, True)
    pool.run(gpu_bodies.with_tune, tune, body, "nvshmem", [40 - 3 * r for r in range(world)], 40, 1024, 32, 8, 62,
             mixed, hook, None, False)
    pool.run(gpu_bodies.with_tune, tune, body, "nvshmem", [64 - r for r in range(world)], 64, 2048, 48, 6, 63, mixed,
             False, world // 2, True)
    pool.run(gpu_bodies.with_tune, tune, gpu_bodies.low_latency_graph, 10, 128, 7168, 288, 8, True, True)


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("tune", ["", "ll_fuse=1", "ll_spread=0"])
@pytest.mark.parametrize("ranks_per_node", [None, 1], ids=["one-node", "2-nodes"])
def test_low_latency_combine_ids_mask(pools, tune: str, ranks_per_node: int | None) -> None:
    """A low-latency combine given other ids than its dispatch (no weights sent): k adds iff the dispatch sent it and
    the combine names an expert there, with the dispatch's expert's row (before, the nvshmem combine took which
    copies exist from its own ids and read a stale row where the dispatch had sent none), against the torch
    backend and float64 sums, without and with hooks; counts raised in place are bounded; an eager combine of a
    never-replayed captured dispatch's handle does not fault. One node and 2 nodes of 1 (puts); under each
    LARGEEP_TUNE low-latency path."""
    results = pools(2, "nccl").run(gpu_bodies.with_tune, tune, gpu_bodies.low_latency_combine_mask, [40, 27], 40,
                                   2048, 16, 8, ranks_per_node)
    if tune == "ll_fuse=1":
        assert all(r["fused"] > 0 for r in results), f"no fused launch: {results}"


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("world", [2, FOUR])
def test_low_latency_graph_and_double_buffer(pools, world: int) -> None:
    pools(world, "nccl").run(gpu_bodies.low_latency_two_in_flight, 128, 7168, 288, 8)
    pools(world, "nccl").run(gpu_bodies.low_latency_graph, 100, 128, 7168, 288, 8)


@pytest.mark.gpu(2)
@needs_native
def test_low_latency_fp8_disagree(pools) -> None:
    """Ranks whose low-latency dispatches differ in use_fp8: every rank's next call raises, naming a sender."""
    pools(2, "nccl").run(gpu_bodies.low_latency_fp8_disagree)


@pytest.mark.gpu(2)
@needs_native
def test_low_latency_rounds_past_2_31(pools) -> None:
    """A Buffer's rounds 2**31 - 3 to 2**31 + 4 and 2**32 - 3 to 2**32 + 4, each checked: the count words carry the
    round beside the count (with the round in the word's high 32 bits, every dispatch from round 2**31 on failed)."""
    pools(2, "nccl").run(gpu_bodies.low_latency_rounds, 8, 96, 2048, 16, 4, 2**31 - 4)
    pools(2, "nccl").run(gpu_bodies.low_latency_rounds, 8, 96, 2048, 16, 4, 2**32 - 4)


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("world", [2, FOUR])
@pytest.mark.parametrize("tokens", [96, 2500])
def test_normal_worst_graph(pools, world: int, tokens: int) -> None:
    """Normal mode with num_worst_tokens (no host wait): dispatch + combine captured in a CUDA graph, replayed
    (2500 tokens: the prepare kernel's blocks per destination meet through their scratch on every replay)."""
    pools(world, "nccl").run(gpu_bodies.normal_worst_graph, 20 if tokens < 1024 else 8, tokens, 2048, 32, 8)


@pytest.mark.gpu(1)
def test_normal_worst_graph_torch_one_rank(pools) -> None:
    """The torch backend's fresh num_worst_tokens dispatch captured in a CUDA graph (one rank on NCCL: ranks
    cannot share a GPU there): it made its call signature from a host list, which a capture refuses."""
    pools(1, "nccl").run(gpu_bodies.normal_worst_graph, 10, 96, 2048, 32, 8, "torch")


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("tune", ["ll_fuse=1", "ll_fuse=0", "ll_spread=0"])
@pytest.mark.parametrize("world", [2, FOUR])
def test_low_latency_tune(pools, world: int, tune: str) -> None:
    """The low-latency paths that LARGEEP_TUNE picks. ll_fuse=1: a dispatch or combine without a hook runs as one
    kernel (the tests check that it did); ll_fuse=0 (the default): as two (send, then receive; the tests check that
    no fused kernel ran); ll_spread=0: the dispatch receive and the combine send with one block per local expert.
    The reference cases above without hooks, 20 rounds without host syncs with the ranks out of step, 100 graph
    replays on fresh data, and the put path (2 nodes emulated)."""
    pool = pools(world, "nccl")

    def run(*args: object) -> None:
        results = pool.run(gpu_bodies.with_tune, tune, *args)
        if tune == "ll_fuse=1":
            assert all(r["fused"] > 0 for r in results), f"no fused launch: {results}"
        else:
            assert all(r["fused"] == 0 for r in results), f"fused launches with {tune}: {results}"

    for m, hidden, experts, topk, fp8, round_scale, _hook in LL_CASES:
        if experts % world:
            continue
        tokens = [max(1, m - 3 * r) if r != 1 else min(m, 40) for r in range(world)]
        run(bodies.low_latency_roundtrip, "nvshmem", tokens, m, hidden, experts, topk, fp8, round_scale, False,
            7 + world)
    run(gpu_bodies.low_latency_rounds, 20, 96, 2048, 8 * world, 4)
    run(gpu_bodies.low_latency_graph, 100, 128, 7168, 288, 8)
    run(gpu_bodies.low_latency_put_path, world // 2, "nvshmem", [128 - 5 * r for r in range(world)], 128, 7168, 288,
        8, True, False, False, 9)


@pytest.mark.gpu(2)
@needs_native
def test_config_mismatch_refused(pools) -> None:
    """Ranks disagreeing on the symmetric layout (LARGEEP_ZERO_COPY_SLOTS) or on the combine protocol
    (LARGEEP_TUNE comb 0 or not) are refused on every rank."""
    pools(2, "nccl").run(gpu_bodies.config_mismatch_refused)


@pytest.mark.gpu(2)
@needs_native
def test_zero_copy_slots(pools) -> None:
    """Dispatch outputs as views of receive slots: lifetime, reuse, fallback to the copy slot, the setting off."""
    pools(2, "nccl").run(gpu_bodies.zero_copy_slots)


@pytest.mark.gpu(1)
@needs_native
@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.gpu(2))])
@pytest.mark.parametrize("mode", ["plain", "weights", "partial"])
def test_low_latency_skipped_not_finite(pools, world: int, mode: str) -> None:
    """The kernels leave out the k a combine skips (masked, or not sent), inf there or not, as the torch backend
    does."""
    pools(world, "nccl").run(bodies.low_latency_skipped_not_finite, "nvshmem", mode)


@pytest.mark.gpu(1)
@needs_native
@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.gpu(2))])
@pytest.mark.parametrize("round_scale", [False, True])
def test_low_latency_fp8_not_finite(pools, world: int, round_scale: bool) -> None:
    """The kernels' FP8 quantiser on NaN and infinities: as largeep.fp8 (the group NaN after dequantising; before,
    a NaN became -448 times the scale and an infinity -inf)."""
    pools(world, "nccl").run(bodies.low_latency_fp8_not_finite, "nvshmem", round_scale)


@pytest.mark.gpu(1)
@needs_native
def test_low_latency_layout_too_large(pools) -> None:
    """A layout on a low-latency Buffer whose experts the layout kernel cannot count is refused, naming the sizes."""
    pools(1, "nccl").run(gpu_bodies.low_latency_layout_too_large)


@pytest.mark.gpu(1)
@needs_native
def test_low_latency_fp8_bits(pools) -> None:
    """The kernels' FP8 rows are largeep.fp8.quantize's bits exactly (2 x 7.3M values)."""
    for res in pools(1, "nccl").run(gpu_bodies.low_latency_fp8_bits, 1024, 7168):
        assert res["compared"] == 2 * 1024 * 7168, res


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_low_latency_raised_after_send(pools, op: str) -> None:
    """An exception between a low-latency send and its receive makes the Buffer refuse later calls, naming it."""
    pools(2, "nccl").run(gpu_bodies.low_latency_raised_after_send, op)


@pytest.mark.gpu(2)
@needs_native
def test_destroy_keeps_held_outputs(pools) -> None:
    """destroy() with a dispatch output alive on one rank keeps the memory on every rank (not reused under it)."""
    pools(2, "nccl").run(gpu_bodies.destroy_keeps_held_outputs)


@pytest.mark.gpu(1)
@needs_native
def test_low_latency_hook_capture(pools) -> None:
    pools(1, "nccl").run(gpu_bodies.low_latency_hook_capture)


@pytest.mark.gpu(1)
@pytest.mark.parametrize("backend,world", [pytest.param("nvshmem", 1, marks=needs_native),
                                           pytest.param("nvshmem", 2, marks=(needs_native, pytest.mark.gpu(2))),
                                           ("torch", 1), pytest.param("torch", 2, marks=pytest.mark.gpu(2))])
def test_previous_event_orders(pools, backend: str, world: int) -> None:
    """previous_event and async_finish on events that matter (a write on a side stream 50 ms late), both modes."""
    pools(world, "nccl").run(gpu_bodies.previous_event_orders, backend)


@pytest.mark.gpu(2)
@needs_native
def test_low_latency_send_holds_nothing(pools) -> None:
    """Hook mode: rank 0's send ends (device synchronised) while the others start 0.5 s late; its hooks then
    receive right."""
    results = pools(2, "nccl").run(gpu_bodies.low_latency_send_holds_nothing)
    assert results[0]["dispatch_send_s"] < 0.2 and results[0]["combine_send_s"] < 0.2, results


@pytest.mark.gpu(1)
@needs_native
def test_normal_stream_edges(pools) -> None:
    """A fresh variable-size dispatch refused inside a capture; the layout's async event; a finished call's event
    given to another Buffer; a previous_event of the wrong type refused (one rank)."""
    pools(1, "nccl").run(gpu_bodies.normal_stream_edges, "nvshmem")


@pytest.mark.gpu(2)
@needs_native
def test_worst_tokens_too_small(pools) -> None:
    """num_worst_tokens below the rows received: no write past the output, and a clear error at the next call."""
    pools(2, "nccl").run(gpu_bodies.worst_too_small)


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("world", [2, FOUR])
def test_missing_peer_times_out(pools, world: int) -> None:
    times = pools(world, "nccl").run(gpu_bodies.missing_peer, 5.0)
    assert all(t["elapsed_s"] > 4.0 for r, t in enumerate(times) if r != 1), times


@pytest.mark.gpu(1)
@needs_native
@pytest.mark.parametrize("low_latency", [False, True])
def test_parts_on_buffer_stream(pools, low_latency: bool) -> None:
    """The tensors a Buffer's kernels keep using are allocated on the Buffer's stream (a Buffer dropped without
    destroy() cannot hand them to the caller's stream while its kernels still use them)."""
    pools(1, "nccl").run(gpu_bodies.parts_on_buffer_stream, low_latency)


@pytest.mark.gpu(2)
@needs_native
def test_failed_count_wait_frees_memory(pools) -> None:
    """A fresh dispatch that took a zero-copy slot and failed at its count wait (a peer missing) gives the slot
    back, and destroy frees the symmetric memory on every rank instead of keeping it for outputs that do not exist."""
    results = pools(2, "nccl").run(gpu_bodies.failed_count_wait_frees_memory, 5.0)
    assert all(r["freed"] > 0 for r in results), results


@pytest.mark.gpu(1)
@needs_native
def test_host_wait_sees_cuda_fault() -> None:
    """A CUDA fault before a dispatch's count exchange reaches the caller as RuntimeError naming the CUDA error at
    once, not as PeerTimeoutError after the bound (a pool of its own: the fault leaves its CUDA context unusable)."""
    results = run_in_own_pool(1, "nccl", gpu_bodies.host_wait_sees_cuda_fault, 5.0)
    assert results[0]["elapsed_s"] < 2.0, results


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("where", ["planes", "state", "worst"])
def test_dispatch_outputs_out_of_memory(pools, where: str) -> None:
    """A dispatch that cannot make its outputs after its sends (out of memory) raises and drains its round, its
    zero-copy slot given back: the other ranks' call completes, and every rank's Buffer takes the next rounds with
    the right rows."""
    pools(2, "nccl").run(gpu_bodies.outputs_out_of_memory, where)


@pytest.mark.gpu(2)
@needs_native
def test_failed_copyout_launch(pools) -> None:
    """A dispatch that raises between its sends and its copy-out in a way it cannot drain (the copy-out's launch
    fails) marks its Buffer unusable, and the other ranks' next call names that rank after the bound instead of
    reading a stale round."""
    times = pools(2, "nccl").run(gpu_bodies.failed_copyout_launch, 5.0)
    assert times[0]["elapsed_s"] > 4.0, times


@pytest.mark.gpu(2)
@needs_native
def test_failed_reduce_launch(pools) -> None:
    """A push + reduce combine that raises between its push and its reduce marks its Buffer unusable (its next
    combine would have summed the round before's rows); the other ranks' combine is right."""
    pools(2, "nccl").run(gpu_bodies.with_tune, "comb=0", gpu_bodies.failed_reduce_launch, 5.0)


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("variant", ["dtype", "fp8", "no_wait"])
def test_kinds_disagree(pools, variant: str) -> None:
    """A void round of ranks that disagree on the kind of rows: every waiting rank raises naming each rank's kind
    (the Buffer usable, unless a rank ran it with num_worst_tokens: that one learns it at its next call). (Also the
    bad-input table's dispatch_ranks_disagree cases, on 2 GPUs.)"""
    pools(2, "nccl").run(gpu_bodies.kinds_disagree, variant)


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize(("tune", "ranks_per_node"),
                         [("comb=0", None), ("comb=3", None), ("comb=8", None), ("comb=3", 1)],
                         ids=["push_reduce", "fused", "copy_engines", "two_nodes"])
def test_late_peer_gets_no_stale_sums(pools, tune: str, ranks_per_node: int | None) -> None:
    """A peer more than LARGEEP_TIMEOUT_S late meets a timeout, not the sums of the round before: a kernel queued
    after one that gave up raises no flag that says its rows or partial sums are in place."""
    times = pools(2, "nccl").run(gpu_bodies.with_tune, tune, gpu_bodies.late_peer, 4.0, ranks_per_node)
    assert all(3.0 < r["result"]["elapsed_s"] < 30.0 for r in times), times


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("variant", ["fp8", "dtype", "y_dtype", "weights", "handle_dispatch", "handle_combine"])
@pytest.mark.parametrize(("tune", "ranks_per_node"),
                         [("comb=0", None), ("comb=3", None), ("comb=8", None), ("comb=0", 1)],
                         ids=["push_reduce", "fused", "copy_engines", "two_nodes"])
def test_calls_kinds_disagree(pools, variant: str, tune: str, ranks_per_node: int | None) -> None:
    """Ranks that differ in a cached dispatch's kind of rows or a combine's y dtype or weights: the receivers see
    the sender's kind in its flag, leave the rows unread, and every rank's next call raises naming a sender; a round
    of one kind (a rank with no tokens among them) passes."""
    pools(2, "nccl").run(gpu_bodies.with_tune, tune, gpu_bodies.calls_kinds_disagree, variant, ranks_per_node)


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("mode", ["plain", "hook", "fused"])
@pytest.mark.parametrize("ranks_per_node", [None, 1], ids=["one_node", "two_nodes"])
def test_low_latency_handles_disagree(pools, mode: str, ranks_per_node: int | None) -> None:
    """Ranks that combine handles of different low-latency dispatches: every rank's next call raises naming a
    sender (the done flags carry the handle's tag), on the NVLink and the put paths; the same combines in one order
    pass and are right."""
    tune = "ll_fuse=1" if mode == "fused" else "ll_fuse=0"
    results = pools(2, "nccl").run(gpu_bodies.with_tune, tune, gpu_bodies.low_latency_handles_disagree, mode,
                                   ranks_per_node)
    if mode == "fused":
        assert all(r["fused"] > 0 for r in results), results


@pytest.mark.gpu(2)
@needs_native
def test_calls_kinds_disagree_bf16_partials(pools) -> None:
    """Ranks of two nodes that differ in the combine's bf16_partial_sums: each reads the other's partial sums only
    if its signature says they are of its own kind, else the next call raises naming the sender."""
    pools(2, "nccl").run(gpu_bodies.with_tune, "comb=0", gpu_bodies.calls_kinds_disagree, "partials", 1)


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("worst", [False, True])
def test_normal_combine_bf16_partials(pools, worst: bool) -> None:
    """bodies.normal_combine_bf16_partials on the nvshmem backend, 2 nodes of one rank: bf16 partials that are one
    row each, so the same bits as without the flag (and as the reference), with half the bytes put."""
    pools(2, "nccl").run(bodies.normal_combine_bf16_partials, "nvshmem", [6, 0], 2048, 1, worst)


@pytest.mark.gpu(2)
@needs_native
def test_missing_peer_times_out_low_latency(pools) -> None:
    """The low-latency mode's bounded waits: a rank that never calls costs the others one LARGEEP_TIMEOUT_S, named
    at their next call."""
    times = pools(2, "nccl").run(gpu_bodies.missing_peer, 5.0, True)
    assert times[0]["elapsed_s"] > 4.0, times


@pytest.mark.gpu(2)
@needs_native
def test_destroy_without_peer() -> None:
    """A rank that never destroys its Buffer costs the others one bounded wait, not a hang (a pool of its own:
    NVSHMEM is unusable in these processes afterwards)."""
    from dist_pool import run_in_own_pool

    times = run_in_own_pool(2, "nccl", gpu_bodies.destroy_without_peer, 5.0)
    assert times[0]["elapsed_s"] > 4.0, times


@pytest.mark.gpu(1)
@needs_native
@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.gpu(2))])
def test_num_sms_of_the_gpu(pools, world: int) -> None:
    """num_sms above the real GPU's SM count is refused on every rank; the count itself runs a checked round."""
    for r in pools(world, "nccl").run(gpu_bodies.num_sms_of_the_gpu):
        assert f"argument 'num_sms' = {r['sms'] + 1} is more than the GPU's {r['sms']} SMs" in r["message"], r
        assert not r["failures"], r["failures"]


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("low_latency", [False, True], ids=["normal", "low_latency"])
def test_peer_exits(low_latency: bool) -> None:
    """A rank whose process exits before a dispatch: the others raise PeerTimeoutError naming the call and that
    rank within LARGEEP_TIMEOUT_S (5 s), refuse the next call at once, and destroy within the bound (a pool of its
    own: its group and NVSHMEM lose that rank)."""
    from dist_pool import run_in_own_pool

    res = run_in_own_pool(2, "nccl", gpu_bodies.peer_exits, 5.0, low_latency, exits=frozenset({1}))
    assert res[1] == ("exited", 3), res
    op = "low_latency_dispatch" if low_latency else "dispatch"
    r = res[0]
    print(f"peer exits ({op}): rank 0 {r}")  # (for a run's log: pytest -s prints it)
    assert r["elapsed_s"] < 15.0 and r["again_s"] < 1.0 and r["destroy_s"] < 15.0, r
    assert op in r["message"] and "rank 1" in r["message"], r
    # a normal dispatch raises from its own host wait; a low-latency one's receive gives up on the device, which the
    # next call reports as an earlier call's (as the normal mode's next call does)
    assert ("an earlier" in r["message"]) == low_latency and "an earlier" in r["again"], r
    assert "destroy" not in r or ("destroy" in r["destroy"] and "rank 1" in r["destroy"]), r
    # (told in words: no "[false]" of an assert, the source named from csrc/ on)
    assert "destroy" not in r or ("[false]" not in r["destroy"] and "(csrc/runtime/" in r["destroy"]), r


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("world,ranks_per_node,m", [(2, 1, 128), pytest.param(4, 2, 128, marks=pytest.mark.gpu(4)),
                                                    pytest.param(4, 1, 128, marks=pytest.mark.gpu(4)), (2, 1, 320)])
def test_low_latency_put_path(pools, world: int, ranks_per_node: int, m: int) -> None:
    """Peers on another (emulated) node are reached with NVSHMEM puts and signals instead of NVLink stores (m 320:
    more tokens than the send's blocks, so a block sends several)."""
    tokens = [m - 5 * r for r in range(world)]
    pools(world, "nccl").run(
        gpu_bodies.low_latency_put_path, ranks_per_node, "nvshmem", tokens, m, 7168, 288, 8, True, False, True, 9
    )


@pytest.mark.gpu(2)
@needs_native
@pytest.mark.parametrize("world,ranks_per_node", [pytest.param(2, 1, id="2x1"),
                                                 pytest.param(4, 2, marks=pytest.mark.gpu(4), id="2x2"),
                                                 pytest.param(4, 1, marks=pytest.mark.gpu(4), id="4x1")])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_normal_internode(pools, world: int, ranks_per_node: int, case: tuple) -> None:
    """One host split into nodes (ranks_per_node below the host size): rows for other nodes take the RDMA leg
    (NVSHMEM puts, once per node) and the forwarder's NVLink leg; combine sums per node first. Same reference."""
    _normal_case(pools, world, "nvshmem", case, 31 + world, ranks_per_node)


SHARED_GPUS = os.environ.get("LARGEEP_TEST_SHARED_GPUS") == "1"
needs_shared = pytest.mark.skipif(
    not SHARED_GPUS, reason="LARGEEP_TEST_SHARED_GPUS=1 runs 4 ranks on 2 GPUs (NVSHMEM's several PEs per GPU; slow)"
)


@pytest.mark.gpu(2)
@needs_native
@needs_shared
@pytest.mark.parametrize("ranks_per_node", [None, 2, 1])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=[CASE_IDS[0], CASE_IDS[1], CASE_IDS[3]])
def test_normal_four_ranks_shared_gpus(pools, ranks_per_node: int | None, case: tuple) -> None:
    """4 ranks of a gloo group on 2 GPUs, 2 per GPU: the 4-rank paths (one node of 4, 2 x 2, 4 x 1) for correctness
    where no 4-GPU machine is lent (their kernels take turns on a GPU, so no timing means anything here)."""
    hidden, experts, topk, dtype, fp8, align, worst = case
    pools(4, "gloo-cuda").run(
        bodies.normal_roundtrip, "nvshmem", _tokens(4, 300), hidden, experts, topk, dtype, fp8, align, 31,
        ranks_per_node, worst,
    )


@pytest.mark.gpu(2)
@needs_native
@needs_shared
@pytest.mark.parametrize("variant", ["fp8", "y_dtype", "weights", "handle_combine", "partials"])
def test_calls_kinds_disagree_four_ranks_shared_gpus(pools, variant: str) -> None:
    """test_calls_kinds_disagree on 2 nodes of 2 ranks (4 ranks on 2 GPUs): the forwarders that meet the other
    kind raise their flags poisoned, so every rank's next call raises, none times out."""
    pools(4, "gloo-cuda").run(gpu_bodies.calls_kinds_disagree, variant, 2)


@pytest.mark.gpu(1)
@needs_native
@needs_shared
@pytest.mark.parametrize("ranks_per_node", [None, 17], ids=["one-node", "2-nodes"])
def test_low_latency_many_ranks_shared_gpus(ranks_per_node: int | None) -> None:
    """34 ranks, 0-16 on GPU 0 and 17-33 on GPU 1 (all on GPU 0 where only one is visible): more ranks than the 32
    the normal mode takes, so every per-rank step of the low-latency kernels loops over ranks; one node (NVLink
    stores to every peer) and 2 nodes of 17, one per GPU (NVSHMEM puts to the other GPU's ranks). A pool of its own,
    closed afterwards (34 processes)."""
    from dist_pool import DistPool

    world = 34
    gpus = min(torch.cuda.device_count(), 2)  # the GPUs there are, not the emulated count
    tokens = [8 - r % 3 if r != 1 else 0 for r in range(world)]
    pool = DistPool(world, "gloo-cuda:" + ",".join(str(r * gpus // world) for r in range(world)), timeout_s=600)
    try:
        pool.run(bodies.low_latency_roundtrip, "nvshmem", tokens, 8, 256, 2 * world, 4, True, False, True, 43,
                 ranks_per_node)
    finally:
        pool.close(force=True)


@pytest.mark.gpu(1)
@needs_native
@needs_shared
@pytest.mark.parametrize("ranks_per_node", [None, 6], ids=["one-node", "2-nodes"])
def test_low_latency_many_destinations_one_gpu(ranks_per_node: int | None) -> None:
    """12 ranks on one GPU, top-16 of 24 experts: most tokens go to more than 8 ranks, so the dispatch send takes
    its destinations past the 8 it holds in registers from shared memory; one node (NVLink stores) and 2 nodes of 6
    (staged rows and NVSHMEM puts). FP8 with a hook, the even ranks' weights sent, rank 1 without tokens; then BF16
    with repeated experts, ranks without weights, with split sums and with bf16 partial sums mixed, the combine
    bit for bit against float64 sums. A pool of its own, closed afterwards."""
    from dist_pool import DistPool

    world = 12
    tokens = [6 - r % 3 if r != 1 else 0 for r in range(world)]
    modes = [("none", "split", "bf16")[r % 3] for r in range(world)]
    pool = DistPool(world, "gloo-cuda0", timeout_s=300)
    try:
        pool.run(bodies.low_latency_roundtrip, "nvshmem", tokens, 8, 256, 24, 16, True, False, True, 47,
                 ranks_per_node, "some")
        pool.run(bodies.low_latency_partial_sums, "nvshmem", tokens, 8, 256, 24, 16, 53, modes, True,
                 ranks_per_node, False, False)
    finally:
        pool.close(force=True)


@pytest.mark.gpu(1)
@needs_native
@needs_shared
@pytest.mark.parametrize("ranks_per_node", [None, 2], ids=["one-node", "2-nodes"])
def test_normal_tokens_per_round_one_gpu(pools, ranks_per_node: int | None) -> None:
    """Buffer(tokens_per_round=...) on the nvshmem backend, 4 ranks on one GPU (rank 1 without tokens): calls in 5 to
    26 rounds against the reference (BF16 with the cached path, FP8, float32 with the adjoint check),
    and against a Buffer of one round bit for bit, with a bad id refused in the last round (one node: zero-copy
    receive slots per round; 2 nodes: the RDMA
    and forwarding legs per round)."""
    tokens = _tokens(4, 300)
    pool = pools(4, "gloo-cuda0")
    for case, per_round in ((CASES[0], 100), (CASES[1], 37), (CASES[3], 16)):
        hidden, experts, topk, dtype, fp8, align, _ = case
        pool.run(bodies.normal_roundtrip, "nvshmem", tokens, hidden, experts, topk, dtype, fp8, align, 61,
                 ranks_per_node, 0, per_round)
    for fp8 in (False, True):
        pool.run(bodies.rounds_match_one_round, "nvshmem", tokens, 2048, 32, 8, "bfloat16", fp8, 128, 67,
                 ranks_per_node)


@pytest.mark.gpu(1)
def test_normal_tokens_per_round_torch_one_rank(pools) -> None:
    """Buffer(tokens_per_round=...) on the torch backend with CUDA tensors, a group of one rank on NCCL: the rounds'
    receive offsets (host lists) reach the GPU in one pinned, non-blocking copy (rounds.stack_offsets); results
    against one round bit for bit."""
    pools(1, "nccl").run(bodies.rounds_match_one_round, "torch", [700], 4096, 16, 8, "bfloat16", False, 256, 79)
    pools(1, "nccl").run(bodies.rounds_match_one_round, "torch", [517], 7168, 16, 8, "bfloat16", True, 200, 83)


@pytest.mark.gpu(2)
@pytest.mark.parametrize("backend", [pytest.param("nvshmem", marks=needs_native), "torch"])
def test_normal_tokens_per_round(pools, backend: str) -> None:
    """Buffer(tokens_per_round=...) on 2 GPUs (an NCCL group: the torch backend on CUDA tensors, each rank on its
    own GPU), against one round."""
    pools(2, "nccl").run(bodies.rounds_match_one_round, backend, [700, 0], 4096, 64, 8, "bfloat16", False, 256, 71)
    pools(2, "nccl").run(bodies.rounds_match_one_round, backend, [300, 517], 7168, 64, 8, "bfloat16", True, 200, 73)


def _normal_rounds_on_shared_gpus(world: int, empty: tuple[int, ...], per_nodes: tuple[int | None, ...],
                                  topk: int, topk_f32: int, refusers: list[int], seed: int) -> None:
    """``world`` ranks, the first half on GPU 0 and the rest on GPU 1 (all on GPU 0 where only one is visible), no
    tokens on the ranks in ``empty``, 2 experts per rank; for each ranks_per_node in ``per_nodes``: BF16 (top-k
    ``topk``) with alignment and the cached path, FP8 with num_worst_tokens, float32 (top-k ``topk_f32``) with the
    adjoint check, then refusals from ``refusers`` (every other rank names exactly those) and a good round after
    them; seeds ``seed``..``seed`` + 2. A pool of its own, closed afterwards."""
    import error_bodies
    from dist_pool import DistPool

    gpus = min(torch.cuda.device_count(), 2)  # the GPUs there are, not the emulated count
    tokens = [0 if r in empty else 5 + (r * 7) % 19 for r in range(world)]
    pool = DistPool(world, "gloo-cuda:" + ",".join(str(r * gpus // world) for r in range(world)), timeout_s=900)
    try:
        for per_node in per_nodes:
            pool.run(bodies.normal_roundtrip, "nvshmem", tokens, 2048, 2 * world, topk, "bfloat16", False, 4, seed,
                     per_node)
            pool.run(bodies.normal_roundtrip, "nvshmem", tokens, 2048, 2 * world, topk, "bfloat16", True, 1,
                     seed + 1, per_node, world * max(tokens))
            pool.run(bodies.normal_roundtrip, "nvshmem", tokens, 1024, 2 * world, topk_f32, "float32", False, 1,
                     seed + 2, per_node)
            results = pool.run(error_bodies.some_ranks_refuse, "nvshmem", refusers, 2 * world * 4 + 5,
                               [1 + t % 16 for t in tokens], False, per_node)
            assert all(not r["failures"] for r in results), [r["failures"] for r in results if r["failures"]]
    finally:
        pool.close(force=True)


@pytest.mark.gpu(1)
@needs_native
@needs_shared
@pytest.mark.parametrize("world,ranks_per_node,worst", [(3, None, False), (4, None, False), (4, 2, False),
                                                         (3, None, True), (4, 2, True)])
def test_normal_combine_float32_sums_shared_gpus(pools, world: int, ranks_per_node: int | None, worst: bool) -> None:
    """The nvshmem combine's float32 accumulation, bit for bit, on 3 and 4 ranks sharing the GPUs (4 as 2 nodes of
    2: the forwarder's partial sums and the reduce over nodes); values whose BF16 sums differ; after a
    num_worst_tokens dispatch too (its tail rows NaN in y)."""
    pools(world, "gloo-cuda").run(bodies.normal_combine_exact, "nvshmem", [5, 0, 7, 3][:world], 2048, ranks_per_node,
                                  worst)


@pytest.mark.gpu(2)
@needs_native
@needs_shared
@pytest.mark.parametrize("ranks_per_node,worst,per_round", [(2, False, None), (2, True, None), (1, False, None),
                                                            (2, False, 3)])
def test_normal_combine_bf16_partials_shared_gpus(pools, ranks_per_node: int, worst: bool,
                                                  per_round: int | None) -> None:
    """bodies.normal_combine_bf16_partials on the nvshmem backend, 4 ranks sharing the GPUs: 2 nodes of 2 (the
    forwarders' bf16 partials, bit for bit against the reference, which differs there from float32 partials), 4
    nodes of 1, after a num_worst_tokens dispatch, and in rounds."""
    pools(4, "gloo-cuda").run(bodies.normal_combine_bf16_partials, "nvshmem", [6, 0, 9, 4], 2048, ranks_per_node,
                              worst, per_round)


@pytest.mark.gpu(2)
@needs_native
@needs_shared
@pytest.mark.parametrize("custom", [False, True])
def test_ops_bf16_partial_sums_shared_gpus(pools, custom: bool) -> None:
    """ops.combine(bf16_partial_sums=True) and the backward of ops.dispatch(bf16_partial_sums=True) on the nvshmem
    backend, 4 ranks as 2 nodes of 2 sharing the GPUs, eager and custom-op paths: bit for bit against the node
    partials of float32 combines (ops_bodies.ops_bf16_partial_sums)."""
    fails = pools(4, "gloo-cuda").run(ops_bodies.ops_bf16_partial_sums, 2, custom, "nvshmem")
    assert not any(fails), "\n".join(f for r in fails for f in r)


@pytest.mark.gpu(4)
@needs_native
def test_normal_combine_bf16_partials_four_gpus(pools) -> None:
    """The same on 4 GPUs (an NCCL group), 2 nodes of 2."""
    pools(4, "nccl").run(bodies.normal_combine_bf16_partials, "nvshmem", [6, 0, 9, 4], 2048, 2)


@pytest.mark.gpu(4)
@pytest.mark.parametrize("backend", [pytest.param("nvshmem", marks=needs_native), "torch"])
def test_normal_combine_float32_sums_four_gpus(pools, backend: str) -> None:
    """The combine's float32 accumulation, bit for bit, on 4 GPUs (an NCCL group), one node and 2 x 2."""
    for ranks_per_node in (None, 2):
        pools(4, "nccl").run(bodies.normal_combine_exact, backend, [5, 0, 7, 3], 2048, ranks_per_node)


@pytest.mark.gpu(1)
@needs_native
@needs_shared
def test_normal_many_ranks_shared_gpus() -> None:
    """40 ranks, 0-19 on GPU 0 and 20-39 on GPU 1 (all on GPU 0 where only one is visible): more ranks than fit a
    32-bit mask, so every per-rank step of the normal kernels is by rank position or thread, not by bit. 5 nodes of
    8 (ranks past 32 inside a node; on 2 GPUs node 2 straddles them), 20 nodes of 2 (20 RDMA peers per rank,
    through NVSHMEM puts) and 40 nodes of 1 (more nodes than a warp has lanes: the per-token loops over nodes go 32
    at a time): BF16 with alignment and the cached path, FP8 with num_worst_tokens, float32 with the adjoint check,
    then refusals from ranks 3, 33 and 39 (every other rank names exactly those) and a good round after them. A pool
    of its own, closed afterwards (40 processes)."""
    _normal_rounds_on_shared_gpus(40, (1, 34), (8, 2, 1), 8, 6, [3, 33, 39], 61)


@pytest.mark.gpu(1)
@needs_native
@needs_shared
def test_normal_wide_nodes_shared_gpus() -> None:
    """32 ranks, 0-15 on GPU 0 and 16-31 on GPU 1 (all on GPU 0 where only one is visible), as one node of 32 and
    as 2 nodes of 16: more ranks per node than the combine reductions hold rows of in registers (8), with top-24 of
    64 experts so that a token's rows come from up to 24 ranks of a node (read 8 at a time). One node: zero-copy
    dispatch and the fused combine (lanes by rank, all 32); 2 nodes: the RDMA leg, the forward to 16 ranks and
    their partial sums. BF16 with alignment and the cached path, FP8 with num_worst_tokens, float32 with the
    adjoint check, then refusals from ranks 3, 17 and 31 and a good round. A pool of its own, closed afterwards."""
    _normal_rounds_on_shared_gpus(32, (1, 20), (None, 16), 24, 20, [3, 17, 31], 64)


@pytest.mark.gpu(2)
@needs_native
@needs_shared
@pytest.mark.parametrize("ranks_per_node", [None, 2], ids=["one-node", "2-nodes"])
def test_low_latency_bf16_partial_sums_four_ranks_shared_gpus(pools, ranks_per_node: int | None) -> None:
    """bf16_partial_sums with 4 ranks on 2 GPUs (a token's experts spread over up to 4 ranks, each rank's sum
    rounded on its own), ranks in the three modes mixed, repeated experts; one node, and 2 nodes of 2 (puts)."""
    pools(4, "gloo-cuda").run(bodies.low_latency_partial_sums, "nvshmem", [48, 0, 40, 33], 48, 2048, 64, 8, 71,
                              ["bf16", "split", "none", "bf16"], True, ranks_per_node, False)


@pytest.mark.gpu(2)
@needs_native
@needs_shared
@pytest.mark.parametrize("case", LL_CASES[:2], ids=["m128-fp8", "m128-bf16-hook"])
def test_low_latency_four_ranks_shared_gpus(pools, case: tuple) -> None:
    m, hidden, experts, topk, fp8, round_scale, hook = case
    tokens = [m, 0, m - 6, m - 9]
    pools(4, "gloo-cuda").run(
        bodies.low_latency_roundtrip, "nvshmem", tokens, m, hidden, experts, topk, fp8, round_scale, hook, 41
    )


def _fp8_rows(dtype: torch.dtype, rows: int, hidden: int) -> torch.Tensor:
    """Rows of 128-channel groups spread over many magnitudes (1e-12 to 1e12), with groups that test the edges: all
    zero, all below 1e-4, a NaN, +-inf, -0.0, an amax a few float32 steps above 448 * 2^k (round_scale's edge)."""
    g = torch.Generator().manual_seed(77)
    x = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    mag = 10.0 ** (torch.rand(rows, hidden // 128, 1, generator=g, dtype=torch.float64) * 24 - 12)
    x = (x.view(rows, hidden // 128, 128) * mag).view(rows, hidden)
    if rows >= 8 and hidden >= 256:
        x[0, :128] = 0.0
        x[1, :128] *= 1e-9
        x[2, 5] = float("nan")
        x[3, 130] = float("inf")
        x[4, 7] = float("-inf")
        x[5, :128] = -0.0
        x[6, :128] = 1.0
        x[6, 9] = 448.0 * 2.0**-3 * (1 + 3 * 2.0**-23)
        x[7, 128:256] = -(448.0 * 2.0**5) * (1 + 2.0**-23)
    if rows >= 10 and hidden >= 256:
        x[2, 6] = -float("nan")
        x[8, :128] = torch.linspace(-1e-40, 1e-40, 128, dtype=torch.float64)  # float32 subnormals (bf16: 0 or tiny)
        x[9, 3] = 3.0e38  # near the largest float32 (and bf16)
    return x.to(dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many values of a and b (same dtype) differ: both NaN counts as equal, else the bits must be."""
    fa, fb = a.float(), b.float()
    both_nan = torch.isnan(fa) & torch.isnan(fb)
    ia = a.view(torch.uint8) if a.element_size() == 1 else a.view(torch.int16 if a.element_size() == 2 else torch.int32)
    ib = b.view(ia.dtype)
    return int(((ia != ib) & ~both_nan).sum())


@pytest.mark.gpu(1)
@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("round_scale", [False, True])
@pytest.mark.parametrize("shape", [(0, 128), (1, 128), (1, 896), (3, 384), (37, 7168), (300, 256)])
def test_fp8_native_kernels(monkeypatch, dtype: torch.dtype, round_scale: bool, shape: tuple[int, int]) -> None:
    """fp8.quantize and fp8.dequantize on CUDA (one native kernel each: counted) give the CPU's bits (torch ops
    there), NaN for NaN; the finite groups' codes are also checked from first principles (reference.fp8_check).
    Group counts of 1, 7 and 9 leave a warp step part full. A strided or misaligned x, an x that needs a gradient
    and a float16 output take torch ops on CUDA (not the kernels) and give the same bits; 3-D rows dequantise as 2-D
    ones."""
    from largeep import fp8
    from reference import fp8_check

    C = native.module()
    calls = {"fp8_quantize": 0, "fp8_dequantize": 0}
    for name in calls:
        kernel = getattr(C, name)

        def counted(*args, _kernel=kernel, _name=name):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _kernel(*args)

        monkeypatch.setattr(C, name, counted)
    x = _fp8_rows(dtype, *shape)
    want_q, want_s = fp8.quantize(x, round_scale=round_scale)
    got_q, got_s = fp8.quantize(x.cuda(), round_scale=round_scale)
    assert calls["fp8_quantize"] == 1, calls
    assert _same_bits(got_q.cpu(), want_q) == 0 and _same_bits(got_s.cpu(), want_s) == 0
    finite = torch.isfinite(x.float()).view(shape[0], shape[1] // 128, 128).all(-1).all(-1)
    if bool(finite.any()):
        assert fp8_check(got_q.cpu()[finite], got_s.cpu()[finite], x[finite], round_scale) is None
    # strided (a column slice) and misaligned (starting 8 bytes into its storage) x: the torch ops, the same bits
    wide = torch.cat([x, x], dim=1).cuda()
    flat = torch.zeros(x.numel() + 8 // x.element_size(), dtype=dtype, device="cuda")
    off = flat[8 // x.element_size():].view(shape)
    off.copy_(x)
    assert off.numel() == 0 or off.data_ptr() % 16 != 0  # (an empty tensor's pointer may be 0)
    grad_x = x.cuda().requires_grad_()
    others = (wide[:, : shape[1]], off, grad_x)
    for other in others:
        q2, s2 = fp8.quantize(other, round_scale=round_scale)
        assert _same_bits(q2.cpu(), want_q) == 0 and _same_bits(s2.cpu(), want_s) == 0
    # the kernel takes a contiguous, 16-byte aligned x that needs no gradient, and only that (a slice of one row,
    # or of none, is contiguous; so is an empty tensor, whose pointer is 0): at 2 rows or more, the three above took
    # the torch ops
    takes = sum(o.is_contiguous() and o.data_ptr() % 16 == 0 and not o.requires_grad for o in others)
    assert shape[0] < 2 or takes == 0
    assert calls["fp8_quantize"] == 1 + takes, calls
    assert shape[0] == 0 or s2.grad_fn is not None  # (x's gradient reaches the scales, as on the CPU)
    for out in (torch.bfloat16, torch.float32, torch.float16):
        want = fp8.dequantize(want_q, want_s, out)
        got = fp8.dequantize(got_q, got_s, out)
        assert got.dtype == out and got.shape == x.shape
        assert _same_bits(got.cpu(), want) == 0, f"dequantize to {out}"
        if shape[0] % 2 == 0 and shape[0]:
            q3 = got_q.view(2, shape[0] // 2, shape[1])
            got3 = fp8.dequantize(q3, got_s.view(2, shape[0] // 2, -1), out)
            assert _same_bits(got3.cpu().view(shape), want) == 0, f"3-D dequantize to {out}"
    assert calls["fp8_dequantize"] == (4 if shape[0] % 2 == 0 and shape[0] else 2), calls
    # the default output dtype stays float32
    assert fp8.dequantize(got_q, got_s).dtype == torch.float32
