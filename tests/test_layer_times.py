"""bench/layer_times.py in its CPU mode (gloo + torch backend, tiny sizes): it runs, and its JSON is a list of
SPEC.md's records, each with exactly SPEC's keys, "variant", "speedup" and "pass", the environment and the command,
with positive times; the run file beside it holds the settings and the summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC_KEYS = {
    "backend", "mode", "op", "ep", "ranks_per_node", "num_tokens", "hidden", "num_topk", "num_experts", "dtype",
    "num_sms", "time_us_median", "time_us_p10", "time_us_p90", "logical_gbps",
}
FILE_KEYS = SPEC_KEYS | {"gpu", "driver", "cuda", "torch", "nccl", "nvshmem", "git", "command"}
LAYER = {"no_overlap", "chunked_2", "chunked_4", "two_batch"}
STACK = {"stack_sequential", "stack_pipeline"}
PARTS = {"gate_only", "comm_only", "experts_only", "experts_half", "experts_carveout", "comm_beside_experts"}


def test_layer_times_cpu(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "python"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(ROOT / "bench" / "layer_times.py"), "--cpu", "--nprocs", "2", "--warmup", "1",
           "--iters", "3", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no_overlap" in proc.stdout and "summary:" in proc.stdout
    recs = json.loads((tmp_path / "layer_times_torch_ep2_cpu.json").read_text())
    doc = json.loads((tmp_path / "layer_times_torch_ep2_cpu.run.json").read_text())
    assert isinstance(recs, list) and set(doc) == {"schema", "results", "command", "env", "what", "settings",
                                                   "summary"}
    assert doc["results"] == "layer_times_torch_ep2_cpu.json"
    assert "layer_times.py" in doc["command"] and doc["env"]["torch"]
    assert {r["variant"] for r in recs} == LAYER | PARTS | STACK
    for r in recs:
        assert set(r) == FILE_KEYS | {"variant", "speedup", "pass"}, r
        assert r["command"] == doc["command"] and r["torch"] == doc["env"]["torch"] and r["gpu"] is None
        assert (r["mode"], r["op"], r["dtype"], r["backend"]) == ("layer", "roundtrip", "bf16", "torch")
        assert (r["ep"], r["num_tokens"], r["hidden"], r["num_experts"], r["num_topk"]) == (2, 64, 128, 8, 2)
        assert r["num_sms"] is None and r["logical_gbps"] is None
        assert 0 < r["time_us_p10"] <= r["time_us_median"] <= r["time_us_p90"]
        if r["variant"] in LAYER | STACK:
            assert r["speedup"] > 0
        else:
            assert r["speedup"] is None
    assert next(r for r in recs if r["variant"] == "no_overlap")["speedup"] == 1.0
    s = doc["summary"]
    assert s["comm_us"] > 0 and s["experts_us"] > 0 and s["ideal_speedup"] >= 1.0
    # the overlapped schedules compute the same output as the plain layer
    assert all(v <= 2e-2 for v in s["max_rel_diff_vs_no_overlap"].values())
    # which grouped GEMM ran, per variant that runs experts (the CPU sizes have 16-byte strides: the native one)
    assert s["grouped_mm_backends"] == ["native"]
    assert set(s["grouped_mm"]) == LAYER | STACK | {
        "experts_only", "experts_half", "experts_carveout", "comm_beside_experts"
    }
    assert "experts_second_chunk_extra_us" in s and doc["settings"]["carveout_sms"] == 0
    assert "overlap_of_independent_parts" in s and s["independent_parts_speedup"] > 0
    assert next(r for r in recs if r["variant"] == "stack_sequential")["speedup"] == 1.0 and s["stack_speedup"] > 0
    # the pipelined stack computes what the layer called L times does
    assert s["max_rel_diff_stack_pipeline_vs_sequential"] <= 2e-2
    assert s["best_variant"] in LAYER and doc["settings"]["stack_chunks"] == 2


def test_layer_times_cpu_fp8(tmp_path: Path) -> None:
    """--fp8: the layer and the communication parts dispatch FP8; records say dtype "fp8", the file name "_fp8",
    the settings the dispatch's dtype; the overlapped schedules still compute the plain layer's output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "python"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(ROOT / "bench" / "layer_times.py"), "--cpu", "--nprocs", "2", "--warmup", "1",
           "--iters", "2", "--fp8", "--variants", "no_overlap,chunked_2,two_batch,comm_only", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FP8 dispatch" in proc.stdout
    recs = json.loads((tmp_path / "layer_times_torch_ep2_fp8_cpu.json").read_text())
    doc = json.loads((tmp_path / "layer_times_torch_ep2_fp8_cpu.run.json").read_text())
    assert {r["variant"] for r in recs} == {"no_overlap", "chunked_2", "two_batch", "comm_only"}
    assert all(r["dtype"] == "fp8" for r in recs)
    assert doc["settings"]["dispatch_dtype"].startswith("fp8")
    assert all(v <= 2e-2 for v in doc["summary"]["max_rel_diff_vs_no_overlap"].values())
    bad = subprocess.run(cmd[:-2] + ["--hidden", "96", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0 and "--fp8 needs a hidden size that is a multiple of 128, got 96" in bad.stderr
