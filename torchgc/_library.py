"""Finds and loads torchgc's op library and checks it matches the running torch (torchgc.ops calls
load() once, on the first use of an op)."""

import importlib.machinery
import re
from pathlib import Path
from typing import NamedTuple

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
_REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps <torchgc source dir>  (or `make build` in a checkout)"


class BuildInfo(NamedTuple):
    torch_version: str
    with_cuda: bool
    cuda_archs: str
    parallel: str  # "openmp" when the CPU kernels' at::parallel_for uses threads


def _library_path() -> Path:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = _PACKAGE_DIR / f"_C{suffix}"
        if candidate.exists():
            return candidate
    raise ImportError(
        f"torchgc: the op library (torchgc/_C*.so) is missing from {_PACKAGE_DIR}; "
        f"torchgc was not built. Build it with: {_REBUILD}"
    )


def check_torch_version(info: BuildInfo, running: str) -> None:
    if info.torch_version != running:
        raise ImportError(
            f"torchgc: the op library was built against torch {info.torch_version} but torch "
            f"{running} is installed; C++ ops are tied to the torch they were built with. "
            f"Rebuild with: {_REBUILD}"
        )


def _load_failure(exc: OSError) -> str:
    """What the dynamic loader said, which torch.ops.load_library keeps only as the cause."""
    said = str(exc.__cause__ or exc)
    missing = re.search(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", said)
    if missing:
        # A CPU-only torch lacks the CUDA libraries a library built with CUDA links to, for one.
        return (f"it needs {missing.group(1)}, which is not installed or not on the loader's path; the torch installed "
                f"now is probably not the one torchgc was built with ({said})")
    # An undefined symbol almost always means another torch was installed since.
    return said


def load() -> BuildInfo:
    """Loads the op library and returns what it was built against; raises ImportError naming the
    cause and the rebuild command."""
    path = _library_path()
    try:
        torch.ops.load_library(str(path))
    except OSError as exc:
        raise ImportError(f"torchgc: loading {path} failed: {_load_failure(exc)}; rebuild with: {_REBUILD}") from exc
    version, backends, archs, parallel = torch.ops.torchgc.build_info.default()
    info = BuildInfo(version, backends == "cuda", archs, parallel)
    check_torch_version(info, torch.__version__)
    return info
