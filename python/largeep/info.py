"""``python -m largeep``: what this machine gives largeep -- versions, GPUs, the native module and why it is missing,
peer access between the GPUs, the ``LARGEEP_*`` and ``NVSHMEM_*`` settings -- and what to fix first.

Never raises for a missing piece: every line says what it found. Exit status 1 when a ``LARGEEP_*`` variable has a
value the library would refuse (Buffer creation would raise, or for LARGEEP_INDUCTOR_ORDER_FIX the first trace of a
graph holding largeep's communication ops), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any


def _cuda_major(version: str | None) -> int | None:
    m = re.match(r"(\d+)", version or "")
    return int(m.group(1)) if m else None


# the files the native module is built from (relative to a checkout's root)
NATIVE_SOURCES = ("csrc", "CMakeLists.txt")


def native_staleness(note: dict[str, object], package_dir: str | os.PathLike[str]) -> str | None:
    """Where largeep runs from a git checkout (``package_dir`` is its python/largeep) and the install recorded the
    commit it built the native module from (setup.py's note, "git"): why that module may not match the checkout's
    sources (the files of NATIVE_SOURCES that differ from that commit, uncommitted changes included), else None. A
    module whose bindings changed is refused by its version (native.ABI_VERSION); one whose kernels alone changed
    loads and runs the old kernels, which only this tells."""
    import subprocess
    from pathlib import Path

    rev = note.get("git")
    if note.get("built") is not True or not isinstance(rev, str) or not rev:
        return None
    pkg = Path(package_dir).resolve()
    root = pkg.parent.parent
    if pkg.parent.name != "python" or not (root / ".git").exists():
        return None  # (an install outside a checkout: its module and sources were installed together)
    dirty = rev.endswith("-dirty")
    commit = rev.removesuffix("-dirty")

    def git(*args: str) -> str | None:
        try:
            run = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return run.stdout if run.returncode == 0 else None

    if git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}") is None:
        if git("rev-parse", "HEAD") is None:
            return None  # (git does not answer here: not installed, or a checkout of another user)
        return (f"the native module was built from commit {commit[:12]}, which this checkout ({root}) does not "
                "have: its kernels may not be this checkout's; rebuild it (`pip install --no-build-isolation -e .`)")
    diff = git("diff", "--name-only", commit, "--", *NATIVE_SOURCES)
    if diff is None:
        return None
    changed = diff.split()
    if not changed:
        return None
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    return (f"the native module was built from commit {commit[:12]}"
            + (" with uncommitted changes" if dirty else "")
            + f", and {len(changed)} of its source files differ from that commit in this checkout ({shown}): it "
            "may run older kernels; rebuild it (`pip install --no-build-isolation -e .`)")


def report() -> dict[str, Any]:
    """Everything the text report shows, as plain values."""
    import torch

    from largeep import _env, native
    from largeep.bench.records import environment

    out: dict[str, Any] = {"environment": environment()}
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / (1 << 30), 1), "sms": p.multi_processor_count})
    out["gpus"] = gpus
    # peer access: the ranks of one node write each other's memory directly (NVLink), so each pair must have it
    out["peer_access"] = [[i == j or bool(torch.cuda.can_device_access_peer(i, j)) for j in range(len(gpus))]
                          for i in range(len(gpus))]
    try:
        out["native"] = native.unavailable_reason() or "ok"
    except ValueError as exc:  # (a bad LARGEEP_SEGV_BACKTRACE, which the module's load reads; settings say it too)
        out["native"] = f"not loaded: {exc}"
    out["auto_backend"] = "nvshmem" if out["native"] == "ok" else "torch"
    # the install's record of the native build: built (None: no record, as in a source tree), the compute
    # capabilities it was built for (None: unrecorded), the last lines of a failed build's output
    note = native.build_note()
    built = note.get("built")
    out["native_built"] = built if isinstance(built, bool) else None
    archs = native.built_archs()
    out["native_archs"] = sorted(archs) if archs is not None and built is True else None
    out["native_build_log"] = native.build_log()
    if built is True and archs is None:
        out["native_archs_error"] = (
            f"the native module's install recorded no compute capabilities (cuda_archs={note.get('cuda_archs')!r}), "
            "so no GPU is checked against them: reinstall largeep with LARGEEP_CUDA_ARCHS as numbers (e.g. 90)")
    else:
        out["native_archs_error"] = None
    out["native_stale"] = native_staleness(note, os.path.dirname(native.__file__))
    try:
        settings = _env.settings()
        out["settings"] = dict(vars(settings))
        out["settings_error"] = None
    except ValueError as exc:
        out["settings"], out["settings_error"] = None, f"{exc} (Buffer creation would raise this)"
    try:
        fix = _env.inductor_order_fix()
        if out["settings"] is not None:
            out["settings"]["inductor_order_fix"] = fix
    except ValueError as exc:
        msg = f"{exc} (a torch.compile trace of a largeep op would raise this)"
        out["settings_error"] = f"{out['settings_error']}; {msg}" if out["settings_error"] else msg
    out["variables"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("LARGEEP_", "NVSHMEM_"))}
    out["log_level_error"] = None if _env.log_level() is not None else (
        f"LARGEEP_LOG_LEVEL={os.environ.get('LARGEEP_LOG_LEVEL')!r} names no logging level (DEBUG, INFO, WARNING, "
        "ERROR, CRITICAL, or a whole number): the library logs at WARNING, and a Buffer refuses it")
    out["advice"] = _advice(out)
    return out


def _advice(r: dict[str, Any]) -> list[str]:
    env, tips = r["environment"], []
    if r["settings_error"]:
        tips.append(f"fix the environment variable: {r['settings_error']}")
    if r.get("log_level_error"):
        tips.append(r["log_level_error"])
    if r.get("native_archs_error"):
        tips.append(r["native_archs_error"])
    if r.get("native_stale"):
        tips.append(r["native_stale"])
    nvshmem, torch_cuda = env.get("nvshmem"), env.get("cuda")
    wheel = re.search(r"cu(\d+)", nvshmem or "")
    if wheel and torch_cuda and int(wheel.group(1)) != _cuda_major(torch_cuda):
        want = f"nvidia-nvshmem-cu{_cuda_major(torch_cuda)}"
        tips.append(f"{nvshmem} is for CUDA {wheel.group(1)} but torch is built for CUDA {torch_cuda}: keep only "
                    f"{want} (`pip uninstall` the other NVSHMEM wheel, which writes the same files, then `pip install "
                    f"--force-reinstall {want}`) and rebuild largeep with an nvcc of CUDA {_cuda_major(torch_cuda)}")
    if r["native"] != "ok" and r["gpus"]:
        tips.append(f"the nvshmem backend is unavailable ({r['native']}); backend='auto' falls back to 'torch'")
    cut = [(i, j) for i, row in enumerate(r["peer_access"]) for j, ok in enumerate(row) if not ok]
    if cut:
        tips.append(f"GPU pairs without peer access {cut}: ranks on those GPUs cannot share a node in the nvshmem "
                    "backend (set ranks_per_node so that they are on different nodes, or use backend='torch')")
    if not r["gpus"]:
        tips.append("no CUDA GPU is visible: only the torch backend runs (gloo on CPU)")
    return tips


def _text(r: dict[str, Any]) -> str:
    env = r["environment"]
    lines = [f"largeep {env.get('largeep')}" + (f" ({env['git']})" if env.get("git") else ""),
             f"  python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda') or 'none'}), "
             f"NCCL {env.get('nccl') or '-'}, {env.get('nvshmem') or 'no NVSHMEM wheel'}"]
    if r["gpus"]:
        lines.append(f"  {len(r['gpus'])} GPU(s), driver {env.get('driver') or '?'}:")
        for g in r["gpus"]:
            lines.append(f"    {g['index']}: {g['name']} (sm_{g['capability'].replace('.', '')}, {g['sms']} SMs, "
                         f"{g['memory_gib']} GiB)")
        if len(r["gpus"]) > 1:
            # GPU i: one mark per GPU j, y where i reaches j's memory directly
            lines.append("  peer access (GPU: to GPUs 0, 1, ...): " + "  ".join(
                f"{i}: " + "".join("y" if ok else "." for ok in row) for i, row in enumerate(r["peer_access"])))
    else:
        lines.append("  no CUDA GPU visible")
    archs = r.get("native_archs")
    built_for = f" (built for compute capability {', '.join(map(str, archs))})" if archs else ""
    lines.append(f"  native module (nvshmem backend): {r['native']}{built_for}")
    if r.get("native_build_log"):
        lines.append("  the end of the native build's output (at install):")
        lines.extend(f"    | {line}" for line in r["native_build_log"])
    from largeep.backends import nvshmem_backend as nv

    lines.append(f"  backend='auto' picks: {r['auto_backend']} (for normal-mode groups of up to "
                 f"{nv.TESTED_RANKS_NORMAL} ranks, low-latency groups of up to {nv.TESTED_RANKS_LOW_LATENCY}; "
                 f"backend='nvshmem': normal mode up to {nv.MAX_RANKS_NORMAL} ranks, {nv.MAX_NODES_NORMAL} nodes "
                 f"of at most {nv.MAX_RANKS_PER_NODE_NORMAL}, low latency up to "
                 f"{nv.MAX_RANKS_LOW_LATENCY})")
    if r["settings_error"]:
        lines.append(f"  settings: INVALID: {r['settings_error']}")
    else:
        s = r["settings"]
        lines.append(f"  settings: timeout {s['timeout_s']:g} s, init timeout {s['init_timeout_s']:g} s, "
                     f"value checks {'on' if s['check_values'] else 'off'}, zero-copy slots {s['zero_copy_slots']}")
    for k, v in r["variables"].items():
        lines.append(f"    {k}={v}")
    if r["advice"]:
        lines.append("to do:")
        lines.extend(f"  - {t}" for t in r["advice"])
    else:
        lines.append("nothing to fix")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    # (the module docstring's first paragraph, without its reST literal marks)
    about = (__doc__ or "").split("\n\n")[0].replace("``", "")
    ap = argparse.ArgumentParser(prog="python -m largeep", description=about)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    r = report()
    print(json.dumps(r, indent=2, default=str) if args.json else _text(r))
    return 1 if r["settings_error"] else 0


if __name__ == "__main__":
    sys.exit(main())
