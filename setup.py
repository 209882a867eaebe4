"""Builds torchgc's op library by driving CMake (CMakeLists.txt is the one build definition)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

# Environment variables passed through to CMake as -D options.
CMAKE_OPTIONS = {
    "TORCHGC_CUDA": "TORCHGC_CUDA",
    "TORCHGC_BUILD_TESTS": "TORCHGC_BUILD_TESTS",
    "TORCHGC_SANITIZE": "TORCHGC_SANITIZE",
    "CMAKE_BUILD_TYPE": "CMAKE_BUILD_TYPE",
}


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(os.environ.get("TORCHGC_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        # The venv's bin (cmake, ninja from pip) may not be on PATH when pip is called by path.
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        cmake = shutil.which("cmake", path=env["PATH"])
        if cmake is None:
            raise RuntimeError("torchgc: cmake >= 3.25 is needed to build (pip install cmake)")
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


setup(
    ext_modules=[CMakeExtension("torchgc._C")],
    cmdclass={"build_ext": CMakeBuild},
)
