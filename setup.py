"""Builds torchgc's op libraries by driving CMake (CMakeLists.txt is the one build definition), and
packs them into a wheel that serves every torch from the libraries' stable-ABI target on.

The libraries are built against the torch importable where the build runs (any release from the
target on: only its headers' stable ABI is used), so the build refuses to start where no torch is:
pip's default build isolation would otherwise download a torch of several GB into a throwaway
environment. Build with `make wheel`, or `pip install --no-build-isolation .` in an environment
that has torch.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError as exc:  # before setuptools 70.1; pip's build isolation would bring a newer one
    raise RuntimeError("torchgc: building needs setuptools 70.1 or newer in this environment: pip install -U setuptools") from exc

ROOT = Path(__file__).resolve().parent
CMAKE_MINIMUM = (3, 24, 0)
# What the build writes beside the package: the libraries and what they hold (torchgc/_library.py).
ARTIFACTS = ("_C.so", "_C_cuda.so", "_build.json")

# Environment variables passed through to CMake as -D options.
CMAKE_OPTIONS = ("TORCHGC_CUDA", "TORCHGC_CUDA_NORMS", "TORCHGC_CUDA_ARCHS", "TORCHGC_BUILD_TESTS", "TORCHGC_SANITIZE", "CMAKE_BUILD_TYPE")

NO_ISOLATION = "make wheel, or pip install --no-build-isolation .  (-e . for development; pip install cmake first if needed)"


def require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"torchgc: torch cannot be imported by {sys.executable} ({exc}). torchgc's op libraries are built with the "
            "headers of an installed torch, so the build runs only where torch is installed, never in pip's isolated "
            f"build environment (which would download one). In the environment that has torch, run: {NO_ISOLATION}"
        ) from exc


def check_cmake_version(cmake: str) -> None:
    text = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=True).stdout
    found = tuple(int(n) for n in re.search(r"(\d+)\.(\d+)\.(\d+)", text).groups())
    if found < CMAKE_MINIMUM:
        need = ".".join(map(str, CMAKE_MINIMUM))
        raise RuntimeError(f"torchgc: {cmake} is CMake {'.'.join(map(str, found))}, and the build needs {need} or newer; "
                           f"run: pip install 'cmake>={need}'")


def _cache_entry(cache: Path, name: str) -> Optional[str]:
    match = re.search(rf"^{re.escape(name)}:[A-Z]+=(.*)$", cache.read_text(errors="replace"), re.MULTILINE)
    return match.group(1).strip() if match else None


def stale_configuration(build_dir: Path, python: str) -> Optional[str]:
    """Why the CMake folder `build_dir` was configured for another Python, if it was: CMake keeps
    the first Python it found in its cache, and would ask that one for torch's headers."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return None
    cached = _cache_entry(cache, "Python_EXECUTABLE")
    if cached is not None and os.path.realpath(cached) != os.path.realpath(python):
        return f"{build_dir} was configured with Python_EXECUTABLE={cached}, and this build uses {python}"
    return None


def reset_configuration(build_dir: Path) -> None:
    (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
    shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


def find_cmake(env: dict) -> str:
    cmake = shutil.which("cmake", path=env["PATH"])
    if cmake is None:
        raise RuntimeError(f"torchgc: cmake >= {'.'.join(map(str, CMAKE_MINIMUM))} is needed to build (pip install cmake)")
    check_cmake_version(cmake)
    return cmake


def run_cmake(build_dir: Path) -> None:
    require_torch()
    # The venv's bin (cmake, ninja from pip) may not be on PATH when pip is called by path.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmake = find_cmake(env)
    why = stale_configuration(build_dir, sys.executable)
    if why:
        print(f"torchgc: {why}; configuring it afresh", file=sys.stderr)
        reset_configuration(build_dir)
    configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}"]
    configure += [f"-D{name}={os.environ[name]}" for name in CMAKE_OPTIONS if os.environ.get(name)]
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    subprocess.run(configure, check=True, env=env)
    subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True, env=env)


def copy_artifacts(build_dir: Path, package_dir: Path) -> None:
    """The libraries and _build.json into package_dir; a CUDA library left there by an earlier
    build that made none this time is removed."""
    package_dir.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACTS:
        built, placed = build_dir / name, package_dir / name
        if built.exists():
            shutil.copy2(built, placed)
        else:
            placed.unlink(missing_ok=True)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def get_ext_filename(self, fullname):
        # Loaded with torch.ops.load_library, never imported: no Python ABI tag in its name.
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext):
        build_dir = Path(os.environ.get("TORCHGC_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        run_cmake(build_dir)
        copy_artifacts(build_dir, Path(self.get_ext_fullpath(ext.name)).resolve().parent)
        if self.editable_mode:  # the editable install reads the package from the source tree
            copy_artifacts(build_dir, ROOT / "torchgc")


class TaggedWheel(bdist_wheel):
    """py3-none-<platform>: the libraries link no Python, and load under any CPython that torch runs on."""

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


# setuptools runs this file as __main__; the tests import it for the functions above.
if __name__ == "__main__":
    setup(
        ext_modules=[CMakeExtension("torchgc._C")],
        cmdclass={"build_ext": CMakeBuild, "bdist_wheel": TaggedWheel},
    )
