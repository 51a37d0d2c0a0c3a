"""The native module ``largeep._C`` (NVSHMEM kernels): whether it is there, and why not."""

from __future__ import annotations

import functools
import importlib.machinery
import json
import re
import sys
from pathlib import Path
from types import ModuleType

_HOW = (
    "build it with a CUDA toolkit (nvcc) and NVSHMEM present: `pip install nvidia-nvshmem-cu12` or "
    "`nvidia-nvshmem-cu13` (matching torch's CUDA) or set NVSHMEM_DIR, then reinstall largeep "
    "(`pip install --no-build-isolation .`)"
)


# the version of the bindings this Python code calls (csrc/bindings.cpp's abi_version; 2: ops.gather_rows and
# weighted_row_sum's count; 3: the low-latency kernels without the ll_send setting; 4: id_check; 5: the normal
# mode's status words for a void round, one per rank; 6: normal-mode groups of up to 512 ranks, 64 nodes and 32
# ranks per node, which an older build would refuse only after the Buffer's collective allocation; 7: the normal
# kernels' start, a fresh dispatch's launches in one call; 8: NormalKernels without the load kind, which every call
# site chooses; 9: the dispatch copy-out's drain (num_rows -1), weighted_row_sum's src_rows, and one send for fresh
# and cached dispatches; 10: the low-latency send keeps the ids it sent and the combine reads them, and the error
# words of a low-latency row counter not cleared and of a count word of another round; 11: NormalKernels takes the
# prepare kernel's scratch, prep_scratch_words, and the error word kOpPrepare; 12: free's keep vote; 13: the normal
# kernels take has_scales / with_weights and the handle's tag word, and report calls of other signatures, ops 17-22;
# 14: fp8_quantize / fp8_dequantize; 15: the normal combine's push, forward and reduce take part_bf16; 16:
# wait_host_word takes the stream, cuda_error_name, NormalKernels.zc_held, no barrier / finalize; 17: layout takes
# no status or error words: an unchecked layout counts an id out of range nowhere instead of reporting it; 18: the
# low-latency combine kernels take the handle's dispatch round, whose tag their done flags carry, op 23; 19:
# NormalKernels.copy_engines / combine_ce, and a reporting notify's rows per source in the status words)
ABI_VERSION = 19


@functools.lru_cache(maxsize=1)
def build_note() -> dict[str, object]:
    """What the install recorded about the native build (setup.py writes largeep/_native_build.json): ``built``,
    and ``reason`` (why not, with ``log``: the last lines of a failed build's output) or ``cuda_archs`` (the CMake
    list it was built for, e.g. "90;100a"); empty when there is no record (a source tree, an older install)."""
    try:
        note = json.loads((Path(__file__).with_name("_native_build.json")).read_text())
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def build_log() -> list[str]:
    """The last lines of a failed native build's output (the compiler's or CMake's error), as the install recorded
    them; empty when it recorded none."""
    log = build_note().get("log")
    return [str(line) for line in log] if isinstance(log, list) else []


def built_archs() -> set[int] | None:
    """The compute capabilities (major * 10 + minor) the native module was built for, None when unrecorded."""
    raw = str(build_note().get("cuda_archs") or "")
    archs = {int(a) for a in re.findall(r"\d+", raw)}
    return archs or None


def built_for(capability: int) -> bool | None:
    """Whether the recorded build runs on a GPU of compute capability ``capability`` (major * 10 + minor): one of
    its numbers exactly, or within the family of an ``f`` target (100f: 100 and 103, the same major and a minor no
    lower); None when unrecorded. PTX targets are not counted as running elsewhere: their JIT on another GPU is
    untested (and slow at the first call)."""
    raw = str(build_note().get("cuda_archs") or "")
    found = re.findall(r"(\d+)([af]?)", raw)
    if not found:
        return None
    return any(int(n) == capability or (suffix == "f" and int(n) // 10 == capability // 10 and capability > int(n))
               for n, suffix in found)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from largeep import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        found = sorted(p.name for p in Path(__file__).parent.glob("_C*.so"))
        mine = [n for n in found if n[len("_C"):] in importlib.machinery.EXTENSION_SUFFIXES]
        if found and not mine:
            # (a module of another Python's ABI: this interpreter does not even look at it)
            return None, (f"the native module largeep._C is installed for another Python ({', '.join(found)}), this "
                          f"is Python {sys.version_info.major}.{sys.version_info.minor} (which loads _C"
                          f"{importlib.machinery.EXTENSION_SUFFIXES[0]}); reinstall largeep with this Python "
                          "(`python -m pip install --no-build-isolation .`)")
        if found:
            return None, (f"the native module largeep._C is installed but does not load ({exc}): a library it needs "
                          "(libnvshmem_host from the NVSHMEM wheel it was built with) moved or was removed; "
                          f"reinstall largeep (`pip install --no-build-isolation .`)")
        note = build_note()
        if note.get("built") is False:
            shown = " (`python -m largeep` shows the end of the build's output)" if build_log() else ""
            return None, f"the native module largeep._C was not built: {note.get('reason')}{shown}; {_HOW}"
        return None, f"the native module largeep._C is not installed ({exc}); {_HOW}"
    have = getattr(_C, "abi_version", 1)
    if have != ABI_VERSION:
        return None, (
            f"the native module largeep._C ({_C.__file__}) is from another build of largeep (its bindings are "
            f"version {have}, this Python code needs {ABI_VERSION}); reinstall largeep "
            "(`pip install --no-build-isolation .`)"
        )
    from largeep import _env

    if _env.fault_backtrace():
        _C.install_fault_backtrace()
    return _C, None


def module() -> ModuleType:
    """Returns largeep._C or raises RuntimeError saying why it is missing and how to get it."""
    mod, reason = _load()
    if mod is None:
        raise RuntimeError(reason)
    return mod


def unavailable_reason() -> str | None:
    """None when the nvshmem backend can be used in this process, else why not."""
    mod, reason = _load()
    if mod is None:
        return reason
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return _arch_reason(torch.cuda.current_device())


@functools.cache
def _arch_reason(device: int) -> str | None:
    """Why the module cannot run on CUDA device ``device`` (built for other GPUs), else None. Cached: the row
    kernels ask unavailable_reason on every call."""
    import torch

    archs = built_archs()
    major, minor = torch.cuda.get_device_capability(device)
    if archs is not None and not built_for(major * 10 + minor):
        return (f"the native module was built for compute capability {sorted(archs)} (LARGEEP_CUDA_ARCHS), this "
                f"GPU is {major * 10 + minor}; reinstall with LARGEEP_CUDA_ARCHS={major * 10 + minor} (the kernels "
                "are written for Hopper: other GPUs are untested)")
    return None
