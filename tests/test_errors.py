"""SPEC.md "Errors": every wrong call is refused before any byte moves, with an exception that names the argument
and what was expected; the caller's tensors stay as they were; the Buffer still works for the next good call.

The rows live in ``error_bodies.CASES``; each runs on 2 ranks for every backend available: the torch backend over
gloo here, and on a GPU machine the torch backend over NCCL and the nvshmem backend (marked ``gpu(2)``). Also here:
LARGEEP_TIMEOUT_S parsing (``largeep._env``).
"""

from __future__ import annotations

import os
import re
from typing import Any

import error_bodies
import largeep
import pytest
import torch
from dist_pool import run_in_own_pool
from error_bodies import CASES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from largeep import _env

WORLD = 2
_GPU = pytest.mark.gpu(WORLD)
# (backend, process-group backend, marks)
RUNS = [("torch", "gloo", ()), ("torch", "nccl", (_GPU,)), ("nvshmem", "nccl", (_GPU,))]


def _params() -> list:
    out = []
    for backend, pg, marks in RUNS:
        for case in CASES:
            if (case.device == "cuda" and pg != "nccl") or (case.device == "cpu" and pg != "gloo"):
                continue
            out.append(pytest.param(backend, pg, case.name, marks=marks, id=f"{backend}-{pg}-{case.name}"))
    return out


def test_the_table_covers_spec() -> None:
    """At least 30 rows, and every kind of wrong input SPEC.md lists."""
    assert len(CASES) >= 30
    names = " ".join(c.name for c in CASES)
    for kind in ("dtype", "shape", "non_contiguous", "too_large", "below_minus_one", "too_many_tokens",
                 "hidden_not_128", "other_buffer", "destroyed_buffer", "rows_more_than_handle",
                 "not_divisible", "ranks_per_node_not_dividing", "destroyed_dispatch", "low_latency_dispatch_on_normal",
                 "dispatch_on_low_latency", "subgroup", "on_cpu", "without_this_rank"):
        assert kind in names, f"no row for {kind}"


@pytest.mark.parametrize("backend,pg,name", _params())
def test_wrong_call(pools, backend: str, pg: str, name: str) -> None:
    if error_bodies.BY_NAME[name].gpus > torch.cuda.device_count():
        pytest.skip(f"needs {error_bodies.BY_NAME[name].gpus} GPUs in the process (ranks share one here)")
    results = pools(WORLD, pg).run(error_bodies.bad_call, backend, name)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    assert any(r["message"] for r in results), "no rank made the wrong call"


def _refusal_params() -> list:
    out = []
    for backend, pg, marks in RUNS:
        for variant in error_bodies.REFUSAL_VARIANTS:
            # worst_peer: the torch backend on CPU checks a num_worst_tokens dispatch too (no device sync there),
            # and on CUDA a num_worst_tokens dispatch there has no host wait: nvshmem's case only
            if variant in ("worst_peer", "worst_all", "late_worst") and backend != "nvshmem":
                continue
            # a layout's refusal on the torch backend with CUDA tensors stays that rank's (Buffer._void_after_layout)
            if variant.startswith("layout") and backend == "torch" and pg != "gloo":
                continue
            out.append(pytest.param(backend, pg, variant, marks=marks, id=f"{backend}-{pg}-{variant}"))
    return out


@pytest.mark.parametrize("backend,pg,variant", _refusal_params())
def test_one_rank_refuses(pools, backend: str, pg: str, variant: str) -> None:
    """Rank 0's dispatch has an expert id out of range, the others' are good: the id check's verdict travels with
    the count exchange, so rank 0 raises ArgumentError and the others PeerRefusedError, all at once (nothing
    waits for LARGEEP_TIMEOUT_S), and every Buffer works for the next call."""
    results = pools(WORLD, pg).run(error_bodies.one_rank_refuses, backend, variant)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    assert all(r["elapsed_s"] < 5.0 for r in results), [r["elapsed_s"] for r in results]


@pytest.mark.parametrize("variant", error_bodies.LL_REFUSAL_VARIANTS)
def test_low_latency_one_rank_refuses(pools, variant: str) -> None:
    """The torch backend on CPU groups carries a low-latency dispatch's refusal (a bad expert id, too many tokens)
    with its counts: the refusing rank raises ArgumentError, the others PeerRefusedError at once, and every Buffer
    works for the next calls (the nvshmem backend cannot: docs/usage.md)."""
    results = pools(WORLD).run(error_bodies.ll_one_rank_refuses, variant)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    assert all(r["elapsed_s"] < 5.0 for r in results), [r["elapsed_s"] for r in results]


@pytest.mark.parametrize("how", ["weights", "in_flight"])
def test_low_latency_refused_alike(pools, how: str) -> None:
    """Every rank refused for a reason of its arguments, rank 0 with a bad id too: every rank raises that refusal
    (their void rounds meet), and the calls after it pair (a review found rank 0's void round meeting the others'
    next call, and gloo aborting a process on a combine)."""
    results = pools(WORLD).run(error_bodies.ll_refused_alike, how)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 4])
def test_low_latency_mixed_refusals(pools, world: int) -> None:
    """One rank refused for its values, the others for an argument: their void rounds meet, every rank raises its
    own refusal, and the calls after it pair and are right (docs/usage.md)."""
    results = pools(world).run(error_bodies.ll_mixed_refusals)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("then", ["dispatch", "bad_dispatch", "other_combine"])
def test_low_latency_combine_refusal_meets_dispatch(pools, world: int, then: str) -> None:
    """A rank whose low-latency combine was refused (the others' combine raising PeerRefusedError) goes on to its
    next dispatch (or to the combine of another dispatch) while the others repeat the combine: every rank raises
    ArgumentError naming the calls (gloo aborted the processes before; the other combine summed the wrong rows), and
    they go on in step."""
    results = pools(world).run(error_bodies.ll_combine_refusal_meets_dispatch, then)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("call,name", error_bodies.LONE_REFUSAL_CASES,
                         ids=[f"{c}-{n}" for c, n in error_bodies.LONE_REFUSAL_CASES])
def test_lone_refusal(pools, call: str, name: str) -> None:
    """Rank 0's call is refused for an argument (a fresh, cached or low-latency dispatch, a combine, a low-latency
    combine), rank 1 makes the good call: rank 0 raises ArgumentError naming the argument and rank 1
    PeerRefusedError naming rank 0, both at once, instead of rank 1's call pairing with rank 0's next one (a review
    found rank 1's dispatch returning the rows of rank 0's next dispatch); then the good call and a good round trip
    are right on both ranks."""
    results = pools(WORLD).run(error_bodies.lone_refusal, "torch", call, name)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    assert all(r["elapsed_s"] < 5.0 for r in results), [r["elapsed_s"] for r in results]


_SHARED = pytest.mark.skipif(os.environ.get("LARGEEP_TEST_SHARED_GPUS") != "1",
                             reason="LARGEEP_TEST_SHARED_GPUS=1 runs several ranks on one GPU")


# the groups of the refusal tests: the torch backend on 3 CPU ranks, the nvshmem backend on 2 GPUs over NCCL, or 3
# ranks on one GPU
_REFUSAL_GROUPS = [
    pytest.param("torch", "gloo", 3, id="torch-gloo-3"),
    pytest.param("nvshmem", "nccl", 2, marks=_GPU, id="nvshmem-nccl-2"),
    pytest.param("nvshmem", "gloo-cuda0", 3, marks=(pytest.mark.gpu(1), _SHARED), id="nvshmem-one-gpu-3"),
]


@pytest.mark.parametrize("backend,pg,world", _REFUSAL_GROUPS)
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_some_ranks_refuse_random(pools, backend: str, pg: str, world: int, data: st.DataObject) -> None:
    """Random ranks refuse (random bad ids, token counts, some of them 0): SPEC's rule that a refused call moves
    nothing, with each rank's exception saying whose ids were wrong; the same generator on the nvshmem backend on
    GPUs (2 over NCCL, or 3 ranks on one GPU)."""
    tokens = data.draw(st.lists(st.integers(0, 16), min_size=world, max_size=world), label="tokens")
    bad = data.draw(st.lists(st.integers(0, world - 1), max_size=world, unique=True), label="bad ranks")
    value = data.draw(st.one_of(st.integers(4 * world, 1 << 40), st.integers(-(1 << 40), -2)),  # (E = 4 * world)
                      label="bad id")
    use_fp8 = data.draw(st.booleans(), label="fp8")
    results = pools(world, pg).run(error_bodies.some_ranks_refuse, backend, bad, value, tokens, use_fp8)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend,pg,world", _REFUSAL_GROUPS)
@pytest.mark.parametrize("over,use_fp8,rounds", [([0], False, None), ([1, 2], True, None), ([2], False, 4)],
                         ids=["rank0", "ranks12-fp8", "rank2-rounds"])
def test_too_many_tokens_on_some_ranks(pools, backend: str, pg: str, world: int, over: list[int], use_fp8: bool,
                                       rounds: int | None) -> None:
    """A rank whose batch outgrows max_tokens_per_rank refuses the dispatch on every rank (the others raise
    PeerRefusedError naming it at once, not PeerTimeoutError after LARGEEP_TIMEOUT_S), and every Buffer serves the
    next call; also with calls in rounds (tokens_per_round)."""
    over = [r for r in over if r < world]
    results = pools(world, pg).run(error_bodies.too_many_tokens_on_some_ranks, backend, over, use_fp8, rounds)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend,pg", [pytest.param(b, p, marks=m, id=f"{b}-{p}") for b, p, m in RUNS])
@pytest.mark.parametrize("low_latency", [False, True], ids=["normal", "low_latency"])
def test_unchecked_out_of_range_ids_are_ignored(pools, backend: str, pg: str, low_latency: bool) -> None:
    """LARGEEP_CHECK_VALUES=0: an id >= E counts as -1 on every backend (no out-of-range indexing, no crash)."""
    results = pools(WORLD, pg).run(error_bodies.unchecked_out_of_range, backend, low_latency)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


def _bare_nvshmem(**ctx: Any) -> Any:
    """An NvshmemBackend with only ``ctx`` (a namespace of ``ctx``), for its host-side message logic on CPU."""
    import types

    from largeep.backends.nvshmem_backend import NvshmemBackend

    b = object.__new__(NvshmemBackend)
    b.ctx = types.SimpleNamespace(**ctx)
    return b


def test_nvshmem_destroy_keeps_status_words_of_busy_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """destroy() whose device work does not finish within the bound raises PeerTimeoutError and leaves the
    host-mapped status words the kernels write allocated (freeing them would wait for that work, or let it write into
    released memory); with the device idle they are freed."""
    import types

    from largeep.backends import nvshmem_backend

    freed: list[int] = []

    def busy(device: Any, timeout_s: float, op: str) -> None:
        raise largeep.PeerTimeoutError(f"{op}: the work queued did not finish")

    b = _bare_nvshmem(device="cpu", low_latency=True, rank=0)
    b.alive, b.host_ptr, b.heap_bytes, b.base = True, 1234, 0, 0
    b.settings = types.SimpleNamespace(timeout_s=1.0)
    b.C = types.SimpleNamespace(host_free=freed.append, free=lambda *a: True)
    monkeypatch.setattr(nvshmem_backend, "_synchronize_bounded", busy)
    with pytest.raises(largeep.PeerTimeoutError, match="did not finish"):
        b.destroy()
    assert freed == [] and not b.alive
    b.alive = True
    monkeypatch.setattr(nvshmem_backend, "_synchronize_bounded", lambda *a: None)
    monkeypatch.setattr(nvshmem_backend, "_zc_register", lambda *a: None)
    b.destroy()
    assert freed == [1234]


def test_nvshmem_host_wait_cuda_fault_message() -> None:
    """A host wait that ended on a CUDA error (wait_host_word returned minus the cudaError_t) raises RuntimeError
    naming the error, the wait and this rank's device, not PeerTimeoutError blaming a peer (its GPU test:
    test_host_wait_sees_cuda_fault); a wait that ended otherwise raises nothing here."""
    import types

    b = _bare_nvshmem(rank=1, device="cuda:1")
    b.C = types.SimpleNamespace(cuda_error_name={710: "cudaErrorAssert (device-side assert triggered)"}.__getitem__)
    for rc in (0, 1, 2):
        b._raise_if_cuda_fault("dispatch", rc, "the count exchange")
    with pytest.raises(RuntimeError) as info:
        b._raise_if_cuda_fault("dispatch", -710, "the count exchange")
    assert not isinstance(info.value, largeep.PeerTimeoutError)
    msg = str(info.value)
    assert msg.startswith("dispatch: while rank 1's host waited for the count exchange, its device cuda:1 reported "
                          "a CUDA error: cudaErrorAssert (device-side assert triggered)"), msg
    assert "not a peer" in msg and "unusable" in msg, msg


def _count_wait_backend(rc: int, report: int, slot: int) -> tuple[Any, list[tuple[int, int]]]:
    """An NvshmemBackend on CPU whose fresh dispatch gets zero-copy slot ``slot`` from its native start and whose
    count wait returns ``rc`` after the device wrote ``report`` into the error word; and the slots given back."""
    import types

    from largeep.backends.nvshmem_backend import _ERROR

    given: list[tuple[int, int]] = []
    b = _bare_nvshmem(rank=0, num_ranks=2, ranks_per_node=2, num_nodes=1, num_experts=8, experts_per_rank=4,
                      num_topk=2, hidden=128, max_tokens_per_rank=8, num_sms=4, device=torch.device("cpu"))
    b.settings = types.SimpleNamespace(timeout_s=1.0)
    b.status = [0] * 16
    b.host_ptr, b.zc_slots, b._layout_token, b._round_open = 1, 2, 0, False
    b._stream = lambda: 77

    def wait(*args: Any) -> int:
        b.status[_ERROR] = report
        return rc

    b.C = types.SimpleNamespace(wait_host_word=wait, cuda_error_name=lambda e: f"cudaError {e}")
    b.kernels = types.SimpleNamespace(start=lambda *a: slot, zc_give_back=lambda s, st: given.append((s, st)))
    return b, given


@pytest.mark.parametrize(("rc", "report", "kind"), [
    (2, 0, largeep.PeerTimeoutError),  # the host gave up first
    (1, (15 << 16) + 2, largeep.PeerTimeoutError),  # the device reported a peer it waited for
    (-710, 0, RuntimeError),  # a CUDA fault
])
@pytest.mark.parametrize("slot", [0, 1])
def test_nvshmem_failed_count_wait_gives_slot_back(rc: int, report: int, kind: type, slot: int) -> None:
    """A fresh dispatch that took a zero-copy slot and fails at its count wait (timeout, device report, CUDA fault)
    gives the slot back (after its stream's work) before raising: no outputs were made, and a slot left taken would
    make destroy keep the Buffer's whole symmetric memory on every rank (its GPU test:
    test_failed_count_wait_frees_memory). Without a slot nothing is given back."""
    b, given = _count_wait_backend(rc, report, slot)
    x = torch.randn(3, 128).to(torch.bfloat16)
    idx = torch.tensor([[0, 5], [1, -1], [7, 2]])
    with pytest.raises(kind) as info:
        b.dispatch(x, None, idx, torch.rand(3, 2), None, 1, 0)
    assert kind is not RuntimeError or not isinstance(info.value, largeep.PeerTimeoutError)
    assert given == ([(1, 77)] if slot else []), given
    assert int(b.status[1]) != 0, "the Buffer must be unusable after a failed count wait"


@pytest.mark.parametrize("held", [0, 1])
def test_nvshmem_destroy_counts_only_live_outputs(monkeypatch: pytest.MonkeyPatch, held: int) -> None:
    """destroy() votes to keep the symmetric memory only for slots whose outputs are alive (zc_held), not for
    slots merely taken (zc_busy: e.g. by a dispatch that failed before making outputs)."""
    import types

    from largeep.backends import nvshmem_backend

    votes: list[bool] = []

    def free(base: int, timeout_s: float, keep: bool) -> bool:
        votes.append(keep)
        return not keep

    b = _bare_nvshmem(device="cpu", low_latency=False, rank=0)
    b.alive, b.host_ptr, b.heap_bytes, b.base = True, 1234, 0, 0
    b.settings = types.SimpleNamespace(timeout_s=1.0)
    b.C = types.SimpleNamespace(host_free=lambda p: None, free=free)
    b.kernels = types.SimpleNamespace(zc_held=lambda: held, zc_busy=lambda: 2, zc_close=lambda: None)
    monkeypatch.setattr(nvshmem_backend, "_synchronize_bounded", lambda *a: None)
    monkeypatch.setattr(nvshmem_backend, "_zc_register", lambda *a: None)
    b.destroy()
    assert votes == [bool(held)], votes


def test_nvshmem_kinds_disagree_message() -> None:
    """A void round whose ranks sent different kinds of rows (the kind in bits 2-4 of each rank's refusal word):
    ArgumentError naming each rank's kind as the torch backend names it, and the rank that ran it without a host
    wait (its GPU test: test_kinds_disagree)."""
    b = _bare_nvshmem(rank=0, num_ranks=3, num_experts=12)
    words = [1 << 2, (2 << 2) | 2, 4 << 2]  # bf16; float32 without a host wait; FP8 with scales
    with pytest.raises(largeep.ArgumentError) as info:
        b._raise_refused("dispatch", words, checked=True)
    msg = str(info.value)
    for part in ("disagree", "rank 0: x torch.bfloat16", "rank 1: x torch.float32",
                 "rank 2: x torch.float8_e4m3fn, FP8 scales", "rank(s) [1] ran the call with num_worst_tokens"):
        assert part in msg, msg


def test_nvshmem_host_gave_up_message() -> None:
    """The error word a dispatch's host writes when it gave up on the count exchange before the device reported
    (op 3, no rank): this and every later call raise PeerTimeoutError saying so."""
    import types

    import largeep

    b = _bare_nvshmem(rank=1, num_ranks=2)
    b.settings = types.SimpleNamespace(timeout_s=7.0)
    b.status = [0, 3 << 16]
    for _ in range(2):
        with pytest.raises(largeep.PeerTimeoutError, match=r"count exchange\) on rank 1 waited more than "
                           r"LARGEEP_TIMEOUT_S=7 s for a peer \(the host gave up first.*unusable now"):
            b._raise_if_failed("dispatch")


def test_nvshmem_low_latency_handles_message() -> None:
    """A low-latency combine whose peer's done flag carried another dispatch's handle tag (op 23): this and every
    later call raise RuntimeError naming this rank and the sender; not a timeout (its GPU test:
    test_low_latency_handles_disagree)."""
    import largeep

    b = _bare_nvshmem(rank=1, num_ranks=4)
    b.status = [0, (23 << 16) + 3]  # rank field: 2
    for _ in range(2):
        with pytest.raises(RuntimeError) as info:
            b._raise_if_failed("low_latency_dispatch")
        assert not isinstance(info.value, largeep.PeerTimeoutError)
        msg = str(info.value)
        assert msg.startswith("low_latency_dispatch: in an earlier low_latency_combine on rank 1, rank 2 sent rows "
                              "with the handle of another low_latency_dispatch than this rank's"), msg
        assert "No row of it was read" in msg and "unusable now" in msg, msg


@pytest.mark.parametrize(("op", "what", "met"), [
    (17, "dispatch", "received rows of another kind from rank 2 than its own (x's dtype, or an FP8 pair"),
    (18, "combine", "received rows of another kind from rank 2 than its own (y's dtype (bf16 or float32), "
     "topk_weights given against none, or bf16_partial_sums against not)"),
    (19, "dispatch", "rank 0, which forwards the rows of ranks on other nodes to this rank (rank 2's among them), "
     "found rows of another kind than its own (x's dtype"),
    (20, "combine", "rank 2, which sums the rows of its node's ranks for this rank, found rows of another kind than "
     "its own (y's dtype"),
    (21, "dispatch", "rank 2 sent rows with the handle of another dispatch than this rank's"),
    (22, "combine", "rank 2 sent rows with the handle of another dispatch than this rank's")])
def test_nvshmem_calls_kinds_message(op: int, what: str, met: str) -> None:
    """A dispatch or combine that met another call's signature in a data flag (ops 17 and 18: the sender's kind of
    rows; 21 and 22: its handle's tag; 19 and 20: a forwarder's poisoned flag): this and every later call raise
    RuntimeError naming the call, this rank, the ranks concerned and what may differ; not a timeout (its GPU test:
    test_calls_kinds_disagree)."""
    import largeep

    b = _bare_nvshmem(rank=1, num_ranks=4, ranks_per_node=2)
    b.status = [0, (op << 16) + 3]  # rank field: 2 (on the other node; rank 1's RDMA peer there is rank 3)
    for _ in range(2):
        with pytest.raises(RuntimeError) as info:
            b._raise_if_failed("combine")
        assert not isinstance(info.value, largeep.PeerTimeoutError)
        msg = str(info.value)
        assert msg.startswith(f"combine: in an earlier {what} on rank 1, {met}"), msg
        assert "No row of it was read" in msg and "unusable now" in msg, msg


def test_nvshmem_rows_timeout_names_the_forwarder() -> None:
    """A dispatch's copy-out that timed out waiting for the rows of a source on another node (op 15) names that
    source and the rank of this node that forwards its rows (either may be missing); a source of this node alone."""
    import types

    import largeep

    b = _bare_nvshmem(rank=1, num_ranks=4, ranks_per_node=2)
    b.settings = types.SimpleNamespace(timeout_s=7.0)
    b.status = [0, (15 << 16) + 3]  # rank field: source 2 (on the other node; its RDMA peer here is rank 0)
    with pytest.raises(largeep.PeerTimeoutError, match=r"^dispatch: an earlier dispatch \(waiting for a peer's rows\) "
                       r"on rank 1 waited more than LARGEEP_TIMEOUT_S=7 s for rank 2's rows, which reach this node "
                       r"through rank 0 "):
        b._raise_if_failed("dispatch")
    # (right after the call's own host wait: this call's)
    with pytest.raises(largeep.PeerTimeoutError, match=r"^dispatch: dispatch \(waiting for a peer's rows\) on rank 1 "):
        b._raise_if_failed("dispatch", earlier=False)
    b.status = [0, (15 << 16) + 1]  # source 0, of this node
    with pytest.raises(largeep.PeerTimeoutError, match=r"waited more than LARGEEP_TIMEOUT_S=7 s for rank 0; the.*"
                       r"stopped calling the Buffer, failed, or made another call than this one \(every rank makes "
                       r"the same calls in the same order: a fresh dispatch, a cached one, a combine"):
        b._raise_if_failed("dispatch")
    b = _bare_nvshmem(rank=0, num_ranks=4, ranks_per_node=2)  # rank 0 forwards source 2's rows itself
    b.settings = types.SimpleNamespace(timeout_s=7.0)
    b.status = [0, (15 << 16) + 3]
    with pytest.raises(largeep.PeerTimeoutError, match=r"waited more than LARGEEP_TIMEOUT_S=7 s for rank 2; the"):
        b._raise_if_failed("dispatch")


def test_nvshmem_threads_for_many_ranks() -> None:
    """LARGEEP_TUNE threads must exceed the rank count of a normal-mode group (a thread per rank in the kernels'
    waits); the message names the ranks that set too few."""
    from largeep.backends.nvshmem_backend import threads_reason

    assert threads_reason(40, [64] * 40) is None
    assert threads_reason(256, [1024] * 256) is None
    reason = threads_reason(64, [1024] * 60 + [64, 1024, 64, 1024])
    assert reason is not None and "must exceed 64" in reason and "rank(s) [60, 62] set [64]" in reason, reason


def test_nvshmem_memory_reason() -> None:
    """A Buffer whose symmetric allocation some GPU cannot hold for all of its ranks is refused on every rank, naming
    that GPU, its ranks and its free memory; GPUs are told apart by host and GPU."""
    from largeep.backends.nvshmem_backend import memory_reason

    gib = 1 << 30
    assert memory_reason(10 * gib, [("a", "0", 80 * gib), ("a", "1", 80 * gib)]) is None
    assert memory_reason(10 * gib, [("a", "0", 80 * gib)] * 8) is None  # 8 ranks on one GPU: 80 GiB, just fits
    reason = memory_reason(10 * gib, [("a", "0", 80 * gib)] * 8 + [("a", "1", 15 * gib)] + [("b", "0", 5 * gib)])
    assert reason is not None
    assert "10.00 GiB of symmetric memory per rank" in reason
    assert "GPU 0 of host a" not in reason, reason
    assert "GPU 1 of host a (1 rank(s): [8]) has 15.0 GiB free" not in reason, reason
    assert "GPU 0 of host b (1 rank(s): [9]) has 5.0 GiB free" in reason, reason
    # the lowest free memory any sharer saw counts
    reason = memory_reason(10 * gib, [("a", "0", 80 * gib), ("a", "0", 19 * gib)], max_tokens=4096)
    assert reason is not None and "(2 rank(s): [0, 1]) has 19.0 GiB free" in reason, reason
    assert "pass tokens_per_round=3891 or fewer" in reason, reason
    assert "lower max_tokens_per_rank to about 3891" in reason and "MoELayer(num_chunks=...)" in reason, reason
    # a Buffer in rounds: its buffers hold tokens_per_round tokens per rank
    reason = memory_reason(10 * gib, [("a", "0", 19 * gib)] * 2, max_tokens=1024, in_rounds=True)
    assert reason is not None and "lower tokens_per_round (about 972 or fewer would fit)" in reason, reason
    reason = memory_reason(10 * gib, [("a", "0", 1 << 20)], max_tokens=8)
    assert reason is not None and "lower max_tokens_per_rank or tokens_per_round" in reason, reason
    # a later Buffer: only what the heap must grow by (the fourth entry) needs free memory
    assert memory_reason(10 * gib, [("a", "0", 5 * gib, 2 * gib)] * 2) is None  # 2 x 2 GiB more of 5 GiB free
    reason = memory_reason(10 * gib, [("a", "0", 5 * gib, 6 * gib)], max_tokens=1000)
    assert reason is not None and "(of which NVSHMEM's heap holds 4.00 GiB already)" in reason, reason
    assert "has 5.0 GiB free" in reason and "tokens_per_round=900 or fewer" in reason, reason  # (5 + 4) / 10


def test_nvshmem_heap_growth(monkeypatch) -> None:
    """How much a Buffer grows this process's symmetric heap: what its allocation needs past the most the live
    Buffers have held at once (NVSHMEM keeps the memory it mapped for Buffers since destroyed)."""
    from largeep.backends import nvshmem_backend as nb

    monkeypatch.setattr(nb, "_heap", {"live": 0, "peak": 0})
    assert nb._heap_growth(10) == 10  # the first Buffer
    nb._heap_taken(10)
    assert nb._heap_growth(4) == 4  # a second beside it
    nb._heap_taken(4)
    nb._heap["live"] -= 10  # the first destroyed: 4 live, 14 mapped
    assert nb._heap_growth(10) == 0 and nb._heap_growth(12) == 2
    nb._heap_taken(12)
    assert nb._heap == {"live": 16, "peak": 16}


def test_nvshmem_refusal_words_of_many_ranks() -> None:
    """A void round of 40 ranks: each rank's status word says whether it refused (bit 0) and whether it ran the
    round without a host wait (bit 1); ranks past 32 are named as any other."""
    import largeep

    b = _bare_nvshmem(rank=5, num_ranks=40, num_experts=80)
    words = [0] * 40
    words[0] = 1
    words[33] = 1 | 2
    words[31] = 2
    words[39] = 2
    with pytest.raises(largeep.PeerRefusedError,
                       match=r"rank\(s\) \[0, 33\] refused.*rank\(s\) \[31, 33, 39\] ran") as info:
        b._raise_refused("dispatch", words, checked=True)
    assert info.value.buffer_usable is False
    words = [0] * 40
    words[37] = 1
    with pytest.raises(largeep.PeerRefusedError, match=r"rank\(s\) \[37\] refused") as info:
        b._raise_refused("dispatch", words, checked=True)
    assert info.value.buffer_usable is True


@pytest.mark.gpu(2, real=True)
def test_nvshmem_refuses_uneven_gpus(pools) -> None:
    """Ranks 0 and 2 on GPU 0, rank 1 on GPU 1: NVSHMEM's initialisation never returned with that placement (2x
    H200); every rank raises ArgumentError at once instead."""
    results = pools(3, "gloo-cuda:0,1,0").run(error_bodies.uneven_gpus_refused)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    assert all(r["elapsed_s"] < 10.0 for r in results), [r["elapsed_s"] for r in results]


@pytest.mark.parametrize("places,uneven", [
    ([("a", "g0"), ("a", "g1")], None),
    ([("a", "g0"), ("a", "g0"), ("a", "g0")], None),  # 3 ranks on one GPU
    ([("a", "g0"), ("a", "g1"), ("a", "g0"), ("a", "g1")], None),  # 2 on each
    ([("a", "g0"), ("b", "g0"), ("b", "g0"), ("a", "g1")], None),  # uneven only across hosts
    ([("a", "g0"), ("a", "g1"), ("a", "g0")], "ranks [0, 2] on GPU g0; ranks [1] on GPU g1"),
    ([("a", "g0"), ("a", "g1"), ("b", "g0"), ("b", "g0"), ("b", "g1")], "host b"),
])
def test_nvshmem_uneven_gpus_reason(places: list[tuple[str, str]], uneven: str | None) -> None:
    from largeep.backends.nvshmem_backend import uneven_gpus_reason

    reason = uneven_gpus_reason(places)
    if uneven is None:
        assert reason is None, reason
    else:
        assert reason is not None and uneven in reason and "same number of ranks on every GPU" in reason, reason


@pytest.mark.parametrize("sizes,differ", [
    (["2147483648", "2147483648"], None),
    (["2G", "2147483648", "2g"], None),  # NVSHMEM's suffixes: the same size
    (["1.5G", str(3 << 29)], None),
    ([None, None], None),
    (["2G", "4G"], "ranks [0]: '2G'; ranks [1]: '4G'"),
    (["4294967296", None, "4294967296"], "ranks [0, 2]: '4294967296'; ranks [1]: unset"),
    (["lots", "2G"], "'lots'"),  # not a size NVSHMEM reads: compared as given
])
def test_nvshmem_heap_size_reason(sizes: list[str | None], differ: str | None) -> None:
    from largeep.backends.nvshmem_backend import heap_size_reason

    reason = heap_size_reason(sizes)
    if differ is None:
        assert reason is None, reason
    else:
        assert reason is not None and differ in reason and "NVSHMEM_SYMMETRIC_SIZE differs" in reason, reason


@pytest.mark.parametrize("peer_size", ["same", "8G"])
def test_nvshmem_join_gathers_heap_sizes(monkeypatch, peer_size: str) -> None:
    """_join on CPU with stand-ins for NVSHMEM and the group (this rank 0 of 2, the peer's gather entry made up):
    the size largeep picks is what it gathers; a peer with another size refuses before NVSHMEM starts and the
    variable largeep set is taken back; the same size goes on into the initialisation."""
    import types

    import largeep
    from largeep._env import settings
    from largeep.backends import nvshmem_backend as nb

    inits = []

    class Stand:
        def initialized(self) -> bool:
            return False

        def unique_id(self) -> bytes:
            return b"uid"

    def gather(ctx: object, mine: tuple, timeout_s: float) -> list:
        if len(mine) == 2:  # (rank 0's unique id, or why it has none; the peer sends None)
            return [mine, None]
        peer = (mine[0], "gpu-1", mine[2], True) if peer_size == "same" else (mine[0], "gpu-1", peer_size, False)
        return [mine, peer]

    monkeypatch.setenv("NVSHMEM_SYMMETRIC_SIZE", "0")  # (restored to what it was after the test, as _join sets it)
    monkeypatch.delenv("NVSHMEM_SYMMETRIC_SIZE")
    monkeypatch.setattr(nb, "_world", {})
    monkeypatch.setattr(nb.native, "module", lambda: Stand())
    monkeypatch.setattr(nb.dist, "get_process_group_ranks", lambda group: [0, 1])
    monkeypatch.setattr(nb, "_gather", gather)
    monkeypatch.setattr(nb, "_gpu_of", lambda device: "gpu-0")
    monkeypatch.setattr(nb, "_init_bounded", lambda C, uid, ctx, timeout_s: inits.append(uid))
    ctx = types.SimpleNamespace(rank=0, num_ranks=2, device=types.SimpleNamespace(index=0), group=None)
    if peer_size == "same":
        nb._join(ctx, 3 << 30, settings())  # type: ignore[arg-type]
        assert inits == [b"uid"] and os.environ["NVSHMEM_SYMMETRIC_SIZE"] == str(4 << 30)  # 3 GiB x 1.25, whole GiB
    else:
        differs = r"NVSHMEM_SYMMETRIC_SIZE differs between ranks \(ranks \[0\]: unset, so largeep's '4294967296'; "
        with pytest.raises(largeep.ArgumentError, match=differs + r"ranks \[1\]: '8G'\)"):
            nb._join(ctx, 3 << 30, settings())  # type: ignore[arg-type]
        assert inits == [] and "NVSHMEM_SYMMETRIC_SIZE" not in os.environ
        # a gather that fails (a peer gone) takes the variable back too
        monkeypatch.setattr(nb, "_gather", lambda ctx, mine, timeout_s: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            nb._join(ctx, 3 << 30, settings())  # type: ignore[arg-type]
        assert "NVSHMEM_SYMMETRIC_SIZE" not in os.environ


@pytest.mark.gpu(2)
def test_nvshmem_other_group_first() -> None:
    """Rank 0's process serves another group with NVSHMEM: a Buffer on the whole group is refused on every rank at
    once. A pool of its own (NVSHMEM must not be running in it yet)."""
    results = run_in_own_pool(2, "nccl", error_bodies.other_group_first)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


@pytest.mark.gpu(2)
def test_nvshmem_refuses_different_heap_sizes() -> None:
    """Rank 1 sets a larger NVSHMEM_SYMMETRIC_SIZE than rank 0: both raise ArgumentError before NVSHMEM starts
    (an allocation failing on one rank only would leave the other inside NVSHMEM's barrier); with the variable
    unset again, a Buffer is made. A pool of its own (NVSHMEM must not be running in it yet)."""
    results = run_in_own_pool(2, "nccl", error_bodies.heap_sizes_refused)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("fail_on", "busy_on"), [(-1, -1), (0, -1), (1, -1), (0, 0), (0, 1)])
def test_nvshmem_creation_fails_after_alloc(pools, fail_on: int, busy_on: int) -> None:
    """A rank that fails after the symmetric allocation (its kernels, say) makes every rank raise and free that
    memory and its host-mapped words, instead of keeping it and leaving the others a Buffer whose first call times
    out; each rank first waits for its device, bounded (cudaFreeHost and the free's device synchronisation have no
    bound), and a rank whose device stays busy (``busy_on``) frees nothing (CPU: a stand-in for the native
    module)."""
    for rank, res in enumerate(pools(WORLD).run(error_bodies.nvshmem_creation_fails_after_alloc, fail_on, busy_on)):
        if fail_on < 0:
            assert res["error"] is None and res["alive"] and res["free"] == 0 and res["host_free"] == 0, res
            assert res["order"] == [], res
            continue
        if rank == busy_on:
            assert res["free"] == 0 and res["host_free"] == 0 and res["order"] == ["sync"], res
            if rank != fail_on:
                assert "did not finish" in res["error"] and "could not be freed" in res["error"], res
            else:
                assert res["error"] == "injected: the kernels could not be made", res
            continue
        assert res["free"] == 1 and res["host_free"] == 1, res
        assert res["order"] == ["sync", "host_free", "free"], res
        if rank == fail_on:
            assert res["error"] == "injected: the kernels could not be made", res
        else:
            assert f"rank(s) [{fail_on}] could not make their part" in res["error"] and "injected" in res["error"], res
            assert res["kernels"] == 1, res


def test_nvshmem_join_judged_on_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """What each rank's process says of NVSHMEM (started, the group it serves, an earlier failure, the device) is
    judged alike on every rank: a process that serves another group, failed earlier or has another device current
    refuses the Buffer on every rank of the group, not on its own rank alone (the others would wait for it in the
    collectives that follow)."""
    import types

    from largeep.backends import nvshmem_backend as nb

    monkeypatch.setattr(nb.dist, "get_process_group_ranks", lambda group: [0, 1, 2])
    monkeypatch.setattr(nb, "_world", {})
    ctx = types.SimpleNamespace(rank=1, num_ranks=3, group=None)
    fresh, mine = (False, (), None, True), (True, (0, 1, 2), None, True)
    assert nb._join_reason(ctx, [fresh] * 3) is False  # type: ignore[arg-type]
    assert nb._join_reason(ctx, [mine] * 3) is True  # type: ignore[arg-type]
    cases = [
        ([fresh, fresh, (True, (2,), None, True)], RuntimeError, r"already serves another process group \(global "
         r"ranks \[2\]\) in the process\(es\) of rank\(s\) \[2\]"),
        ([(False, (), "NVSHMEM's initialisation failed on rank 0 of 3", True), fresh, fresh], RuntimeError,
         r"failed earlier in the process\(es\) of rank\(s\) \[0\]"),
        ([mine, mine, (True, (0, 1, 2), None, False)], largeep.ArgumentError,
         r"on rank\(s\) \[2\] the current CUDA device is not the one NVSHMEM runs on"),
        ([mine, fresh, mine], RuntimeError, r"started on this group in the processes of rank\(s\) \[0, 2\] but not of "
         r"rank\(s\) \[1\]"),
    ]
    for states, kind, match in cases:
        with pytest.raises(kind, match=match):
            nb._join_reason(ctx, states)  # type: ignore[arg-type]
    # the failed process itself raises its own reason
    monkeypatch.setattr(nb, "_world", {"init_failed": (largeep.PeerTimeoutError, "NVSHMEM's initialisation did not "
                                                                                 "finish")})
    with pytest.raises(largeep.PeerTimeoutError, match="an earlier Buffer's NVSHMEM's initialisation did not"):
        nb._join_reason(ctx, [fresh, (False, (), "x", True), fresh])  # type: ignore[arg-type]


@pytest.mark.parametrize("outcome", ["hangs", "raises"])
def test_nvshmem_init_is_bounded(monkeypatch, outcome: str) -> None:
    """An NVSHMEM initialisation that does not return (CPU: a stand-in that blocks) raises PeerTimeoutError after
    LARGEEP_INIT_TIMEOUT_S; one that raises passes its error on. Either way every later Buffer of the process raises
    at once, without entering NVSHMEM again, and the caller's device is left alone."""
    import threading
    import time
    import types

    import largeep
    from largeep.backends import nvshmem_backend as nb

    release = threading.Event()
    calls, devices = [], []

    class Stand:
        def init(self, *args: object) -> None:
            calls.append(args)
            if outcome == "raises":
                raise RuntimeError("NVSHMEM initialisation failed with status 7")
            release.wait(30)

        def initialized(self) -> bool:
            return False

    monkeypatch.setattr(nb, "_world", {})
    monkeypatch.setattr(nb.native, "module", lambda: Stand())
    monkeypatch.setattr(nb.torch.cuda, "set_device", devices.append)
    ctx = types.SimpleNamespace(rank=1, num_ranks=2, device=types.SimpleNamespace(index=0))
    start = time.monotonic()
    try:
        if outcome == "hangs":
            with pytest.raises(largeep.PeerTimeoutError, match=r"did not finish within 0.5 s .* rank 1 of 2"):
                nb._init_bounded(Stand(), b"uid", ctx, 0.5)  # type: ignore[arg-type]
            assert 0.5 <= time.monotonic() - start < 5.0
            later: type[Exception] = largeep.PeerTimeoutError
        else:
            with pytest.raises(RuntimeError, match="status 7"):
                nb._init_bounded(Stand(), b"uid", ctx, 30.0)  # type: ignore[arg-type]
            later = RuntimeError
        with pytest.raises(later, match="an earlier Buffer's NVSHMEM's initialisation"):
            nb._join(ctx, 1 << 20, None)  # type: ignore[arg-type]
        assert len(calls) == 1 and devices == []
    finally:
        release.set()


@pytest.mark.gpu(2, real=True)
def test_nvshmem_init_timeout_on_gpus() -> None:
    """The real timeout path: ranks on GPUs 0, 1, 0 with the placement check switched off, so that NVSHMEM's
    initialisation does not finish (as seen on 2x H200): every rank raises PeerTimeoutError after
    LARGEEP_INIT_TIMEOUT_S (10 s) and at once for a second Buffer. A pool of its own, killed afterwards (its
    processes keep a thread inside NVSHMEM)."""
    results = run_in_own_pool(3, "gloo-cuda:0,1,0", error_bodies.init_times_out, 10.0)
    if any(r["created"] for r in results):
        pytest.skip("NVSHMEM initialised the uneven placement here: its initialisation has nothing to time out")
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


@pytest.mark.gpu(1)
@pytest.mark.skipif(os.environ.get("LARGEEP_TEST_SHARED_GPUS") != "1",
                    reason="LARGEEP_TEST_SHARED_GPUS=1 runs 2 ranks on one GPU (NVSHMEM's several PEs per GPU)")
@pytest.mark.parametrize("world,variant", [(2, v) for v in error_bodies.REFUSAL_VARIANTS]
                         + [(4, v) for v in ("bf16", "half_nodes", "nodes", "worst_peer", "worst_all", "late",
                                             "late_nodes", "late_first")])
def test_one_rank_refuses_one_gpu(pools, world: int, variant: str) -> None:
    """The nvshmem backend's refusal with every rank on one GPU (a gloo group; for machines of one GPU); on 4
    ranks also 2 nodes of 2 (the forwarders' path) and 4 nodes of 1."""
    results = pools(world, "gloo-cuda0").run(error_bodies.one_rank_refuses, "nvshmem", variant)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    assert all(r["elapsed_s"] < 5.0 for r in results), [r["elapsed_s"] for r in results]


@pytest.mark.gpu(1)
@pytest.mark.skipif(os.environ.get("LARGEEP_TEST_SHARED_GPUS") != "1",
                    reason="LARGEEP_TEST_SHARED_GPUS=1 runs 2 ranks on one GPU (NVSHMEM's several PEs per GPU)")
@pytest.mark.parametrize("low_latency", [False, True], ids=["normal", "low_latency"])
def test_unchecked_out_of_range_ids_are_ignored_one_gpu(pools, low_latency: bool) -> None:
    results = pools(WORLD, "gloo-cuda0").run(error_bodies.unchecked_out_of_range, "nvshmem", low_latency)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


@pytest.mark.gpu(1)
@pytest.mark.skipif(os.environ.get("LARGEEP_TEST_SHARED_GPUS") != "1",
                    reason="LARGEEP_TEST_SHARED_GPUS=1 runs 2 ranks on one GPU (NVSHMEM's several PEs per GPU)")
def test_buffer_too_large_for_the_gpu_one_gpu() -> None:
    """A first Buffer that the GPU cannot hold is refused on every rank before NVSHMEM starts, which leaves the
    processes able to make a Buffer that fits. A pool of its own: NVSHMEM must not have started in it."""
    results = run_in_own_pool(2, "gloo-cuda0", error_bodies.too_large_for_the_gpu, timeout_s=300)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


# -- LARGEEP_TIMEOUT_S --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,expected", [(None, 100.0), ("", 100.0), ("5", 5.0), ("0.25", 0.25), (" 7 ", 7.0)])
def test_timeout_accepts(monkeypatch: pytest.MonkeyPatch, raw: str | None, expected: float) -> None:
    if raw is None:
        monkeypatch.delenv("LARGEEP_TIMEOUT_S", raising=False)
    else:
        monkeypatch.setenv("LARGEEP_TIMEOUT_S", raw)
    assert _env.settings().timeout_s == expected


@pytest.mark.parametrize(
    "raw,words",
    [
        ("abc", "expected a number"),
        ("10s", "expected a number"),
        ("1,5", "expected a number"),
        ("0", "expected a positive number"),
        ("-3", "expected a positive number"),
        ("-0.0", "expected a positive number"),
        ("nan", "expected a positive number"),
        ("inf", "expected a positive number"),
    ],
)
def test_timeout_rejects(monkeypatch: pytest.MonkeyPatch, raw: str, words: str) -> None:
    monkeypatch.setenv("LARGEEP_TIMEOUT_S", raw)
    with pytest.raises(ValueError) as info:
        _env.settings()
    msg = str(info.value)
    assert "LARGEEP_TIMEOUT_S" in msg and repr(raw) in msg and words in msg, msg


@pytest.mark.parametrize("raw,ok", [("0", True), ("64", True), ("65", False), ("1048576", False), ("-1", False)])
def test_zero_copy_slots_range(monkeypatch: pytest.MonkeyPatch, raw: str, ok: bool) -> None:
    """LARGEEP_ZERO_COPY_SLOTS: a whole number in [0, 64] (a slot number shares its count word with flag bits)."""
    monkeypatch.setenv("LARGEEP_ZERO_COPY_SLOTS", raw)
    if ok:
        assert _env.settings().zero_copy_slots == int(raw)
        return
    with pytest.raises(ValueError) as info:
        _env.settings()
    assert "LARGEEP_ZERO_COPY_SLOTS" in str(info.value) and "<= 64" in str(info.value), str(info.value)


@pytest.mark.parametrize("var,raw", [("LARGEEP_TIMEOUT_S", "abc"), ("LARGEEP_TUNE", "comb=9"),
                                     ("LARGEEP_ZERO_COPY_SLOTS", "two")])
def test_bad_variable_on_one_rank(pools, var: str, raw: str) -> None:
    results = pools(WORLD).run(error_bodies.bad_env, "torch", var, raw, [WORLD - 1])
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


def test_nvshmem_missing_on_one_rank(pools) -> None:
    msgs = pools(WORLD).run(error_bodies.nvshmem_missing_on_one_rank)
    assert "backend 'nvshmem' is not available: not built here (test)" in msgs[0], msgs
    assert all("rank(s) [0] cannot load the native module" in m for m in msgs[1:]), msgs


@pytest.mark.parametrize("raw,words", [
    ("threads=100", "threads=100, expected a multiple of 32 in [64, 1024]"),
    ("threads=2048", "a multiple of 32"),
    ("load=1", "expected comma-separated key=int"),  # (a key of old builds that changed nothing)
    ("unroll=6", "unroll=6, expected 4 or 8"),
    ("ll_spread=2", "ll_spread=2"),
    ("ll_fuse=-1", "ll_fuse=-1"),
    ("comb=9", "comb=9, expected 0 (push, then reduce), 1..7 (fused: eighths of the blocks that push) or 8"),
    ("speed=1", "expected comma-separated key=int"),
    ("comb=3,threads=512,comb=0", "comb given twice"),
])
def test_tune_rejects(monkeypatch: pytest.MonkeyPatch, raw: str, words: str) -> None:
    monkeypatch.setenv("LARGEEP_TUNE", raw)
    with pytest.raises(ValueError, match=re.escape(words)):
        _env.settings()


@pytest.mark.parametrize("comb", [0, 8])
def test_tune_accepts(monkeypatch: pytest.MonkeyPatch, comb: int) -> None:
    monkeypatch.setenv("LARGEEP_TUNE", f"threads=512,unroll=4,ll_spread=0,ll_fuse=1,comb={comb}")
    assert _env.settings().tune == {"threads": 512, "unroll": 4, "ll_spread": 0, "ll_fuse": 1, "comb": comb}


@pytest.mark.parametrize("raw,comb", [(None, 3), ("", 3), (" comb = 8 ", 8), ("comb=0", 0)])
def test_tune_defaults(monkeypatch: pytest.MonkeyPatch, raw: str | None, comb: int) -> None:
    """Unset (or empty) LARGEEP_TUNE gives README's defaults, threads=1024,unroll=8,ll_spread=1,ll_fuse=0,comb=3 (the
    fused combine, not the copy engines' comb=8); a value given for one key leaves the others at theirs."""
    if raw is None:
        monkeypatch.delenv("LARGEEP_TUNE", raising=False)
    else:
        monkeypatch.setenv("LARGEEP_TUNE", raw)
    assert _env.settings().tune == {"threads": 1024, "unroll": 8, "ll_spread": 1, "ll_fuse": 0, "comb": comb}


# -- LARGEEP_STREAM_PRIORITY ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,high", [(None, True), ("", True), ("high", True), (" HIGH ", True), ("normal", False)])
def test_stream_priority_accepts(monkeypatch: pytest.MonkeyPatch, raw: str | None, high: bool) -> None:
    if raw is None:
        monkeypatch.delenv("LARGEEP_STREAM_PRIORITY", raising=False)
    else:
        monkeypatch.setenv("LARGEEP_STREAM_PRIORITY", raw)
    assert _env.settings().high_priority is high
    assert _env.settings().stream_priority == (_env.HIGHEST_PRIORITY if high else 0)


@pytest.mark.parametrize("raw", ["low", "1", "-1", "highest", " Highest "])
def test_stream_priority_rejects(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("LARGEEP_STREAM_PRIORITY", raw)
    with pytest.raises(ValueError) as info:
        _env.settings()
    # (the value as it was set, as every other variable's message gives it)
    assert str(info.value) == f"LARGEEP_STREAM_PRIORITY={raw!r}: expected one of high, normal"


@pytest.mark.parametrize("raw", ["abc", "-1"])
def test_timeout_rejected_at_buffer_creation(pools, raw: str) -> None:
    """A bad value set after import is refused when a Buffer is made (naming the variable), and a Buffer made
    once it is fixed works."""
    results = pools(WORLD).run(error_bodies.bad_env, "torch", "LARGEEP_TIMEOUT_S", raw, list(range(WORLD)))
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


def test_id_check_runs_once_per_tensor_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layout's id check covers the dispatch that follows with the same unchanged tensor, once; anything else is
    checked again: another tensor, another E, a change in place, a second dispatch, an inference tensor."""
    import torch
    from largeep import checks
    from largeep.errors import ArgumentError

    calls = []
    real = checks._id_range
    monkeypatch.setattr(checks, "_id_range", lambda t: calls.append(1) or real(t))
    dev = torch.device("cpu")
    idx = torch.tensor([[0, 3], [1, -1]], dtype=torch.int64)

    def check(t: torch.Tensor, memo: str | None, experts: int = 4) -> None:
        checks.topk_idx("op", t, num_tokens=2, num_topk=2, num_experts=experts, device=dev, check_values=True,
                        memo=memo)

    check(idx, "remember")
    check(idx, "use")
    assert len(calls) == 1  # the dispatch after the layout: no second check
    check(idx, "use")
    assert len(calls) == 2  # one use only
    check(idx, "remember")
    check(idx.clone(), "use")  # another tensor
    check(idx, "use", experts=8)  # another expert count
    assert len(calls) == 5
    check(idx, "remember")
    idx[0, 1] = 4  # in place: the version counter moves
    with pytest.raises(ArgumentError, match="expert id 4"):
        check(idx, "use")
    with torch.inference_mode():
        inf = torch.tensor([[0, 3], [1, -1]], dtype=torch.int64)
        check(inf, "remember")  # no version counter: not remembered, and no error
        n = len(calls)
        check(inf, "use")
        assert len(calls) == n + 1


@pytest.mark.parametrize("op", error_bodies.MISSING_PEER_OPS)
def test_torch_backend_missing_peer_times_out(pools, op: str) -> None:
    # gloo: bounded by LARGEEP_TIMEOUT_S (2 s here), not by the process group's own timeout; the message names the
    # call and exactly the ranks waited on (the body matches the whole head of the message)
    for rank, res in enumerate(pools(WORLD).run(error_bodies.torch_missing_peer, 2.0, op)):
        if rank != 1:
            assert 2.0 <= res["elapsed_s"] < 10.0 and res["refused_s"] < 0.5, res
            others = re.escape(str([r for r in range(WORLD) if r != rank]))
            assert re.match(rf"{op}: rank {rank} waited for ranks? {others} ", res["message"]), res
            assert "its process group is out of step (give the next Buffer a new group)" in res["message"], res
        if op == "dispatch":  # a new Buffer on the same group: refused at once where the call timed out, and
            again = res["again"]  # rank 1 (which never made it) times out waiting for those ranks' arrival
            if rank != 1:
                assert again["error"] == "ArgumentError" and again["elapsed_s"] < 1.0, again
                assert again["message"].startswith(f"Buffer: argument 'group' is out of step on rank {rank}: an "
                                                   f"earlier call on it failed (dispatch on rank {rank} failed"), again
            else:
                assert again["error"] == "PeerTimeoutError" and again["elapsed_s"] < 10.0, again
                others = [r for r in range(WORLD) if r != 1]
                assert (f"waited in vain for ranks {others} of its group" in again["message"]
                        or f"lost its connection to ranks {others}" in again["message"]), again


@pytest.mark.parametrize("op", error_bodies.PEER_EXITS_OPS)
def test_peer_exits(op: str) -> None:
    """gloo, 3 ranks: rank 1's process exits where the others call ``op``; each raises PeerTimeoutError naming the
    call and the ranks it waited for at once (LARGEEP_TIMEOUT_S is 30 s here), the Buffer refuses its next call at
    once and destroys without waiting. A pool of its own (its group loses rank 1)."""
    res = run_in_own_pool(3, "gloo", error_bodies.peer_exits, op, 30.0, exits=frozenset({1}))
    assert res[1] == ("exited", 3), res
    for rank in (0, 2):
        r = res[rank]
        assert r["elapsed_s"] < 10.0 and r["destroy_s"] < 5.0, r
        others = [p for p in range(3) if p != rank]
        if op == "gate":
            assert r["message"].startswith(f"TopKGate.update_bias: rank {rank} waited for the group in vain (gloo "
                                           "lost a connection: "), r
            continue
        name = "low_latency_dispatch" if op == "low_latency_hook" else op
        assert r["message"].startswith(f"{name}: rank {rank} lost its connection to its group while it waited for "
                                       f"ranks {others} (gloo: "), r
        assert "a peer exited or crashed" in r["message"] and "GLHF" not in r["message"], r
        assert r["again"].startswith(f"{name}: this Buffer failed earlier") and r["again_s"] < 1.0, r
        assert "GLHF" not in r["again"] and "pair.cc" not in r["again"], r



def test_peer_exits_gate_after_its_other_neighbour_raised() -> None:
    """The gate's load sum, 3 ranks on gloo: rank 1's connections to rank 2 close first and rank 2 raises at once,
    while rank 0, already in the collective, learns of rank 1's exit only through its own connection to it, 0.5 s
    later. Rank 0 raises then too, naming the call, not after LARGEEP_TIMEOUT_S (30 s here): over gloo's ring
    all-reduce it waited that long for rank 2, which had left the collective (test_peer_exits[gate]'s rare
    failure, made certain)."""
    res = run_in_own_pool(3, "gloo", error_bodies.peer_exits_after_neighbour, 30.0, exits=frozenset({1}))
    assert res[1] == ("exited", 3), res
    for rank in (0, 2):
        r = res[rank]
        assert r["message"].startswith(f"TopKGate.update_bias: rank {rank} waited for the group in vain (gloo lost a "
                                       "connection: "), r
        assert "a peer exited or crashed" in r["message"] and r["elapsed_s"] < 10.0, r
    assert res[2]["elapsed_s"] < 1.0, res  # (rank 2 had seen its connection to rank 1 closed)

def test_gloo_lost_connection_words() -> None:
    """gloo's lost-connection errors (as torch 2.x words them): the cause named, gloo's source location and advice
    left out; a timeout or another error is no lost connection."""
    from largeep import _collective

    def err(line: str) -> RuntimeError:
        return RuntimeError(line + " This is typically caused by a remote worker crashing. Check the logs of the "
                            "remote worker before reporting an error. GLHF! \U0001f3d6\ufe0f\nmore")

    closed = err("[/src/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:6062.")
    reset = err("[/src/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1228: Connection reset by peer.")
    own = err("[/src/gloo/transport/tcp/pair.cc:592] Application timeout caused pair closure")
    assert _collective.gloo_words(closed) == "Connection closed by peer [127.0.0.1]:6062."
    assert _collective.gloo_words(reset) == "Read error [127.0.0.1]:1228: Connection reset by peer."
    assert _collective.lost_connection(closed) == _collective.lost_connection(reset) == (
        "a peer exited or crashed, or gave up waiting for this rank")
    assert "an earlier wait of this rank" in str(_collective.lost_connection(own))
    timeout = RuntimeError("[/src/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 2000ms for recv "
                           "operation to complete")
    assert _collective.lost_connection(timeout) is None and _collective.lost_connection(ValueError("x")) is None
    assert _collective.gloo_words(timeout).startswith("Timed out waiting 2000ms")
    assert _collective.gloo_words(RuntimeError("")) == "RuntimeError"


@pytest.mark.parametrize("tokens_per_round", [None, 2], ids=["one_round", "rounds"])
@pytest.mark.parametrize("op", ["layout", "dispatch"])
def test_refused_without_a_dispatch(pools, op: str, tokens_per_round: int | None) -> None:
    # gloo, LARGEEP_TIMEOUT_S 2 s: the void round of a layout's refusal, or of a dispatch's with too many tokens,
    # finds no dispatch; its timeout carries the refusal (the argument and the value refused), chained from it
    res = pools(WORLD).run(error_bodies.refused_without_a_dispatch, 2.0, op, tokens_per_round)[0]
    assert 2.0 <= res["elapsed_s"] < 10.0, res
    if op == "layout":
        refusal = f"get_dispatch_layout: argument 'topk_idx' holds expert id {2 * WORLD + 5}"
        where = "the void round that was to tell the other ranks (in their next fresh dispatch) timed out: "
    else:
        refusal = "dispatch: argument 'x' has 5 tokens, more than max_tokens_per_rank=4"
        where = "the void round that was to tell the other ranks timed out: "
    assert res["message"].startswith(refusal) and where in res["message"], res
    assert "rank 0 waited for ranks [1] of its group in vain" in res["message"], res
    assert res["cause"] == "ArgumentError", res


def test_out_of_step_keys(pools) -> None:
    pools(1).run(error_bodies.out_of_step_keys)


def test_creation_missing_peer_times_out(pools) -> None:
    # gloo: Buffer creation's arrival bounded by LARGEEP_TIMEOUT_S (2 s here), naming the rank that did not arrive;
    # that rank, arriving late, fails at once naming the ranks that gave up on it
    world = 3
    for rank, res in enumerate(pools(world).run(error_bodies.creation_missing_peer, 2.0)):
        msg = res["message"]
        assert "LARGEEP_TIMEOUT_S" in msg and "out of step" in msg and msg.startswith("Buffer"), res
        if rank != 1:
            assert 2.0 <= res["elapsed_s"] < 10.0, res
            assert f"rank {rank} waited in vain for ranks [1] of its group (of 3) to create their Buffer" in msg, res
        else:
            assert res["elapsed_s"] < 2.0, res
            assert "rank 1 lost its connection to ranks [0, 2]" in msg, res
        # then the group is out of step on every rank: a Buffer made on it again is refused at once
        assert res["again"].startswith(f"Buffer: argument 'group' is out of step on rank {rank}: an earlier call "
                                       f"on it failed (Buffer: rank {rank} ") and res["again_s"] < 1.0, res


def test_dispatch_id_check_paths(pools) -> None:
    # the backend's own check, the layout's memo, the Python check, none for a cached dispatch
    for res in pools(WORLD).run(error_bodies.dispatch_id_check_paths):
        assert res == {"asked": [True, False, True, False, False], "python_checks": 2}, res


def test_ranks_per_node_with_hosts_out_of_order(pools) -> None:
    for seen in pools(4).run(error_bodies.hosts_in_any_order):
        assert len(seen) == 2


def test_hosts_of_unequal_size_refused(pools) -> None:
    for msg in pools(3).run(error_bodies.hosts_of_unequal_size):
        assert "Buffer: ranks must fill hosts in equal contiguous blocks" in msg, msg
        assert "['a', 'a', 'b']" in msg and "does not divide the group size 3" in msg, msg


def test_low_latency_call_given_up_is_not_in_flight(pools) -> None:
    (msg,) = pools(1).run(error_bodies.ll_given_up_call_not_in_flight)
    assert "injected" in msg, msg


def test_low_latency_hook_that_raised(pools) -> None:
    """A receive hook whose receive raised is spent (not re-run into a half state), its handle refused by a
    combine with that error, and its call no longer in flight."""
    (msgs,) = pools(1).run(error_bodies.ll_hook_that_raised)
    assert "(injected)" in msgs["hook"], msgs
    assert "may be called once" in msgs["again"] and "its first call raised RuntimeError" in msgs["again"], msgs
    assert "(injected)" in msgs["again"], msgs
    assert "receive hook raised" in msgs["combine"] and "(injected)" in msgs["combine"], msgs


def test_nvshmem_low_latency_broken_state_messages() -> None:
    """The low-latency kernels' reports of a broken state (a row counter not cleared; a source's count word of
    another round under its rows word of this round) raise RuntimeError saying what was found, naming the rank, not
    PeerTimeoutError about LARGEEP_TIMEOUT_S."""
    import types

    from largeep.backends import nvshmem_backend as nb

    b = _bare_nvshmem(rank=0, num_ranks=4)
    b.settings = types.SimpleNamespace(timeout_s=7.0)
    for code, words in ((nb._OP_LL_COUNTER, ("rank 2", "did not clear it", "unusable")),
                        (nb._OP_LL_ROUND, ("rank 2", "of another round", "unusable"))):
        b.status = [0, (code << 16) + 3]  # rank field: rank 2
        with pytest.raises(RuntimeError) as info:
            b._raise_if_failed("low_latency_combine")
        msg = str(info.value)
        assert not isinstance(info.value, largeep.PeerTimeoutError) and "LARGEEP_TIMEOUT_S" not in msg, msg
        assert msg.startswith("low_latency_combine: an earlier low_latency_dispatch on rank 0"), msg
        assert all(w in msg for w in words), msg


def test_nvshmem_prepare_out_of_step_message() -> None:
    """The prepare kernel's report that its blocks did not meet (two dispatches of one Buffer at once, or a wait
    past the timeout) raises RuntimeError saying so, not PeerTimeoutError naming this rank as a peer."""
    import types

    from largeep.backends import nvshmem_backend as nb

    b = _bare_nvshmem(rank=1, num_ranks=4)
    b.settings = types.SimpleNamespace(timeout_s=7.0)
    b.status = [0, (nb._OP_PREPARE << 16) + 2]  # rank field: this rank
    with pytest.raises(RuntimeError) as info:
        b._raise_if_failed("dispatch")
    msg = str(info.value)
    assert not isinstance(info.value, largeep.PeerTimeoutError), msg
    assert msg.startswith("dispatch: an earlier dispatch's prepare kernel on rank 1"), msg
    assert "ran at once" in msg and "unusable" in msg, msg


def test_nvshmem_low_latency_receive_raised_marks_the_buffer() -> None:
    """The nvshmem low-latency receive's guard (run at once or by the hook): an exception marks the Buffer
    unusable naming it, and every later call raises that; a device report first is kept; a receive that returns
    marks nothing."""
    from largeep.backends import nvshmem_backend as nb

    for op in ("low_latency_dispatch", "low_latency_combine"):
        b = _bare_nvshmem(rank=1, num_ranks=2)
        b.status = [0] * 8
        b._abandoned, b._abandoned_in = "", "dispatch"

        def fails() -> None:
            raise RuntimeError("launch failed (injected)")

        b._ll_closes_round(op)(lambda: None)()
        assert b.status[nb._ERROR] == 0
        with pytest.raises(RuntimeError, match="injected"):
            b._ll_closes_round(op)(fails)()
        assert b.status[nb._ERROR] == nb._OP_ABANDONED << 16
        with pytest.raises(RuntimeError) as info:
            b._raise_if_failed("low_latency_dispatch")
        msg = str(info.value)
        for part in (f"an earlier {op} on rank 1", "after its send was queued and before its receive",
                     "launch failed (injected)", "unusable"):
            assert part in msg, msg
        b.status[nb._ERROR] = 7 << 16
        with pytest.raises(RuntimeError):
            b._ll_closes_round(op)(fails)()
        assert b.status[nb._ERROR] == 7 << 16


def test_auto_backend_agrees_across_ranks(pools) -> None:
    # rank 0 could load it: it takes 'torch' because rank 1 cannot (on a CPU group it would anyway, so the reason
    # it gives is what tells)
    r0, r1 = pools(2).run(error_bodies.auto_backend_agrees)
    assert "rank(s) [1] cannot load the native module" in r0, r0
    assert "not built here" in r1, r1


# -- the nvshmem backend's refusal messages (host side only: the status words a void round leaves) -------------------
@pytest.mark.parametrize("me,refusals,raises,words,usable", [
    # (refusals: each rank's status word in the void round, bit 0 refused, bit 1 ran it without a host wait)
    # rank 0 refused (id 11 > E = 8), every rank waited: ArgumentError there, PeerRefusedError elsewhere, usable
    (0, [1, 0, 0, 0], "ArgumentError", ["expert id 11", "'topk_idx'", "stays usable"], True),
    (2, [1, 0, 0, 0], "PeerRefusedError", ["rank(s) [0] refused", "stays usable"], True),
    # ranks 0 and 3 refused
    (1, [1, 0, 0, 1], "PeerRefusedError", ["rank(s) [0, 3] refused"], True),
    # rank 0 refused, ranks 1 and 3 ran the round with num_worst_tokens: the Buffers are gone
    (0, [1, 2, 0, 2], "ArgumentError", ["expert id 11", "rank(s) [1, 3] ran the call with num_worst_tokens",
                                        "destroy the Buffer on every rank"], False),
    (2, [1, 2, 0, 2], "PeerRefusedError", ["rank(s) [0] refused", "[1, 3]", "destroy the Buffer"], False),
])
def test_nvshmem_refusal_messages(me: int, refusals: list[int], raises: str, words: list[str], usable: bool) -> None:
    import largeep

    b = _bare_nvshmem(rank=me, num_ranks=4, num_experts=8)
    b._layout_word, b._layout_token = 4 + 2, 7
    status = [0] * 9
    status[6:9] = [7, 0, 11]  # the id check's words: its token, the lowest id below -1 (none), the highest >= E
    b.status = status
    with pytest.raises(Exception) as info:
        b._raise_refused("dispatch", refusals, checked=True)
    exc = info.value
    assert type(exc).__name__ == raises, exc
    assert all(w in str(exc) for w in words), str(exc)
    if isinstance(exc, largeep.PeerRefusedError):
        assert exc.buffer_usable is usable
    # a report whose token is not this call's is an internal error, not a wrong id
    if raises == "ArgumentError":
        status[6] = 6
        with pytest.raises(RuntimeError, match="report on rank 0 is missing"):
            b._raise_refused("dispatch", refusals, checked=True)


@pytest.mark.parametrize("which,name", [("gate", "TopKGate.update_bias"), ("replicas", "allreduce_replica_grads"),
                                        ("gather", "Buffer: rank 0 waited for the group's gather in vain")])
def test_missing_member_of_a_library_collective_is_bounded(which: str, name: str) -> None:
    """The gate's load sum, the replicas' gradient sum and Buffer creation's gather of the ranks' arguments, made by
    rank 0 alone, raise PeerTimeoutError naming the call after LARGEEP_TIMEOUT_S on gloo; after the gather a Buffer
    on that group is refused at once (ArgumentError naming 'group'). A pool of its own: the abandoned collective
    stays pending in it."""
    r0 = run_in_own_pool(2, "gloo", error_bodies.missing_collective_member, which, 2.0)[0]
    assert r0["raised"] is not None and name in r0["raised"] and "LARGEEP_TIMEOUT_S=2" in r0["raised"], r0
    assert 2.0 <= r0["took"] < 30.0, r0
    if which == "gather":
        assert r0["refused"].startswith("Buffer: argument 'group' is out of step on rank 0: an earlier call on it "
                                        f"failed ({name}") and r0["refused_s"] < 1.0, r0


@pytest.mark.parametrize("low_latency,ranks,per_node,max_tokens,refused,auto", [
    (False, 32, 8, 128, None, True),
    # normal mode: up to 512 ranks and 64 nodes; beyond the tested sizes (40 ranks) only on request
    (False, 40, 8, 128, None, True),
    (False, 40, 2, 128, None, True),
    (False, 40, 1, 128, None, True),
    (False, 64, 1, 128, None, False),
    (False, 65, 1, 128, "at most 64 nodes", False),
    (False, 64, 2, 128, None, False),
    (False, 256, 8, 128, None, False),
    (False, 264, 8, 128, None, False),
    (False, 512, 8, 128, None, False),
    (False, 520, 8, 128, "normal-mode kernels support at most 512 ranks", False),
    # up to 32 ranks per node (the 32-rank test ran one node of 32 and 2 nodes of 16)
    (False, 16, 16, 128, None, True),
    (False, 32, 32, 128, None, True),
    (False, 40, 20, 128, None, True),
    (False, 64, 64, 128, "at most 32 ranks per node", False),
    (False, 256, 32, 128, None, False),
    (True, 32, 8, 128, None, True),
    (True, 34, 17, 128, None, True),
    (True, 34, 34, 128, None, True),
    (True, 34, 2, 128, None, True),
    # low latency: any number of ranks per node, up to 1024 ranks; beyond the tested sizes only on request
    (True, 256, 16, 128, None, False),
    (True, 1024, 8, 128, None, False),
    (True, 2048, 8, 128, "low-latency kernels support at most 1024 ranks", False),
    (True, 1024, 8, 1 << 18, "must be at most 2**31 - 2**20", False),  # 1024 x 2**18 x 8 copies
    (True, 1024, 8, 1 << 16, "must be at most 2**31 - 2**20", False),  # 1024 x 2**16 rows x 32 lanes
    (True, 1024, 8, (1 << 16) - 31, "must be at most 2**31 - 2**20", False),  # a grid's stride below 2**31
    (True, 1024, 8, (1 << 16) - 32, None, False),  # 2**31 - 2**20 rows x 32 lanes
    (True, 2, 2, 1 << 20, None, True),
    (True, 2, 2, (1 << 20) + 1, "at most 2**20", False),  # a round's count words
    (False, 256, 8, 1 << 23, "must be at most 2**31 - 2**20", False),  # 2**31 received rows
    (False, 256, 8, (1 << 23) - 4095, "must be at most 2**31 - 2**20", False),
    (False, 256, 8, (1 << 23) - 4096, None, False),  # 2**31 - 2**20 received rows
])
def test_nvshmem_group_sizes(low_latency: bool, ranks: int, per_node: int, max_tokens: int, refused: str | None,
                             auto: bool) -> None:
    """Which groups the nvshmem backend takes (unsupported_reason), and which of those backend='auto' gives it
    (untested_reason: groups past the sizes that have run on GPUs)."""
    import types

    from largeep.backends.nvshmem_backend import unsupported_reason, untested_reason

    ctx = types.SimpleNamespace(num_ranks=ranks, ranks_per_node=per_node, low_latency=low_latency, hidden=7168,
                                num_topk=8, max_tokens_per_rank=max_tokens, num_experts=2 * ranks)
    reason = unsupported_reason(ctx)  # type: ignore[arg-type]
    assert (reason is None) if refused is None else (reason is not None and refused in reason), reason
    if reason is None:
        assert (untested_reason(ctx) is None) == auto  # type: ignore[arg-type]


@pytest.mark.parametrize("low_latency,ranks,per_node,experts,refused", [
    (False, 8, 8, 12288 - 9, None),
    (False, 8, 8, 12288 - 8, "num_experts + ranks + nodes = 12289 must be at most 12288"),
    (False, 1, 1, 16384, "must be at most 12288"),
    (False, 512, 8, 11712, None),  # 512 ranks, 64 nodes
    (False, 512, 8, 11776, "must be at most 12288"),
    (False, 1, 1, 12224, None),  # one rank: the dispatch's prepare kernel counts its 12224 experts
    (False, 1, 1, 12225, "num_experts / ranks = 12225 must be at most 12224"),
    (False, 2, 2, 12282, None),
    (True, 8, 8, 16384, None),  # (low-latency mode has no layout kernel)
])
def test_nvshmem_expert_counts(low_latency: bool, ranks: int, per_node: int, experts: int, refused: str | None) -> None:
    """The normal mode's layout kernel counts every expert, rank and node in 48 KiB of shared memory: more is
    refused by unsupported_reason (backend='auto' takes the torch backend), not raised by every layout call."""
    import types

    from largeep.backends.nvshmem_backend import unsupported_reason

    ctx = types.SimpleNamespace(num_ranks=ranks, ranks_per_node=per_node, low_latency=low_latency, hidden=7168,
                                num_topk=8, max_tokens_per_rank=128, num_experts=experts)
    reason = unsupported_reason(ctx)  # type: ignore[arg-type]
    assert (reason is None) if refused is None else (reason is not None and refused in reason), reason


@pytest.mark.parametrize("experts,max_tokens,refused", [
    (2048, (1 << 20) - 512, None),  # 2**31 - 2**20 output rows
    (2048, (1 << 20) - 511, "num_experts x max_tokens_per_rank = 2146437120 must be at most 2**31 - 2**20"),
    (2048, 1 << 20, "num_experts x max_tokens_per_rank = 2147483648 must be at most 2**31 - 2**20"),
])
def test_nvshmem_low_latency_output_rows(experts: int, max_tokens: int, refused: str | None) -> None:
    """The low-latency kernels number a rank's output rows (E/N experts x N x max_tokens_per_rank) in 32 bits."""
    import types

    from largeep.backends.nvshmem_backend import unsupported_reason

    ctx = types.SimpleNamespace(num_ranks=2, ranks_per_node=2, low_latency=True, hidden=128, num_topk=1,
                                max_tokens_per_rank=max_tokens, num_experts=experts)
    reason = unsupported_reason(ctx)  # type: ignore[arg-type]
    assert (reason is None) if refused is None else (reason is not None and refused in reason), reason


def test_num_sms_bounds(pools) -> None:
    """num_sms above the GPU's SMs is refused where the native normal-mode kernels could take it, on every rank; a
    failing SM lookup on one rank too (CPU groups, a 16-SM GPU feigned)."""
    last = WORLD - 1
    for msgs in pools(WORLD).run(error_bodies.num_sms_bounds):
        assert "argument 'num_sms' = 17 is more than the GPU's 16 SMs" in msgs[0], msgs
        assert "the GPU's SM count could not be read for 'num_sms': Cannot re-initialize CUDA" in msgs[1], msgs
        assert f"rank(s) [{last}]" in msgs[1] or msgs[1].startswith("Buffer: the GPU's"), msgs
        assert "more" not in msgs[1].split("Cannot re-initialize")[1], msgs


def test_torch_backend_ranks_disagree(pools) -> None:
    """Cached dispatches and combines whose kind differs between ranks, and ranks that make different calls, are
    refused on every rank (CPU groups)."""
    for msgs in pools(WORLD).run(error_bodies.ranks_disagree):
        assert len(msgs) == 12 and all("disagree on the call" in m for m in msgs), msgs
        assert sum("make the same call" in m for m in msgs) == 4, msgs


def test_torch_backend_low_latency_use_fp8_disagree(pools) -> None:
    """Low-latency dispatches whose use_fp8 differs between ranks are refused on every rank (CPU groups)."""
    pools(WORLD).run(error_bodies.ll_use_fp8_disagree)


def test_dispatch_round_left_open_marks_the_buffer() -> None:
    """The nvshmem dispatch's guard: an exception after the round's sends were queued and before its copy-out marks
    the Buffer unusable, naming the exception; one before the sends, or once the copy-out is queued, or after a
    device error was reported, leaves the error word as it was. (Out of memory for a fresh dispatch's outputs
    drains the round instead: test_dispatch_outputs_out_of_memory on GPUs.)"""
    from largeep.backends import nvshmem_backend as nb

    class Fake:
        _mark_abandoned = nb.NvshmemBackend._mark_abandoned

        def __init__(self) -> None:
            self.status = [0] * 8
            self._round_open = False
            self._abandoned = ""

    def body(self: Fake, open_at_raise: bool, exc: BaseException | None) -> str:
        self._round_open = open_at_raise
        if exc is not None:
            raise exc
        return "done"

    guarded = nb._closes_open_round(body)  # type: ignore[arg-type]
    for open_at_raise, exc, marked in ((True, torch.OutOfMemoryError("no memory"), True),
                                       (True, KeyboardInterrupt(), True), (False, MemoryError(), False)):
        f = Fake()
        with pytest.raises(type(exc)):
            guarded(f, open_at_raise, exc)
        assert (f.status[nb._ERROR] == nb._OP_ABANDONED << 16) is marked
        assert (type(exc).__name__ in f._abandoned) is marked
    f = Fake()
    f.status[nb._ERROR] = 3 << 16  # a device report first: kept
    with pytest.raises(RuntimeError):
        guarded(f, True, RuntimeError("x"))
    assert f.status[nb._ERROR] == 3 << 16
    f = Fake()
    f._round_open = True  # (left over from an earlier call: the guard resets it)
    assert guarded(f, False, None) == "done" and f.status[nb._ERROR] == 0

    def combine(self: Fake) -> None:  # (the combine's guard names it)
        self._round_open = True
        raise KeyboardInterrupt

    f = Fake()
    with pytest.raises(KeyboardInterrupt):
        nb._closes_open_round(combine)(f)  # type: ignore[arg-type]
    assert f.status[nb._ERROR] == nb._OP_ABANDONED << 16 and f._abandoned_in == "combine"  # type: ignore[attr-defined]
    assert "before its reduce" in nb._OPEN_ROUND["combine"]


def test_event_arguments(pools) -> None:
    pools(1).run(error_bodies.event_arguments)


def test_handle_owners(pools) -> None:
    pools(1).run(error_bodies.handle_owners)


@pytest.mark.parametrize("raw,on", [(None, True), ("1", True), ("TRUE", True), (" on ", True), ("0", False),
                                    ("False", False), ("OFF", False), ("", True), ("no", False)])
def test_check_values_accepts(monkeypatch: pytest.MonkeyPatch, raw: str | None, on: bool) -> None:
    if raw is None:
        monkeypatch.delenv("LARGEEP_CHECK_VALUES", raising=False)
    else:
        monkeypatch.setenv("LARGEEP_CHECK_VALUES", raw)
    assert _env.settings().check_values is on


def test_check_values_rejects(monkeypatch: pytest.MonkeyPatch) -> None:
    # (FALSE and off left the checks on before, silently)
    monkeypatch.setenv("LARGEEP_CHECK_VALUES", "disable")
    with pytest.raises(ValueError, match="LARGEEP_CHECK_VALUES='disable': expected 1"):
        _env.settings()


def test_settings_name_every_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LARGEEP_TIMEOUT_S", "abc")
    monkeypatch.setenv("LARGEEP_TUNE", "threads=7")
    with pytest.raises(ValueError) as e:
        _env.settings()
    assert "LARGEEP_TIMEOUT_S='abc'" in str(e.value) and "LARGEEP_TUNE='threads=7'" in str(e.value), str(e.value)


@pytest.mark.parametrize("name,raw,message", [
    ("TIMEOUT_S", "0.0004", "expected a number >= 0.001"),  # (0 ms: torch's waits would have no bound)
    ("INIT_TIMEOUT_S", "1e-5", "expected a number >= 0.001"),
    ("TIMEOUT_S", "2e10", "expected a number <= 1e+07"),  # (the native waits' nanoseconds would overflow)
    ("INIT_TIMEOUT_S", "1e14", "expected a number <= 1e+07"),  # (a timedelta or Thread.join would overflow)
    ("NVSHMEM_HEAP_MARGIN", "0.1", "expected a number >= 1"),  # (a heap smaller than the Buffer needs)
    ("ZERO_COPY_SLOTS", "\uff13", "expected a whole number >= 0"),  # (a fullwidth 3: str.isdigit took it)
    ("ZERO_COPY_SLOTS", "\u00b2", "expected a whole number >= 0"),  # (a superscript 2: int() failed, unnamed)
    ("TUNE", "threads=--512", "expected comma-separated key=int"),
    ("TUNE", "threads=\u0665\u0661\u0662", "expected comma-separated key=int"),  # (Arabic-Indic 512)
])
def test_settings_refuse_odd_numbers(monkeypatch: pytest.MonkeyPatch, name: str, raw: str, message: str) -> None:
    """Numbers in other scripts, timeouts below a millisecond or above 1e7 s, and a heap margin below 1 are refused,
    naming the variable."""
    monkeypatch.setenv("LARGEEP_" + name, raw)
    with pytest.raises(ValueError) as e:
        _env.settings()
    assert f"LARGEEP_{name}={raw!r}" in str(e.value) and message in str(e.value), str(e.value)


def test_settings_take_a_millisecond_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LARGEEP_TIMEOUT_S", "0.001")
    monkeypatch.setenv("LARGEEP_ZERO_COPY_SLOTS", " 3 ")
    monkeypatch.setenv("LARGEEP_TUNE", "threads =512")
    s = _env.settings()
    assert s.timeout_s == 0.001 and s.zero_copy_slots == 3 and s.tune["threads"] == 512


# where rank 0's call in 3 rounds raises (the inner backend's call, or around it), and what
_ROUND_FAILURES = {
    "dispatch": ("dispatch 1", torch.OutOfMemoryError("no memory for round 1's outputs")),
    "offsets": ("offsets 1", torch.OutOfMemoryError("no memory for round 1's offsets")),
    "gather": ("gather 1", torch.OutOfMemoryError("no memory for round 1's y")),
    "interrupt": ("combine 2", KeyboardInterrupt("between the rounds")),
    "void": ("dispatch 0", largeep.PeerTimeoutError("rank 1 never dispatched")),
    "refusal": ("dispatch 1", largeep.PeerRefusedError("rank(s) [1] refused")),
}


@pytest.mark.parametrize("where", list(_ROUND_FAILURES))
def test_rounds_out_of_step_after_a_rank_alone_raised(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Calls in rounds (tokens_per_round): an exception on this rank alone after a call's round 0 has begun (out of
    memory in a round's inner call, as the nvshmem dispatch drains that round and the peers go on to the next; or
    around it: a dispatch's receive offsets, a combine's gather of round i's y while the peers are in round i's
    combine; an interrupt) leaves the rank's rounds out of step with its peers', so every later call of the Buffer
    raises at once naming it; a void round (run once, as round 0) that times out too. A refusal (void on every
    rank) does not: the next dispatch is right."""
    import types

    from largeep.backends import rounds
    from largeep.backends.base import NormalDispatchOut

    at, error = _ROUND_FAILURES[where]
    made = {"dispatch": 0, "offsets": 0, "gather": 0, "combine": 0}
    raised: list[str] = []

    def step(what: str) -> None:
        i = made[what]
        made[what] += 1
        if f"{what} {i}" == at and not raised:
            raised.append(at)
            raise error

    class Inner:  # one rank: each round's rows are its own tokens
        name = "fake"

        def dispatch(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> NormalDispatchOut:
            step("dispatch")
            return NormalDispatchOut(x.clone(), None, None, None, [], torch.empty(0, dtype=torch.int32), x.shape[0],
                                     x.shape[0])

        def recv_offsets(self, state: int) -> list[int]:
            step("offsets")
            return [0, state]

        def combine(self, y: torch.Tensor, state: Any, w: Any, part_bf16: bool = False) -> tuple[torch.Tensor, None]:
            step("combine")
            return y.clone(), None

    real = rounds.as_words

    def as_words(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == 4:  # (the combine's y; the dispatch merges rows of 1 and 2)
            step("gather")
        return real(t)

    monkeypatch.setattr(rounds, "as_words", as_words)
    rb = rounds.RoundsBackend(Inner(), types.SimpleNamespace(low_latency=False), 3)
    x = torch.randn(4, 8)
    idx, w = torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, 2)
    state = rounds._RoundsState([0, 1, 2], [0, 1, 2, 4], [torch.tensor([0]), torch.tensor([1]), torch.tensor([2, 3])],
                                4)
    calls = {
        "dispatch": lambda: rb.dispatch(x, None, idx, w, None, 1, 0),
        "combine": lambda: rb.combine(x, state, None),
        "void": lambda: rb.void_dispatch(x[:1], None, idx[:1], w[:1], None, 1, 0, check_ids=True),
        "layout": lambda: rb.get_dispatch_layout(idx),
    }
    first = {"gather": "combine", "interrupt": "combine", "void": "void"}.get(where, "dispatch")
    with pytest.raises(type(error)) as info:
        calls[first]()
    if where == "void":
        assert made["dispatch"] == 1, made  # (the void round: the inner backend's dispatch, once)
    if where == "refusal":  # every rank raised in round 1: in step, and the next dispatch is right
        assert "[in round 1 of 3 (tokens_per_round): rounds 0..0 had moved their rows" in str(info.value)
        rb._check_in_step("dispatch")
        made.update(dispatch=0, offsets=0)
        out = rb.dispatch(x, None, idx, w, None, 1, 0)
        assert torch.equal(out.x, x) and out.num_recv_tokens == 4 and made["dispatch"] == 3, (out, made)
        return
    why = (f"an earlier {'combine' if first == 'combine' else 'dispatch'} in rounds (tokens_per_round) raised in "
           f"round {at.split()[1]} of 3 ({type(error).__name__}: {error})")
    for name, call in calls.items():
        with pytest.raises(RuntimeError) as refused:
            call()
        op = {"layout": "get_dispatch_layout", "void": "dispatch"}.get(name, name)
        msg = str(refused.value)
        assert msg.startswith(f"{op}: {why}; ") and "unusable" in msg, msg


def test_all_reduce_reads_settings_first(pools) -> None:
    """The library's own all-reduce reads LARGEEP_* before it issues the collective: a bad value raises ValueError
    naming the variable on every rank with the tensor unchanged (no sum lands after the error), and the group's
    next all-reduce sums right."""
    results = pools(WORLD).run(error_bodies.all_reduce_bad_setting)
    total = float(sum(range(1, WORLD + 1)))
    for rank, r in enumerate(results):
        assert "LARGEEP_LOG_LEVEL" in r["raised"], r
        assert r["unchanged"] == [float(rank + 1)] * 4 and r["sum"] == [total] * 4, r
