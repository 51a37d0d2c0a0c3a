"""``python -m largeep``: the environment report (CPU here; on a GPU machine the same tests see its GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from largeep import info


def test_report_matches_the_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert info.main(["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert len(r["gpus"]) == n and len(r["peer_access"]) == n
    assert all(r["peer_access"][i][i] for i in range(n))
    assert r["environment"]["torch"] == torch.__version__
    assert (r["native"] == "ok") == (r["auto_backend"] == "nvshmem")
    assert r["settings_error"] is None and r["settings"]["timeout_s"] > 0
    if n == 0:
        assert r["native"] != "ok" and any("no CUDA GPU" in t for t in r["advice"])
    assert r["native_built"] in (True, False, None) and isinstance(r["native_build_log"], list)
    assert r["native_archs"] is None or all(isinstance(a, int) for a in r["native_archs"])


@pytest.mark.gpu(1)
def test_report_matches_the_machine_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    """The same on a GPU machine, where the GPU tests' selection (-m gpu) takes it: its GPUs, peer access, and the
    native module loading exactly when the auto backend is nvshmem."""
    test_report_matches_the_machine(capsys)


@pytest.mark.parametrize("note,built,archs,log", [
    ({}, None, None, []),
    ({"built": True, "cuda_archs": "90;100a"}, True, [90, 100], []),
    ({"built": False, "reason": "its build failed at install: the compile (cmake --build) failed (exit status 1)",
      "log": ["rows.cu(3): error: identifier \"x\" is undefined", "ninja: build stopped: subcommand failed."]},
     False, None, ["rows.cu(3): error: identifier \"x\" is undefined", "ninja: build stopped: subcommand failed."]),
], ids=["no-record", "built", "failed"])
def test_native_build_record(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                             tmp_path: Path, note: dict[str, object], built: bool | None, archs: list[int] | None,
                             log: list[str]) -> None:
    """The install's record of the native build, as fields of the JSON report (native_built, native_archs,
    native_build_log) and in the text: the architectures built for, the end of a failed build's output."""
    from largeep import native

    monkeypatch.setattr(native, "build_note", lambda: note)
    monkeypatch.setitem(sys.modules, "largeep._C", None)  # (as when the module is not there)
    native._load.cache_clear()
    try:
        r = info.report()
        assert (r["native_built"], r["native_archs"], r["native_build_log"]) == (built, archs, log)
        assert r["native_archs_error"] is None
        text = info._text(r)
        assert ("(built for compute capability 90, 100)" in text) == (archs is not None)
        assert ("  the end of the native build's output (at install):\n    | rows.cu(3): error: identifier \"x\" is "
                "undefined\n    | ninja: build stopped" in text) == bool(log)
        if log:  # the load's refusal points at that output (as where no module was installed: CI installs one)
            import largeep

            monkeypatch.setattr(native, "__file__", str(tmp_path / "native.py"))
            monkeypatch.delattr(largeep, "_C", raising=False)
            native._load.cache_clear()
            mod, why = native._load()
            assert mod is None and "(`python -m largeep` shows the end of the build's output)" in str(why), why
    finally:
        native._load.cache_clear()


def test_native_build_without_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """An older install that recorded LARGEEP_CUDA_ARCHS=native (or all): no GPU is checked against the build, and
    the report says so (setup.py now refuses these values)."""
    from largeep import native

    monkeypatch.setattr(native, "build_note", lambda: {"built": True, "cuda_archs": "native"})
    native._load.cache_clear()
    try:
        r = info.report()
    finally:
        native._load.cache_clear()
    assert r["native_built"] is True and r["native_archs"] is None
    assert any("recorded no compute capabilities (cuda_archs='native')" in t and "LARGEEP_CUDA_ARCHS as numbers" in t
               for t in r["advice"])


def test_bad_variable_is_reported(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LARGEEP_INIT_TIMEOUT_S", "-1")
    monkeypatch.setenv("NVSHMEM_DEBUG", "INFO")
    assert info.main([]) == 1
    out = capsys.readouterr().out
    assert "settings: INVALID: LARGEEP_INIT_TIMEOUT_S='-1': expected a positive number" in out
    assert "NVSHMEM_DEBUG=INFO" in out and "fix the environment variable" in out


def test_advice_for_mismatched_cuda_and_cut_peers() -> None:
    r = {"environment": {"nvshmem": "nvidia-nvshmem-cu12 3.3.9", "cuda": "13.0"}, "settings_error": None,
         "native": "ok", "gpus": [{}, {}], "peer_access": [[True, False], [False, True]]}
    tips = info._advice(r)
    assert any("is for CUDA 12 but torch is built for CUDA 13.0" in t and "keep only nvidia-nvshmem-cu13" in t
               and "--force-reinstall nvidia-nvshmem-cu13" in t for t in tips)
    assert any("without peer access [(0, 1), (1, 0)]" in t for t in tips)
    r["environment"]["nvshmem"] = "nvidia-nvshmem-cu13 3.8.0"
    r["peer_access"] = [[True, True], [True, True]]
    assert info._advice(r) == []


def test_import_survives_a_bad_variable() -> None:
    """A bad LARGEEP_* value is an error of the Buffer that reads it: ``import largeep`` and the report still work
    (before, the logger's setup read every variable at import and raised)."""
    env = dict(os.environ, LARGEEP_TIMEOUT_S="abc")
    run = subprocess.run([sys.executable, "-m", "largeep"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "LARGEEP_TIMEOUT_S='abc': expected a number" in run.stdout


def test_overlong_numbers_name_their_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole-number variable of more digits than int() reads (4300 by default) is refused naming the variable,
    and LARGEEP_LOG_LEVEL's does not make ``import largeep`` raise (int()'s own ValueError named neither)."""
    from largeep import _env

    long = "9" * 5000
    for name, value, want in (("ZERO_COPY_SLOTS", long, "expected a whole number >= 0 and <= 64"),
                              ("TUNE", f"threads={long}", "expected comma-separated key=int"),
                              ("LOG_LEVEL", long, "expected DEBUG, INFO, WARNING, ERROR, CRITICAL")):
        monkeypatch.setenv(f"LARGEEP_{name}", value)
        with pytest.raises(ValueError) as exc:
            _env.settings()
        assert str(exc.value).startswith(f"LARGEEP_{name}=") and want in str(exc.value), str(exc.value)[-200:]
        monkeypatch.delenv(f"LARGEEP_{name}")
    env = dict(os.environ, LARGEEP_LOG_LEVEL=long)
    run = subprocess.run([sys.executable, "-c", "import logging, largeep; "
                          "print(logging.getLogger('largeep').level)"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "30", run.stderr[-500:]
    # 0 (logging's NOTSET, which would defer to the root logger's WARNING) logs every message
    run = subprocess.run([sys.executable, "-c", "import logging, largeep; "
                          "print(logging.getLogger('largeep').getEffectiveLevel())"],
                         env=dict(os.environ, LARGEEP_LOG_LEVEL="0"), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "1", run.stderr[-500:]
    monkeypatch.setenv("LARGEEP_TUNE", " threads = 512 , unroll=4")
    monkeypatch.setenv("LARGEEP_ZERO_COPY_SLOTS", " 7 ")
    s = _env.settings()
    assert (s.tune["threads"], s.tune["unroll"], s.zero_copy_slots) == (512, 4, 7)


def test_bad_log_level(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A LARGEEP_LOG_LEVEL that names no level: the library logs at WARNING (import does not fail, even for a
    name that logging maps to something else), the report says so and exits 1 (a Buffer would refuse it)."""
    from largeep import _env

    for raw in ("loud", "basic_format", "warn", "NOTSET"):  # (names logging knows that the README does not list)
        monkeypatch.setenv("LARGEEP_LOG_LEVEL", raw)
        assert _env.log_level() is None
        assert info.main([]) == 1
        assert f"LARGEEP_LOG_LEVEL={raw!r} names no logging level" in capsys.readouterr().out
    monkeypatch.setenv("LARGEEP_LOG_LEVEL", "info")
    assert _env.log_level() == 20
    monkeypatch.setenv("LARGEEP_LOG_LEVEL", "15")
    assert _env.log_level() == 15
    # the Buffer's settings read every variable: a bad level is refused there, naming it
    monkeypatch.setenv("LARGEEP_LOG_LEVEL", "verbose")
    with pytest.raises(ValueError, match="LARGEEP_LOG_LEVEL='verbose'"):
        _env.settings()
    monkeypatch.setenv("LARGEEP_LOG_LEVEL", "info")
    env = dict(os.environ, LARGEEP_LOG_LEVEL="basic_format")
    run = subprocess.run([sys.executable, "-c", "import largeep"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr


def test_peer_access_lines_name_each_gpu() -> None:
    """Two GPUs that cannot reach each other: each GPU's row is named, one mark per GPU it would write to."""
    r = {"environment": {}, "gpus": [{"index": i, "name": "G", "capability": "9.0", "memory_gib": 1.0, "sms": 1}
                                     for i in range(2)],
         "peer_access": [[True, False], [False, True]], "native": "ok", "auto_backend": "nvshmem",
         "settings": None, "settings_error": "(not read here)", "variables": {}, "log_level_error": None,
         "advice": []}
    assert "peer access (GPU: to GPUs 0, 1, ...): 0: y.  1: .y" in info._text(r)


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` shows the docstring's first paragraph without its reST marks."""
    with pytest.raises(SystemExit) as e:
        info.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":mod:" not in out
    assert "python -m largeep: what this machine gives largeep" in " ".join(out.split())


def test_bad_segv_backtrace_is_reported(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """LARGEEP_SEGV_BACKTRACE takes LARGEEP_CHECK_VALUES's spellings; another value makes the report name it and
    exit 1 without a traceback, also where the native module's load (which reads it) raises."""
    from largeep import _env, native

    def load_reads_it() -> str | None:  # (as native._load does when largeep._C is there)
        _env.fault_backtrace()
        return "stand-in"

    monkeypatch.setattr(native, "unavailable_reason", load_reads_it)
    monkeypatch.setenv("LARGEEP_SEGV_BACKTRACE", "sometimes")
    assert info.main([]) == 1
    out = capsys.readouterr().out
    assert "settings: INVALID: LARGEEP_SEGV_BACKTRACE='sometimes': expected 1 (or true, yes, on)" in out
    assert "native module (nvshmem backend): not loaded: LARGEEP_SEGV_BACKTRACE='sometimes'" in out
    monkeypatch.setenv("LARGEEP_SEGV_BACKTRACE", "TRUE")
    assert info.main([]) == 0
    assert "native module (nvshmem backend): stand-in" in capsys.readouterr().out


def test_native_module_older_than_the_checkout(tmp_path: Path) -> None:
    """A checkout whose native sources changed after the install built the module (same bindings version, so the
    load takes it): the report names the commit and the files that differ, uncommitted changes included; nothing
    when they match, outside a checkout, or without a record of the commit."""
    import shutil

    if shutil.which("git") is None:
        pytest.skip("no git")
    root = tmp_path / "repo"
    pkg = root / "python" / "largeep"
    pkg.mkdir(parents=True)
    (root / "csrc").mkdir()
    (root / "csrc" / "a.cu").write_text("1\n")
    (root / "README.md").write_text("x\n")

    def git(*args: str) -> str:
        env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                   GIT_COMMITTER_EMAIL="t@t")
        return subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    rev = git("rev-parse", "HEAD")
    note = {"built": True, "cuda_archs": "90", "git": rev}
    assert info.native_staleness(note, pkg) is None
    (root / "README.md").write_text("y\n")  # (not a source of the module)
    assert info.native_staleness(note, pkg) is None
    (root / "csrc" / "a.cu").write_text("2\n")  # uncommitted, then committed
    want = (f"the native module was built from commit {rev[:12]}, and 1 of its source files differ from that commit "
            "in this checkout (csrc/a.cu): it may run older kernels; rebuild it")
    assert (info.native_staleness(note, pkg) or "").startswith(want)
    git("commit", "-qam", "two")
    assert (info.native_staleness(note, pkg) or "").startswith(want)
    assert "with uncommitted changes, and 1" in (info.native_staleness({**note, "git": rev + "-dirty"}, pkg) or "")
    unknown = info.native_staleness({**note, "git": "0" * 40}, pkg) or ""
    assert unknown.startswith("the native module was built from commit 000000000000, which this checkout"), unknown
    assert info.native_staleness({**note, "built": False}, pkg) is None
    assert info.native_staleness({"built": True, "cuda_archs": "90"}, pkg) is None
    assert info.native_staleness(note, tmp_path / "site-packages" / "largeep") is None
    r = {**info.report(), "native_stale": info.native_staleness(note, pkg)}
    assert any(t.startswith(want) for t in info._advice(r))
