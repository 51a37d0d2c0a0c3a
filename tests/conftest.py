from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from dist_pool import DistPool, PoolCache


def real_gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_count() -> int:
    """GPUs the tests may assume: the visible ones, or LARGEEP_TEST_EMULATE_GPUS=N where that is more (and at least
    one GPU is visible). A test that needs more GPUs than are visible then runs with its ranks on GPU 0 (DistPool
    runs its "nccl" pools as gloo groups, all ranks on GPU 0: NVSHMEM's several PEs per GPU), for correctness only,
    where no machine with N GPUs is lent; tests of the torch backend on NCCL and gpu(n, real=True) tests are
    skipped there. A test that the visible GPUs can hold runs on them, whatever the variable says."""
    have = real_gpu_count()
    emulate = os.environ.get("LARGEEP_TEST_EMULATE_GPUS", "").strip()
    return max(have, int(emulate)) if emulate and have > 0 else have


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "gpu(n, real=False): needs n CUDA GPUs (skipped without them); real=True: n distinct GPUs, which the "
        "emulation (LARGEEP_TEST_EMULATE_GPUS) cannot stand in for (ranks placed on named devices, NCCL itself)",
    )


def _torch_on_nccl(item: pytest.Item) -> bool:
    """Whether a GPU test runs the torch backend on an NCCL group (by its backend parameter or its id)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "torch":
        return callspec.params.get("world") != 1  # (a group of one rank keeps NCCL under the emulation)
    return "torch-nccl" in item.name


def _gpu_need(marks: list[pytest.Mark]) -> int:
    """The GPUs a test needs: the largest of its gpu marks (a parameter's gpu(4) beside its function's gpu(2) is the
    parameter's case; pytest's closest mark would be the function's)."""
    return max(int(m.kwargs.get("n", m.args[0] if m.args else 1)) for m in marks)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    have, real = gpu_count(), real_gpu_count()
    for item in items:
        marks = list(item.iter_markers("gpu"))
        if not marks:
            continue
        need = _gpu_need(marks)
        emulated = need > real  # (and have >= need: LARGEEP_TEST_EMULATE_GPUS stands in for the rest)
        if have < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} GPU{'s' if need > 1 else ''}, {have} visible"))
        elif emulated and any(m.kwargs.get("real", False) for m in marks):
            item.add_marker(pytest.mark.skip(reason=f"needs {need} distinct GPUs, not emulation"))
        elif emulated and _torch_on_nccl(item):
            # NCCL refuses two ranks on one GPU, so the emulated groups are gloo groups, where the torch backend
            # runs on the CPU: its GPU tests need as many real GPUs as ranks
            item.add_marker(pytest.mark.skip(reason="the torch backend on NCCL needs one GPU per rank, not emulation"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """On a GPU machine's scripted run, a missing native module or fewer GPUs than expected ends the run at once
    (exit status 3) instead of skipping the GPU tests quietly: LARGEEP_TEST_REQUIRE_GPUS=N (at least N GPUs
    visible) and LARGEEP_TEST_REQUIRE_NATIVE=1 (largeep's native module loads), checked when GPU tests are
    selected (after -m and -k)."""
    if not any(item.get_closest_marker("gpu") for item in session.items):
        return
    want = os.environ.get("LARGEEP_TEST_REQUIRE_GPUS", "").strip()
    if want and real_gpu_count() < int(want):
        pytest.exit(f"LARGEEP_TEST_REQUIRE_GPUS={want}, but {real_gpu_count()} GPUs are visible", returncode=3)
    if os.environ.get("LARGEEP_TEST_REQUIRE_NATIVE", "").strip() == "1":
        from largeep import native

        reason = native.unavailable_reason()
        if reason is not None:
            pytest.exit(f"LARGEEP_TEST_REQUIRE_NATIVE=1, but the native module is unavailable: {reason}", returncode=3)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small tensors: one intra-op thread is faster, and it avoids oversubscribing a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_cache = PoolCache()


@pytest.fixture(autouse=True)
def _pool_cache_test(request: pytest.FixtureRequest) -> None:
    _cache.test = request.node.nodeid  # (a pool's hangs are counted per test)


@pytest.fixture(scope="session")
def pools() -> Iterator[Callable[[int, str], DistPool]]:
    yield _cache.get
    _cache.close_all()
