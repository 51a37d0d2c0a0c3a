"""The test harness's choices (tests/conftest.py), checked on CPU by collecting the GPU tests with torch made to see
1, 2 or 4 GPUs (fake_gpus.py): which tests run, which skip and why, with and without the emulation of more GPUs;
and the scripted GPU runs' requirements (LARGEEP_TEST_REQUIRE_GPUS, LARGEEP_TEST_REQUIRE_NATIVE) ending the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_pool import pool_backend

HERE = Path(__file__).resolve().parent


def _collect(gpus: int, emulate: int | None = None, native: bool = True, files: tuple[str, ...] = ("test_gpu.py",),
             marks: str = "gpu", **env: str) -> tuple[int, dict[str, str]]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("LARGEEP_TEST_")}
    e.update(LARGEEP_FAKE_GPUS=str(gpus), LARGEEP_FAKE_NATIVE="1" if native else "0", **env)
    e["PYTHONPATH"] = os.pathsep.join([str(HERE), e.get("PYTHONPATH", "")])
    if emulate is not None:
        e.update(LARGEEP_TEST_EMULATE_GPUS=str(emulate), LARGEEP_TEST_SHARED_GPUS="1")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fake_gpus",
                        "--collect-only", "-m", marks, *files],
                       cwd=HERE, env=e, capture_output=True, text=True, timeout=300)
    got = dict(line[len("HARNESS "):].split(" | ", 1) for line in p.stdout.splitlines() if line.startswith("HARNESS "))
    return p.returncode, got


def test_marks_and_emulation() -> None:
    rc, one = _collect(1, files=("test_gpu.py", "test_info.py"))
    assert rc == 0 and one, one
    # a parameter's gpu(2) beside its function's gpu(1): the 2-rank case needs 2 GPUs (it once ran on 1)
    assert one["test_low_latency_fp8_not_finite[False-1]"] == "run"
    assert one["test_low_latency_fp8_not_finite[False-2]"] == "needs 2 GPUs, 1 visible"
    assert one["test_runtime_cycles[4]"] == "needs 4 GPUs, 1 visible"
    assert one["test_report_matches_the_machine_gpu"] == "run"
    rc, emu = _collect(1, emulate=2, files=("test_gpu.py", "test_errors.py::test_nvshmem_refuses_uneven_gpus"))
    assert emu["test_low_latency_fp8_not_finite[False-2]"] == "run"
    assert emu["test_runtime_cycles[2]"] == "run" and emu["test_runtime_cycles[4]"] == "needs 4 GPUs, 2 visible"
    assert emu["test_previous_event_orders[torch-2]"].startswith("the torch backend on NCCL needs one GPU per rank")
    assert emu["test_nvshmem_refuses_uneven_gpus"] == "needs 2 distinct GPUs, not emulation"
    # the emulation never takes real GPUs away: on 4 GPUs with LARGEEP_TEST_EMULATE_GPUS=2 everything runs there
    rc, four = _collect(4, emulate=2)
    assert rc == 0 and set(four.values()) == {"run"}, {k: v for k, v in four.items() if v != "run"}
    rc, two = _collect(2, emulate=4)
    assert two["test_previous_event_orders[torch-2]"] == "run"
    assert two["test_runtime_cycles[4]"] == "run"


def test_scripted_runs_end_on_a_missing_requirement() -> None:
    info = ("test_info.py",)
    rc, _ = _collect(1, native=False, files=info, LARGEEP_TEST_REQUIRE_NATIVE="1")
    assert rc == 3
    rc, _ = _collect(1, files=info, LARGEEP_TEST_REQUIRE_GPUS="2")
    assert rc == 3
    rc, got = _collect(2, files=info, LARGEEP_TEST_REQUIRE_GPUS="2", LARGEEP_TEST_REQUIRE_NATIVE="1")
    assert rc == 0 and got["test_report_matches_the_machine_gpu"] == "run"
    # checked on the tests selected: none of them a GPU test here (-m "not gpu" after the collection)
    rc, _ = _collect(1, native=False, files=info, LARGEEP_TEST_REQUIRE_NATIVE="1", LARGEEP_TEST_REQUIRE_GPUS="4",
                     marks="not gpu")
    assert rc == 0


def test_pool_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """DistPool's group under the emulation: gloo on GPU 0 only for more ranks than visible GPUs."""
    monkeypatch.delenv("LARGEEP_TEST_EMULATE_GPUS", raising=False)
    assert pool_backend("nccl", 2, 1) == "nccl"  # (no emulation: the test was skipped, or fails as it should)
    for off in ("", "0", " 0 "):
        monkeypatch.setenv("LARGEEP_TEST_EMULATE_GPUS", off)
        assert pool_backend("nccl", 2, 1) == "nccl"
    monkeypatch.setenv("LARGEEP_TEST_EMULATE_GPUS", "2")
    assert pool_backend("nccl", 2, 1) == "gloo-cuda0"
    assert pool_backend("nccl", 1, 1) == "nccl" and pool_backend("nccl", 2, 2) == "nccl"
    assert pool_backend("nccl", 4, 2) == "gloo-cuda0" and pool_backend("gloo", 4, 1) == "gloo"
