"""The op libraries as installed: built on PyTorch's stable ABI, so one build loads on every torch from
its target on. `make test` runs this file with the op tests in fresh environments holding the wheel
and torch 2.11, 2.12, 2.13+cpu and 2.14 (tests/wheel_venvs.py); it runs on the development build too.
"""

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import torchgc
from tiny_models import batch, build

PACKAGE = Path(torchgc.__file__).resolve().parent
LIBRARIES = [path for path in (PACKAGE / "_C.so", PACKAGE / "_C_cuda.so") if path.exists()]
TORCH_LIBRARIES = [path for path in (Path(torch.__file__).parent / "lib" / name for name in ("libtorch_cpu.so", "libtorch_cuda.so"))
                   if path.exists()]
# A demangled C++ symbol of PyTorch's own C++ API, which changes between releases.
TORCH_CXX = re.compile(r"^(vtable for |typeinfo for |typeinfo name for |VTT for |guard variable for )?(c10|at|torch|caffe2)::")

needs_nm = pytest.mark.skipif(shutil.which("nm") is None or shutil.which("c++filt") is None, reason="needs binutils' nm and c++filt")


def symbols(path: Path, which: str) -> set:
    out = subprocess.run(["nm", "-D", which, str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def test_the_installed_torchgc_is_the_one_imported():
    expected = os.environ.get("EXPECT_TORCHGC_INSTALLED_IN")
    if expected is None:
        assert LIBRARIES, f"no op library in {PACKAGE}"
    else:
        assert PACKAGE.parent == Path(expected).resolve(), f"imported {PACKAGE}, not the wheel installed in {expected}"


@needs_nm
def test_the_libraries_import_no_cxx_symbol_of_torch():
    imported = sorted(set().union(*(symbols(lib, "--undefined-only") for lib in LIBRARIES)))
    demangled = subprocess.run(["c++filt"], input="\n".join(imported), capture_output=True, text=True, check=True).stdout.splitlines()
    found = [name for name in demangled if TORCH_CXX.match(name)]
    assert not found, f"C++ symbols of torch imported by {[lib.name for lib in LIBRARIES]}: {found}"


@needs_nm
def test_every_shim_symbol_they_import_is_exported_by_the_running_torch():
    # A CPU-only torch has no libtorch_cuda, and never loads the CUDA library.
    loaded = [lib for lib in LIBRARIES if lib.name == "_C.so" or torch.version.cuda is not None]
    needed = {name for lib in loaded for name in symbols(lib, "--undefined-only") if name.startswith(("aoti_torch_", "torch_"))}
    exported = set().union(*(symbols(lib, "--defined-only") for lib in TORCH_LIBRARIES))
    missing = sorted(needed - exported)
    assert needed and not missing, f"torch {torch.__version__} does not export {missing}"


def test_build_info_says_what_was_built_and_loaded():
    info = torchgc.BUILD_INFO
    assert info.target == torchgc._library.MINIMUM_TORCH
    assert torchgc._library.release(torch.__version__) >= torchgc._library.release(info.target)
    assert info.with_cuda == (torch.version.cuda is not None and info.cuda_version is not None)
    assert "avx2" in info.cpu_isas or not sys.platform.startswith("linux") or os.uname().machine != "x86_64"


def loaded_objects() -> str:
    return Path("/proc/self/maps").read_text()


def test_the_cuda_library_is_loaded_exactly_under_a_cuda_torch():
    torchgc.ops.load_library()
    assert ("_C_cuda.so" in loaded_objects()) == torchgc.BUILD_INFO.with_cuda
    if torch.version.cuda is None:
        assert "libcudart" not in loaded_objects()


def test_auto_and_the_fused_norms_use_cuda_kernels_only_where_the_build_has_them():
    # Fake CUDA tensors: what a model on a GPU hands torchgc, on a machine without one.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchgc import modes, offload, ops

    with FakeTensorMode():
        x = torch.empty(1024, 1024, device="cuda", dtype=torch.bfloat16)
        weight = torch.ones(1024, device="cuda")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            offloads = modes.wants_offload(offload.OffloadPolicy(devices=offload.ACCELERATORS), (x,))
            y = ops.rms_norm(x, weight, 1e-6)  # the kernel, or the same math as torch ops: never an error
    assert offloads == torchgc.BUILD_INFO.with_cuda
    assert y.shape == x.shape and y.dtype == x.dtype
    said = " ".join(str(w.message) for w in caught)
    assert ("strategy 'auto' checkpoints instead" in said) == (not torchgc.BUILD_INFO.with_cuda), said
    assert ("the same fp32 norm runs as torch ops" in said) == (not torchgc.BUILD_INFO.cuda_norm), said


@pytest.mark.parametrize("strategy", ["checkpoint", "offload"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_patch_trains_with_exact_gradients(strategy, use_reentrant):
    reference = build("llama", layers=2)
    reference(**batch()).loss.backward()
    with torchgc.patched(strategy, use_reentrant=use_reentrant, min_offload_bytes=0):
        model = build("llama", layers=2)
        model.gradient_checkpointing_enable()
        torchgc.reset_stats()
        model(**batch()).loss.backward()
    assert torchgc.stats()["checkpoint_calls"] == {strategy: 2}
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name
