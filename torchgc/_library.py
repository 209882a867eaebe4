"""Finds and loads torchgc's op libraries (torchgc.ops calls load() once, on the first use of an op).

Both libraries are built on PyTorch's stable ABI, so one build loads on every torch from its target
version on (csrc/README.md):
- _C.so: every op schema and the CPU kernels;
- _C_cuda.so: the CUDA kernels, loaded only under a CUDA build of torch, whose CUDA major version
  must be the one the library was built for (a process has one CUDA runtime).
_build.json, written by the build beside them, says which torch built them, the oldest torch they
load on, and what the CUDA library holds; it is read before anything is loaded.
"""

import json
import re
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
_REBUILD = "pip install --no-build-isolation <torchgc source dir> (or, in a checkout: make wheel, then pip install dist/torchgc-*.whl)"
# The first torch with the stable ABI's from_blob with a deleter, which the host pool needs.
MINIMUM_TORCH = "2.11"


class BuildInfo(NamedTuple):
    torch_version: str  # the torch whose headers built the libraries
    target: str  # the oldest torch the libraries load on
    with_cuda: bool  # the CUDA library is loaded: offload and wait have CUDA kernels
    cuda_version: Optional[str]  # the CUDA the CUDA library was built for (None: built without it)
    cuda_norm: bool  # the CUDA library has the fused norm kernels (they need nvcc at build time)
    cuda_archs: str  # the GPU code of those kernels
    cpu_isas: Tuple[str, ...]  # the copies of the CPU norm kernels


def release(version: str) -> Tuple[int, int]:
    """(major, minor) of a version such as "2.14.1+cu130" or "2.11"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ImportError(f"torchgc: cannot read the torch version {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch_supported(running: str = None) -> None:
    """Raises ImportError when the installed torch is older than the libraries' stable-ABI target."""
    running = torch.__version__ if running is None else running
    if release(running) < release(MINIMUM_TORCH):
        raise ImportError(
            f"torchgc needs torch {MINIMUM_TORCH} or newer: its op libraries use PyTorch's stable ABI as of "
            f"{MINIMUM_TORCH}; torch {running} is installed. Upgrade torch: pip install 'torch>={MINIMUM_TORCH}'"
        )


def read_build(package_dir: Path = None) -> dict:
    path = (package_dir or _PACKAGE_DIR) / "_build.json"
    if not path.is_file() or not (path.parent / "_C.so").is_file():
        raise ImportError(
            f"torchgc: the op library (torchgc/_C*.so) is missing from {path.parent}; torchgc was not built. "
            f"Build it with: {_REBUILD}"
        )
    return json.loads(path.read_text())


def check_cuda_match(build: dict, torch_cuda: Optional[str]) -> bool:
    """Whether to load the CUDA library; ImportError when it was built for another CUDA major."""
    if torch_cuda is None or build["cuda"] is None:
        return False
    if release(build["cuda"] + ".0")[0] != release(torch_cuda + ".0")[0]:
        raise ImportError(
            f"torchgc: its CUDA library was built for CUDA {build['cuda']}, and torch {torch.__version__} is built "
            f"with CUDA {torch_cuda}; a process has one CUDA runtime. Install the torchgc wheel built for CUDA "
            f"{release(torch_cuda + '.0')[0]}, or build it from source with that torch: {_REBUILD}"
        )
    return True


def _load_failure(exc: OSError) -> str:
    """What the dynamic loader said, which torch.ops.load_library keeps only as the cause."""
    said = str(exc.__cause__ or exc)
    missing = re.search(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", said)
    if missing:
        return f"it needs {missing.group(1)}, which is not installed or not on the loader's path ({said})"
    return said


def _load(path: Path) -> None:
    try:
        torch.ops.load_library(str(path))
    except OSError as exc:
        raise ImportError(f"torchgc: loading {path} failed: {_load_failure(exc)}; rebuild with: {_REBUILD}") from exc


def load() -> BuildInfo:
    """Loads the op libraries and returns what they hold; raises ImportError naming the cause and
    the fix when they are missing, or cannot run with the installed torch."""
    build = read_build()
    with_cuda = check_cuda_match(build, torch.version.cuda)
    _load(_PACKAGE_DIR / "_C.so")
    if with_cuda:
        _load(_PACKAGE_DIR / "_C_cuda.so")
    torch.ops.torchgc.use_cpu_capability(torch.backends.cpu.get_cpu_capability())
    return BuildInfo(build["built_with_torch"], build["target"], with_cuda, build["cuda"], with_cuda and build["cuda_norm"],
                     build["cuda_archs"], tuple(build["cpu_isas"]))


# At import: nothing of torchgc can run on an older torch, so say so at once.
check_torch_supported()
