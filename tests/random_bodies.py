"""Bodies for the randomised, long-running and two-group tests: ``fn(rank, world, *args)`` on every rank of a pool.

Every body returns what it found instead of raising (see ``checked_calls``); the parent asserts.
"""

from __future__ import annotations

import gc
import os
import random
from typing import Any

import largeep
import torch
import torch.distributed as dist
from checked_calls import (
    Checker,
    LowLatencyCase,
    LowLatencyRound,
    NormalCase,
    NormalRound,
    make_buffer,
    same_bits,
)
from largeep import fp8

Case = NormalCase | LowLatencyCase


# -- one list of cases, optionally against a second backend ---------------------------------------------------------
def _compare_normal(a: NormalRound, b: NormalRound, chk: Checker) -> None:
    """Two backends, the same inputs: the dispatch is fully specified (row order included), so bit-equal."""
    assert a.res is not None and b.res is not None
    xa, xb = a.res.x, b.res.x
    pairs = list(zip(xa, xb, strict=True)) if isinstance(xa, tuple) else [(xa, xb)]
    r = len(a.refs[a.rank].src)
    for i, (u, v) in enumerate(pairs):
        chk.expect(same_bits(u[:r].cpu(), v[:r].cpu()), f"backends differ: dispatch x[{i}]")
    for name in ("topk_idx", "topk_weights"):
        u, v = getattr(a.res, name), getattr(b.res, name)
        chk.expect(same_bits(u[:r].cpu(), v[:r].cpu()), f"backends differ: dispatch {name}")
    # (the counts as tensors; the lists too where both backends give them: with num_worst_tokens a GPU gives none)
    ta, tb = a.res.num_tokens_per_expert_tensor.cpu().tolist(), b.res.num_tokens_per_expert_tensor.cpu().tolist()
    chk.expect(ta == tb, f"backends differ: counts {ta} != {tb}")
    la, lb = a.res.num_tokens_per_expert, b.res.num_tokens_per_expert
    chk.expect(la == lb or not la or not lb, f"backends differ: counts {la} != {lb}")
    if a.combined is not None and b.combined is not None:
        chk.close(a.combined, b.combined.cpu(), a.combined.dtype, "backends differ: combine x")


def _ll_rows(rnd: LowLatencyRound) -> dict[tuple[int, int, int], torch.Tensor]:
    """(local expert, source rank, token) -> received row (dequantized for FP8)."""
    assert rnd.res is not None
    counts = rnd.res.num_tokens_per_expert.cpu().tolist()
    info = rnd.res.src_info.cpu()
    if rnd.case.use_fp8:
        q, s = rnd.res.x
        vals = fp8.dequantize(q.cpu(), s.cpu())
    else:
        assert isinstance(rnd.res.x, torch.Tensor)
        vals = rnd.res.x.cpu().float()
    out = {}
    for e, n in enumerate(counts):
        for j in range(n):
            src, tok = info[e, j].tolist()
            out[(e, src, tok)] = vals[e, j]
    return out


def _compare_low_latency(a: LowLatencyRound, b: LowLatencyRound, chk: Checker) -> None:
    ra, rb = _ll_rows(a), _ll_rows(b)
    if not chk.expect(ra.keys() == rb.keys(), "backends differ: low-latency rows received"):
        return
    # (FP8: both divide each value by its group's scale in float32, so the codes and scales are the same bits)
    for key, u in ra.items():
        if not chk.expect(same_bits(u, rb[key]), f"backends differ: low-latency row {key}"):
            break


def run_cases(
    rank: int, world: int, backend: str, cases: list[Case], against: str | None = None
) -> list[dict[str, Any]]:
    """Runs every case on a fresh Buffer of ``backend`` (and, with ``against``, the same case on a Buffer of that
    backend, both checked against the reference and against each other). One result per case: failures, number of
    checks, and this rank's adjoint shares for normal cases."""
    out: list[dict[str, Any]] = []
    for i, case in enumerate(cases):
        chk = Checker(f"case {i} {case} on rank {rank}")
        kinds = [backend] + ([against] if against else [])
        rounds: list[NormalRound | LowLatencyRound] = []
        for kind in kinds:
            buf = make_buffer(case, kind)
            try:
                if isinstance(case, NormalCase):
                    rounds.append(NormalRound(buf, case, chk).run())
                else:
                    rounds.append(LowLatencyRound(buf, case, chk).run())
            except Exception as exc:
                raise RuntimeError(f"{kind} backend raised on case {i} {case} (rank {rank})") from exc
            finally:
                buf.destroy()
        if against:
            a, b = rounds
            if isinstance(a, NormalRound) and isinstance(b, NormalRound):
                _compare_normal(a, b, chk)
            elif isinstance(a, LowLatencyRound) and isinstance(b, LowLatencyRound):
                _compare_low_latency(a, b, chk)
        adjoint = rounds[0].adjoint if isinstance(rounds[0], NormalRound) else None
        out.append({"failures": chk.failures, "checks": chk.checks, "adjoint": adjoint})
    return out


# -- memory ---------------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident set size of this process (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    """Tensors reachable by the garbage collector (a leak of Python-held tensors shows here at once)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no __class__ hooks


def memory_sample() -> dict[str, int]:
    gc.collect()
    sample = {"rss": rss_bytes(), "tensors": live_tensors()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        sample["cuda_allocated"] = int(torch.cuda.memory_allocated())
    return sample


# -- long runs ------------------------------------------------------------------------------------------------------
LONG_NORMAL = dict(hidden=256, num_topk=4, max_tokens=32)  # experts: 4 per rank
LONG_LOW_LATENCY = dict(hidden=128, num_topk=3, max_tokens=16)  # experts: 2 per rank


def _long_round(
    i: int, rank: int, world: int, seed: int, normal: largeep.Buffer, low: largeep.Buffer, kinds: dict[str, int]
) -> tuple[Checker, Any]:
    """Round ``i`` of :func:`long_run` (a function, so nothing of it stays alive when memory is sampled)."""
    rng = random.Random(seed * 1_000_003 + i)  # the same draws on every rank
    chk = Checker(f"round {i} on rank {rank}")
    minus = rng.choice([0.0, 0.05, 0.3, 1.0])
    n_exp, l_exp = normal.ctx.num_experts, low.ctx.num_experts
    if rng.random() < 0.5:
        m = LONG_NORMAL["max_tokens"]
        dtype, use_fp8 = rng.choice([("bfloat16", False), ("float32", False), ("bfloat16", True)])
        case = NormalCase(
            tuple(rng.randint(0, m) for _ in range(world)), LONG_NORMAL["hidden"], n_exp, LONG_NORMAL["num_topk"],
            seed * 7 + i, dtype=dtype, use_fp8=use_fp8, alignment=rng.choice([1, 1, 4]), worst=rng.random() < 0.25,
            minus_one=minus, distinct=rng.random() < 0.8, max_tokens=m,
        )
        kinds["normal"] += 1
        return chk, (NormalRound(normal, case, chk).run().adjoint, dtype, use_fp8)
    m = LONG_LOW_LATENCY["max_tokens"]

    def ll_case(j: int) -> LowLatencyCase:
        return LowLatencyCase(
            tuple(rng.randint(0, m) for _ in range(world)), m, LONG_LOW_LATENCY["hidden"], l_exp,
            LONG_LOW_LATENCY["num_topk"], seed * 11 + i * 2 + j, use_fp8=rng.random() < 0.7,
            round_scale=rng.random() < 0.3, use_ue8m0=rng.random() < 0.2, hook=rng.random() < 0.5, minus_one=minus,
            weighted=rng.choice(["none", "all", "some"]), bf16_sums=rng.random() < 0.5,
        )

    if i % 8 == 7:
        first, second = LowLatencyRound(low, ll_case(0), chk), LowLatencyRound(low, ll_case(1), chk)
        first.dispatch()
        second.dispatch()
        first.receive()
        second.receive()
        first.combine()
        second.combine()
        kinds["two_in_flight"] += 1
    else:
        LowLatencyRound(low, ll_case(0), chk).run()
        kinds["low_latency"] += 1
    return chk, None


def long_run(rank: int, world: int, backend: str, rounds: int, seed: int, warmup: int) -> dict[str, Any]:
    """``rounds`` rounds of random sizes on one normal and one low-latency Buffer, every result checked; memory
    sampled after ``warmup`` rounds and at the end. Every 8th round, if low-latency, keeps two dispatches in
    flight (SPEC: double-buffered) before receiving and combining them."""
    normal = largeep.Buffer(
        None, hidden=LONG_NORMAL["hidden"], num_experts=4 * world, num_topk=LONG_NORMAL["num_topk"],
        max_tokens_per_rank=LONG_NORMAL["max_tokens"], backend=backend,
    )
    low = largeep.Buffer(
        None, hidden=LONG_LOW_LATENCY["hidden"], num_experts=2 * world, num_topk=LONG_LOW_LATENCY["num_topk"],
        max_tokens_per_rank=LONG_LOW_LATENCY["max_tokens"], backend=backend, low_latency=True,
    )
    failures: list[str] = []
    checks = 0
    adjoints: list[Any] = []
    samples: list[dict[str, int]] = []
    kinds = {"normal": 0, "low_latency": 0, "two_in_flight": 0}
    try:
        for i in range(rounds):
            if i == warmup:
                samples.append(memory_sample())
            chk, adjoint = _long_round(i, rank, world, seed, normal, low, kinds)
            failures += chk.failures[: max(0, 50 - len(failures))]  # keep going: ranks must stay in step
            checks += chk.checks
            if adjoint is not None:
                adjoints.append(adjoint)
            del chk, adjoint
        samples.append(memory_sample())
    finally:
        normal.destroy()
        low.destroy()
    return {"failures": failures, "checks": checks, "adjoints": adjoints, "samples": samples, "kinds": kinds}


def create_destroy(rank: int, world: int, backend: str, cycles: int, warmup: int) -> dict[str, Any]:
    """``cycles`` Buffers made and destroyed in turn (normal and low-latency, several sizes), a checked round on
    every 10th; memory sampled after ``warmup`` cycles and at the end."""
    failures: list[str] = []
    samples: list[dict[str, int]] = []
    toks = tuple(3 + r for r in range(world))
    for i in range(cycles):
        if i == warmup:
            samples.append(memory_sample())
        case: Case
        if i % 2:
            case = LowLatencyCase(toks, 8 + 8 * (i % 3), 128 * (1 + i % 2), 2 * world, 2, i)
        else:
            case = NormalCase(toks, 128 * (1 + i % 3), 4 * world, 3, i, max_tokens=8 + 8 * (i % 4))
        buf = make_buffer(case, backend)
        try:
            if i % 10 == 9:
                chk = Checker(f"cycle {i} on rank {rank}")
                if isinstance(case, NormalCase):
                    NormalRound(buf, case, chk).run()
                else:
                    LowLatencyRound(buf, case, chk).run()
                failures += chk.failures
        finally:
            buf.destroy()
    samples.append(memory_sample())
    return {"failures": failures, "samples": samples}


# -- two Buffers on two groups --------------------------------------------------------------------------------------
def two_groups(rank: int, world: int, backend: str, seed: int) -> dict[str, Any]:
    """Buffers on the world group and on a second group of the same ranks, then on the world group and a subgroup
    (pairs of ranks), used side by side: calls of one Buffer between the dispatch and combine of the other, and a
    low-latency receive hook left pending across them."""
    chk = Checker(f"two groups on rank {rank}")
    toks = tuple(4 + 3 * r for r in range(world))
    same = dist.new_group(list(range(world)))
    bufs: list[largeep.Buffer] = []

    def buffer(case: Case, group: dist.ProcessGroup | None) -> largeep.Buffer:
        b = largeep.Buffer(group, backend=backend, **case.buffer_kwargs())
        bufs.append(b)
        return b

    sub: dist.ProcessGroup | None = None
    try:
        ca = NormalCase(toks, 256, 4 * world, 3, seed, max_tokens=16)
        cb = NormalCase(toks, 128, 2 * world, 2, seed + 1, dtype="float32", worst=True, max_tokens=16)
        cc = LowLatencyCase(toks, 16, 128, 2 * world, 2, seed + 2, hook=True)
        ra = NormalRound(buffer(ca, None), ca, chk)
        rb = NormalRound(buffer(cb, same), cb, chk, group=same)
        rc = LowLatencyRound(buffer(cc, same), cc, chk, group=same)
        rc.dispatch()  # sends issued; the receive waits for the hook
        ra.dispatch()
        rb.dispatch()
        rc.receive()
        rb.combine()
        ra.combine()
        rc.combine()
        if world % 2 == 0 and world > 2:
            size = world // 2
            sub, _ = dist.new_subgroups(group_size=size)
            part = rank // size
            cs = NormalCase(tuple(toks[part * size : (part + 1) * size]), 128, 2 * size, 2, seed + 10 + part,
                            max_tokens=16)
            cw = LowLatencyCase(toks, 16, 256, 2 * world, 3, seed + 3, use_fp8=False, hook=True)
            rs = NormalRound(buffer(cs, sub), cs, chk, group=sub)
            rw = LowLatencyRound(buffer(cw, None), cw, chk)
            rs.dispatch()
            rw.dispatch()
            rs.combine()
            rw.receive()
            rw.combine()
    finally:
        for b in bufs:
            b.destroy()
        dist.destroy_process_group(same)
        if sub is not None:
            dist.destroy_process_group(sub)
    return {"failures": chk.failures, "checks": chk.checks}
