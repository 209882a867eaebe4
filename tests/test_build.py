"""The build: every op has its kernels in the dispatcher, and the library matches torch."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import torchgc
from torchgc import _library

# Ops that take a device tensor and so need a kernel per backend.
DEVICE_OPS = ["offload", "wait"]
# Ops whose dispatch key is not the device they work on: reload dispatches on its host argument
# and routes by its `device` argument inside one kernel.
ROUTED_OPS = ["reload"]
# Ops without tensor arguments (bookkeeping): one kernel for every key.
UTILITY_OPS = ["host_pool_stats", "set_host_pool_limit", "empty_host_pool", "build_info"]
# The fused norms and their backward ops.
DEVICE_OPS += ["rms_norm", "rms_norm_backward", "layer_norm", "layer_norm_backward"]


def all_torchgc_ops():
    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("torchgc::"))


def has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"torchgc::{op}", key)


def cuda_build_expected():
    if os.environ.get("TORCHGC_CUDA", "").upper() in ("0", "OFF"):
        return False
    nvcc = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")
    return bool(nvcc) and torch.version.cuda is not None


def test_every_op_is_classified():
    assert set(all_torchgc_ops()) == set(DEVICE_OPS + ROUTED_OPS + UTILITY_OPS)


@pytest.mark.parametrize("op", DEVICE_OPS)
def test_device_op_has_cpu_and_cuda_kernels(op):
    assert has_kernel(op, "CPU")
    assert has_kernel(op, "CUDA") == torchgc.BUILD_INFO.with_cuda


@pytest.mark.parametrize("op", ROUTED_OPS)
def test_routed_op_has_a_kernel_for_every_backend(op):
    assert has_kernel(op, "CompositeExplicitAutograd")
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"torchgc::{op}", key)


def test_build_had_cuda_when_nvcc_and_cuda_torch_are_present():
    # A silent CPU-only build on a machine with nvcc and a CUDA torch fails here.
    assert torchgc.BUILD_INFO.with_cuda == cuda_build_expected()


def test_build_info_matches_torch():
    assert torchgc.BUILD_INFO.torch_version == torch.__version__


def test_cpu_kernels_are_built_with_torch_parallel_backend():
    # Without -fopenmp, ATen's inline at::parallel_for runs every CPU kernel on one thread.
    torch_uses_openmp = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert (torchgc.BUILD_INFO.parallel == "openmp") == torch_uses_openmp


def test_mismatched_torch_version_names_cause_and_fix():
    info = torchgc.BUILD_INFO._replace(torch_version="0.0.0")
    with pytest.raises(ImportError, match=r"built against torch 0\.0\.0 but torch 9\.9 is installed.*pip install --no-build-isolation"):
        _library.check_torch_version(info, "9.9")


def test_missing_library_names_cause_and_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(_library, "_PACKAGE_DIR", tmp_path)
    with pytest.raises(ImportError, match=r"op library .* is missing .*Build it with: pip install"):
        _library._load()


def test_import_in_fresh_process_loads_library_once():
    code = "import torchgc, torchgc.ops, torch; import torchgc._library as l; l._load(); print(torch.ops.torchgc.offload)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torchgc.offload" in out.stdout
