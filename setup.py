"""Thin driver: finds nvcc and NVSHMEM, then lets CMake + Ninja build largeep._C.

Without a CUDA toolkit or NVSHMEM the pure-Python package is installed (the torch backend works everywhere) and
the reason is printed once (pip shows it with -v only) and kept in the package (largeep/_native_build.json, with the
last lines of a failed build's output), where ``python -m largeep`` and the nvshmem backend's refusal find it. An
editable install (``pip install --no-build-isolation -e .``) puts the module and that record into python/largeep,
where the package is imported from. Environment:
  LARGEEP_BUILD_NATIVE  auto (default, also when empty) | 1 (a failed native build fails the install) | 0 (skip it)
  LARGEEP_CUDA_ARCHS    the GPUs' compute capabilities to build for, as numbers (major * 10 + minor, e.g. 90 or
                        90;100a; default 90): the install records them and the nvshmem backend refuses other GPUs
                        (a family target, 100f, counts for its family's later ones, 103)
  NVSHMEM_DIR           an NVSHMEM install (include/, lib/); else the nvidia-nvshmem-cu12/-cu13 wheel is used
  CUDA_HOME             the CUDA toolkit (else nvcc on PATH)
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import ExecError, SetupError

ROOT = Path(__file__).resolve().parent
NOTE = "_native_build.json"  # the record of the native build, next to the module
LOG_LINES = 20  # the last lines of a failed build's output, kept in that record


def _say(msg: str) -> None:
    print(f"[largeep setup] {msg}", file=sys.stderr, flush=True)


def _git_revision() -> str | None:
    """The commit of the tree being installed ("-dirty" with uncommitted changes to tracked files), None outside a
    git checkout of largeep; kept in the install's note, since an installed package lies outside the checkout."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != ROOT:  # (a tree inside someone else's repository is not a checkout)
        return None
    rev = git("rev-parse", "HEAD")
    if not rev:
        return None
    return rev + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _nvcc() -> tuple[str | None, int | None]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not Path(nvcc).exists():
        return None, None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.", out)
    return nvcc, int(m.group(1)) if m else None


def _nvshmem(cuda_major: int | None) -> tuple[dict[str, str] | None, str]:
    roots = []
    if os.environ.get("NVSHMEM_DIR"):
        roots.append(Path(os.environ["NVSHMEM_DIR"]))
    else:
        try:
            import nvidia.nvshmem as wheel  # type: ignore[import-not-found]

            roots += [Path(p) for p in wheel.__path__]
        except ImportError:
            pass
    for root in roots:
        inc = root / "include"
        host = sorted(glob.glob(str(root / "lib" / "libnvshmem_host.so*")))
        dev = root / "lib" / "libnvshmem_device.a"
        if (inc / "nvshmem.h").exists() and host and dev.exists():
            return {"include": str(inc), "host": host[0], "device": str(dev)}, ""
    want = f"nvidia-nvshmem-cu{cuda_major}" if cuda_major else "nvidia-nvshmem-cu12 or -cu13"
    if os.environ.get("NVSHMEM_DIR"):
        return None, (f"NVSHMEM not found under NVSHMEM_DIR={os.environ['NVSHMEM_DIR']} (no include/nvshmem.h, "
                      "lib/libnvshmem_host.so* and lib/libnvshmem_device.a there)")
    if importlib.util.find_spec("torch") is None:  # (an isolated build environment holds neither torch nor the wheel)
        return None, (f"NVSHMEM not found: this build cannot see the installed packages (an isolated build?): "
                      f"install with `pip install --no-build-isolation .` after `pip install {want}`")
    return None, f"NVSHMEM not found (set NVSHMEM_DIR or `pip install {want}`)"


def _torch_cuda() -> str | None:
    """The CUDA version the installed torch was built with; None for a CPU build or without torch."""
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def _wheel_cuda_majors(host_lib: str) -> list[int]:
    """The CUDA majors of the nvidia-nvshmem-cuNN wheels that list ``host_lib`` (the -cu12 and -cu13 wheels write
    the same path, so both may), empty when none does or the metadata cannot be read (it only feeds a hint)."""
    from importlib import metadata

    try:
        target = Path(host_lib).resolve()
        found = []
        for dist in metadata.distributions():
            m = re.fullmatch(r"nvidia-nvshmem-cu(\d+)", (dist.metadata["Name"] or "").lower())
            if m and any(Path(str(dist.locate_file(f))).resolve() == target for f in dist.files or ()):
                found.append(int(m.group(1)))
        return sorted(set(found))
    except Exception:  # noqa: BLE001 - a broken RECORD must not fail the build
        return []


def _tool(module: str, attr: str, name: str) -> str:
    """The pip-installed cmake / ninja of this Python (PATH may hold an older one, or none), else PATH's."""
    try:
        found = Path(getattr(__import__(module), attr)) / name
        if found.exists():
            return str(found)
    except (ImportError, AttributeError):
        pass
    return shutil.which(name) or name


def _build_mode() -> str:
    """LARGEEP_BUILD_NATIVE: auto (also unset or empty, as for every LARGEEP_* variable), 1 or 0."""
    raw = os.environ.get("LARGEEP_BUILD_NATIVE", "")
    mode = raw.strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise SetupError(f"LARGEEP_BUILD_NATIVE={raw!r}: expected auto (the default, also when empty), 1 (the "
                         "native module or a failed install) or 0 (the pure-Python package)")
    return mode


def _cuda_archs() -> str:
    """LARGEEP_CUDA_ARCHS as a CMake list: compute capabilities as numbers (major * 10 + minor), each with an
    optional a or f suffix (and CMake's -real or -virtual), separated by ; , or spaces; default 90 (also when
    empty). The install records them and the nvshmem backend refuses a GPU outside them, so CMake's native, all and
    all-major, which name no numbers, are refused (native without a GPU would build for a default architecture)."""
    raw = os.environ.get("LARGEEP_CUDA_ARCHS", "")
    archs = [a for a in re.split(r"[;,\s]+", raw.strip()) if a]
    if not archs:
        return "90"
    bad = [a for a in archs if not re.fullmatch(r"\d{2,3}[af]?(-real|-virtual)?", a)]
    if bad:
        what = "is not a compute capability" if len(bad) == 1 else "are not compute capabilities"
        raise SetupError(
            f"LARGEEP_CUDA_ARCHS={raw!r}: {', '.join(map(repr, bad))} {what}. Give numbers, major * 10 + minor, "
            "separated by ; (e.g. 90 for H100/H200, 90;100 for H100 and B200, 90a for Hopper's arch-specific code; "
            "`nvidia-smi --query-gpu=compute_cap --format=csv` shows your GPUs'). CMake's native, all and all-major "
            "are not taken: the install records the numbers, and the nvshmem backend refuses a GPU outside them")
    return ";".join(archs)


def _fresh_cmake_dir(build_dir: Path, nvcc: str) -> None:
    """Empties ``build_dir``'s CMake cache when it was configured with another nvcc (CUDA_HOME or PATH now name
    another one) or another source tree. CMake would drop that cache itself and configure again without the -D values
    given here (pybind11 then not found, and in auto mode the install silently pure-Python)."""
    cache = build_dir / "CMakeCache.txt"
    try:
        text = cache.read_text(errors="replace")
    except OSError:
        return

    def cached(name: str) -> str | None:
        m = re.search(rf"^{name}:[A-Z]+=(.*)$", text, re.M)
        return m.group(1).strip() if m else None

    was_nvcc, was_root = cached("CMAKE_CUDA_COMPILER"), cached("CMAKE_HOME_DIRECTORY")
    if was_nvcc not in (None, nvcc):
        why = f"was configured with {was_nvcc}, this build uses {nvcc}"
    elif was_root is not None and Path(was_root).resolve() != ROOT:
        why = f"was configured for the source tree {was_root}, this one is {ROOT}"
    else:
        return
    _say(f"the CMake build directory {build_dir} {why}: configuring it afresh")
    cache.unlink()
    shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


class BuildStepFailed(RuntimeError):
    """A build command that failed; ``log`` holds the last lines of its output."""

    def __init__(self, message: str, log: list[str]) -> None:
        super().__init__(message)
        self.log = log


def _run_logged(cmd: list[str], cwd: Path, what: str) -> None:
    """Runs ``cmd``, passing its output on (pip shows it with -v) and keeping its last LOG_LINES lines that are not
    blank, which a failure carries (BuildStepFailed.log) into the note: the compiler's or CMake's own error."""
    tail: deque[str] = deque(maxlen=LOG_LINES)
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            line = line.rstrip()
            if line.strip():  # (a compile command is long; CMake's errors hold many blank lines)
                tail.append(line if len(line) <= 400 else line[:400] + " [...]")
    if proc.returncode != 0:
        raise BuildStepFailed(f"{what} failed (exit status {proc.returncode})", list(tail))


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        mode = _build_mode()
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in glob.glob(str(out_dir / "_C*.so")):  # an earlier build's module must not ship with this one
            os.remove(old)
        note = out_dir / NOTE
        rev = _git_revision()
        if mode == "0":
            _say("LARGEEP_BUILD_NATIVE=0: installing the pure-Python package (torch backend only)")
            note.write_text(json.dumps({"built": False, "reason": "skipped at install (LARGEEP_BUILD_NATIVE=0)",
                                        "git": rev}))
            return
        archs = _cuda_archs()  # (a bad value fails the install also in auto mode: it was asked for)
        try:
            self._build(ext, out_dir, archs)
        except Exception as exc:  # noqa: BLE001 - reported, and fatal only when asked
            log = getattr(exc, "log", [])
            record: dict[str, object] = {"built": False, "reason": f"its build failed at install: {exc}", "git": rev}
            if log:
                record["log"] = log
            note.write_text(json.dumps(record))
            if mode == "1":
                raise ExecError(f"LARGEEP_BUILD_NATIVE=1 and the native module largeep._C was not built: {exc}"
                                + (" (the build's output above says why)" if log else "")) from exc
            _say(f"native module NOT built: {exc}. The torch backend works; the nvshmem backend needs largeep._C "
                 "(`python -m largeep` shows why it was not built)")
            return
        note.write_text(json.dumps({"built": True, "cuda_archs": archs, "git": rev}))

    def _build(self, ext: Extension, out_dir: Path, archs: str) -> None:
        """Builds _C into out_dir for the CUDA architectures ``archs`` (a CMake list)."""
        nvcc, major = _nvcc()
        if nvcc is None:
            home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
            raise RuntimeError(f"no nvcc at {home}/bin/nvcc (CUDA_HOME or CUDA_PATH)" if home
                               else "no CUDA toolkit (nvcc) found on PATH; set CUDA_HOME")
        shmem, why = _nvshmem(major)
        if shmem is None:
            raise RuntimeError(why)
        torch_cuda = _torch_cuda()
        torch_major = int(torch_cuda.split(".")[0]) if torch_cuda else None
        if torch_major is not None and major and torch_major != major:
            _say(f"warning: torch was built with CUDA {torch_cuda} but nvcc is CUDA {major}")
        hint = ""
        wheels = _wheel_cuda_majors(shmem["host"])
        if torch_major is not None and wheels and torch_major not in wheels:
            names = " and ".join(f"nvidia-nvshmem-cu{m}" for m in wheels)
            _say(f"warning: NVSHMEM comes from {names} but torch is built for CUDA {torch_major}: install "
                 f"nvidia-nvshmem-cu{torch_major} (and an nvcc of CUDA {torch_major}) to keep one CUDA major version")
        if major is not None and wheels and wheels != [major]:
            names = " and ".join(f"nvidia-nvshmem-cu{m}" for m in wheels)
            hint = (f"NVSHMEM comes from {names} but nvcc is CUDA {major}: keep only nvidia-nvshmem-cu{major} "
                    f"(`pip uninstall` the other, then `pip install --force-reinstall nvidia-nvshmem-cu{major}`), "
                    "or set NVSHMEM_DIR")
            _say(f"warning: {hint}")
        import pybind11

        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        _fresh_cmake_dir(build_dir, nvcc)
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        cfg = [
            cmake, str(ROOT), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'BIN_DIR', 'ninja')}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DNVSHMEM_INCLUDE_DIR={shmem['include']}",
            f"-DNVSHMEM_HOST_LIB={shmem['host']}",
            f"-DNVSHMEM_DEVICE_LIB={shmem['device']}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]
        sms = ", ".join(f"sm_{a}" for a in archs.split(";"))
        _say(f"building largeep._C with {nvcc} (CUDA {major}, {sms}), NVSHMEM from {Path(shmem['host']).parent}")
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        try:
            _run_logged(cfg, build_dir, "CMake's configure step")
            _run_logged([cmake, "--build", ".", "--parallel", jobs], build_dir, "the compile (cmake --build)")
        except BuildStepFailed as exc:
            if hint:
                raise BuildStepFailed(f"{exc} ({hint})", exc.log) from exc
            raise
        built = glob.glob(str(out_dir / "_C*.so"))
        if not built:
            raise RuntimeError(f"the build produced no _C*.so in {out_dir}")

    def _built_files(self) -> list[str]:
        """What this build wrote into build_lib: the note, and the module where it was built. (setuptools would list
        the module whether or not it is there, and an editable install would then fail copying it.)"""
        ext_file = Path(self.build_lib) / self.get_ext_filename(self.get_ext_fullname("largeep._C"))
        return [str(f) for f in (ext_file.with_name(NOTE), ext_file) if f.exists()]

    def get_outputs(self) -> list[str]:
        return self._built_files()

    def get_output_mapping(self) -> dict[str, str]:
        if not self.inplace:
            return {}
        pkg = self._package_dir()
        return {f: str(pkg / Path(f).name) for f in self._built_files()}

    def _package_dir(self) -> Path:
        return ROOT / self.get_finalized_command("build_py").get_package_dir("largeep")

    def copy_extensions_to_source(self) -> None:
        """An in-place build (an editable install, or build_ext --inplace): the package is imported from the source
        tree (python/largeep), so the note and the module go there; a module of an earlier in-place build that this
        one did not replace is removed (it would load, with this build's note)."""
        pkg = self._package_dir()
        for old in pkg.glob("_C*.so"):
            old.unlink()
        for f in self._built_files():
            self.copy_file(f, str(pkg / Path(f).name), level=self.verbose)


setup(
    ext_modules=[Extension("largeep._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
