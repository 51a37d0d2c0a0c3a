"""SPEC.md's rules on the torch backend over gloo (CPU), on 1 to 4 ranks."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import bodies
import largeep
import pytest
import torch
import torch.distributed as dist
from checked_calls import Checker
from reference import RankInputs, make_inputs, ref_combine, ref_dispatch

WORLDS = [1, 2, 3, 4]


def _tokens(world: int, base: int) -> list[int]:
    # uneven counts, and a rank with no tokens at all when there are several ranks
    return [0 if (r == 1 and world > 1) else base + 3 * r for r in range(world)]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(
    "dtype,use_fp8,alignment,worst",
    [("bfloat16", False, 1, 0), ("float32", False, 4, 0), ("bfloat16", True, 1, 0), ("float32", False, 1, 200),
     ("bfloat16", False, 4, 200)],
)
def test_normal(pools, world: int, dtype: str, use_fp8: bool, alignment: int, worst: int) -> None:
    hidden = 256
    experts = 12 * world if world != 3 else 24
    pools(world).run(
        bodies.normal_roundtrip, "torch", _tokens(world, 17), hidden, experts, 4, dtype, use_fp8, alignment,
        world * 10 + alignment, None, worst,
    )


@pytest.mark.parametrize("world", [2, 4])
def test_normal_emulated_nodes(pools, world: int) -> None:
    pools(world).run(
        bodies.normal_roundtrip, "torch", _tokens(world, 9), 128, 8 * world, 8, "bfloat16", False, 1, 5, 1
    )


def test_normal_topk1_all_minus_one(pools) -> None:
    # top-1 routing, and a token batch where every entry of rank 0 is -1
    pools(2).run(bodies.normal_roundtrip, "torch", [5, 7], 128, 4, 1, "bfloat16", False, 2, 99, None, 0, None, 0)


@pytest.mark.parametrize("weighted", ["all", "some"])
def test_low_latency_weighted(pools, weighted: str) -> None:
    """low_latency_dispatch given topk_weights (some ranks or all), under torch.inference_mode: the same results."""
    pools(2).run(bodies.low_latency_roundtrip_inference, "torch", [8, 5], 8, 256, 12, 4, True, False, True, 17,
                 None, weighted)


def test_low_latency_weighted_ids_kept(pools) -> None:
    """After a dispatch given topk_weights, ids changed in place where the Buffer cannot see it (inference mode):
    the combine sums over the experts the dispatch named, as the nvshmem backend does."""
    pools(2).run(bodies.low_latency_roundtrip_inference, "torch", [8, 5], 8, 256, 12, 4, False, False, False, 21,
                 None, "all", True)


def test_low_latency_ops_weighted(pools) -> None:
    """The custom-op path (and torch.compile) of a low-latency dispatch given topk_weights."""
    pools(2).run(bodies.low_latency_ops_weighted, "torch", [8, 5], 8, 256, 12, 4, 19)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("modes,distinct", [("bf16", True), ("mixed", False)])
def test_low_latency_bf16_partial_sums(pools, world: int, modes: str, distinct: bool) -> None:
    """bf16_partial_sums: a token's sum over its experts on one rank rounded to bf16 where it has two or more there,
    bit for bit against a float64 reference on exact values; ranks asking for it, for two-row sums and for no
    weights mixed in one call; repeated experts."""
    m = ["bf16"] * world if modes == "bf16" else ["bf16", "split", "none"][:world]
    pools(world).run(bodies.low_latency_partial_sums, "torch", [12, 9, 0][:world], 12, 256, 4 * world, 6, 3, m,
                     modes == "mixed", None, distinct)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("use_fp8,round_scale,hook", [(False, False, False), (True, False, False), (True, True, True),
                                                      (True, "ue8m0", False)])
def test_low_latency(pools, world: int, use_fp8: bool, round_scale: bool | str, hook: bool) -> None:
    experts = 6 * world
    tokens = [min(8, 3 + 2 * r) for r in range(world)]
    if world > 1:
        tokens[-1] = 0
    pools(world).run(
        bodies.low_latency_roundtrip, "torch", tokens, 8, 256, experts, 3, use_fp8, round_scale, hook, world + 3
    )


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("mode", ["plain", "weights", "partial"])
def test_low_latency_skipped_not_finite(pools, world: int, mode: str) -> None:
    """A combine leaves out the k it skips (masked, or not sent), inf there or not."""
    pools(world).run(bodies.low_latency_skipped_not_finite, "torch", mode)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("round_scale", [False, True])
def test_low_latency_fp8_not_finite(pools, world: int, round_scale: bool) -> None:
    """NaN and infinities spoil their FP8 group (NaN values after dequantising), never give a finite value."""
    pools(world).run(bodies.low_latency_fp8_not_finite, "torch", round_scale)


@pytest.mark.parametrize("world,ranks_per_node,worst", [(3, None, False), (4, None, False), (4, 2, False),
                                                         (3, None, True), (4, None, True)])
def test_normal_combine_float32_sums(pools, world: int, ranks_per_node: int | None, worst: bool) -> None:
    """The combine's float32 accumulation, bit for bit (values whose BF16 sums differ; 0 tokens on one rank), also
    after a num_worst_tokens dispatch (its tail rows NaN in y)."""
    tokens = [5, 0, 7, 3][:world]
    pools(world).run(bodies.normal_combine_exact, "torch", tokens, 256, ranks_per_node, worst)


def test_events_on_cpu(pools) -> None:
    """async_finish / previous_event on CPU groups: EventOverlap returned, results as without them."""
    pools(2).run(bodies.events_on_cpu)


def test_event_overlap_waits_on_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """current_stream_wait orders the current stream of the event's device (the Buffer's), not that of whichever
    device is current: an EventOverlap made for cuda:1 while cuda:0 is current waits on cuda:1's stream."""
    asked: list[Any] = []

    class FakeStream:
        def __init__(self, device: Any) -> None:
            self.device = device

        def wait_event(self, event: Any) -> None:
            asked.append(("wait_event", self.device, event))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(device))
    ev = object()
    largeep.EventOverlap(ev, device=torch.device("cuda", 1)).current_stream_wait()  # type: ignore[arg-type]
    largeep.EventOverlap(ev, FakeStream(torch.device("cuda", 2))).current_stream_wait()  # type: ignore[arg-type]
    largeep.EventOverlap(ev).current_stream_wait()  # type: ignore[arg-type]
    assert asked == [("wait_event", torch.device("cuda", 1), ev), ("wait_event", torch.device("cuda", 2), ev),
                     ("wait_event", None, ev)], asked
    # `with event:` (DeepEP's form): the block runs first, the wait comes at its end, also when the block raises
    asked.clear()
    with largeep.EventOverlap(ev, device=torch.device("cuda", 1)) as e:  # type: ignore[arg-type]
        assert isinstance(e, largeep.EventOverlap) and asked == []
    assert asked == [("wait_event", torch.device("cuda", 1), ev)], asked
    with pytest.raises(KeyError), largeep.EventOverlap(ev, device=torch.device("cuda", 0)):  # type: ignore[arg-type]
        raise KeyError("inside")
    assert asked[-1] == ("wait_event", torch.device("cuda", 0), ev), asked
    with largeep.EventOverlap(None):  # CPU: nothing to wait for
        pass


@pytest.mark.parametrize("hook", [False, True])
def test_no_autograd(pools, hook: bool) -> None:
    """Inputs that require grad: the Buffer's outputs carry no autograd (as the native kernels'), same bits."""
    pools(2).run(bodies.no_autograd, hook)


def test_hooks_across_inference_mode(pools) -> None:
    """Receive hooks called outside the inference mode of their call, and the reverse: the same bits as without."""
    pools(2).run(bodies.hooks_across_inference_mode)


@pytest.mark.parametrize("worst", [0, 60])
def test_normal_repeat_identical(pools, worst: int) -> None:
    """The same inputs twice give the same bits: dispatch counts and the combine (SPEC: repeated runs identical)."""
    runs = [pools(3).run(bodies.normal_roundtrip, "torch", _tokens(3, 17), 256, 24, 4, "bfloat16", False, 2, 71,
                         None, worst) for _ in range(2)]
    assert runs[0] == runs[1], "a rerun gave other bits"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dtype,use_fp8,alignment,per_round", [("bfloat16", False, 1, 7), ("float32", False, 4, 1),
                                                               ("bfloat16", True, 1, 10)])
def test_normal_rounds(pools, world: int, dtype: str, use_fp8: bool, alignment: int, per_round: int) -> None:
    """A Buffer with tokens_per_round (calls in rounds) against the reference: every check of a plain Buffer's."""
    hidden = 256
    experts = 12 * world if world != 3 else 24
    pools(world).run(
        bodies.normal_roundtrip, "torch", _tokens(world, 17), hidden, experts, 4, dtype, use_fp8, alignment,
        world * 10 + alignment + 3, None, 0, per_round,
    )


@pytest.mark.parametrize("world,ranks_per_node,per_round", [(1, None, 4), (2, None, 3), (3, None, 16), (4, 2, 5)])
@pytest.mark.parametrize("use_fp8", [False, True])
def test_rounds_match_one_round(pools, world: int, ranks_per_node: int | None, per_round: int, use_fp8: bool) -> None:
    """Rounds against one round, bit for bit (dispatch fresh and cached, counts, combine), and rounds' refusals."""
    pools(world).run(
        bodies.rounds_match_one_round, "torch", _tokens(world, 17), 256, 8 * world, 4, "bfloat16", use_fp8, per_round,
        world + 40, ranks_per_node,
    )


@pytest.mark.parametrize("seed", range(6))
def test_merge_positions(seed: int) -> None:
    """rounds.merge_positions against a row-by-row listing of SPEC's order (source, then round, then position)."""
    import torch
    from largeep.backends.rounds import merge_positions, round_bounds

    g = torch.Generator().manual_seed(seed)
    n, r = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    counts = [torch.randint(0, 4, (n,), generator=g) * (torch.rand(n, generator=g) > 0.2) for _ in range(r)]
    rows = [int(c.sum()) for c in counts]
    order = [(s, i, j) for s in range(n) for i in range(r) for j in range(int(counts[i][s]))]
    where = {key: pos for pos, key in enumerate(order)}
    offsets = torch.stack([torch.cat([torch.zeros(1, dtype=torch.int64), c.cumsum(0)]) for c in counts])
    got = merge_positions(offsets.to(torch.int32 if seed % 2 else torch.int64), sum(rows)).tolist()
    want = [where[(s, i, j)] for i in range(r) for s in range(n) for j in range(int(counts[i][s]))]
    assert got == want
    assert round_bounds(10, 3) == [0, 3, 6, 10] and round_bounds(2, 4) == [0, 0, 1, 1, 2]


def test_stack_offsets() -> None:
    """rounds.stack_offsets: the rounds' receive offsets as device tensors (stacked as they are) or as host lists
    (one int64 tensor), the same values either way."""
    import torch
    from largeep.backends.rounds import stack_offsets

    host = [[0, 2, 2, 5], [0, 0, 1, 1]]
    got = stack_offsets(host, torch.device("cpu"))
    assert got.dtype == torch.int64 and got.tolist() == host
    dev = [torch.tensor(h, dtype=torch.int32) for h in host]
    got = stack_offsets(dev, torch.device("cpu"))
    assert got.dtype == torch.int32 and got.tolist() == host


@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_quantize_matches_spec(round_scale: bool) -> None:
    """fp8.quantize (what the torch backend's low-latency dispatch sends, and the usual way to make a normal FP8
    dispatch's input) against reference.fp8_check: amax / 448 scales, round to nearest, zero and huge groups."""
    from largeep import fp8
    from reference import fp8_check

    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 512, generator=g) * torch.logspace(-6, 4, 9).unsqueeze(1)
    x[0, :128] = 0.0  # an all-zero group
    x[1, 5] = 60000.0  # a group with one huge value
    for dt in (torch.float32, torch.bfloat16):
        q, s = fp8.quantize(x.to(dt), round_scale=round_scale)
        assert fp8_check(q, s, x.to(dt), round_scale) is None
    q, s = fp8.quantize(x, round_scale=round_scale)
    assert fp8_check(q, s * 1.01, x, round_scale) is not None  # the check sees a wrong scale
    # the right scale, values rounded toward zero: one e4m3 step down (its magnitude bits) where nearest went up
    v = x / s.repeat_interleave(128, dim=1)
    bits = q.view(torch.uint8)
    up = (q.float().abs() > v.abs()) & ((bits & 0x7F) > 0)
    toward_zero = torch.where(up, bits - 1, bits).view(torch.float8_e4m3fn)
    assert fp8_check(toward_zero, s, x, round_scale) is not None
    # dequantize: each e4m3 value times its group's scale, exactly, in plain torch
    want = q.float() * s.repeat_interleave(128, dim=1)
    assert torch.equal(fp8.dequantize(q, s), want)
    assert torch.equal(fp8.dequantize(q.view(3, 3, 512), s.view(3, 3, 4)), want.view(3, 3, 512))  # leading dims


def test_fp8_round_scale_at_a_power_of_two() -> None:
    """round_scale: the scale is the smallest power of two at or above amax / 448 (Python's frexp on the float32
    quotient): a group whose amax / 448 is exactly a power of two keeps it (not the next one up, which
    reference.fp8_check's tolerance would let through), and ones in between round up."""
    import math

    from largeep import fp8

    amaxes = []
    for k in range(-12, 6):
        exact = 448.0 * 2.0**k
        amaxes += [exact, exact * 1.25, exact * 0.75]
    x = torch.zeros(len(amaxes), 256)
    x[:, 3] = torch.tensor(amaxes)
    x[::2, 3] *= -1  # (the amax of a negative value)
    x[:, 130] = x[:, 3].abs() / 3  # (the second group: amax a third of the first's)
    q, s = fp8.quantize(x, round_scale=True)
    for col, group in ((3, 0), (130, 1)):
        for i in range(len(amaxes)):
            unrounded = float(x[i, col].abs() / torch.tensor(448.0))  # (float32, as SPEC's amax / 448)
            mant, exp = math.frexp(unrounded)
            want = unrounded if mant == 0.5 else 2.0**exp
            assert float(s[i, group]) == want, (i, col, float(x[i, col]), float(s[i, group]), want)
    # a group at an exact power of two: its amax is e4m3's largest value times the scale, back exactly
    exact_rows = list(range(0, len(amaxes), 3))
    assert torch.equal(q[exact_rows, 3].float().abs(), torch.full((len(exact_rows),), 448.0))
    assert torch.equal(fp8.dequantize(q, s)[exact_rows, 3], x[exact_rows, 3])


def test_fp8_round_scale_just_above_a_power_of_two() -> None:
    """round_scale on float32 groups whose amax / 448 is 1 to 63 float32 steps above a power of two: the scale is the
    next power of two (at or above amax / 448, so no value clamps at 448), never the power below, where log2 of the
    quotient rounds to an integer. (bf16 rows never land there: 8 mantissa bits cannot make 448 * 2**k plus a few
    float32 steps.) The power of two from Python's frexp, exactly; reference.fp8_check agrees."""
    import math

    from largeep import fp8
    from reference import fp8_check

    base = torch.tensor([448.0 * 2.0**k for k in range(-20, 20)], dtype=torch.float64)
    steps = torch.arange(1, 64, dtype=torch.float64)
    amax = (base[:, None] * (1 + steps[None] * 2.0**-23)).float().flatten()
    x = torch.zeros(len(amax), 128)
    x[:, 7] = amax
    x[:, 8] = -amax / 2
    q, s = fp8.quantize(x, round_scale=True)
    unrounded = amax / torch.full_like(amax, 448.0)
    below = 0
    for i in range(len(amax)):
        mant, exp = math.frexp(float(unrounded[i]))
        want = float(unrounded[i]) if mant == 0.5 else 2.0**exp
        assert float(s[i, 0]) == want, (i, float(amax[i]), float(s[i, 0]), want)
        below += int(float(torch.exp2(torch.ceil(torch.log2(unrounded[i])))) < float(unrounded[i]))
    assert below > 0  # (the old formula's cases are among these)
    assert bool((q[:, 7].float() < 448.0).all())  # (the scale is above amax / 448: no value saturates)
    assert fp8_check(q, s, x, True) is None
    # the reference refuses a scale one power of two too low
    assert fp8_check(q, s / 2, x, True) is not None


@pytest.mark.parametrize("ranks,per_node", [(1, 1), (4, 2), (6, 3), (8, 2), (8, 4)])
def test_compute_layout_against_a_loop(ranks: int, per_node: int) -> None:
    """layout.compute_layout (the torch backend's get_dispatch_layout) against reference.ref_layout, a loop over
    tokens: a token counts once for a rank, and once for a node (ranks [n*P, (n+1)*P)), however many of its experts
    are there; once per expert however often it names it; -1 nowhere."""
    from largeep.layout import compute_layout
    from reference import ref_layout

    g = torch.Generator().manual_seed(ranks * 10 + per_node)
    experts, topk = 3 * ranks, 4
    idx = torch.randint(-1, experts, (40, topk), generator=g)
    idx[0] = torch.tensor([0, 1, 2, -1])  # three experts of rank 0
    idx[1] = -1  # no expert at all
    idx[2] = torch.tensor([experts - 1, -1, experts - 1, experts - 2])  # an expert named twice, on the last rank
    idx[3] = torch.tensor([0, 3 % experts, 6 % experts, 9 % experts])  # ranks 0..3 (nodes 0 and 1 where P = 2)
    lay = compute_layout(idx, ranks, experts, per_node)
    want = ref_layout(idx, ranks, experts, per_node)
    assert want["num_tokens_per_node"].shape == (ranks // per_node,)
    for key, w in want.items():
        got = getattr(lay, key)
        assert got.shape == w.shape and torch.equal(got.to(w.dtype), w), f"{key}: {got} != {w}"


@pytest.mark.parametrize("tokens", [[10, 7], [3, 0]])
def test_rounds_take_specs_token_slices(pools, tokens: list[int]) -> None:
    """A Buffer in rounds: round i of a call of T tokens dispatches exactly tokens [i*T // R, (i+1)*T // R) of the
    rank's own (the module's rule; never more than tokens_per_round), fresh and cached."""
    pools(2).run(rounds_token_slices, tokens)


# -- bodies run on every rank of a pool (the workers import them from this module) ---------------------------------
def rounds_token_slices(rank: int, world: int, tokens: list[int]) -> None:
    """Records the tokens (row i of x holds the value i) that each inner dispatch of a Buffer in rounds is given."""
    t, per_round, hidden, experts = tokens[rank], 3, 128, 2 * world
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=2, max_tokens_per_rank=10,
                         backend="torch", tokens_per_round=per_round)
    try:
        r = buf.num_rounds
        assert r == 4, r
        inner = buf._impl.inner
        real, seen = inner.dispatch, []

        def record(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            seen.append([int(v) for v in x[:, 0].tolist()])
            return real(x, *args, **kwargs)

        inner.dispatch = record
        x = torch.arange(t, dtype=torch.float32).unsqueeze(1).repeat(1, hidden)
        idx = torch.stack([torch.arange(t) % experts, torch.full((t,), -1)], dim=1)
        w = torch.ones(t, 2)
        want = [list(range(i * t // r, (i + 1) * t // r)) for i in range(r)]
        d = buf.dispatch(x, idx, w)
        assert seen == want and all(len(s) <= per_round for s in seen), (seen, want)
        seen.clear()
        buf.dispatch(x, handle=d.handle)
        assert seen == want, ("cached", seen, want)
        del inner.dispatch
    finally:
        buf.destroy()


@contextlib.contextmanager
def _own_group_buffer(world: int, timeout_s: float, **kwargs: Any) -> Iterator[largeep.Buffer]:
    """A torch-backend Buffer with LARGEEP_TIMEOUT_S = ``timeout_s`` on a group of its own (a collective that a test
    leaves abandoned stays in that group, until the group's own timeout, a few seconds longer, ends it), destroyed
    with it after every rank is past its calls."""
    # (freeing a gloo group blocks the process until its abandoned collective ends: an earlier test's group is
    # freed here, not inside this test's timings)
    gc.collect()
    sub = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=timeout_s + 3))
    before = os.environ.get("LARGEEP_TIMEOUT_S")
    os.environ["LARGEEP_TIMEOUT_S"] = str(timeout_s)
    try:
        buf = largeep.Buffer(sub, backend="torch", **kwargs)
    finally:
        if before is None:
            del os.environ["LARGEEP_TIMEOUT_S"]
        else:
            os.environ["LARGEEP_TIMEOUT_S"] = before
    try:
        yield buf
    finally:
        dist.barrier()  # (the pool's group: a rank whose peers wait in vain waits here until they have given up)
        buf.destroy()
        dist.destroy_process_group(sub)


def _timed(call: Callable[[], Any]) -> tuple[Any, BaseException | None, float]:
    """call()'s result or exception, and the seconds it took."""
    start = time.monotonic()
    try:
        return call(), None, time.monotonic() - start
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt is one of the failures injected
        return None, exc, time.monotonic() - start


def _inject(impl: Any, name: str, exc: BaseException, after: int = 0) -> None:
    """Makes ``impl``'s method ``name`` raise ``exc`` from its call number ``after`` (from 0) on (it runs as before
    until then); ``del impl.<name>`` undoes it."""
    method = getattr(impl, name)
    calls = [0]

    def fail(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] > after:
            raise exc
        return method(*args, **kwargs)

    setattr(impl, name, fail)


FAILURE_POINTS = {
    # where rank 1 fails: (the call, what it raises, after how many of its collectives)
    "dispatch": "a variable-size dispatch, out of memory for its received rows (after the count exchange)",
    "num_worst_tokens": "a num_worst_tokens dispatch, before its row collective (after the counts, the overflow check)",
    "combine": "a combine given weights, KeyboardInterrupt before the rows go back (after the call's signature)",
    "hook": "a low-latency dispatch's receive hook (all of the call's collectives issued)",
    "before": "a variable-size dispatch, out of memory before its first collective: the Buffer stays usable",
}


def fails_mid_call(rank: int, world: int, where: str, timeout_s: float) -> list[str]:
    """Rank 1 raises in the middle of a call (``where``: a FAILURE_POINTS key). From the call's first collective on,
    its Buffer refuses every later call at once, naming the call and the error, so that it never pairs a collective
    with the one its peers wait in; the peers give up after LARGEEP_TIMEOUT_S and refuse too; no process aborts.
    Before the first collective nothing is marked: rank 1's retry pairs with the call its peers wait in."""
    chk = Checker(f"{where} on rank {rank}")
    hidden, experts, topk, tokens = 128, 2 * world, 2, 6
    bad = rank == 1
    inputs = [make_inputs(7, r, tokens, hidden, experts, topk, torch.float32) for r in range(world)]
    me = inputs[rank]
    low_latency = where == "hook"
    with _own_group_buffer(world, timeout_s, hidden=hidden, num_experts=experts, num_topk=topk,
                           max_tokens_per_rank=tokens, low_latency=low_latency) as buf:
        impl = buf._impl
        injected = MemoryError(f"injected on rank {rank}: out of memory")
        if where == "hook":
            xb = me.x.to(torch.bfloat16)
            d = buf.low_latency_dispatch(xb, me.topk_idx, use_fp8=False, return_recv_hook=True)
            if bad:
                _inject(impl, "_wait", injected)
            assert d.hook is not None
            _, exc, _ = _timed(d.hook)
            chk.expect((exc is injected) if bad else exc is None, f"the hook raised {exc!r}")
            y = torch.randn(experts // world, world * tokens, hidden).to(torch.bfloat16)

            def call() -> Any:
                return buf.low_latency_combine(y, me.topk_idx, me.topk_weights, d.handle)

            op = "low_latency_dispatch"
        elif where == "combine":
            d = buf.dispatch(me.x, me.topk_idx, me.topk_weights)
            if bad:
                injected = KeyboardInterrupt()
                _inject(impl, "_all_to_all_into", injected)

            def call() -> Any:
                return buf.combine(d.x, d.handle, topk_weights=d.topk_weights)

            op = "combine"
        else:
            worst = world * tokens if where == "num_worst_tokens" else 0
            if bad and where == "dispatch":  # (the rows' collective, after the count exchange)
                _inject(impl, "_all_to_all_into", injected)
            elif bad:  # (the count exchange: the second collective of a num_worst_tokens dispatch, the first else)
                _inject(impl, "_all_to_all", injected, after=1 if where == "num_worst_tokens" else 0)

            def call() -> Any:
                return buf.dispatch(me.x, me.topk_idx, me.topk_weights, num_worst_tokens=worst)

            op = "dispatch"
        first = None
        if where != "hook":
            first, exc, took = _timed(call)
            if where == "before" and not bad:
                chk.expect(exc is None, f"the call raised {exc!r} (rank 1 retried it at once)")
            elif bad:
                chk.expect(exc is injected and took < timeout_s, f"the call raised {exc!r} after {took:.1f} s")
            else:
                chk.expect(isinstance(exc, largeep.PeerTimeoutError) and timeout_s <= took < timeout_s + 20,
                           f"the call raised {exc!r} after {took:.1f} s, not PeerTimeoutError after {timeout_s} s")
        for name in ("_all_to_all", "_all_to_all_into", "_wait"):
            impl.__dict__.pop(name, None)
        if where == "before":
            # rank 1's retry meets the others' call, which then completes: both are right
            got, exc, _ = _timed(call) if bad else (first, None, 0.0)
            if bad:
                chk.expect(exc is None, f"the retry raised {exc!r}")
            want = ref_dispatch(inputs, rank, experts)
            chk.expect(got is not None, "the call that met the retry returned nothing")
            if got is not None:
                chk.equal(got.x, want.x, "the retry's rows")
                chk.equal(got.topk_idx, want.topk_idx, "the retry's ids")
            return chk.failures
        # the first call after the failure: refused at once on rank 1; the peers wait in vain in the hook case (their
        # first call after rank 1's failure), or are refused at once since their own wait failed
        _, exc, took = _timed(call)
        if bad:
            what = "KeyboardInterrupt" if where == "combine" else f"MemoryError: injected on rank {rank}"
            chk.expect(isinstance(exc, RuntimeError) and not isinstance(exc, largeep.PeerTimeoutError)
                       and took < 1.0 and "failed earlier" in str(exc) and f"{op} on rank 1 raised {what}" in str(exc),
                       f"the next call raised {exc!r} after {took:.1f} s")
        elif where == "hook":
            chk.expect(isinstance(exc, largeep.PeerTimeoutError) and timeout_s <= took < timeout_s + 20,
                       f"the combine raised {exc!r} after {took:.1f} s, not PeerTimeoutError after {timeout_s} s")
        else:
            chk.expect(isinstance(exc, largeep.PeerTimeoutError) and took < 1.0 and "failed earlier" in str(exc),
                       f"the next call raised {exc!r} after {took:.1f} s")
        _, exc, took = _timed(call)  # and again
        chk.expect(isinstance(exc, RuntimeError) and took < 1.0 and "failed earlier" in str(exc),
                   f"the call after that raised {exc!r} after {took:.1f} s")
    return chk.failures


def _routing_to_rank0(world: int, tokens: int, experts: int, seed: int) -> list[RankInputs]:
    """Top-2 inputs where two tokens of three name expert 0 (rank 0's) and the others an expert on another rank,
    and one token of four an expert on another rank too: rank 0 receives the most rows."""
    epr = experts // world
    inputs = [make_inputs(seed, r, tokens, 64, experts, 2, torch.float32) for r in range(world)]
    for inp in inputs:
        t = torch.arange(tokens)
        inp.topk_idx[:, 0] = torch.where(t % 3 != 0, 0, epr * (1 + t % (world - 1)))
        inp.topk_idx[:, 1] = torch.where(t % 4 == 0, epr * (1 + t % (world - 1)) + 1, -1)
    return inputs


def worst_too_small_without_host_wait(rank: int, world: int) -> list[str]:
    """The CUDA path of a num_worst_tokens dispatch (no host wait; forced here on a CPU group) where rank 0 receives
    more rows than num_worst_tokens: its outputs hold no rows, the combine gives NaN for every token rank 0 received
    (never a sum that silently lacks them) and the right sums for the others; rank 0's next call raises, naming
    the rows and num_worst_tokens, as does every call after it. The host reads the device's verdict without
    waiting: a call made before it arrives (simulated) goes through, and the first overflow is the one named."""
    chk = Checker(f"rank {rank}")
    tokens, experts = 8, 2 * world
    inputs = _routing_to_rank0(world, tokens, experts, 31)
    refs = [ref_dispatch(inputs, r, experts) for r in range(world)]
    rows = [len(ref.src) for ref in refs]
    assert rows[0] > max(rows[1:]), rows
    me, ref = inputs[rank], refs[rank]
    buf = largeep.Buffer(None, hidden=64, num_experts=experts, num_topk=2, max_tokens_per_rank=tokens,
                         backend="torch")
    try:
        impl = buf._impl
        impl.worst_check_on_host = False
        to0 = (me.topk_idx == 0).any(1)

        def round_trip(worst: int, what: str) -> None:
            d = buf.dispatch(me.x, me.topk_idx, me.topk_weights, num_worst_tokens=worst)
            over = rows[rank] > worst
            chk.expect(d.x.shape[0] == worst, f"{what}: {d.x.shape[0]} rows")
            if over:
                chk.expect(bool((d.topk_idx == -1).all()) and bool((d.topk_weights == 0).all()),
                           f"{what}: an output that did not fit holds ids or weights")
                chk.expect(d.num_tokens_per_expert_tensor.tolist() == [0] * (experts // world),
                           f"{what}: counts {d.num_tokens_per_expert_tensor.tolist()} of an output that did not fit")
            else:
                n = rows[rank]
                chk.equal(d.x[:n], ref.x, f"{what}: rows")
                chk.equal(d.topk_idx[:n], ref.topk_idx, f"{what}: ids")
                chk.expect(bool((d.topk_idx[n:] == -1).all()), f"{what}: ids past the rows")
                chk.expect(d.num_tokens_per_expert_tensor.tolist() == ref.per_expert, f"{what}: counts")
            # an expert that returns its rows: each token comes back once from every rank it went to
            c = buf.combine(d.x, d.handle, topk_weights=d.topk_weights)
            assert c.topk_weights is not None
            want = ref_combine([r.x for r in refs], refs, rank, tokens).float()
            want_w = ref_combine([r.topk_weights for r in refs], refs, rank, tokens).float()
            lost = to0 if rows[0] > worst else torch.zeros_like(to0)
            chk.expect(bool(c.x[lost].isnan().all()) and bool(c.topk_weights[lost].isnan().all()),
                       f"{what}: tokens sent to rank 0 came back without NaN")
            chk.expect(torch.allclose(c.x[~lost], want[~lost], rtol=1e-6, atol=0)
                       and torch.allclose(c.topk_weights[~lost], want_w[~lost], rtol=1e-6, atol=0),
                       f"{what}: the sums of the other tokens differ")

        round_trip(rows[0], "num_worst_tokens = rows of rank 0")
        # rank 0's host reads its verdict before the device has sent it (as a GPU host running ahead does)
        landed = impl._overflow_host
        impl._overflow_host = torch.zeros(1, dtype=torch.int64).numpy()
        round_trip(rows[0] - 1, "one row too few")
        round_trip(world * tokens, "enough rows after one too few")
        impl._overflow_host = landed
        if rank == 0:  # (the other ranks make no more calls, which would wait for rank 0)
            for _ in range(2):
                _, exc, took = _timed(lambda: buf.dispatch(me.x, me.topk_idx, me.topk_weights))
                msg = str(exc)
                chk.expect(isinstance(exc, RuntimeError) and took < 1.0 and f"num_worst_tokens = {rows[0] - 1} "
                           f"received {rows[0]} rows on rank 0" in msg and "failed earlier" in msg,
                           f"the call after the overflow raised {exc!r}")
    finally:
        buf.destroy()
    return chk.failures


def handles_of_other_dispatches(rank: int, world: int) -> list[str]:
    """Combines and cached dispatches whose ranks pass handles of different dispatches (a variable-size one and a
    num_worst_tokens one; two variable-size ones) raise ArgumentError on every rank naming each rank's handle,
    before any row moves; the Buffer stays usable (the right handles then give the reference's results)."""
    chk = Checker(f"rank {rank}")
    tokens, hidden, experts = 6, 64, 2 * world
    inputs = [make_inputs(13, r, tokens, hidden, experts, 2, torch.float32) for r in range(world)]
    refs = [ref_dispatch(inputs, r, experts) for r in range(world)]
    me = inputs[rank]
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=2, max_tokens_per_rank=tokens,
                         backend="torch")
    try:
        a = buf.dispatch(me.x, me.topk_idx, me.topk_weights)
        b = buf.dispatch(me.x, me.topk_idx, me.topk_weights, num_worst_tokens=world * tokens)
        c = buf.dispatch(me.x, me.topk_idx, me.topk_weights)
        worst = f"the handle of dispatch 2, num_worst_tokens={world * tokens}"
        first = "rank 0: {}the handle of dispatch 1, variable size"
        for mine, theirs, want in ((a, b, [first, worst]),
                                   (a, c, [first, "the handle of dispatch 3, variable size"])):
            h = mine.handle if rank == 0 else theirs.handle
            y = torch.randn(h.num_recv_tokens, hidden)
            for what, call in (("combine", lambda h=h, y=y: buf.combine(y, h)),
                               ("cached dispatch", lambda h=h: buf.dispatch(me.x * 2, handle=h))):
                _, exc, _ = _timed(call)
                msg = str(exc)
                lead = "combine, y torch.float32, topk_weights None, " if what == "combine" else \
                    "cached dispatch, x torch.float32, "
                chk.expect(isinstance(exc, largeep.ArgumentError) and "handle of the same dispatch" in msg
                           and all(w.format(lead) in msg for w in want), f"{what} of {want}: {exc!r}")
        # the Buffer is usable: the right handles give the reference's results
        ys = [torch.randn(len(r.src), hidden, generator=torch.Generator().manual_seed(s)) for s, r in enumerate(refs)]
        got = buf.combine(ys[rank], a.handle)
        chk.expect(torch.allclose(got.x.double(), ref_combine(ys, refs, rank, tokens), rtol=1e-5, atol=1e-5),
                   "combine after the refusals")
        again = buf.dispatch(me.x * 2, handle=b.handle)
        chk.equal(again.x[: len(refs[rank].src)], refs[rank].x * 2, "cached dispatch after the refusals")
    finally:
        buf.destroy()
    return chk.failures


def _spread(g: torch.Generator, rows: int, hidden: int) -> torch.Tensor:
    """float32 [rows, hidden] of magnitudes from 1e-3 to 1e3: sums in another order differ in their last bits."""
    return torch.randn(rows, hidden, generator=g) * 10.0 ** torch.randint(-3, 4, (rows, 1), generator=g).float()


def combine_sums_in_rank_order(rank: int, world: int) -> list[str]:
    """A variable-size combine sums each token's rows in rank order, from 0, in float32: bit for bit
    ((0 + y of the lowest rank) + y of the next) ..., for x and for the weights."""
    chk = Checker(f"rank {rank}")
    hidden, experts, topk = 96, 4 * world, 6
    tokens = [11 + 5 * r for r in range(world)]
    inputs = [make_inputs(17, r, tokens[r], hidden, experts, topk, torch.float32) for r in range(world)]
    refs = [ref_dispatch(inputs, r, experts) for r in range(world)]
    ys = [_spread(torch.Generator().manual_seed(100 + r), len(refs[r].src), hidden) for r in range(world)]
    ws = [_spread(torch.Generator().manual_seed(200 + r), len(refs[r].src), topk) for r in range(world)]
    me = inputs[rank]
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=max(tokens),
                         backend="torch")
    try:
        d = buf.dispatch(me.x, me.topk_idx, me.topk_weights)
        c = buf.combine(ys[rank], d.handle, topk_weights=ws[rank])
        want = torch.zeros(tokens[rank], hidden)
        want_w = torch.zeros(tokens[rank], topk)
        many = 0
        for r in range(world):
            for row, (s, t) in enumerate(refs[r].src):
                if s == rank:
                    want[t] = want[t] + ys[r][row]
                    want_w[t] = want_w[t] + ws[r][row]
        for t in range(tokens[rank]):
            many += sum(any(s == rank and tt == t for s, tt in refs[r].src) for r in range(world)) >= 3
        chk.expect(world < 3 or many > 0, "no token went to three ranks")
        assert c.topk_weights is not None
        chk.equal(c.x, want, "x")
        chk.equal(c.topk_weights, want_w, "weights")
    finally:
        buf.destroy()
    return chk.failures


# -- tests -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where,world", [(w, 2) for w in FAILURE_POINTS] + [("dispatch", 3)])
def test_failure_mid_call(pools, where: str, world: int) -> None:
    """FAILURE_POINTS: one rank fails in the middle of a call; see fails_mid_call."""
    results = pools(world).run(fails_mid_call, where, 2.0 if where != "before" else 60.0)
    assert all(not r for r in results), results


@pytest.mark.parametrize("world", [2, 3])
def test_worst_too_small_without_host_wait(pools, world: int) -> None:
    results = pools(world).run(worst_too_small_without_host_wait)
    assert all(not r for r in results), results


@pytest.mark.parametrize("world", [2, 3])
def test_handles_of_other_dispatches_refused(pools, world: int) -> None:
    results = pools(world).run(handles_of_other_dispatches)
    assert all(not r for r in results), results


@pytest.mark.parametrize("world", [3, 4])
def test_combine_sums_in_rank_order(pools, world: int) -> None:
    results = pools(world).run(combine_sums_in_rank_order)
    assert all(not r for r in results), results


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu(1))])
def test_sum_blocks_in_order(device: str) -> None:
    """The variable-size combine's sum (torch_backend._sum_blocks_in_order) against a row-by-row float32 sum in
    block order, bit for bit, on CPU and on CUDA (where one index_add of all rows sums in atomics of no fixed
    order); bf16 rows are taken as float32."""
    from largeep.backends.torch_backend import _sum_blocks_in_order

    g = torch.Generator().manual_seed(5)
    tokens, hidden = 300, 257
    blocks = [260, 0, 299, 1, 250, 300, 7]
    index = torch.cat([torch.randperm(tokens, generator=g)[:b] for b in blocks])
    for dtype in (torch.float32, torch.bfloat16):
        rows = _spread(g, sum(blocks), hidden).to(dtype)
        want = torch.zeros(tokens, hidden)
        for p, t in enumerate(index.tolist()):
            want[t] = want[t] + rows[p].float()
        for _ in range(3):
            out = torch.zeros(tokens, hidden, device=device)
            _sum_blocks_in_order(out, index.to(device), rows.to(device), blocks)
            assert torch.equal(out.cpu(), want), f"{dtype}: {(out.cpu() != want).sum()} sums differ"


def counts_and_ll_refusals(rank: int, world: int) -> list[str]:
    """A cached dispatch returns its handle's dispatch's per-expert counts (list and tensor; they were empty), and a
    num_worst_tokens dispatch on CPU fills the list. low_latency_combine refuses, before anything moves, an ``out``
    it could not write in place (a leaf that requires grad: it failed after the exchange, the Buffer unusable) and,
    on CPU, an id outside [-1, E) (it counted as -1); the same call with good arguments works after."""
    chk = Checker(f"rank {rank}")
    hidden, experts, topk, tokens = 64, 2 * world, 2, 6
    me = make_inputs(7, rank, tokens, hidden, experts, topk, torch.bfloat16)
    buf = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=tokens,
                         backend="torch")
    try:
        d = buf.dispatch(me.x, me.topk_idx, me.topk_weights)
        want = d.num_tokens_per_expert
        chk.expect(len(want) == experts // world and want == d.num_tokens_per_expert_tensor.tolist(), f"fresh {want}")
        c = buf.dispatch(me.x, handle=d.handle)
        chk.expect(c.num_tokens_per_expert == want, f"cached: {c.num_tokens_per_expert} != {want}")
        chk.expect(c.num_tokens_per_expert_tensor.tolist() == want,
                   f"cached tensor: {c.num_tokens_per_expert_tensor.tolist()} != {want}")
        w = buf.dispatch(me.x, me.topk_idx, me.topk_weights, num_worst_tokens=tokens * world)
        chk.expect(w.num_tokens_per_expert == want, f"num_worst_tokens: {w.num_tokens_per_expert} != {want}")
    finally:
        buf.destroy()
    ll = largeep.Buffer(None, hidden=hidden, num_experts=experts, num_topk=topk, max_tokens_per_rank=tokens,
                        backend="torch", low_latency=True)
    try:
        r = ll.low_latency_dispatch(me.x, me.topk_idx, use_fp8=False)
        y = r.x.float().mul(0.5).to(torch.bfloat16)
        bad_out = torch.zeros(tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
        bad_idx = me.topk_idx.clone()
        bad_idx[0, 0] = experts + 5
        for what, kw, idx in (("out", {"out": bad_out}, me.topk_idx), ("topk_idx", {}, bad_idx)):
            try:
                ll.low_latency_combine(y, idx, me.topk_weights, r.handle, **kw)
                chk.expect(False, f"{what}: not refused")
            except largeep.ArgumentError as exc:
                chk.expect(f"'{what}'" in str(exc), f"{what}: {exc}")
        chk.expect(bool((bad_out == 0).all()), "the refused out was written")
        good = torch.empty(tokens, hidden, dtype=torch.bfloat16)
        comb = ll.low_latency_combine(y, me.topk_idx, me.topk_weights, r.handle, out=good)
        chk.expect(comb.x.data_ptr() == good.data_ptr() and bool(torch.isfinite(good.float()).all()), "good combine")
        ll.low_latency_dispatch(me.x, me.topk_idx, use_fp8=False)  # (every rank still in step)
    finally:
        ll.destroy()
    return chk.failures


@pytest.mark.parametrize("world", [1, 2])
def test_counts_and_ll_refusals(pools, world: int) -> None:
    results = pools(world).run(counts_and_ll_refusals)
    assert all(not r for r in results), results


@pytest.mark.parametrize("world,ranks_per_node,worst,per_round", [(2, 1, False, None), (4, 2, False, None),
                                                                  (4, 1, True, None), (4, 2, False, 3),
                                                                  (3, None, False, None)])
def test_normal_combine_bf16_partials(pools, world: int, ranks_per_node: int | None, worst: bool,
                                      per_round: int | None) -> None:
    """Buffer.combine(bf16_partial_sums=True), bit for bit against a reference of its own: each other node's partial
    sum rounded to bf16, the token's own node's rows in float32; the same as without it within one node. Also
    after a num_worst_tokens dispatch and in rounds."""
    tokens = [6, 0, 9, 4][:world]
    pools(world).run(bodies.normal_combine_bf16_partials, "torch", tokens, 256, ranks_per_node, worst, per_round)
