"""The sweep every rank runs: backends x modes x sizes x dtypes x SM counts, timed as timing.py says.

What each op times (one call each, ranks aligned and L2 flushed before it):
- normal ``layout``: the backend's dispatch layout (which ranks, nodes and experts each token needs);
- normal ``dispatch``: a dispatch with the handle of an earlier dispatch of the same routing (no layout, no count
  exchange: pure data movement, the way DeepEP's tests tune dispatch, so ANCHORS.md's figures compare);
- normal ``combine``: combine with that handle, bf16 expert outputs (with ``Plan.bf16_partial_sums``, Buffer.combine's
  option: its partial sums between nodes in bf16; the round trip's combine too);
- normal ``roundtrip``: a fresh dispatch (layout, count exchange and its host wait included) and a combine: what an
  MoE layer pays;
- low-latency ``dispatch`` and ``combine``: one call each, in pairs (dispatch, then combine of its handle);
- low-latency ``roundtrip``: the two in one timed call (a dispatch, then the combine of its handle);
- low-latency ``send``/``recv`` (backends with a receive hook whose send makes its transfer inside the call: not the
  torch backend, see ``Adapter.hook_untimed``): the call with ``return_recv_hook=True``, then, with every rank's sends
  finished (synchronize + barrier), the hook; ``extras.phase_of`` says which call.
"""

from __future__ import annotations

import itertools
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from largeep.bench import records as rec
from largeep.bench.adapters import Adapter, BufferSpec, make_adapter
from largeep.bench.routing import random_topk, random_weights
from largeep.bench.timing import Stats, Timer, reduce_over_ranks


@dataclass
class ModePlan:
    """Sizes swept in one mode (every combination)."""

    tokens: list[int]
    hidden: list[int]
    topk: list[int]
    experts: list[int]
    dtypes: list[str]


@dataclass
class Plan:
    """Everything a sweep needs; built by the CLI from a preset and the options."""

    preset: str
    backends: list[str]
    modes: list[str]
    normal: ModePlan
    low_latency: ModePlan
    num_sms: list[int]
    warmup: int
    iters: int
    ranks_per_node: int | None = None
    routing: str = "uniform"
    zipf_s: float = 1.0
    seed: int = 0
    hook: bool = True
    # low-latency: the dispatch carries topk_weights where the backend takes them (Buffer.low_latency_dispatch's
    # option: the combine sums each token's outputs on the experts' ranks); other backends run as without
    ll_send_weights: bool = False
    # with ll_send_weights: those sums come back as one bf16 row (bf16_partial_sums)
    ll_bf16_partial_sums: bool = False
    # normal mode: the combines (combine and round trip) pass Buffer.combine's bf16_partial_sums where the backend
    # takes it: in a group of several nodes, each node's partial sum goes home as bf16 rather than float32
    bf16_partial_sums: bool = False
    link_gbps: float = 450.0  # one GPU's link, one way: NVLink4 on H100/H200 (the floor column)
    plots: bool = True
    out: str | None = None
    # set by the launcher that starts one set of processes per backend: rank 0 writes its records here and the
    # launcher prints and writes the merged results
    part: str | None = None
    # set by that launcher too: (progress points of the backends run before these processes, the whole run's), so
    # that the progress lines count the whole run rather than restart with each backend
    progress: tuple[int, int] | None = None
    command: str = ""
    extra_settings: dict[str, Any] = field(default_factory=dict)

    def mode_plan(self, mode: str) -> ModePlan:
        return self.normal if mode == "normal" else self.low_latency


class _Log:
    """Progress and skip lines, printed by rank 0 only (tqdm for the progress bar when it is installed)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.total = 0
        self.done = 0
        self.offset = 0
        self.overall = 0
        self.t0 = time.perf_counter()
        self.bar: Any = None

    def start(self, total: int, offset: int = 0, overall: int | None = None) -> None:
        """Begins the progress count of ``total`` points (a tqdm bar on a terminal when tqdm is installed, else plain
        lines); ``offset`` and ``overall``: where they lie in a whole run of ``overall`` points (the launcher's, one
        set of processes per backend), which the lines then show too."""
        self.total = total
        self.offset = offset
        self.overall = total if overall is None else overall
        self.t0 = time.perf_counter()
        if self.rank == 0 and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=self.overall, initial=offset, unit="pt", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def info(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def step(self, what: str) -> None:
        self.done += 1
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.set_description(what)
            self.bar.update(1)
        else:
            where = f"{self.done}/{self.total}"
            if self.overall != self.total:
                where += f", {self.offset + self.done}/{self.overall} overall"
            print(f"[{where} {time.perf_counter() - self.t0:6.1f}s] {what}", flush=True)

    def skip(self, n: int) -> None:
        """``n`` points that will not run (their sizes or configuration skipped, said why): counted as done, so
        that the count, and the bar, reach the total."""
        self.done += n
        if self.rank == 0 and self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _gather_matrix(vec: torch.Tensor, group: dist.ProcessGroup | None, device: torch.device) -> torch.Tensor:
    """Every rank's int64 [N] -> [N src, N dst] on the CPU (collective)."""
    n = dist.get_world_size(group)
    local = vec.to(device)
    parts = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(parts, local, group=group)
    return torch.stack(parts).cpu()


def _agree(reason: str | None, group: dist.ProcessGroup | None) -> str | None:
    """The first non-None reason of any rank (collective), so every rank skips together."""
    reasons: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(reasons, reason, group=group)
    for r in reasons:
        if r:
            return str(r)
    return None


def ranks_per_host(group: dist.ProcessGroup | None) -> int:
    names: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, socket.gethostname(), group=group)
    return names.count(names[0])


def _tune_now() -> dict[str, int] | str:
    """LARGEEP_TUNE's values as a Buffer made now reads them (or why they cannot be read)."""
    from largeep import _env

    try:
        return dict(_env.settings().tune)
    except ValueError as exc:
        return f"unreadable: {exc}"


class Sweep:
    """Runs a :class:`Plan` on this rank; rank 0 prints, writes the JSON and draws the plots."""

    def __init__(self, plan: Plan, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
        self.plan = plan
        self.device = device
        world = group if group is not None else dist.group.WORLD
        assert world is not None
        self.group: dist.ProcessGroup = world
        self.rank = dist.get_rank(group)
        self.n = dist.get_world_size(group)
        self.timer = Timer(group, device)
        self.records: list[rec.Record] = []
        self.extras: list[rec.Extra] = []
        self.skipped: list[dict[str, str]] = []
        self._env: dict[str, Any] | None = None
        self.log = _Log(self.rank)
        host = ranks_per_host(group)
        self.rpn = plan.ranks_per_node or host
        if self.n % self.rpn or self.rpn > host:
            raise ValueError(
                f"--ranks-per-node {self.rpn} must divide the {self.n} ranks and be at most the {host} ranks per host"
            )

    # -- driver -------------------------------------------------------------------------------------------------
    def run(self) -> tuple[list[rec.Record], list[rec.Extra]]:
        p = self.plan
        adapters: list[Adapter] = []
        for name in p.backends:
            a = make_adapter(name)
            reason = _agree(a.unavailable_reason(self.device), self.group)
            if reason:
                self._skip(name, reason)
                continue
            adapters.append(a)
            if p.ll_send_weights and "low_latency" in p.modes and not a.sends_ll_weights:
                self.log.info(f"--ll-send-weights: not for {name} (it applies the weights at the combine either way)")
            if p.bf16_partial_sums and "normal" in p.modes:
                if not a.takes_bf16_partial_sums:
                    self.log.info(f"--bf16-partial-sums: not for {name} (its combine has no such option)")
                elif self.rpn == self.n:
                    self.log.info(f"--bf16-partial-sums: the {self.n} ranks are one node, where it changes nothing "
                                  f"for {name}")
            if p.hook and "low_latency" in p.modes and a.hook_untimed:
                self._skip(name, a.hook_untimed, "low_latency send/recv")
        self.log.start(sum(points(p, a) for a in adapters), *(p.progress or (0, None)))
        for a in adapters:
            try:
                for mode in p.modes:
                    self._run_mode(a, mode)
            finally:
                a.shutdown()
                self._write_part()  # (also when a backend failed: its records so far are kept)
        self.log.close()
        self._write_part()
        if self.rank == 0 and p.part is None:
            finish(self.records, self.extras, skipped=self.skipped, settings=self.settings(), plan=p)
        return self.records, self.extras

    def _skip(self, backend: str, reason: str, where: str = "") -> None:
        """One line, ``skip BACKEND [WHERE]: REASON``; kept in the run's "skipped" as {backend, reason}, the reason
        prefixed by WHERE (the mode and sizes) when given."""
        self.skipped.append({"backend": backend, "reason": f"{where}: {reason}" if where else reason})
        self.log.info(f"skip {backend}{' ' + where if where else ''}: {reason}")

    def _run_mode(self, a: Adapter, mode: str) -> None:
        p = self.plan
        mp = p.mode_plan(mode)
        sms_list = _sms_list(p, a, mode)
        for hidden, topk, experts in itertools.product(mp.hidden, mp.topk, mp.experts):
            sizes = f"{mode} H={hidden} K={topk} E={experts}"
            dtypes = _dtypes(mp, hidden)
            npoints = len(mp.tokens) * len(dtypes) * len(sms_list)
            why = None
            if experts % self.n:
                why = f"{experts} experts are not divisible by {self.n} ranks"
            elif topk > experts:
                why = f"top-{topk} exceeds {experts} experts"
            if why:
                self._skip(a.name, why, sizes)
                self.log.skip(npoints)
                continue
            if len(dtypes) < len(mp.dtypes):  # (left out of the progress count too)
                self._skip(a.name, f"needs hidden % {rec.FP8_GROUP} == 0", f"{sizes} fp8")
            if not dtypes:  # (no Buffer to make for nothing)
                continue
            # normal mode: one Buffer for every token count (its buffers are sized for the largest); low latency:
            # one Buffer per token count, sized for it (max_tokens_per_rank = T), since its receive slots, and the
            # torch backend's padded transfers, go with max_tokens_per_rank: a point must not depend on the others
            groups = [list(mp.tokens)] if mode == "normal" else [[t] for t in mp.tokens]
            for sms, group in itertools.product(sms_list, groups):
                spec = BufferSpec(mode, hidden, experts, topk, max(group), sms, self.rpn)
                at = sizes + (f" sms={sms}" if sms else "")
                what = f"{a.name} {at}"  # (progress lines add T and dtype)
                where = at + (f" T={group[0]}" if mode != "normal" else "")
                reason = _agree(a.config_reason(spec, self.n), self.group)
                if reason is None:
                    err = None
                    try:
                        a.open(self.group, spec, self.device)
                    except (RuntimeError, ValueError) as exc:  # e.g. largeep.ArgumentError, backend refusals
                        err = f"{type(exc).__name__}: {exc}"
                    reason = _agree(err, self.group)
                if reason:
                    self._skip(a.name, reason, where)
                    self.log.skip(len(group) * len(dtypes))
                    continue
                try:
                    for tokens in group:
                        # the layout and the combine do not depend on the dispatch dtype: timed with the first
                        # dtype, recorded once, as BF16 (the combine's rows are; the layout moves none, and takes
                        # one label whatever the order of --dtypes)
                        for i, dtype in enumerate(dtypes):
                            run = self._normal if mode == "normal" else self._low_latency
                            run(a, spec, tokens, dtype, i == 0)
                            self.log.step(f"{what} T={tokens} {dtype}")
                finally:
                    a.close()

    # -- inputs -------------------------------------------------------------------------------------------------
    def _inputs(self, spec: BufferSpec, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x bf16 [T, H], topk_idx int64 [T, K], topk_weights float32 [T, K] on the device, seeded by rank and T."""
        p = self.plan
        seed = (p.seed * 1_000_003 + self.rank * 10_007 + tokens * 131 + spec.num_experts) % (2**62)
        idx = random_topk(tokens, spec.num_experts, spec.num_topk, seed=seed, routing=p.routing,
                          zipf_s=p.zipf_s, popularity_seed=p.seed)
        w = random_weights(tokens, spec.num_topk, seed=seed + 1)
        gen = torch.Generator().manual_seed(seed + 2)
        x = torch.randn(tokens, spec.hidden, generator=gen).to(torch.bfloat16)
        return x.to(self.device), idx.to(self.device), w.to(self.device)

    # -- normal mode --------------------------------------------------------------------------------------------
    def _normal(self, a: Adapter, spec: BufferSpec, tokens: int, dtype: str, first: bool) -> None:
        """``first``: the first dtype of these sizes, which also times the layout and the combine."""
        from largeep import fp8

        x, idx, w = self._inputs(spec, tokens)
        xd: Any = fp8.quantize(x) if dtype == "fp8" else x
        send = rec.send_rows_normal(idx, spec.num_experts, self.n)
        matrix = _gather_matrix(send, self.group, self.device)
        traffic = rec.Traffic.from_matrix(matrix)
        handle, rows = a.dispatch(xd, idx, w)
        if rows is None:
            rows = int(matrix[:, self.rank].sum())
        y = a.combine_input(rows)
        # Buffer.combine's bf16_partial_sums, passed to every combine of the backends that take it (it applies in
        # a group of several nodes; the records say whether it did)
        part = self.plan.bf16_partial_sums and a.takes_bf16_partial_sums

        def roundtrip() -> None:
            h, _ = a.dispatch(xd, idx, w)
            a.combine(y, h, bf16_partial_sums=part)

        t = self.timer
        for i in range(self.plan.warmup + self.plan.iters):
            keep = i >= self.plan.warmup
            if first:
                t.time("layout", lambda: a.layout(idx), record=keep)
            t.time("dispatch", lambda: a.dispatch_cached(xd, handle), record=keep)
            # (every dtype combines here, recorded for the first: the round trip's dispatch then follows a combine,
            # so no adapter pays the fence of two dispatches in a row inside the timed round trip; symm_mem's)
            t.time("combine", lambda: a.combine(y, handle, bf16_partial_sums=part), record=keep and first)
            t.time("roundtrip", roundtrip, record=keep)
        stats = reduce_over_ranks(t.take(), self.group, self.device)
        rb_d = rec.row_bytes(dtype, spec.hidden)
        rb_c = rec.row_bytes("bf16", spec.hidden)
        per_row = {"layout": None, "dispatch": rb_d, "combine": rb_c, "roundtrip": rb_d + rb_c}
        # the floor: a token once per destination rank, and back in the combine (the busiest rank's link); the
        # combine's as rank-to-rank rows of 2 H bytes, with or without bf16 partial sums (the forwarders' sums between
        # nodes, float32 or bf16, are not modelled: the logical and bus bandwidths count the same rows)
        back = traffic.reversed()
        floors = {"layout": None, "dispatch": rec.link_bytes((traffic, rb_d)), "combine": rec.link_bytes((back, rb_c)),
                  "roundtrip": rec.link_bytes((traffic, rb_d), (back, rb_c))}
        # which combine ran (records of the combine and the round trip of backends that take the option): True, its
        # partial sums between nodes in bf16; False, in float32 (or one node, where there are none)
        applied = part and self.rpn < self.n if a.takes_bf16_partial_sums else None
        for op in ("layout", "dispatch", "combine", "roundtrip"):
            if op in stats:
                label = "bf16" if op in ("layout", "combine") else dtype
                self._add(a, spec, "normal", op, None, tokens, label, stats[op], traffic, per_row[op], floors[op],
                          bf16_partial_sums=applied if op in ("combine", "roundtrip") else None)

    # -- low-latency mode ---------------------------------------------------------------------------------------
    def _low_latency(self, a: Adapter, spec: BufferSpec, tokens: int, dtype: str, first: bool) -> None:
        """``first``: the first dtype of these sizes; only its combines are recorded (each dispatch is still
        combined, so every dtype's calls run in the same order)."""
        x, idx, w = self._inputs(spec, tokens)
        use_fp8 = dtype == "fp8"
        copies = rec.send_copies_ll(idx, spec.num_experts, self.n)
        traffic = rec.Traffic.from_matrix(_gather_matrix(copies, self.group, self.device))
        # the floor: a dispatched token needs to reach each destination rank once; the combine's copies differ
        per_rank = rec.Traffic.from_matrix(
            _gather_matrix(rec.send_rows_normal(idx, spec.num_experts, self.n), self.group, self.device))
        sent = self.plan.ll_send_weights and a.sends_ll_weights
        one = sent and self.plan.ll_bf16_partial_sums
        if sent:  # the combine's floor: a summed (token, rank) pair comes back as two rows (one: bf16 partial
            # sums), a single copy as one
            summed = rec.Traffic.from_matrix(_gather_matrix(
                rec.summed_rows_ll(idx, spec.num_experts, self.n, 1 if one else 2), self.group, self.device))
        y = a.ll_combine_input()
        t = self.timer
        ws = w if sent else None

        def dispatch(hook: bool) -> Callable[[], Any]:
            return lambda: a.ll_dispatch(x, idx, use_fp8, hook, ws, one)

        def combine(handle: Any, hook: bool) -> Callable[[], Any]:
            return lambda: a.ll_combine(y, idx, w, handle, hook)

        def roundtrip() -> None:
            h, _ = a.ll_dispatch(x, idx, use_fp8, False, ws, one)
            a.ll_combine(y, idx, w, h, False)

        for i in range(self.plan.warmup + self.plan.iters):
            keep = i >= self.plan.warmup
            handle, _ = t.time("dispatch", dispatch(False), record=keep)
            t.time("combine", combine(handle, False), record=keep and first)
            t.time("roundtrip", roundtrip, record=keep)
        if self.plan.hook and a.has_hook:
            for i in range(self.plan.warmup + self.plan.iters):
                keep = i >= self.plan.warmup
                handle, recv_hook = t.time("dispatch.send", dispatch(True), record=keep)
                t.time("dispatch.recv", _call(recv_hook), record=keep)
                combine_hook = t.time("combine.send", combine(handle, True), record=keep and first)
                t.time("combine.recv", _call(combine_hook), record=keep and first)
        stats = reduce_over_ranks(t.take(), self.group, self.device)
        rb_d = rec.row_bytes(dtype, spec.hidden)
        rb_c = rec.row_bytes("bf16", spec.hidden)
        names = [("dispatch", "dispatch", None, rb_d), ("combine", "combine", None, rb_c),
                 ("roundtrip", "roundtrip", None, rb_d + rb_c),
                 ("dispatch.send", "send", "dispatch", rb_d), ("dispatch.recv", "recv", "dispatch", None),
                 ("combine.send", "send", "combine", rb_c), ("combine.recv", "recv", "combine", None)]
        back = (summed if sent else traffic).reversed()  # (the combine's rows go from the experts' ranks)
        floors = {"dispatch": rec.link_bytes((per_rank, rb_d)), "combine": rec.link_bytes((back, rb_c)),
                  "roundtrip": rec.link_bytes((per_rank, rb_d), (back, rb_c))}
        # what crosses the links (bus bandwidth): with the weights sent, the combine's summed rows, not a row per copy
        moved: dict[str, tuple[tuple[rec.Traffic, int], ...]] = {
            "dispatch": ((traffic, rb_d),), "combine": ((summed if sent else traffic, rb_c),)}
        moved["roundtrip"] = moved["dispatch"] + moved["combine"]
        for name, op, phase, rb in names:
            if name in stats:
                # (a receive moves nothing over the link in hook mode: its rows came with the send, so it has
                # no floor and no logical bandwidth, as a layout has none)
                self._add(a, spec, "low_latency", op, phase, tokens, "bf16" if (phase or op) == "combine" else dtype,
                          stats[name], traffic, rb,
                          None if op == "recv" else floors[phase or op], weights_sent=sent,
                          bf16_partial_sums=one if sent else None, moved=moved[phase or op])

    # -- records ------------------------------------------------------------------------------------------------
    def _add(
        self, a: Adapter, spec: BufferSpec, mode: str, op: str, phase: str | None, tokens: int, dtype: str,
        st: Stats, traffic: rec.Traffic, bytes_per_row: int | None, floor_bytes: float | None = None,
        weights_sent: bool | None = None, bf16_partial_sums: bool | None = None,
        moved: tuple[tuple[rec.Traffic, int], ...] | None = None,
    ) -> None:
        """floor_bytes: the fewest bytes the busiest GPU's link carries one way (records.py, ``floor_us``).
        ``moved``: the (rows, bytes per row) that cross the links, where they are not ``traffic``'s rows of
        ``bytes_per_row`` (the bus bandwidth's bytes; the logical bandwidth counts ``traffic``'s)."""
        logical = bus = None
        if bytes_per_row is not None:
            logical = rec.gbps(traffic.logical_bytes(bytes_per_row), st.median)
            parts = moved if moved is not None else ((traffic, bytes_per_row),)
            bus = rec.gbps(sum(tr.bus_bytes(rb) for tr, rb in parts), st.median)
        floor = (rec.floor_us(floor_bytes, self.plan.link_gbps)
                 if floor_bytes is not None and self.device.type == "cuda" else None)
        self.records.append(rec.Record(
            backend=a.name, mode=mode, op=op, ep=self.n, ranks_per_node=self.rpn, num_tokens=tokens,
            hidden=spec.hidden, num_topk=spec.num_topk, num_experts=spec.num_experts, dtype=dtype,
            num_sms=spec.num_sms, time_us_median=st.median, time_us_p10=st.p10, time_us_p90=st.p90,
            logical_gbps=logical,
        ))
        self.extras.append(rec.Extra(bus_gbps=bus, phase_of=phase, floor_us=floor, weights_sent=weights_sent,
                                     bf16_partial_sums=bf16_partial_sums,
                                     semantics="partial" if a.partial else "full", semantics_note=a.partial,
                                     max_tokens_per_rank=spec.max_tokens))

    def settings(self) -> dict[str, Any]:
        p = self.plan
        return {
            "preset": p.preset, "backends": p.backends, "modes": p.modes, "hook": p.hook,
            "warmup": p.warmup, "iters": p.iters, "routing": p.routing,
            "zipf_s": p.zipf_s if p.routing == "zipf" else None, "seed": p.seed,
            "device": self.device.type, "world_size": self.n, "ranks_per_node": self.rpn,
            "normal": asdict(p.normal), "low_latency": asdict(p.low_latency), "num_sms": p.num_sms,
            "timing": ("per iteration: max over ranks of each rank's time (all-gathered); median/p10/p90 over "
                       "iterations; " + ("CUDA events, L2 flushed (256 MiB zero_) and ranks barrier-aligned "
                                         "before each call" if self.device.type == "cuda"
                                         else "time.perf_counter, ranks barrier-aligned before each call")),
            "dispatch": "normal: with the handle of an earlier dispatch (no layout, no count exchange); low latency: "
                        "one call",
            "roundtrip": "normal: fresh dispatch (layout, count exchange included) + combine; low latency: "
                         "dispatch + combine of its handle, one timed call",
            "bandwidth": "per-rank mean of received bytes (SPEC.md Measuring) / median time",
            "link_gbps": p.link_gbps,
            "ll_send_weights": p.ll_send_weights,
            "ll_bf16_partial_sums": p.ll_bf16_partial_sums,
            "bf16_partial_sums": p.bf16_partial_sums,
            # the nvshmem kernels' settings (LARGEEP_TUNE): comb says which combine one node ran (0 push + reduce,
            # 1..7 fused), which the model needs to read a combine record
            "tune": _tune_now(),
            **p.extra_settings,
        }

    def _write_part(self) -> None:
        """Rank 0: the records so far, to the launcher's part file (or, without one, to --out's results.json and
        run.json as a checkpoint, once there is a record)."""
        if self.rank != 0:
            return
        if self.plan.part:
            rec.write_part(self.plan.part, self.records, self.extras, settings=self.settings(), skipped=self.skipped)
            return
        if not self.plan.out or not self.records:
            return
        if self._env is None:
            self._env = rec.environment()
        rec.write_results(Path(self.plan.out) / "results.json", self.records, self.extras, env=self._env,
                          command=self.plan.command, settings=self.settings(), skipped=self.skipped)


def finish(
    records: list[rec.Record], extras: list[rec.Extra], *, skipped: list[dict[str, str]], settings: dict[str, Any],
    plan: Plan, env: dict[str, Any] | None = None,
) -> list[Path]:
    """Fills ``x_best``, prints the table, writes results.json, run.json and the plots under ``plan.out`` and
    prints their folder's absolute path (without ``plan.plots``, and a warning naming the plots an earlier run left
    there). With no record it prints one line to stderr and writes nothing: a results file would look like a run
    (the caller exits non-zero)."""
    if not records:
        # (the launcher keeps a backend whose processes failed as skipped, its reason "failed: ...")
        failed = [s["backend"] for s in skipped if str(s.get("reason", "")).startswith("failed:")]
        why = (f"{', '.join(failed)} failed (see above), every other backend and configuration was skipped"
               if failed else "every backend and configuration was skipped (see the skip lines)")
        print(f"largeep-bench: nothing measured: {why}; no results written", file=sys.stderr, flush=True)
        return []
    rec.fill_x_best(records, extras)
    print(rec.format_table(records, extras), flush=True)
    if not plan.out:
        return []
    out = Path(plan.out).resolve()
    written = rec.write_results(out / "results.json", records, extras, env=env or rec.environment(),
                                command=plan.command, settings=settings, skipped=skipped)
    if plan.plots:
        from largeep.bench.plots import plot_results

        written += plot_results(records, extras, out)
    print(f"wrote {', '.join(w.name for w in written)} in {out}", flush=True)
    stale = [name for name in ("latency.png", "bandwidth.png") if not plan.plots and (out / name).exists()]
    if stale:
        print(f"largeep-bench: warning: {', '.join(stale)} in {out} {'is' if len(stale) == 1 else 'are'} from an "
              "earlier run (--no-plots drew none)", file=sys.stderr, flush=True)
    return written


def _sms_list(plan: Plan, a: Adapter, mode: str) -> list[int | None]:
    """The SM counts one mode sweeps: the plan's for a backend that takes them in normal mode; else [None], one
    measurement recorded with num_sms None. The low-latency kernels of every backend size their grids from the
    device's SMs (largeep.Buffer's num_sms is for normal mode; DeepEP's low-latency kernels ignore set_num_sms): a
    sweep over SM counts would time one configuration several times under different labels."""
    return list(plan.num_sms) if a.uses_sms and mode == "normal" else [None]


def points(plan: Plan, a: Adapter) -> int:
    """The progress count of one backend's sweep: per mode, its token counts x runnable (hidden, dtype) pairs x
    top-k values x expert counts x SM counts."""
    total = 0
    for mode in plan.modes:
        mp = plan.mode_plan(mode)
        per_sms = len(mp.tokens) * sum(len(_dtypes(mp, h)) for h in mp.hidden) * len(mp.topk) * len(mp.experts)
        total += per_sms * len(_sms_list(plan, a, mode))
    return total


def _dtypes(mp: ModePlan, hidden: int) -> list[str]:
    """The dispatch dtypes that can run at this hidden size (FP8 needs whole 128-channel scale groups)."""
    return [d for d in mp.dtypes if d != "fp8" or hidden % rec.FP8_GROUP == 0]


def _call(hook: Callable[[], Any] | None) -> Callable[[], Any]:
    def run() -> Any:
        return hook() if hook is not None else None

    return run
