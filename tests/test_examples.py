"""examples/train_moe.py as a user runs it: torchrun, 2 CPU processes (gloo, the torch backend), tiny sizes. The
loss falls, the run ends cleanly, and a run saved at step 4 and resumed gives the uninterrupted run's losses at
every later step (the checkpoint holds the experts gathered per logical expert, their AdamW moments, the
placement re-planned at step 3 and the loads measured since); the same with GPT-OSS's experts and router
(--gpt-oss: experts with biases, whose AdamW moments travel through the checkpoint too)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_moe.py"
TINY = ["--hidden", "32", "--seq", "16", "--batch", "4", "--experts", "8", "--replan-every", "3", "--seed", "1"]


def _train(*options: str) -> tuple[str, dict[int, float]]:
    """Runs the example on 2 CPU processes; returns its output and the loss printed for each step."""
    if not SCRIPT.exists():
        pytest.skip("needs the source tree (examples/train_moe.py)")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # (CPU processes on a GPU machine too)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "python"), env.get("PYTHONPATH")) if p)
    # --standalone: a free port of its own (tests of other checkouts may run torchrun on this host at once)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           *TINY, *options]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "largeep backend torch" in out and re.search(r"^done: \d+ steps", proc.stdout, re.M), out
    losses = {int(s): float(v) for s, v in re.findall(r"^step +(\d+) +loss ([0-9.]+)$", proc.stdout, re.M)}
    return out, losses


def test_train_moe_learns_and_resumes(tmp_path: Path) -> None:
    out, whole = _train("--steps", "8")
    assert sorted(whole) == list(range(8)), out
    assert max(whole[6], whole[7]) < whole[0] - 0.3, f"the loss did not fall: {whole}"
    assert out.count("re-plan layer 0") == 2 and out.count("re-plan layer 1") == 2, out  # after steps 2 and 5
    ck = tmp_path / "ck.pt"
    out, first = _train("--steps", "4", "--save", str(ck))
    assert f"saved {ck} at step 4" in out and ck.exists(), out
    assert first == {s: whole[s] for s in range(4)}, (first, whole)  # (the same seed: the same steps)
    out, rest = _train("--steps", "8", "--resume", str(ck))
    assert sorted(rest) == list(range(4, 8)), out
    for s in range(4, 8):  # (the same arithmetic on the same ranks: the printed values agree to the last digit)
        assert abs(rest[s] - whole[s]) <= 1e-6, f"step {s}: resumed {rest[s]}, uninterrupted {whole[s]}"


def test_train_moe_gpt_oss_learns_and_resumes(tmp_path: Path) -> None:
    out, whole = _train("--steps", "6", "--gpt-oss")
    assert sorted(whole) == list(range(6)), out
    assert max(whole[4], whole[5]) < whole[0] - 0.2, f"the loss did not fall: {whole}"
    ck = tmp_path / "ck.pt"
    out, first = _train("--steps", "4", "--gpt-oss", "--save", str(ck))
    assert f"saved {ck} at step 4" in out and first == {s: whole[s] for s in range(4)}, (out, first, whole)
    out, rest = _train("--steps", "6", "--gpt-oss", "--resume", str(ck))
    for s in (4, 5):
        assert abs(rest[s] - whole[s]) <= 1e-6, f"step {s}: resumed {rest[s]}, uninterrupted {whole[s]}"
