"""Installs a built torchgc wheel into fresh virtual environments, one per torch release, and runs
the op tests and tests/test_wheel.py in each (`make test-wheel`, part of `make test`).

Usage: python tests/wheel_venvs.py WHEEL TORCH_VERSION [TORCH_VERSION ...]

Each environment is .venv/wheel/torch-<version>, made afresh. It gets:
- torch, with pip --no-deps (2.13.0+cpu lies on this kind of machine's disk; the others download);
  for the main environment's own torch release, its torch is shared instead of installed again;
- the wheel, with pip --no-deps;
- everything else the tests import (transformers, pytest, numpy, ...) from the main environment,
  through a .pth file that comes after the environment's own site-packages, so its torch and
  torchgc are the ones imported; and the main environment's CUDA libraries (its nvidia/ folder),
  linked where the CUDA builds of torch look for them.
The tests run from a scratch folder, so that the checkout's torchgc package is never imported.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_wheel.py", "tests/test_norm_ops.py", "tests/test_offload_ops.py"]


def site_packages(venv: Path) -> Path:
    return Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())


def main_torch_version() -> str:
    import torch

    return torch.__version__


def pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", *args], check=True)


def make_venv(venv: Path, torch_version: str) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    shared = Path(sysconfig.get_paths()["purelib"])
    own = site_packages(venv)
    if torch_version != main_torch_version():
        pip(venv, f"torch=={torch_version}")
        (own / "nvidia").symlink_to(shared / "nvidia", target_is_directory=True)
    (own / "_torchgc_shared_main_env.pth").write_text(f"{shared}\n")


def run_tests(venv: Path, wheel: Path, torch_version: str) -> bool:
    pip(venv, "--force-reinstall", str(wheel))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("TORCHGC_")}
    env["EXPECT_TORCHGC_INSTALLED_IN"] = str(site_packages(venv))
    with tempfile.TemporaryDirectory(prefix="torchgc-wheel-") as scratch:
        done = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider",
                               "--rootdir", str(ROOT), *[str(ROOT / t) for t in TESTS]], cwd=scratch, env=env)
    return done.returncode == 0


def main(argv) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    wheel, versions = Path(argv[0]).resolve(), argv[1:]
    failed = []
    for version in versions:
        start = time.time()
        venv = ROOT / ".venv" / "wheel" / f"torch-{version}"
        print(f"== {wheel.name} with torch {version} in {venv}", flush=True)
        make_venv(venv, version)
        if not run_tests(venv, wheel, version):
            failed.append(version)
        print(f"== torch {version}: {'failed' if version in failed else 'passed'} in {time.time() - start:.0f} s", flush=True)
    if failed:
        print(f"wheel_venvs: the tests failed with torch {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
