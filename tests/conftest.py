from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from dist_pool import DistPool, PoolCache


def gpu_count() -> int:
    """Visible GPUs; LARGEEP_TEST_EMULATE_GPUS=N (with at least one GPU) makes the multi-GPU tests run with N ranks
    on GPU 0 (DistPool then runs "nccl" pools as gloo groups, all ranks on GPU 0: NVSHMEM's several PEs per GPU):
    for correctness only, where no machine with N GPUs is lent. Tests of the torch backend on NCCL are skipped there."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    emulate = os.environ.get("LARGEEP_TEST_EMULATE_GPUS")
    return int(emulate) if emulate and have > 0 else have


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    have = gpu_count()
    emulated = bool(os.environ.get("LARGEEP_TEST_EMULATE_GPUS")) and have > 0
    for item in items:
        marks = list(item.iter_markers("gpu"))
        if not marks:
            continue
        # (the largest need: a parameter's gpu(2) beside its function's gpu(1) is the parameter's case)
        need = max(m.args[0] if m.args else 1 for m in marks)
        if have < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} GPUs, {have} visible"))
        elif emulated and any(m.kwargs.get("real", False) for m in marks):
            item.add_marker(pytest.mark.skip(reason=f"needs {need} distinct GPUs, not emulation"))
        elif emulated and _torch_on_nccl(item):
            # NCCL refuses two ranks on one GPU, so the emulated groups are gloo groups, where the torch backend
            # runs on the CPU: its GPU tests need as many real GPUs as ranks
            item.add_marker(pytest.mark.skip(reason="the torch backend on NCCL needs one GPU per rank, not emulation"))


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
