"""The native module's errors reach Python as exceptions with their message (no GPU needed)."""

from __future__ import annotations

import pytest
from largeep import native


def test_native_errors_are_python_exceptions() -> None:
    """A failed check inside the module raises RuntimeError naming the check and its source line (formatted without
    iostreams: a module whose toolchain linked libstdc++ statically used to crash while formatting the line)."""
    try:
        C = native.module()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    with pytest.raises(RuntimeError, match=r"NVSHMEM is not initialised .* \(csrc/runtime/runtime\.cu:\d+\)$"):
        C.free(0, 1.0)
    with pytest.raises(RuntimeError, match=r"bad layout sizes: num_experts 8, num_ranks 0, ranks_per_node 1 "
                       r"\[num_ranks > 0 .* \(csrc/kernels/layout\.cu:\d+\)$"):
        C.layout(0, 1, 1, 0, 8, 1, 0, 0, 0, 0, 0, 0, 0, 0)


def test_native_module_of_another_build_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A largeep._C whose bindings are another version than the Python code calls (a stale build) is reported as
    unavailable with a message saying to reinstall, not used until a call fails with a TypeError."""
    import sys
    import types

    fake = types.ModuleType("largeep._C")
    fake.__file__ = "/stale/_C.so"
    fake.abi_version = native.ABI_VERSION - 1  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "largeep._C", fake)
    import largeep

    monkeypatch.setattr(largeep, "_C", fake, raising=False)
    native._load.cache_clear()
    try:
        reason = native.unavailable_reason()
        assert reason is not None and "another build of largeep" in reason and "reinstall" in reason, reason
        with pytest.raises(RuntimeError, match="another build"):
            native.module()
        fake.abi_version = native.ABI_VERSION  # type: ignore[attr-defined]
        fake.install_fault_backtrace = lambda: None  # type: ignore[attr-defined]
        native._load.cache_clear()
        assert native.module() is fake
    finally:
        native._load.cache_clear()


def test_dispatch_state_copies_share_the_original() -> None:
    """An nvshmem dispatch's routing state holds device addresses into its own workspace: a copy (copy.copy,
    copy.deepcopy of a handle) shares the original rather than getting a new workspace those addresses miss."""
    import copy

    import torch
    from largeep.backends import nvshmem_backend as nb

    ws = torch.zeros(16, dtype=torch.int32)
    st = nb._NvState(ws, ws.data_ptr(), ws.data_ptr() + 8, torch.zeros(2, 2, dtype=torch.int32), ws.data_ptr() + 16,
                     2, 1, False, ws.data_ptr() + 24)
    assert copy.copy(st) is st and copy.deepcopy(st) is st
    assert copy.deepcopy({"state": st})["state"] is st


@pytest.mark.parametrize("ranks,experts,max_tokens,topk", [(2, 6, 11, 6), (2, 288, 128, 8), (3, 3, 5, 1),
                                                           (34, 68, 8, 4), (7, 21, 13, 3)])
def test_low_latency_rowmap_is_aligned(ranks: int, experts: int, max_tokens: int, topk: int) -> None:
    """A low-latency handle's rowmap (16-byte entries after one lead word per output row) starts 16-byte aligned
    whatever E/N * N*M is (2 ranks, 6 experts, 11 tokens: 66 lead words made misaligned loads on GPUs)."""
    from types import SimpleNamespace

    from largeep.backends.nvshmem_backend import _lead_ints

    c = SimpleNamespace(experts_per_rank=experts // ranks, num_ranks=ranks, max_tokens_per_rank=max_tokens,
                        num_topk=topk)
    words = _lead_ints(c)
    assert words * 4 % 16 == 0
    assert words >= c.experts_per_rank * ranks * max_tokens > words - 4


def test_install_record(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """setup.py's record of the native build (largeep/_native_build.json): why it was not built reaches the
    refusal (pip hides the build's own message without -v); the architectures it was built for are compared with
    the GPU's; no record (a source tree) keeps the generic message and no architecture check."""
    import importlib.machinery
    import json
    import sys

    import torch

    note = tmp_path / "_native_build.json"
    monkeypatch.setattr(native, "__file__", str(tmp_path / "native.py"))
    import largeep

    monkeypatch.setitem(sys.modules, "largeep._C", None)  # (import largeep._C fails as when it is not there)
    monkeypatch.delattr(largeep, "_C", raising=False)
    caches = (native._load, native.build_note, native._arch_reason)

    def clear() -> None:  # (the record and the verdicts are cached per process; this test changes them)
        for c in caches:
            c.cache_clear()

    clear()
    try:
        assert native.build_note() == {} and native.built_archs() is None
        assert "is not installed" in (native.unavailable_reason() or "")
        note.write_text(json.dumps({"built": False, "reason": "its build failed at install: no nvcc"}))
        clear()
        reason = native.unavailable_reason() or ""
        assert "was not built: its build failed at install: no nvcc" in reason, reason
        note.write_text(json.dumps({"built": True, "cuda_archs": "90;100a"}))
        clear()
        assert native.built_archs() == {90, 100}
        mine = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]  # (the name this Python loads)
        (tmp_path / mine).write_bytes(b"")
        clear()
        reason = native.unavailable_reason() or ""
        assert "installed but does not load" in reason, reason
        # a module built for another Python, which this one does not load: said so, not a missing library
        (tmp_path / mine).unlink()
        other = "_C.cpython-39-x86_64-linux-gnu.so"
        (tmp_path / other).write_bytes(b"")
        clear()
        reason = native.unavailable_reason() or ""
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        assert f"installed for another Python ({other}), this is Python {here}" in reason, reason
        assert "libnvshmem" not in reason
        # a module that loads, on a GPU it was not built for
        fake = type(sys)("largeep._C")
        fake.abi_version = native.ABI_VERSION  # type: ignore[attr-defined]
        fake.install_fault_backtrace = lambda: None  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "largeep._C", fake)
        monkeypatch.setattr(largeep, "_C", fake, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
        clear()
        reason = native.unavailable_reason() or ""
        assert "built for compute capability [90, 100]" in reason and "LARGEEP_CUDA_ARCHS=80" in reason, reason
        assert native.unavailable_reason() == reason  # (the verdict is kept for the device)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        clear()
        assert native.unavailable_reason() is None
        # an arch-specific target (100a) runs on its GPU alone; a family target (100f) on its family's later ones
        for archs, cc, runs in (("90;100a", (10, 3), False), ("90;100f", (10, 3), True), ("100f", (10, 0), True),
                                ("100f", (9, 0), False), ("103f", (10, 0), False), ("100f", (11, 0), False),
                                ("90-virtual", (10, 0), False)):
            note.write_text(json.dumps({"built": True, "cuda_archs": archs}))
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, cc=cc: cc)
            clear()
            assert (native.unavailable_reason() is None) == runs, (archs, cc, native.unavailable_reason())
    finally:
        clear()
