"""Installing into a user's own environment: the build cannot half-succeed, a build folder set up
for another torch is reconfigured, and an old CMake is named."""

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def current_torch_dir() -> Path:
    return Path(torch.utils.cmake_prefix_path) / "Torch"


def test_a_build_folder_configured_for_another_torch_is_detected_and_reset(tmp_path):
    deleted = "/tmp/pip-build-env-gone/overlay/lib/python3.11/site-packages/torch/share/cmake/Torch"
    write_cache(tmp_path, Torch_DIR=deleted, Python_EXECUTABLE=sys.executable)
    why = setup_py.stale_configuration(tmp_path, current_torch_dir(), sys.executable)
    assert why is not None and f"Torch_DIR={deleted}" in why and str(current_torch_dir()) in why
    setup_py.reset_configuration(tmp_path)
    assert not (tmp_path / "CMakeCache.txt").exists() and not (tmp_path / "CMakeFiles").exists()


def test_a_build_folder_for_another_python_is_detected_and_one_for_this_torch_is_kept(tmp_path):
    write_cache(tmp_path, Torch_DIR=current_torch_dir(), Python_EXECUTABLE="/old/venv/bin/python")
    assert "Python_EXECUTABLE=/old/venv/bin/python" in setup_py.stale_configuration(tmp_path, current_torch_dir(), sys.executable)
    write_cache(tmp_path, Torch_DIR=current_torch_dir(), Python_EXECUTABLE=sys.executable)
    assert setup_py.stale_configuration(tmp_path, current_torch_dir(), sys.executable) is None
    assert setup_py.stale_configuration(tmp_path / "never-configured", current_torch_dir(), sys.executable) is None


@pytest.mark.parametrize("version, ok", [("3.25.1", False), ("3.24.3", False), ("3.25.2", True), ("4.4.4", True)])
def test_an_old_cmake_is_named_with_the_version_needed(tmp_path, version, ok):
    fake = tmp_path / "cmake"
    fake.write_text(f"#!/bin/sh\necho 'cmake version {version}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    if ok:
        setup_py.check_cmake_version(str(fake))
    else:
        with pytest.raises(RuntimeError, match=rf"is CMake {version}, and the build needs 3\.25\.2 or newer .*pip install 'cmake>=3\.25\.2'"):
            setup_py.check_cmake_version(str(fake))


def test_the_build_refuses_a_python_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        f"import importlib.util; spec = importlib.util.spec_from_file_location('s', {str(ROOT / 'setup.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "m.torch_cmake_dir()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode != 0 and "never in pip's isolated build environment" in done.stderr
