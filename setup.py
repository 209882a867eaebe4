"""Builds torchgc's op library by driving CMake (CMakeLists.txt is the one build definition).

The library is C++ compiled against one torch, and only that torch can load it. So the build uses
the torch importable where it runs, and refuses to start where none is: pip's default build
isolation would otherwise fetch a torch into a throwaway environment, build against it for many
minutes, and install a library the user's torch cannot load. Build with
`pip install --no-build-isolation .` in the environment that has torch.
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

ROOT = Path(__file__).resolve().parent
# CMake 3.25.2 added nvcc 12's C++20 dialect, which a CUDA torch's CMake config asks for (3.25.0
# and Debian's 3.25.1 fail with "requires the language dialect CUDA20"). CMakeLists.txt checks too.
CMAKE_MINIMUM = (3, 25, 2)

# Environment variables passed through to CMake as -D options.
CMAKE_OPTIONS = {
    "TORCHGC_CUDA": "TORCHGC_CUDA",
    "TORCHGC_BUILD_TESTS": "TORCHGC_BUILD_TESTS",
    "TORCHGC_SANITIZE": "TORCHGC_SANITIZE",
    "CMAKE_BUILD_TYPE": "CMAKE_BUILD_TYPE",
}

NO_ISOLATION = "pip install --no-build-isolation .  (or -e . for development; pip install cmake first if needed)"


def torch_cmake_dir() -> Path:
    """The CMake config folder of the torch this build compiles against."""
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError(
            f"torchgc: torch cannot be imported by {sys.executable} ({exc}). torchgc's op library must be built "
            "against the torch that will run it, so it builds only where that torch is installed, never in pip's "
            f"isolated build environment. In the environment that has torch, run: {NO_ISOLATION}"
        ) from exc
    return Path(torch.utils.cmake_prefix_path) / "Torch"


def check_cmake_version(cmake: str) -> None:
    text = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=True).stdout
    found = tuple(int(n) for n in re.search(r"(\d+)\.(\d+)\.(\d+)", text).groups())
    if found < CMAKE_MINIMUM:
        need = ".".join(map(str, CMAKE_MINIMUM))
        raise RuntimeError(f"torchgc: {cmake} is CMake {'.'.join(map(str, found))}, and the build needs {need} or newer "
                           f"(CUDA 12's C++20 dialect); run: pip install 'cmake>={need}'")


def _cache_entry(cache: Path, name: str) -> Optional[str]:
    match = re.search(rf"^{re.escape(name)}:[A-Z]+=(.*)$", cache.read_text(errors="replace"), re.MULTILINE)
    return match.group(1).strip() if match else None


def stale_configuration(build_dir: Path, torch_dir: Path, python: str) -> Optional[str]:
    """Why the CMake folder `build_dir` was configured for another torch or Python, if it was: CMake
    keeps the first torch it found in its cache and would build against it (or fail, when that
    one has been deleted, like a torch from an isolated build environment)."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return None
    for name, current in (("Torch_DIR", torch_dir), ("Python_EXECUTABLE", Path(python))):
        cached = _cache_entry(cache, name)
        if cached is not None and os.path.realpath(cached) != os.path.realpath(current):
            return f"{build_dir} was configured with {name}={cached}, and this build uses {current}"
    return None


def reset_configuration(build_dir: Path) -> None:
    (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
    shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        torch_dir = torch_cmake_dir()
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(os.environ.get("TORCHGC_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        # The venv's bin (cmake, ninja from pip) may not be on PATH when pip is called by path.
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        cmake = shutil.which("cmake", path=env["PATH"])
        if cmake is None:
            raise RuntimeError(f"torchgc: cmake >= {'.'.join(map(str, CMAKE_MINIMUM))} is needed to build (pip install cmake)")
        check_cmake_version(cmake)
        why = stale_configuration(build_dir, torch_dir, sys.executable)
        if why:
            print(f"torchgc: {why}; configuring it afresh", file=sys.stderr)
            reset_configuration(build_dir)
        name = target.name[: -len(".so")] if target.name.endswith(".so") else target.stem
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DTORCHGC_OUTPUT_NAME={name}",
        ]
        for var, option in CMAKE_OPTIONS.items():
            if os.environ.get(var):
                configure.append(f"-D{option}={os.environ[var]}")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(configure, check=True, env=env)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True, env=env)
        # The library stays in the build dir too, where the C++ tests link against it.
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build_dir / f"{name}.so", target)


# setuptools runs this file as __main__; the tests import it for the functions above.
if __name__ == "__main__":
    setup(
        ext_modules=[CMakeExtension("torchgc._C")],
        cmdclass={"build_ext": CMakeBuild},
    )
