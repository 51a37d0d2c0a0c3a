"""setup.py and the source distribution, on CPU (no compile): LARGEEP_BUILD_NATIVE and LARGEEP_CUDA_ARCHS are checked
before any build; a CMake build directory configured with another nvcc starts afresh; a failed build keeps the last
lines of its output in the install's record; an editable install without the native module succeeds and keeps that
record where the package is imported from; the sdist holds what the native build needs."""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree (setup.py)")

STALE = "_C.cpython-311-x86_64-linux-gnu.so"  # (a module an earlier in-place build left; any _C*.so name)


@pytest.fixture(scope="module")
def setup_py() -> Iterator[dict[str, Any]]:
    """setup.py's functions, without running setup()."""
    import setuptools

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setuptools, "setup", lambda **kw: None)
        yield runpy.run_path(str(ROOT / "setup.py"), run_name="largeep_setup")


def _copy_tree(dst: Path) -> Path:
    """The checkout without its git data, build outputs and benchmark records (a test must not write into it)."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in ("__pycache__", ".hypothesis", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                                          "_native_build.json") or n.endswith((".egg-info", ".so"))}
        if Path(folder).resolve() == ROOT:
            skip |= {".git", "build", "dist", "bench"} & set(names)
        return skip

    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LARGEEP_BUILD", "LARGEEP_CUDA", "PIP_USER", "PIP_TARGET", "PIP_PREFIX", "PYTHON"))}
    return dict(env, PIP_DISABLE_PIP_VERSION_CHECK="1", **values)


@pytest.mark.parametrize("raw,want", [(None, "auto"), ("", "auto"), (" ", "auto"), ("Auto", "auto"), ("1", "1"),
                                      (" 0 ", "0")])
def test_build_mode_taken(setup_py: dict[str, Any], monkeypatch: pytest.MonkeyPatch, raw: str | None,
                          want: str) -> None:
    """Unset or empty is auto, as for every LARGEEP_* variable (before, an empty value failed the install)."""
    if raw is None:
        monkeypatch.delenv("LARGEEP_BUILD_NATIVE", raising=False)
    else:
        monkeypatch.setenv("LARGEEP_BUILD_NATIVE", raw)
    assert setup_py["_build_mode"]() == want


@pytest.mark.parametrize("raw", ["yes", "2", "on"])
def test_build_mode_refused(setup_py: dict[str, Any], monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("LARGEEP_BUILD_NATIVE", raw)
    with pytest.raises(setup_py["SetupError"], match=f"LARGEEP_BUILD_NATIVE={raw!r}: expected auto"):
        setup_py["_build_mode"]()


@pytest.mark.parametrize("raw,want", [(None, "90"), ("", "90"), (" ", "90"), ("90", "90"), ("90;100a", "90;100a"),
                                      ("90, 100f", "90;100f"), ("80 90", "80;90"), ("90-real;90a-virtual",
                                                                                    "90-real;90a-virtual")])
def test_cuda_archs_taken(setup_py: dict[str, Any], monkeypatch: pytest.MonkeyPatch, raw: str | None,
                          want: str) -> None:
    """Compute capabilities as numbers (CMake's list), which the install records and native.built_archs reads."""
    if raw is None:
        monkeypatch.delenv("LARGEEP_CUDA_ARCHS", raising=False)
    else:
        monkeypatch.setenv("LARGEEP_CUDA_ARCHS", raw)
    assert setup_py["_cuda_archs"]() == want


@pytest.mark.parametrize("raw,bad", [("native", "'native' is not"), ("all", "'all' is not"),
                                     ("all-major", "'all-major' is not"), ("90;native", "'native' is not"),
                                     ("sm_90", "'sm_90' is not"), ("9.0", "'9.0' is not"),
                                     ("compute_90;x", "'compute_90', 'x' are not")])
def test_cuda_archs_refused(setup_py: dict[str, Any], monkeypatch: pytest.MonkeyPatch, raw: str, bad: str) -> None:
    """Values that name no numbers are refused before the build (with native, all or all-major the install recorded
    the word, and the check of the GPU against the build was off; native without a GPU built for sm_75)."""
    monkeypatch.setenv("LARGEEP_CUDA_ARCHS", raw)
    with pytest.raises(setup_py["SetupError"]) as e:
        setup_py["_cuda_archs"]()
    msg = str(e.value)
    assert msg.startswith(f"LARGEEP_CUDA_ARCHS={raw!r}: {bad}"), msg
    assert "e.g. 90 for H100/H200" in msg and "native, all and all-major are not taken" in msg


def test_cmake_dir_of_another_nvcc_starts_afresh(setup_py: dict[str, Any], tmp_path: Path) -> None:
    """A build directory configured with another nvcc loses its cache here, before CMake would drop it and configure
    without this build's -D values; one of the same nvcc and tree is kept (the next build is incremental)."""
    fresh = setup_py["_fresh_cmake_dir"]
    cache, files = tmp_path / "CMakeCache.txt", tmp_path / "CMakeFiles"

    def configured(nvcc: str, root: Path = ROOT) -> None:
        files.mkdir(exist_ok=True)
        (files / "x").write_text("")
        cache.write_text(f"# comment\nCMAKE_CUDA_COMPILER:FILEPATH={nvcc}\nCMAKE_HOME_DIRECTORY:INTERNAL={root}\n")

    fresh(tmp_path / "none", "/usr/local/bin/nvcc")  # (no build directory yet: nothing to do)
    configured("/usr/local/bin/nvcc")
    fresh(tmp_path, "/usr/local/bin/nvcc")
    assert cache.exists() and files.exists()
    fresh(tmp_path, "/opt/cuda-12.8/bin/nvcc")
    assert not cache.exists() and not files.exists()
    configured("/usr/local/bin/nvcc", root=tmp_path)  # (a copied checkout: CMake refuses another source tree)
    fresh(tmp_path, "/usr/local/bin/nvcc")
    assert not cache.exists() and not files.exists()


def test_failed_step_keeps_its_last_lines(setup_py: dict[str, Any], tmp_path: Path) -> None:
    """A failing build command: the error names the step and its exit status, and carries its last 20 lines that are
    not blank (long ones cut), which the install's record keeps."""
    code = "for i in range(30):\n    print(f'line {i}')\n    print()\nprint('x' * 1000)\nraise SystemExit(3)"
    with pytest.raises(setup_py["BuildStepFailed"]) as e:
        setup_py["_run_logged"]([sys.executable, "-c", code], tmp_path, "the step")
    assert str(e.value) == "the step failed (exit status 3)"
    assert e.value.log == [f"line {i}" for i in range(11, 30)] + ["x" * 400 + " [...]"]
    setup_py["_run_logged"]([sys.executable, "-c", "print('ok')"], tmp_path, "the step")


def test_failed_build_is_recorded_with_its_output(tmp_path: Path) -> None:
    """A native build that fails (here CMake's configure, on a CUDA flag nvcc refuses): in auto mode the install
    goes on and its record holds the reason and the end of the build's output; with LARGEEP_BUILD_NATIVE=1 the build
    fails with a plain error. Needs nvcc, pybind11, cmake and ninja (the NVSHMEM files are stand-ins)."""
    pytest.importorskip("pybind11")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("needs nvcc")
    for tool in ("cmake", "ninja"):
        if importlib.util.find_spec(tool) is None and shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    shmem = tmp_path / "nvshmem"
    for f in ("include/nvshmem.h", "lib/libnvshmem_host.so.3", "lib/libnvshmem_device.a"):
        (shmem / f).parent.mkdir(parents=True, exist_ok=True)
        (shmem / f).write_text("")
    tree = _copy_tree(tmp_path / "src")
    env = _env(NVSHMEM_DIR=str(shmem), CUDAFLAGS="--no-such-flag")
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
           str(tmp_path / "tmp")]
    run = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    note = json.loads((tmp_path / "lib" / "largeep" / "_native_build.json").read_text())
    assert note["built"] is False
    assert note["reason"] == "its build failed at install: CMake's configure step failed (exit status 1)"
    assert 0 < len(note["log"]) <= 20 and all(line.strip() for line in note["log"])
    assert "Configuring incomplete" in note["log"][-1]
    assert not list((tmp_path / "lib" / "largeep").glob("_C*.so"))

    run = subprocess.run(cmd, cwd=tree, env=dict(env, LARGEEP_BUILD_NATIVE="1"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert ("error: LARGEEP_BUILD_NATIVE=1 and the native module largeep._C was not built: CMake's configure step "
            "failed (exit status 1) (the build's output above says why)") in run.stderr, run.stderr


@pytest.mark.parametrize("env,reason", [
    ({"LARGEEP_BUILD_NATIVE": "0"}, "skipped at install (LARGEEP_BUILD_NATIVE=0)"),
    ({"LARGEEP_BUILD_NATIVE": "", "CUDA_HOME": "/nonexistent"},
     "its build failed at install: no nvcc at /nonexistent/bin/nvcc (CUDA_HOME or CUDA_PATH)"),
], ids=["skipped", "auto-without-nvcc"])
def test_editable_install_without_native(tmp_path: Path, env: dict[str, str], reason: str) -> None:
    """`pip install -e .` without the native module (skipped, or auto mode without nvcc) succeeds (before, it failed
    copying the module it had not built); the install's record lands in python/largeep, where the package is
    imported from (before, it stayed in a temporary folder, and build_note() was empty), and a module an earlier
    editable build left there is removed (it would load with this record)."""
    if int(metadata.version("setuptools").split(".")[0]) < 64:
        pytest.skip("editable installs of a pyproject.toml project need setuptools 64")
    tree = _copy_tree(tmp_path / "src")
    pkg = tree / "python" / "largeep"
    (pkg / STALE).write_bytes(b"")
    prefix = tmp_path / "prefix"
    # (--ignore-installed: pip would otherwise uninstall this environment's largeep before installing into prefix)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--ignore-installed",
           "--prefix", str(prefix), "-e", str(tree)]
    run = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not list(pkg.glob("_C*.so"))
    assert json.loads((pkg / "_native_build.json").read_text())["reason"] == reason
    site = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    code = (f"import site, sys; n = len(sys.path); site.addsitedir({site!r}); sys.path[:] = sys.path[n:] + "
            "sys.path[:n]\nimport largeep\nfrom largeep import native\n"
            "print(largeep.__file__); print(native.build_note()['reason']); print(native.unavailable_reason())")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    file, note, why = run.stdout.splitlines()
    assert Path(file) == pkg / "__init__.py"
    assert note == reason and f"was not built: {reason}; build it with" in why


def test_sdist_has_the_native_sources(tmp_path: Path) -> None:
    """The source distribution builds the native module: CMakeLists.txt and all of csrc/ are in it (before, neither
    was), as are the tests' helpers and the docs; a module or an install record of an in-place build is not."""
    tree = _copy_tree(tmp_path / "src")
    (tree / "python" / "largeep" / STALE).write_bytes(b"")
    (tree / "python" / "largeep" / "_native_build.json").write_text("{}")
    run = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=tree,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    (sdist,) = (tmp_path / "dist").glob("largeep-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = {"CMakeLists.txt", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "docs/usage.md",
            "tests/conftest.py", "python/largeep/native.py"}
    want |= {p.relative_to(tree).as_posix() for p in (tree / "csrc").rglob("*") if p.is_file()}
    want |= {p.relative_to(tree).as_posix() for p in (tree / "tests").glob("*.py")}
    assert any(n.startswith("csrc/") for n in want)
    assert not want - names, sorted(want - names)
    assert not [n for n in names if n.endswith(".so") or n.endswith("_native_build.json")]
