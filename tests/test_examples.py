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


def _whole_and_resumed(tmp_path: Path, steps: int, drop: float, *options: str) -> str:
    """``steps`` steps (each printed once; the loss of the last two at least ``drop`` below the first's), then 4
    steps saved to a checkpoint (the whole run's first 4: the same seed) and a run resumed from it to ``steps``,
    which prints the whole run's loss at every later step (the same arithmetic on the same ranks: to the last
    printed digit). Returns the whole run's output."""
    whole_out, whole = _train("--steps", str(steps), *options)
    assert sorted(whole) == list(range(steps)), whole_out
    assert max(whole[steps - 2], whole[steps - 1]) < whole[0] - drop, f"the loss did not fall: {whole}"
    ck = tmp_path / "ck.pt"
    out, first = _train("--steps", "4", "--save", str(ck), *options)
    assert f"saved {ck} at step 4" in out and ck.exists(), out
    assert first == {s: whole[s] for s in range(4)}, (first, whole)
    out, rest = _train("--steps", str(steps), "--resume", str(ck), *options)
    assert sorted(rest) == list(range(4, steps)), out
    for s in range(4, steps):
        assert abs(rest[s] - whole[s]) <= 1e-6, f"step {s}: resumed {rest[s]}, uninterrupted {whole[s]}"
    return whole_out


def test_train_moe_learns_and_resumes(tmp_path: Path) -> None:
    out = _whole_and_resumed(tmp_path, 8, 0.3)
    assert out.count("re-plan layer 0") == 2 and out.count("re-plan layer 1") == 2, out  # after steps 2 and 5


def test_train_moe_gpt_oss_learns_and_resumes(tmp_path: Path) -> None:
    _whole_and_resumed(tmp_path, 6, 0.2, "--gpt-oss")
