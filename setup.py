"""Thin driver: finds nvcc and NVSHMEM, then lets CMake + Ninja build largeep._C.

Without a CUDA toolkit or NVSHMEM the pure-Python package is installed (the torch backend works everywhere) and
the reason is printed once (pip shows it with -v only) and kept in the package (largeep/_native_build.json), where
``python -m largeep`` and the nvshmem backend's refusal find it. Environment:
  LARGEEP_BUILD_NATIVE  auto (default) | 1 (a failed native build fails the install) | 0 (skip it)
  LARGEEP_CUDA_ARCHS    CMake CUDA architectures (default 90)
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
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


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


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        mode = os.environ.get("LARGEEP_BUILD_NATIVE", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise RuntimeError(f"LARGEEP_BUILD_NATIVE={mode!r}: expected auto, 1 (the native module or a failed "
                               "install) or 0 (the pure-Python package)")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in glob.glob(str(out_dir / "_C*.so")):  # an earlier build's module must not ship with this one
            os.remove(old)
        note = out_dir / "_native_build.json"
        rev = _git_revision()
        if mode == "0":
            _say("LARGEEP_BUILD_NATIVE=0: installing the pure-Python package (torch backend only)")
            note.write_text(json.dumps({"built": False, "reason": "skipped at install (LARGEEP_BUILD_NATIVE=0)",
                                        "git": rev}))
            return
        try:
            archs = self._build(ext, out_dir)
        except Exception as exc:  # noqa: BLE001 - reported, and fatal only when asked
            note.write_text(json.dumps({"built": False, "reason": f"its build failed at install: {exc}", "git": rev}))
            if mode == "1":
                raise
            _say(f"native module NOT built: {exc}. The torch backend works; the nvshmem backend needs largeep._C.")
            return
        note.write_text(json.dumps({"built": True, "cuda_archs": archs, "git": rev}))

    def _build(self, ext: Extension, out_dir: Path) -> str:
        """Builds _C into out_dir; returns the CUDA architectures it was built for."""
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
        archs = os.environ.get("LARGEEP_CUDA_ARCHS", "90")
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
        _say(f"building largeep._C with {nvcc} (CUDA {major}, sm_{archs}), NVSHMEM from {Path(shmem['host']).parent}")
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        try:
            subprocess.run(cfg, cwd=build_dir, check=True)
            subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)
        except subprocess.CalledProcessError as exc:
            if hint:
                raise RuntimeError(f"{exc} ({hint})") from exc
            raise
        built = glob.glob(str(out_dir / "_C*.so"))
        if not built:
            raise RuntimeError(f"the build produced no _C*.so in {out_dir}")
        return archs


setup(
    ext_modules=[Extension("largeep._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
