"""``python -m largeep.bench`` / ``largeep-bench``: the dispatch/combine benchmark.

Starts one process per visible GPU (NCCL), or runs inside torchrun when RANK and WORLD_SIZE are set; with no GPU it
starts ``--nprocs`` CPU processes (gloo, default 4) and sweeps small sizes with the torch backend. Every process it
starts gets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 unless the user set
them. Prints a table, writes ``results.json`` (a list of SPEC.md's records), ``run.json`` (settings, skipped
backends, per-record extras; see :mod:`largeep.bench.records`) and ``latency.png``/``bandwidth.png`` under ``--out``
(default ``bench/results/<time>-<preset>-<gpu|cpu>/`` under the current directory, a new folder: ``-2``, ``-3``, ...
after the name where a run started in the same second has it), and prints that folder's absolute path.

Options are checked before any process starts (argparse errors, exit status 2): sizes and counts positive (a value
listed twice is measured once), every expert count divisible by the rank count, top-k at most the expert count, ranks
per node dividing the rank count, ``--out`` a folder (or a path one can be made at), ``--zipf-s`` finite and >= 0,
``--ll-bf16-partial-sums`` with ``--ll-send-weights``, ``--bf16-partial-sums`` with the normal mode, a backend that
takes it (nvshmem, torch) and several nodes. (An odd SM count is run by the nvshmem backend and skipped, with its
reason, by deepep.) Exit status 1 when a backend failed or nothing at all was measured (then no results file is
written). SIGTERM or Ctrl-C stops the ranks it started and removes its temporary folder; the ranks also die with it
(Linux: their parent-death signal). The records so far are written to results.json and run.json as each backend ends, so
a run stopped part-way keeps the backends it finished (without x_best, the table and the plots) and says so on stderr.

When it starts the processes itself, each backend runs in a fresh set of them (nvshmem, symm_mem and deepep each
initialise NVSHMEM once per process), and the parent merges the results; a backend that crashes is reported and the
others still run. Under torchrun every backend shares the same processes: on GPUs a run takes at most one of
nvshmem, symm_mem and deepep (refused otherwise), so pass ``--backends`` there, one NVSHMEM user at a time;
the recorded command then starts with ``torchrun --nnodes N --nproc-per-node M`` (records.command_line).

Calibration records for ``python -m largeep.bench.sim`` are kernel times: ``bench/kernel_times.py`` for the normal
mode (e.g. ``--num-sms 8,16,24``) and ``bench/low_latency_times.py`` for the low-latency mode, each on 1, 2 and 4 GPUs.
This benchmark's records (``--preset full`` included) time whole calls with events: ``sim`` shows them (``--show``)
and fits them only when no kernel-timed record is given (``--timing auto``; ``--timing kernel`` never fits them).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Set before torch, NCCL or NVSHMEM start in this process or any it spawns: NVLink multicast (NVLS) stays off.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# (preset, device kind) -> sizes. GPU presets follow SPEC.md's DeepSeek-V3 profile; CPU presets are small enough
# for the quick one to finish in seconds on two cores.
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("quick", "gpu"): {
        "normal": {"tokens": [4096], "hidden": [7168], "topk": [8], "experts": [256], "dtypes": ["fp8", "bf16"]},
        "low_latency": {"tokens": [128], "hidden": [7168], "topk": [8], "experts": [288], "dtypes": ["fp8"]},
        "num_sms": [24], "warmup": 3, "iters": 10,
    },
    ("full", "gpu"): {
        "normal": {"tokens": [128, 512, 1024, 2048, 4096, 8192], "hidden": [2048, 4096, 7168], "topk": [4, 8],
                   "experts": [256], "dtypes": ["fp8", "bf16"]},
        "low_latency": {"tokens": [1, 8, 32, 64, 128, 256], "hidden": [2048, 4096, 7168], "topk": [4, 8],
                        "experts": [288], "dtypes": ["fp8", "bf16"]},
        "num_sms": [8, 16, 24, 32], "warmup": 5, "iters": 30,
    },
    ("quick", "cpu"): {
        "normal": {"tokens": [32, 128], "hidden": [256], "topk": [4], "experts": [16], "dtypes": ["bf16", "fp8"]},
        "low_latency": {"tokens": [16, 64], "hidden": [256], "topk": [4], "experts": [16], "dtypes": ["fp8"]},
        "num_sms": [24], "warmup": 1, "iters": 5,
    },
    ("full", "cpu"): {
        "normal": {"tokens": [32, 128, 512, 2048], "hidden": [256, 1024], "topk": [4, 8], "experts": [32],
                   "dtypes": ["bf16", "fp8"]},
        "low_latency": {"tokens": [16, 64, 256], "hidden": [256, 1024], "topk": [4, 8], "experts": [32],
                        "dtypes": ["fp8", "bf16"]},
        "num_sms": [24], "warmup": 2, "iters": 10,
    },
}


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return list(dict.fromkeys(vals))  # (a value given twice is measured once)


def _int_at_least(lo: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "a non-negative integer")


def _seed(text: str) -> int:
    """An integer torch's generators take as a seed (the Zipf routing seeds one with it as given)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -(1 << 63) <= v < 1 << 64:
        raise argparse.ArgumentTypeError(f"expected an integer from -2**63 to 2**64 - 1, got {text!r}")
    return v


def _float_where(ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """A float parser that takes values for which ``ok`` holds (NaN never does), else says it expected ``what``."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_float = _float_where(lambda v: 0 < v < float("inf"), "a positive number")
_non_negative_float = _float_where(lambda v: 0 <= v < float("inf"), "a finite number >= 0")


def _choices(allowed: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        vals = [v for v in text.replace(" ", "").split(",") if v]
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {', '.join(allowed)}")
        return list(dict.fromkeys(vals))

    return parse


def build_parser() -> argparse.ArgumentParser:
    from largeep.bench.adapters import BACKENDS
    from largeep.bench.routing import ROUTINGS

    p = argparse.ArgumentParser(
        prog="largeep-bench",
        description="Benchmark largeep dispatch/combine against the other expert-parallel backends present. "
                    "Sizes not given come from the preset (GPU: SPEC.md's DeepSeek-V3 profile; CPU: a small one).",
    )
    p.add_argument("--preset", choices=("quick", "full"), default="quick",
                   help="sizes to sweep (default: quick); the options below override them")
    p.add_argument("--backends", type=_choices(BACKENDS), default=list(BACKENDS),
                   help=f"comma list (default: all of {','.join(BACKENDS)}); those missing here are skipped with "
                        "the reason")
    p.add_argument("--modes", type=_choices(("normal", "low_latency")), default=["normal", "low_latency"],
                   help="comma list of normal, low_latency (default: both)")
    p.add_argument("--tokens", type=_ints, help="tokens per rank, comma list, every mode (default: the preset's)")
    p.add_argument("--hidden", type=_ints, help="hidden sizes, comma list (default: the preset's; FP8 needs a "
                                                 "multiple of 128)")
    p.add_argument("--topk", type=_ints, help="top-k values, comma list, each at most every expert count (default: "
                                               "the preset's)")
    p.add_argument("--experts", type=_ints, help="expert counts, comma list, each divisible by the rank count "
                                                  "(default: the preset's)")
    p.add_argument("--dtypes", type=_choices(("bf16", "fp8")),
                   help="dispatch dtypes, comma list of bf16, fp8 (default: the preset's); combine is always bf16")
    p.add_argument("--num-sms", type=_ints,
                   help="normal-mode SM counts for backends that take one (nvshmem: any >= 1; deepep: even ones, an "
                        "odd one is skipped with its reason), comma list, e.g. 8,16,24 (default: the preset's, 24; "
                        "full GPU preset 8,16,24,32); low-latency mode is measured once, num_sms null (its kernels "
                        "size their grids from the device)")
    p.add_argument("--ranks-per-node", type=_positive,
                   help="ranks per node; must divide the rank count and be at most the ranks on one host "
                        "(default: the ranks on one host)")
    p.add_argument("--nprocs", type=_positive, help="processes to start (default: every visible GPU, or 4 on CPU)")
    p.add_argument("--cpu", action="store_true", help="run CPU processes (gloo) even when GPUs are visible")
    p.add_argument("--out", help="output folder (default: a new folder bench/results/<time>-<preset>-<gpu|cpu> under "
                                 "the current directory)")
    p.add_argument("--warmup", type=_non_negative, help="untimed calls before the timed ones (default: the preset's)")
    p.add_argument("--iters", type=_positive, help="timed calls per op (default: the preset's)")
    p.add_argument("--routing", choices=ROUTINGS, default="uniform",
                   help="expert choice per token (default: uniform)")
    p.add_argument("--zipf-s", type=_non_negative_float, default=1.0,
                   help="Zipf exponent for --routing zipf, a finite number >= 0 (default: 1.0)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the routings and inputs (default: 0)")
    p.add_argument("--no-hook", action="store_true", help="skip the low-latency send/recv (receive hook) phases")
    p.add_argument("--ll-send-weights", action="store_true",
                   help="low-latency, nvshmem backend: the dispatch carries topk_weights and the combine sums each "
                        "token's outputs on the experts' ranks; other backends apply them at the combine as always")
    p.add_argument("--ll-bf16-partial-sums", action="store_true",
                   help="with --ll-send-weights: those sums come back as one bf16 row each (one more bf16 rounding "
                        "of each rank's partial sum, fewer bytes)")
    p.add_argument("--bf16-partial-sums", action="store_true",
                   help="normal mode, nvshmem and torch backends: every combine (combine and roundtrip ops) passes "
                        "Buffer.combine's bf16_partial_sums, so in a group of several nodes (--ranks-per-node below "
                        "the rank count) each node's partial sum goes home as bf16 rather than float32 (fewer bytes "
                        "between nodes, one more bf16 rounding); other backends run as without it")
    p.add_argument("--link-gbps", type=_positive_float, default=450.0,
                   help="one GPU's link bandwidth one way in GB/s, for the floor column (default: 450, NVLink4 on "
                        "H100/H200)")
    p.add_argument("--no-plots", action="store_true", help="write no latency.png and bandwidth.png")
    return p


def _mode_plans(args: argparse.Namespace, device_kind: str) -> dict[str, Any]:
    """Each mode's sizes: the preset's with the options applied (dicts of ModePlan's fields)."""
    base = PRESETS[(args.preset, device_kind)]
    modes: dict[str, Any] = {}
    for mode in ("normal", "low_latency"):
        m = dict(base[mode])
        for key in ("tokens", "hidden", "topk", "experts", "dtypes"):
            if getattr(args, key) is not None:
                m[key] = getattr(args, key)
        modes[mode] = m
    return modes


def check_args(args: argparse.Namespace, device_kind: str, world: int, host_ranks: int | None) -> str | None:
    """What would make the sweep skip every size of a mode or fail once its processes run, found before they start:
    an expert count not divisible by the ``world`` ranks, a top-k above an expert count, modes whose every hidden
    size and dtype pair FP8 with a hidden size that is not a multiple of 128, ranks per node that do not divide the
    ranks or exceed ``host_ranks`` (None: not known here), ``--bf16-partial-sums`` on one node (where it changes
    nothing). Returns the first such message, or None."""
    modes = _mode_plans(args, device_kind)
    bad = {mode: ",".join(str(e) for e in modes[mode]["experts"] if e % world) for mode in args.modes}
    bad = {mode: v for mode, v in bad.items() if v}
    if bad and args.experts is not None:
        return f"--experts {next(iter(bad.values()))}: not divisible by the {world} ranks"
    if bad and len(bad) == len(args.modes):  # (a preset's mode that cannot run is skipped, said why, if another can)
        return (f"the {args.preset} preset's expert counts ({', '.join(f'{m} {v}' for m, v in bad.items())}) are not "
                f"divisible by the {world} ranks: pass --experts with multiples of {world} or another --nprocs")
    for mode in args.modes:
        m = modes[mode]
        pairs = [(k, e) for k in m["topk"] for e in m["experts"] if k > e]
        if pairs:
            return f"{mode}: top-k above the expert count: " + ", ".join(f"top-{k} of {e}" for k, e in pairs)
    # FP8 needs hidden % 128 == 0: when no (hidden, dtype) pair of any mode asked for can run, the run would measure
    # nothing (pairs that cannot run beside ones that can are skipped, each with a line saying why)
    if all(d == "fp8" and h % 128 for mode in args.modes for h in modes[mode]["hidden"] for d in modes[mode]["dtypes"]):
        asked = "; ".join(f"{mode} hidden {','.join(map(str, modes[mode]['hidden']))} dtypes "
                          f"{','.join(modes[mode]['dtypes'])}" for mode in args.modes)
        return ("FP8 needs hidden sizes that are multiples of 128, and every mode's hidden sizes and dtypes pair FP8 "
                f"with another hidden size: {asked}")
    from largeep.bench.records import folder_problem

    if args.out is not None:
        if not args.out.strip():
            return "--out: an empty path (give a folder for the results)"
        problem = folder_problem(args.out)
        if problem:
            return f"--out {args.out}: {problem}"
    else:
        problem = folder_problem(Path.cwd() / "bench" / "results")
        if problem:
            return (f"the default output folder bench/results/ under the current directory ({Path.cwd()}): {problem}; "
                    "give --out a folder, or run from another directory")
    rpn = args.ranks_per_node
    if rpn is not None:
        if world % rpn:
            return (f"--ranks-per-node {rpn} " + ("exceeds" if rpn > world else "does not divide")
                    + f" the {world} ranks")
        if host_ranks is not None and rpn > host_ranks:
            return f"--ranks-per-node {rpn} exceeds the {host_ranks} ranks on this host"
    nodes_of = rpn or host_ranks  # (the ranks per node the sweep takes; None under torchrun when not known here)
    if args.bf16_partial_sums and nodes_of is not None and nodes_of >= world:
        return (f"--bf16-partial-sums: the {world} ranks are one node ({nodes_of} ranks per node), whose combine "
                "has no partial sums between nodes: it would change nothing; pass --ranks-per-node below the rank "
                "count (nodes emulated on one host) or run on several nodes")
    return None


def default_out(preset: str, device_kind: str, stamp: str | None = None) -> Path:
    """A new folder for a run given no --out, made now: bench/results/<time>-<preset>-<gpu|cpu> under the current
    directory, with -2, -3, ... after it where a run started in the same second (another process) has that name
    (mkdir makes it or fails, atomically, so two runs never share one and the later one's files never replace the
    earlier one's)."""
    base = Path("bench") / "results"
    base.mkdir(parents=True, exist_ok=True)
    name = f"{stamp or time.strftime('%Y%m%d-%H%M%S')}-{preset}-{device_kind}"
    i = 1
    while True:
        path = base / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            i += 1


def _drop_if_empty(path: Path) -> None:
    """Removes the folder :func:`default_out` made when the run wrote nothing into it."""
    try:
        path.rmdir()  # (only an empty folder)
    except OSError:
        pass


def make_plan(args: argparse.Namespace, device_kind: str, command: str) -> Any:
    """The sweep of a preset with the options applied (the options checked by the parser and :func:`check_args`)."""
    from largeep.bench.sweep import ModePlan, Plan

    base = PRESETS[(args.preset, device_kind)]
    modes = {mode: ModePlan(**m) for mode, m in _mode_plans(args, device_kind).items()}
    out = args.out
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = str(Path("bench") / "results" / f"{stamp}-{args.preset}-{device_kind}")
    return Plan(
        preset=args.preset, backends=args.backends, modes=args.modes, normal=modes["normal"],
        low_latency=modes["low_latency"], num_sms=args.num_sms or base["num_sms"],
        warmup=base["warmup"] if args.warmup is None else args.warmup,
        iters=base["iters"] if args.iters is None else args.iters,
        ranks_per_node=args.ranks_per_node, routing=args.routing, zipf_s=args.zipf_s, seed=args.seed,
        hook=not args.no_hook, ll_send_weights=args.ll_send_weights,
        ll_bf16_partial_sums=args.ll_bf16_partial_sums, bf16_partial_sums=args.bf16_partial_sums,
        link_gbps=args.link_gbps,
        plots=not args.no_plots, out=out, command=command,
    )


def _safe_env() -> None:
    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)


def _run_rank(
    args: argparse.Namespace, command: str, device_kind: str, local_rank: int, part: str | None = None,
    progress: tuple[int, int] | None = None,
) -> int:
    """Body of one process after torch.distributed is initialised; returns how many records it measured. ``part``
    and ``progress``: Plan's, from the launcher."""
    import torch
    import torch.distributed as dist

    from largeep.bench.sweep import Sweep

    device = torch.device("cuda", local_rank) if device_kind == "gpu" else torch.device("cpu")
    plan = make_plan(args, device_kind, command)
    plan.part = part
    plan.progress = progress
    records, _ = Sweep(plan, device).run()
    # no collective on the error path: a failed rank exits at once and the launcher ends the others
    dist.barrier()
    dist.destroy_process_group()
    return len(records)


def _spawned(
    rank: int, world: int, rendezvous: str, device_kind: str, args: argparse.Namespace, command: str, part: str,
    progress: tuple[int, int],
) -> None:
    _die_with_parent()
    _safe_env()
    import torch
    import torch.distributed as dist

    kwargs: dict[str, Any] = {}
    if device_kind == "gpu":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(
        "nccl" if device_kind == "gpu" else "gloo", init_method=f"file://{rendezvous}", rank=rank,
        world_size=world, timeout=datetime.timedelta(seconds=600), **kwargs,
    )
    _run_rank(args, command, device_kind, rank, part, progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    _safe_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ll_bf16_partial_sums and not args.ll_send_weights:
        parser.error("--ll-bf16-partial-sums needs --ll-send-weights")
    if args.bf16_partial_sums and "normal" not in args.modes:
        parser.error("--bf16-partial-sums is the normal-mode combine's: it needs the normal mode in --modes (the "
                     "low-latency counterpart is --ll-bf16-partial-sums)")
    takers = [b for b in args.backends if b in _BF16_PARTIAL_SUMS_USERS]
    if args.bf16_partial_sums and not takers:
        parser.error(f"--bf16-partial-sums: none of the backends run ({', '.join(args.backends)}) takes it (it is "
                     f"largeep's Buffer.combine option: {', '.join(_BF16_PARTIAL_SUMS_USERS)})")
    from largeep.bench.records import command_line

    command = command_line(None if argv is None else ["largeep-bench", *argv])
    import torch
    import torch.distributed as dist

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kind = "gpu" if torch.cuda.is_available() and not args.cpu else "cpu"
        local = os.environ.get("LOCAL_WORLD_SIZE")
        error = check_args(args, kind, int(os.environ["WORLD_SIZE"]), int(local) if local else None)
        if error:
            parser.error(error)
        nvshmem_users = [b for b in args.backends if b in _NVSHMEM_USERS]
        if kind == "gpu" and len(nvshmem_users) > 1:
            parser.error(f"under torchrun every backend runs in the same processes, and {', '.join(nvshmem_users)} "
                         "each initialise NVSHMEM in them: pass --backends with at most one of "
                         f"{', '.join(_NVSHMEM_USERS)} (torch may go with it), one run each")
        _say_ignored(args, kind, torchrun=True)
        kwargs: dict[str, Any] = {}
        if kind == "gpu":
            torch.cuda.set_device(local_rank)
            kwargs["device_id"] = torch.device("cuda", local_rank)
        claimed = None
        if args.out is None and os.environ["RANK"] == "0":  # (the rank that writes the results)
            claimed = default_out(args.preset, kind)
            args.out = str(claimed)
        try:
            dist.init_process_group("nccl" if kind == "gpu" else "gloo", **kwargs)
            return 0 if _run_rank(args, command, kind, local_rank) else 1
        finally:
            if claimed is not None:
                _drop_if_empty(claimed)

    gpus = torch.cuda.device_count() if torch.cuda.is_available() and not args.cpu else 0
    kind = "gpu" if gpus else "cpu"
    nprocs = args.nprocs or (gpus if gpus else 4)
    if gpus and nprocs > gpus:
        parser.error(f"--nprocs {nprocs}: only {gpus} GPUs are visible (--cpu runs CPU processes)")
    error = check_args(args, kind, nprocs, nprocs)
    if error:
        parser.error(error)
    _say_ignored(args, kind)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if kind == "cpu" and args.nprocs is not None and nprocs > cpus:  # (the default's 4 is for a small sweep)
        print(f"largeep-bench: warning: {nprocs} processes on {cpus} CPUs: the ranks take turns on them, so the "
              "times will be inflated", file=sys.stderr, flush=True)
    print(f"largeep-bench: {nprocs} {'GPU' if gpus else 'CPU'} processes, preset {args.preset}", flush=True)
    claimed = None
    if args.out is None:  # (claimed here: the backends' processes take it from args)
        claimed = default_out(args.preset, kind)
        args.out = str(claimed)
    try:
        return _launch(args, kind, nprocs, command)
    finally:
        if claimed is not None:
            _drop_if_empty(claimed)


def _launch(args: argparse.Namespace, kind: str, nprocs: int, command: str) -> int:
    """Runs each backend in a fresh set of processes (the NVSHMEM users, nvshmem, symm_mem and deepep, each
    initialise NVSHMEM once per process and must not meet), then merges, prints and writes the results. A backend
    whose processes fail is reported and the others still run. The records so far are written to --out's
    results.json and run.json as each backend ends (without x_best, the table and the plots, which come at the end),
    so a run stopped part-way keeps the backends it finished and says so on stderr."""
    import shutil
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from largeep.bench import records as rec
    from largeep.bench.adapters import make_adapter
    from largeep.bench.sweep import finish, points

    plan = make_plan(args, kind, command)
    device = torch.device("cuda", 0) if kind == "gpu" else torch.device("cpu")
    # SIGTERM (a scheduler's, `timeout`'s) ends the launcher as Ctrl-C does: its ranks are stopped and its temporary
    # folder removed, rather than left running on the GPUs
    try:
        old_term = signal.signal(signal.SIGTERM, _exit_on_signal)
    except ValueError:  # (not the main thread: left as it is)
        old_term = None
    adapters = {b: make_adapter(b) for b in plan.backends}
    reasons = {b: a.unavailable_reason(device) for b, a in adapters.items()}
    # the progress lines count the points of the whole run (each backend's processes start at its offset)
    counts = {b: points(plan, a) for b, a in adapters.items() if not reasons[b]}
    offset = 0
    env = rec.environment()
    parts_dir = Path(tempfile.mkdtemp(prefix="largeep-bench-"))
    records: list[rec.Record] = []
    extras: list[rec.Extra] = []
    skipped: list[dict[str, str]] = []
    settings: dict[str, Any] = {}
    failed: list[str] = []
    try:
        for backend in plan.backends:
            reason = reasons[backend]
            if reason:
                print(f"skip {backend}: {reason}", flush=True)  # (the sweep's form: skip BACKEND [where]: why)
                skipped.append({"backend": backend, "reason": reason})
                continue
            child = argparse.Namespace(**vars(args))
            child.backends = [backend]
            part = parts_dir / f"{backend}.json"
            # a file rendezvous, new for each backend (a free TCP port found here could be taken before the ranks
            # bind it)
            rendezvous = parts_dir / f"{backend}.rendezvous"
            progress = (offset, sum(counts.values()))
            offset += counts[backend]
            try:
                _run_ranks(mp, (nprocs, str(rendezvous), kind, child, command, str(part), progress), nprocs)
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
                print(f"largeep-bench: backend {backend} failed (its results so far are kept):\n{exc}",
                      file=sys.stderr, flush=True)
                failed.append(backend)
                skipped.append({"backend": backend, "reason": f"failed: {str(exc).strip().splitlines()[-1]}"})
            if part.exists():
                part_records, part_extras, part_skipped, part_settings = rec.read_part(part)
                records += part_records
                extras += part_extras
                skipped += part_skipped
                settings = settings or {**part_settings, "backends": plan.backends}  # (each part ran one of them)
            if records and plan.out:  # (the results so far, in case the run stops before the end)
                _save_so_far(functools.partial(rec.write_results, Path(plan.out) / "results.json", records, extras,
                                               env=env, command=command, settings=settings, skipped=skipped))
        finish(records, extras, skipped=skipped, settings=settings, plan=plan, env=env)
    except (KeyboardInterrupt, SystemExit):
        kept = ", ".join(dict.fromkeys(r.backend for r in records))
        print("largeep-bench: stopped; " + (f"the records of {kept} are in {Path(plan.out or '.').resolve()}"
                                            if records else "no backend had finished: no results written"),
              file=sys.stderr, flush=True)
        raise
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return 1 if failed or not records else 0


_NVSHMEM_USERS = ("nvshmem", "symm_mem", "deepep")  # backends that initialise NVSHMEM in their process
_BF16_PARTIAL_SUMS_USERS = ("nvshmem", "torch")  # backends whose normal combine takes --bf16-partial-sums


def _say_ignored(args: argparse.Namespace, kind: str, torchrun: bool = False) -> None:
    """One line for each option given that this run does not use (they were ignored without a word)."""
    if torchrun and args.nprocs is not None:
        print(f"largeep-bench: --nprocs {args.nprocs} is ignored under torchrun (its ranks are the processes)",
              flush=True)
    if args.zipf_s != 1.0 and args.routing != "zipf":
        print(f"largeep-bench: --zipf-s {args.zipf_s} is ignored without --routing zipf", flush=True)
    if args.link_gbps != 450.0 and kind == "cpu":
        print(f"largeep-bench: --link-gbps {args.link_gbps} is ignored on CPU processes (no floor column)",
              flush=True)
    if args.num_sms is not None:
        from largeep.bench.adapters import make_adapter

        users = [b for b in args.backends if make_adapter(b).uses_sms]
        why = ("without the normal mode (the low-latency kernels take no SM count)" if "normal" not in args.modes
               else f"by the backends run ({', '.join(args.backends)}): none takes an SM count" if not users
               else f"on CPU processes (the backends that take it, {', '.join(users)}, need GPUs)" if kind == "cpu"
               else None)
        if why:
            print(f"largeep-bench: --num-sms {','.join(map(str, args.num_sms))} is ignored {why}", flush=True)
    for flag, given in (("--ll-send-weights", args.ll_send_weights), ("--no-hook", args.no_hook)):
        if given and "low_latency" not in args.modes:
            print(f"largeep-bench: {flag} is ignored without the low_latency mode", flush=True)


def _save_so_far(write: Callable[[], Any]) -> None:
    """The results so far, written with SIGINT and SIGTERM held (results.json and run.json are replaced one after
    the other: a stop between them would pair one run's records with another's settings); a write that fails is
    reported and the run goes on (the final write says so again if it fails too)."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        write()
    except OSError as exc:
        print(f"largeep-bench: warning: the results so far could not be written ({exc}); the run goes on",
              file=sys.stderr, flush=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run_ranks(mp: Any, args: tuple[Any, ...], nprocs: int) -> None:
    """Starts the ranks and waits for them. A rank that fails makes torch stop the others and raise; anything else
    that ends the wait (Ctrl-C, SIGTERM) stops them here (terminated, then killed after 10 s) before it goes on."""
    ctx = mp.start_processes(_spawned, args=args, nprocs=nprocs, join=False, start_method="spawn")
    try:
        while not ctx.join():
            pass
    except BaseException:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 10.0
        for p in ctx.processes:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        raise


def _die_with_parent() -> None:
    """Linux: this process is killed when the launcher that started it dies (even by SIGKILL), so that no rank is
    left running on a GPU without it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
