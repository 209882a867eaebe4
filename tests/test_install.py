"""Installing from source into a user's own environment: the build cannot half-succeed, a build
folder set up for another Python is reconfigured, and an old CMake is named."""

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_setup_py():
    spec = importlib.util.spec_from_file_location("torchgc_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not as __main__: setup() does not run
    return module


setup_py = load_setup_py()


def test_an_isolated_build_stops_at_once_and_says_how_to_build(tmp_path):
    # pip's default build isolation has no torch to build against; it must not fetch one.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "torchgc: torch cannot be imported" in output, output[-3000:]
    assert "pip install --no-build-isolation ." in output
    assert not list(tmp_path.glob("*.whl"))


def write_cache(build_dir: Path, **entries):
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "CMakeFiles").mkdir(exist_ok=True)
    lines = ["# This is the CMakeCache file."] + [f"{name}:PATH={value}" for name, value in entries.items()]
    (build_dir / "CMakeCache.txt").write_text("\n".join(lines) + "\n")


def test_a_build_folder_for_another_python_is_detected_and_reset_and_one_for_this_python_is_kept(tmp_path):
    write_cache(tmp_path, Python_EXECUTABLE="/old/venv/bin/python")
    assert "Python_EXECUTABLE=/old/venv/bin/python" in setup_py.stale_configuration(tmp_path, sys.executable)
    setup_py.reset_configuration(tmp_path)
    assert not (tmp_path / "CMakeCache.txt").exists() and not (tmp_path / "CMakeFiles").exists()
    write_cache(tmp_path, Python_EXECUTABLE=sys.executable)
    assert setup_py.stale_configuration(tmp_path, sys.executable) is None
    assert setup_py.stale_configuration(tmp_path / "never-configured", sys.executable) is None


# Debian 12's CMake 3.25.1 builds: the build no longer goes through torch's CMake config, whose CUDA
# C++20 dialect needed 3.25.2.
@pytest.mark.parametrize("version, ok", [("3.23.5", False), ("3.22.1", False), ("3.24.0", True), ("3.25.1", True), ("4.4.4", True)])
def test_an_old_cmake_is_named_with_the_version_needed(tmp_path, version, ok):
    fake = tmp_path / "cmake"
    fake.write_text(f"#!/bin/sh\necho 'cmake version {version}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    if ok:
        setup_py.check_cmake_version(str(fake))
    else:
        with pytest.raises(RuntimeError, match=rf"is CMake {version}, and the build needs 3\.24\.0 or newer.*pip install 'cmake>=3\.24\.0'"):
            setup_py.check_cmake_version(str(fake))


def test_the_build_refuses_a_python_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        f"import importlib.util; spec = importlib.util.spec_from_file_location('s', {str(ROOT / 'setup.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "m.require_torch()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode != 0 and "never in pip's isolated build environment" in done.stderr
