"""Benchmark records, the byte counts behind their bandwidths, the environment, and the JSON files.

Files of one run (``python -m largeep.bench``; :func:`write_results`)::

    results.json   a JSON list, one record per measurement (SPEC.md "Measuring"), each with exactly these keys:
                   RECORD_KEYS  backend, mode, op, ep, ranks_per_node, num_tokens, hidden, num_topk, num_experts,
                                dtype, num_sms, time_us_median, time_us_p10, time_us_p90, logical_gbps
                   ENV_KEYS     gpu, driver, cuda, torch, nccl, nvshmem, git  (the same in every record of a file;
                                ``gpu`` is None for records of CPU processes, even on a host with GPUs)
                   "command"    the command line that produced the file
    run.json       what is not a record:
                   {"schema": "largeep.bench/2", "results": "results.json", "command": ..., "env": {...},
                    "settings": {...},     # preset, warm-up, iterations, routing, timing method, device
                    "skipped": [{"backend": ..., "reason": ...}],
                    "extras": [{"bus_gbps": ..., "x_best": ..., "phase_of": ..., "floor_us": ...,
                                "weights_sent": ..., "bf16_partial_sums": ..., "semantics": ...,
                                "semantics_note": ..., "max_tokens_per_rank": ...}, ...]}   # aligned with results.json

A run that measures nothing writes neither file (the CLI says so and exits 1).
``env`` in run.json is :func:`environment` whole (host, python, largeep, gpu_count, deep_ep besides ENV_KEYS). The
``extras`` hold per-record values SPEC has no key for, at the index of their record: ``bus_gbps`` (bytes that crossed
between GPUs / time), ``x_best`` (time over the fastest backend's time for the same configuration, 1.0 = fastest; None
for records of semantics "partial", which take no part in it), ``phase_of`` ("dispatch"/"combine" for the low-latency
"send"/"recv" records, which SPEC's keys cannot tell apart otherwise; None elsewhere) and ``floor_us``, the
bytes-over-link floor: the fewest bytes the busiest GPU's link must carry one way (the max over ranks of the bytes a
rank sends to other ranks and of those it receives from them, a round trip's two legs summed per direction, as times are
the slowest rank's; :func:`link_bytes`; a token once per destination rank, except the low-latency combine, whose copies
carry different expert outputs and go back one by one, or with ``--ll-send-weights`` as one sum in two rows per token
with two or more experts on a rank) over the link's bandwidth (``--link-gbps``, settings "link_gbps"; GPU runs only,
None on CPU and for the layout); ``weights_sent`` (low-latency records: the dispatch carried the weights, see
``summed_rows_ll``; None for normal mode) and ``bf16_partial_sums`` (low latency: with the weights sent, the sums came
back as one bf16 row; normal combine and round-trip records of the backends whose combine takes it, nvshmem and torch:
True where their partial sums between nodes went home as bf16, ``--bf16-partial-sums`` on several nodes, False where in
float32 or on one node; None elsewhere; the normal combine's floor, logical and bus bytes count its rank-to-rank rows of
``2*H`` bytes either way, not the forwarders' partial sums); ``semantics``: "full" where the backend's calls do what
largeep.Buffer's do, "partial" where they do less (symm_mem; ``semantics_note`` says what they leave out);
``max_tokens_per_rank``: the Buffer's, sized for the largest token count of the sweep in normal mode and for each call's
own in low-latency mode (its fixed receive slots, and the torch backend's padded transfers, go with it).

The scripts in ``bench/`` write their SPEC records the same way (:func:`write_records`): a list file, each record
with SPEC's keys, the script's own per-record keys, ENV_KEYS and "command", and its run file beside it, named
``NAME.run.json`` for ``NAME.json`` (``run.json`` for ``results.json``; several scripts write into one folder).
Their own keys: ``bench/layer_times.py`` (mode "layer") "variant", "speedup" (over the no-overlap variant, or the
sequential stack) and "pass" ("forward" or "forward_backward"); ``bench/kernel_times.py`` "bus_gbps", "kernels"
(the op whose kernels were summed: profiler times), "tune" (LARGEEP_TUNE) and "combine_eighths" (the fused
combine's push share, 0 for push + reduce); ``bench/low_latency_times.py`` "of" (how the op was timed: "dispatch",
"combine", "dispatch_hook", "combine_hook", "graph", "graph_back_to_back"), "tune", "weights_sent" and
"bf16_partial_sums". Their run files hold "what" (what the times are) and, for layer_times.py, "settings" and
"summary".

Files written before this layout (schema "largeep.bench/1" and the scripts' ``{"command", "env", "what",
"records"}``) are one JSON object with the records under "records" and, for the benchmark, "extras" aligned with
them; :func:`read_results` reads both layouts, and a bare list of records without a run file.

Byte counts (SPEC.md "Measuring", the field's convention):
- normal dispatch: every received row, local rows included; a BF16 row is ``2*H`` bytes, an FP8 row ``H + 4*H/128``
  (e4m3 values plus one float32 scale per 128 channels);
- normal combine: the same rows in BF16; round trip: dispatch bytes + combine bytes;
- low-latency dispatch/combine (and their send phases): every (token, expert) copy, FP8 or BF16 as sent for
  dispatch, BF16 for combine;
- layout, and a receive phase in hook mode (its rows came with the send), move no token bytes over a link: their
  ``logical_gbps`` is None.
A record's bandwidth is the per-rank average of these bytes divided by the record's median time.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

SCHEMA = "largeep.bench/2"  # a list file of records and its run file (module docstring)
SCHEMA_V1 = "largeep.bench/1"  # one object {"schema", "command", "env", "settings", "skipped", "records", "extras"}
MODES = ("normal", "low_latency", "layer")
OPS = ("layout", "dispatch", "combine", "roundtrip", "send", "recv")
DTYPES = ("bf16", "fp8")
FP8_GROUP = 128


@dataclass
class Record:
    """One measurement, with exactly SPEC.md's keys. Times in microseconds; ``num_tokens`` is per rank;
    ``num_sms`` is None for backends that take no SM count (torch, symm_mem) and for low-latency records (those
    kernels size their grids from the device's SMs, whatever the SM count)."""

    backend: str
    mode: str
    op: str
    ep: int
    ranks_per_node: int
    num_tokens: int
    hidden: int
    num_topk: int
    num_experts: int
    dtype: str
    num_sms: int | None
    time_us_median: float
    time_us_p10: float
    time_us_p90: float
    logical_gbps: float | None


RECORD_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Record))
# SPEC.md's environment, in every record of a file (names as :func:`environment` gives them)
ENV_KEYS: tuple[str, ...] = ("gpu", "driver", "cuda", "torch", "nccl", "nvshmem", "git")
# the keys of every record of results.json, in this order
FILE_KEYS: tuple[str, ...] = RECORD_KEYS + ENV_KEYS + ("command",)


@dataclass
class Extra:
    """Per-record values SPEC has no key for (see the module docstring)."""

    bus_gbps: float | None
    x_best: float | None = None
    phase_of: str | None = None
    floor_us: float | None = None
    # low-latency records: the dispatch carried topk_weights (``--ll-send-weights``), so the combine summed each
    # token's outputs on the experts' ranks; None for normal mode
    weights_sent: bool | None = None
    # low latency, with weights_sent: the sums came back as one bf16 row each (``--ll-bf16-partial-sums``); normal
    # combine and round trip of a backend that takes ``--bf16-partial-sums``: whether its partial sums between nodes
    # went home as bf16 (False: float32, or one node); else None
    bf16_partial_sums: bool | None = None
    # "full": the backend's calls do what largeep.Buffer's do; "partial": less (semantics_note says what), and the
    # record has no x_best; None in files written before these keys
    semantics: str | None = None
    semantics_note: str | None = None
    # the Buffer's max_tokens_per_rank the call ran with (normal mode: the sweep's largest token count; low
    # latency: the call's own); None in files written before this key
    max_tokens_per_rank: int | None = None


# -- byte counts ------------------------------------------------------------------------------------------------
def row_bytes(dtype: str, hidden: int) -> int:
    """Bytes of one token row as SPEC counts it: BF16 ``2*H``; FP8 ``H + 4*H/128``."""
    if dtype == "bf16":
        return 2 * hidden
    if dtype == "fp8":
        if hidden % FP8_GROUP:
            raise ValueError(f"row_bytes: FP8 needs hidden % {FP8_GROUP} == 0, got {hidden}")
        return hidden + 4 * (hidden // FP8_GROUP)
    raise ValueError(f"row_bytes: dtype {dtype!r}, expected one of {DTYPES}")


def send_rows_normal(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """Normal mode: rows one rank sends to each rank (a token goes to a rank once however many of its experts live
    there). topk_idx int64 [T, K] in [-1, E) -> int64 [N] on the CPU."""
    per_rank = num_experts // num_ranks
    idx = topk_idx.detach().to("cpu", torch.int64)
    hit = torch.zeros(idx.shape[0], num_ranks + 1, dtype=torch.bool)
    hit.scatter_(1, torch.where(idx >= 0, idx // per_rank, num_ranks), True)
    return hit[:, :num_ranks].sum(0, dtype=torch.int64)


def send_copies_ll(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """Low-latency mode: (token, expert) copies one rank sends to each rank (no per-rank deduplication).
    topk_idx int64 [T, K] -> int64 [N] on the CPU."""
    per_rank = num_experts // num_ranks
    idx = topk_idx.detach().to("cpu", torch.int64).reshape(-1)
    idx = idx[idx >= 0]
    return torch.bincount(idx // per_rank, minlength=num_ranks).to(torch.int64)


def summed_rows_ll(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, rows_per_sum: int = 2) -> torch.Tensor:
    """Low-latency combine of a dispatch that carried its weights: rows that come back to one rank from each rank,
    where a token with two or more distinct experts on a rank gets their sum as two rows (bf16 value and
    remainder; ``rows_per_sum`` 1: bf16_partial_sums, the value alone) and a token with one gets its one row.
    topk_idx int64 [T, K] -> int64 [N] on the CPU."""
    per_rank = num_experts // num_ranks
    idx = topk_idx.detach().to("cpu", torch.int64)
    hit = torch.zeros(idx.shape[0], num_experts + 1, dtype=torch.bool)
    hit.scatter_(1, torch.where(idx >= 0, idx, num_experts), True)  # distinct valid experts of each token
    per = hit[:, :num_experts].reshape(idx.shape[0], num_ranks, per_rank).sum(2)
    return per.clamp(max=rows_per_sum).sum(0, dtype=torch.int64)


@dataclass(frozen=True)
class Traffic:
    """Rows moved by one collective call, from the [src, dst] matrix of row counts of every rank.

    mean_rows: rows received per rank, averaged over ranks (local rows included);
    mean_remote_rows: the same without the rows a rank sends to itself;
    remote_out / remote_in: each rank's rows sent to / received from other ranks (the link's two directions)."""

    mean_rows: float
    mean_remote_rows: float
    remote_out: tuple[float, ...] = ()
    remote_in: tuple[float, ...] = ()

    @staticmethod
    def from_matrix(matrix: torch.Tensor) -> Traffic:
        """matrix int [N src, N dst]: rows (or copies) each source rank sends to each destination rank."""
        m = matrix.to(torch.float64)
        n = m.shape[0]
        total = float(m.sum())
        local = float(m.diagonal().sum())
        remote = m - torch.diag(m.diagonal())
        return Traffic(total / n, (total - local) / n, tuple(remote.sum(1).tolist()), tuple(remote.sum(0).tolist()))

    def reversed(self) -> Traffic:
        """The same rows sent back (a combine's traffic from its dispatch's): out and in swapped."""
        return Traffic(self.mean_rows, self.mean_remote_rows, self.remote_in, self.remote_out)

    def logical_bytes(self, bytes_per_row: int) -> float:
        return self.mean_rows * bytes_per_row

    def bus_bytes(self, bytes_per_row: int) -> float:
        return self.mean_remote_rows * bytes_per_row


def link_bytes(*legs: tuple[Traffic, int]) -> float:
    """The bytes the busiest link direction carries in a call made of ``legs`` (each a Traffic and its bytes per
    row; a round trip has two): the max over ranks of the bytes a rank sends to other ranks and of those it receives
    from them, each summed over the legs. Times are the slowest rank's, so the floor is the busiest rank's bytes,
    not the mean over ranks."""
    if not legs:
        return 0.0
    n = len(legs[0][0].remote_out)
    out = [sum(t.remote_out[r] * b for t, b in legs) for r in range(n)]
    inn = [sum(t.remote_in[r] * b for t, b in legs) for r in range(n)]
    return max(out + inn, default=0.0)


def floor_us(num_bytes: float, link_gbps: float) -> float:
    """The time ``num_bytes`` take over a link of ``link_gbps`` GB/s (one way), in microseconds."""
    return num_bytes / (link_gbps * 1e3)


def gbps(num_bytes: float, time_us: float) -> float:
    """Bytes over microseconds -> GB/s (1e9 bytes per second)."""
    return num_bytes / (time_us * 1e-6) / 1e9 if time_us > 0 else float("nan")


# -- extras -----------------------------------------------------------------------------------------------------
_CONFIG_KEYS = ("mode", "op", "ep", "ranks_per_node", "num_tokens", "hidden", "num_topk", "num_experts", "dtype")


def fill_x_best(records: Sequence[Record], extras: Sequence[Extra]) -> None:
    """Sets each extra's ``x_best``: the record's time over the fastest time for the same configuration (any
    backend, any SM count; for send/recv also the same phase). Records of semantics "partial" (calls that do less
    than a Buffer's, e.g. symm_mem's) are left out: their x_best is None and they set no best time."""
    best: dict[tuple[Any, ...], float] = {}
    keys: list[tuple[Any, ...] | None] = []
    for r, e in zip(records, extras, strict=False):
        if e.semantics == "partial":
            keys.append(None)
            continue
        key = tuple(getattr(r, k) for k in _CONFIG_KEYS) + (e.phase_of,)
        keys.append(key)
        best[key] = min(best.get(key, float("inf")), r.time_us_median)
    for r, e, k in zip(records, extras, keys, strict=False):
        e.x_best = r.time_us_median / best[k] if k is not None and best[k] > 0 else None


# -- environment ------------------------------------------------------------------------------------------------
def _run(cmd: Sequence[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _dist_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def git_revision() -> str | None:
    """The largeep commit this code is from ("-dirty" with uncommitted changes): that of the checkout it runs in
    (PYTHONPATH=python, an editable install), else the one the install recorded (setup.py, from the tree it
    installed); None when neither is known. A package installed into a folder that lies inside some other git
    repository (site-packages in a versioned tool folder) does not take that repository's commit."""
    pkg = Path(__file__).resolve().parent.parent  # python/largeep in a checkout
    here = str(pkg)
    top = _run(["git", "rev-parse", "--show-toplevel"], cwd=here)
    if top is not None and Path(top).resolve() / "python" / "largeep" == pkg:
        rev = _run(["git", "rev-parse", "HEAD"], cwd=here)
        if rev is not None:
            dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here)
            return rev + ("-dirty" if dirty else "")
    if pkg.parent.name == "python" and (pkg.parent.parent / ".git").exists():
        # a checkout whose git did not answer (not installed, or "dubious ownership" of a checkout of another user):
        # a build record here is an earlier editable install's, of whatever commit was checked out then
        return None
    from largeep import native

    recorded = native.build_note().get("git")
    return recorded if isinstance(recorded, str) and recorded else None


def nvshmem_in_use() -> tuple[str, str] | None:
    """(version, folder) of the NVSHMEM host library the native module runs with, as this process mapped it
    (Linux) and as that library reports its version; None where the module does not load or the library cannot
    be found or asked. The installed NVSHMEM wheel need not be it: a module built with NVSHMEM_DIR links another."""
    import ctypes

    try:
        from largeep import native

        mod, _ = native._load()
        if mod is None:
            return None
        maps = Path("/proc/self/maps").read_text()
    except Exception:  # noqa: BLE001 - the environment never raises
        return None
    paths = sorted({cols[5].strip() for cols in (line.split(None, 5) for line in maps.splitlines())
                    if len(cols) == 6 and Path(cols[5].strip()).name.startswith("libnvshmem_host")})
    if not paths:
        return None
    try:
        lib = ctypes.CDLL(paths[0])  # (loaded already: the same library)
        parts = [ctypes.c_int() for _ in range(3)]
        lib.nvshmemx_vendor_get_version_info(*(ctypes.byref(p) for p in parts))
    except (OSError, AttributeError):
        return None
    return ".".join(str(p.value) for p in parts), str(Path(paths[0]).parent)


def _nvshmem_version() -> str | None:
    """The NVSHMEM wheel ("nvidia-nvshmem-cu13 3.8.0") where the native module runs with that wheel's library or
    does not load; "NVSHMEM 3.2.5 (/opt/nvshmem/lib)" where it runs with another."""
    wheel = _dist_version("nvidia-nvshmem-cu13", "nvidia-nvshmem-cu12", "nvidia-nvshmem")
    used = nvshmem_in_use()
    if used is None:
        return wheel
    version, folder = used
    if wheel is not None and Path(folder).parts[-3:] == ("nvidia", "nvshmem", "lib"):  # (the wheel's files)
        return wheel
    return f"NVSHMEM {version} ({folder})"


def environment() -> dict[str, Any]:
    """GPU, driver, CUDA, torch, NCCL and NVSHMEM versions, git revision, host. Never raises."""
    import largeep

    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "largeep": largeep.__version__,
        "git": git_revision(),
        "gpu": None,
        "gpu_count": 0,
        "driver": None,
        "nccl": None,
        "nvshmem": _nvshmem_version(),
        "deep_ep": _dist_version("deep_ep", "deep-ep"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if env["driver"]:
            env["driver"] = env["driver"].splitlines()[0]
        try:
            v = torch.cuda.nccl.version()
            env["nccl"] = ".".join(str(p) for p in v) if isinstance(v, tuple) else str(v)
        except (RuntimeError, AttributeError):
            env["nccl"] = None
    return env


def torchrun_launcher(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """Under torchrun (RANK and WORLD_SIZE set, as the CLI reads them): ``torchrun --nnodes N --nproc-per-node M``
    from what torchrun sets (M: LOCAL_WORLD_SIZE, else WORLD_SIZE; N: GROUP_WORLD_SIZE, else WORLD_SIZE / M); else
    None. A run of several nodes also took rendezvous options, which its processes cannot see."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    world = int(env["WORLD_SIZE"])
    local = int(env.get("LOCAL_WORLD_SIZE") or world)
    nodes = int(env.get("GROUP_WORLD_SIZE") or max(1, world // max(1, local)))
    return ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(local)]


def command_line(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The command that started this process, as a shell line that reruns the same run: under torchrun
    (:func:`torchrun_launcher`), with the launcher in front (``torchrun ... -m largeep.bench ARGS``; a console
    script such as ``largeep-bench`` after ``--no-python``)."""
    args = list(sys.argv if argv is None else argv)
    module = bool(args) and args[0].endswith(("__main__.py", "cli.py"))
    if module:
        args = [sys.executable, "-m", "largeep.bench"] + args[1:]
    launcher = torchrun_launcher(environ)
    if launcher is not None and args:
        if module:
            args = [*launcher, *args[1:]]  # (torchrun starts its own python)
        elif args[0].endswith(".py"):
            args = [*launcher, *args]
        else:
            args = [*launcher, "--no-python", *args]
    return shlex.join(args)


# -- files ------------------------------------------------------------------------------------------------------
def run_path(results: str | os.PathLike[str]) -> Path:
    """The run file beside a list file of records: ``run.json`` for ``results.json``, else ``NAME.run.json``."""
    path = Path(results)
    return path.with_name("run.json" if path.name == "results.json" else f"{path.stem}.run.json")


def _write_json(path: Path, obj: Any) -> None:
    """Atomically (a temporary file, then a rename: a run cut short leaves the earlier file whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite(obj), indent=1, allow_nan=False, default=_json_default) + "\n")
    tmp.replace(path)


def folder_problem(path: str | os.PathLike[str]) -> str | None:
    """Why no file can be written in folder ``path`` (or, where it does not exist yet, in its nearest existing
    parent, where it would be made), or None. It creates and removes a probe file there: os.access answers yes as
    root where a write still fails (under /proc, a read-only mount)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        return "exists and is not a folder"
    here = next((q for q in (target, *target.parents) if q.exists()), Path("."))
    try:
        fd, probe = tempfile.mkstemp(prefix=".largeep-probe-", dir=here)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot create a file in {here} ({exc.strerror or exc})"
    return None


def flat_record(record: dict[str, Any], env: dict[str, Any], command: str) -> dict[str, Any]:
    """A record as a list file holds it: its keys, then ENV_KEYS from ``env``, then "command"."""
    return {**record, **{k: env.get(k) for k in ENV_KEYS}, "command": command}


def write_records(
    path: str | os.PathLike[str], records: Sequence[dict[str, Any]], *, env: dict[str, Any], command: str,
    cpu: bool = False, **run: Any,
) -> list[Path]:
    """Writes ``records`` (SPEC's keys plus the writer's own, see the module docstring) as a JSON list at ``path``,
    each with ENV_KEYS from ``env`` (``gpu``, ``driver`` and ``nvshmem`` None for the records of CPU processes,
    ``cpu``) and "command" added,
    and ``{"schema", "results", "command", "env", **run}`` as its run file (:func:`run_path`). Returns both
    paths."""
    target = Path(path)
    doc = {"schema": SCHEMA, "results": target.name, "command": command, "env": env, **run}
    runfile = run_path(target)
    # (records of CPU processes ran no GPU and no NVSHMEM: the versions installed beside them are in the run file)
    renv = {**env, "gpu": None, "driver": None, "nvshmem": None} if cpu else env
    _write_json(target, [flat_record(r, renv, command) for r in records])
    _write_json(runfile, doc)
    return [target, runfile]


def write_results(
    path: str | os.PathLike[str],
    records: Sequence[Record],
    extras: Sequence[Extra],
    *,
    env: dict[str, Any],
    command: str,
    settings: dict[str, Any],
    skipped: Iterable[dict[str, str]] = (),
) -> list[Path]:
    """Writes the benchmark's results.json and run.json (module docstring). Records of CPU processes (settings
    "device" "cpu") say ``gpu`` None. Returns the two paths."""
    return write_records(
        path, [asdict(r) for r in records], env=env, command=command,
        cpu=settings.get("device") == "cpu", settings=settings,
        skipped=list(skipped), extras=[asdict(e) for e in extras],
    )


def write_part(
    path: str | os.PathLike[str],
    records: Sequence[Record],
    extras: Sequence[Extra],
    *,
    settings: dict[str, Any],
    skipped: Iterable[dict[str, str]] = (),
) -> None:
    """One backend's records, from its rank 0 to the launcher that merges the backends (a private file, one
    object: ``{"settings", "skipped", "records", "extras"}``; :func:`read_part` reads it)."""
    _write_json(Path(path), {"settings": settings, "skipped": list(skipped), "records": [asdict(r) for r in records],
                             "extras": [asdict(e) for e in extras]})


def read_part(path: str | os.PathLike[str]) -> tuple[list[Record], list[Extra], list[dict[str, str]], dict[str, Any]]:
    """A part file's records, extras, skipped backends and settings."""
    doc = json.loads(Path(path).read_text())
    return ([Record(**r) for r in doc["records"]], [Extra(**e) for e in doc["extras"]], list(doc["skipped"]),
            dict(doc["settings"]))


def finite(obj: Any) -> Any:
    """NaN and infinities become None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


@dataclass
class ResultsFile:
    """One results file read by :func:`read_results`, in either layout.

    records: the records as stored (dicts); extras: per-record dicts aligned with them, or None; env, command,
    settings, skipped, what: the run's (from the run file or the old object; empty when not known); run: the whole
    run file or old object, records and extras left out; layout: "list" or "object"."""

    path: Path
    records: list[dict[str, Any]]
    extras: list[dict[str, Any]] | None
    env: dict[str, Any]
    command: str | None
    settings: dict[str, Any]
    skipped: list[dict[str, Any]]
    what: str
    run: dict[str, Any]
    layout: str


def _is_run_doc(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("schema") == SCHEMA and isinstance(doc.get("results"), str)


def read_results(path: str | os.PathLike[str]) -> ResultsFile:
    """Reads a list file of records with its run file when there is one (given the run file, reads the list file
    it names), or an object file of the old layout. Raises ValueError for anything else."""
    path = Path(path)
    doc = json.loads(path.read_text())
    run: dict[str, Any] = {}
    if _is_run_doc(doc):
        run, path = doc, path.with_name(doc["results"])
        doc = json.loads(path.read_text())
    if isinstance(doc, list):
        layout, records = "list", doc
        if not run and run_path(path).exists():
            run = json.loads(run_path(path).read_text())
            if not _is_run_doc(run):
                raise ValueError(f"{run_path(path)}: not a run file (schema {SCHEMA})")
    elif isinstance(doc, dict) and isinstance(doc.get("records"), list):
        layout, records, run = "object", doc["records"], doc
    else:
        raise ValueError(f"{path}: expected a list of records or an object with 'records'")
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: a record is not a JSON object")
    extras = run.get("extras") if isinstance(run.get("extras"), list) else None
    if extras is not None and len(extras) != len(records):
        # (the two files are written one after the other: a run cut short between them leaves them apart)
        warnings.warn(f"{path}: {len(records)} records but {len(extras)} extras in its run file (a run cut short "
                      "between writing the two?): the extras are left out", stacklevel=2)
        extras = None
    env = run.get("env")
    settings = run.get("settings")
    return ResultsFile(
        path=path, records=records, extras=extras, env=env if isinstance(env, dict) else {},
        command=run.get("command") if isinstance(run.get("command"), str) else None,
        settings=settings if isinstance(settings, dict) else {}, skipped=list(run.get("skipped") or []),
        what=str(run.get("what") or ""), run={k: v for k, v in run.items() if k not in ("records", "extras")},
        layout=layout,
    )


def read_results_files(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> Iterator[ResultsFile]:
    """Each results file of ``paths`` once (:func:`read_results`; a list file given twice, or with its run file, is
    read once), every record checked for SPEC's keys (ValueError naming the file otherwise)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    seen: set[Path] = set()
    for p in paths:
        f = read_results(p)
        if f.path.resolve() in seen:
            continue
        seen.add(f.path.resolve())
        for r in f.records:
            missing = [k for k in RECORD_KEYS if k not in r]
            if missing:
                raise ValueError(f"{f.path}: a record lacks the keys {missing}")
        yield f


def load_records(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Records of one or more results files in either layout (:func:`read_results_files`), as dicts with SPEC's
    keys, the writer's own keys, and ENV_KEYS and "command" (from the run's environment where an old file keeps them
    once; left out where it has none). Raises ValueError for a record without SPEC's keys."""
    out: list[dict[str, Any]] = []
    for f in read_results_files(paths):
        for r in f.records:
            row = dict(r)
            if f.layout == "object" and f.settings.get("device") == "cpu":
                row.setdefault("gpu", None)  # (as write_results says of CPU processes)
            for k in ENV_KEYS:
                if k in f.env:
                    row.setdefault(k, f.env[k])
            if f.command is not None:
                row.setdefault("command", f.command)
            out.append(row)
    return out


# -- table ------------------------------------------------------------------------------------------------------
def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def _fmt_rate(v: float | None) -> str:
    """A bandwidth: two decimals, or three significant digits below 1 (CPU runs: 0.0037, not 0.00)."""
    return "-" if v is None or v != v else (f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}")


def op_bytes(record: Record) -> float | None:
    """The bytes a record's op moves per rank, the count behind its ``logical_gbps`` (module docstring), or None
    where it has none (layout, a receive phase)."""
    if record.logical_gbps is None or record.logical_gbps != record.logical_gbps:
        return None
    return record.logical_gbps * record.time_us_median * 1e3  # (gbps(): bytes / (us * 1e3))


def format_table(records: Sequence[Record], extras: Sequence[Extra]) -> str:
    """An nccl-tests-like table: one row per record, grouped by mode and sizes, then op, then dtype; ``size(B)``
    is :func:`op_bytes`."""
    from tabulate import tabulate

    op_order = ("layout", "dispatch", "combine", "roundtrip", "dispatch.send", "dispatch.recv", "combine.send",
                "combine.recv")

    def label(i: int) -> str:
        return f"{extras[i].phase_of}.{records[i].op}" if extras[i].phase_of else records[i].op

    def key(i: int) -> tuple[Any, ...]:
        r = records[i]
        return (
            MODES.index(r.mode) if r.mode in MODES else 9, r.hidden, r.num_experts, r.num_topk, r.num_tokens,
            op_order.index(label(i)) if label(i) in op_order else 9, r.dtype, r.backend, r.num_sms or 0,
        )

    order = sorted(range(len(records)), key=key)
    rows = []
    for i in order:
        r, e = records[i], extras[i]
        rows.append([
            r.backend, r.mode, label(i), r.dtype, r.ep, r.num_tokens, r.hidden, r.num_topk, r.num_experts,
            "-" if r.num_sms is None else r.num_sms, _fmt(op_bytes(r), 0),
            _fmt(r.time_us_median), _fmt(r.time_us_p10), _fmt(r.time_us_p90),
            _fmt_rate(r.logical_gbps), _fmt_rate(e.bus_gbps), _fmt(e.x_best, 2), _fmt(e.floor_us),
        ])
    headers = [
        "backend", "mode", "op", "dtype", "ep", "tokens", "hidden", "topk", "experts", "sms", "size(B)",
        "time(us)", "p10", "p90", "logical GB/s", "bus GB/s", "x best", "floor(us)",
    ]
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True,
                    colalign=("left", "left", "left", "left") + ("right",) * 14)
