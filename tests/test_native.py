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
    with pytest.raises(RuntimeError, match=r"NVSHMEM is not initialised .*runtime\.cu:\d+\)$"):
        C.free(0, 1.0)
    with pytest.raises(RuntimeError, match=r"bad layout sizes \[num_ranks > 0 .*layout\.cu:\d+\)$"):
        C.layout(0, 1, 1, 0, 8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


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
