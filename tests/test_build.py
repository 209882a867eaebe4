"""The build: every op has its kernels in the dispatcher, and the library matches torch."""

import importlib.machinery
import os
import shutil
import subprocess
import sys

import pytest
import torch

import torchgc
from torchgc import _library, ops

ops.load_library()  # the dispatcher checks below need the schemas

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
        _library.load()


def test_a_library_that_needs_a_missing_one_names_it(monkeypatch, tmp_path):
    # As a library built with CUDA under a CPU-only torch: the loader cannot find a library it links to.
    (tmp_path / "dep.c").write_text("int torchgc_test_dependency(void) { return 1; }\n")
    (tmp_path / "lib.c").write_text("int torchgc_test_dependency(void);\nint torchgc_test_entry(void) { return torchgc_test_dependency(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "libtorchgc_gone.so"), str(tmp_path / "dep.c")], check=True)
    package = tmp_path / "package"
    package.mkdir()
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(package / f"_C{suffix}"), str(tmp_path / "lib.c"), f"-L{tmp_path}",
                    "-ltorchgc_gone", f"-Wl,-rpath,{tmp_path}"], check=True)
    (tmp_path / "libtorchgc_gone.so").unlink()
    monkeypatch.setattr(_library, "_PACKAGE_DIR", package)
    with pytest.raises(ImportError, match=r"failed: it needs libtorchgc_gone\.so, which is not installed .*rebuild with: pip install --no-build-isolation"):
        _library.load()


def test_import_in_fresh_process_loads_library_once():
    code = "import torchgc, torchgc.ops, torch; import torchgc._library as l; l.load(); print(torch.ops.torchgc.offload)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torchgc.offload" in out.stdout


def _run_python(code: str) -> subprocess.CompletedProcess:
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHGC_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_torchgc_does_not_load_the_op_library():
    code = (
        "import torch, torchgc\n"
        "loaded = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith('torchgc::')]\n"
        "assert not loaded, loaded\n"
        "torchgc.ops.offload(torch.ones(3))\n"  # the first op call loads it
        "assert 'torchgc::offload' in torch._C._dispatch_get_all_op_names()\n"
    )
    done = _run_python(code)
    assert done.returncode == 0, done.stderr[-3000:]


# A library that cannot load: missing, or built for another torch (as after a torch upgrade,
# simulated by changing the version the running torch reports).
BROKEN_LIBRARY = {
    "missing": ("import torchgc._library, pathlib; torchgc._library._PACKAGE_DIR = pathlib.Path('/nonexistent')",
                r"the op library \(torchgc/_C\*\.so\) is missing .*Build it with: pip install --no-build-isolation"),
    "other-torch": ("import torch; torch.__version__ = '9.9.9'",
                    r"built against torch \S+ but torch 9\.9\.9 is installed.*Rebuild with: pip install --no-build-isolation"),
}

# Everything that needs no C++ keeps working; every first use of an op raises the clear error,
# the offload strategy fails at enable before the model changes, and a compiled first use names it too.
BROKEN_LIBRARY_SCRIPT = """
import re, warnings
import torch, torchgc
from tiny_models import batch, build

def raises_clear_error(call, expected):
    try:
        call()
    except Exception as exc:
        assert re.search(expected, str(exc), re.S), str(exc)
        return type(exc).__name__
    raise AssertionError("no error")

torchgc.patch()
reference = build("llama", layers=2)
reference(**batch()).loss.backward()
for strategy in ("checkpoint", "auto"):  # auto checkpoints CPU tensors: no op needed
    model = build("llama", layers=2)
    model.gradient_checkpointing_enable({{"strategy": strategy}})
    model(**batch()).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name

expected = {expected!r}
model = build("llama", layers=2)
kinds = [
    raises_clear_error(lambda: model.gradient_checkpointing_enable({{"strategy": "offload"}}), expected),
    raises_clear_error(lambda: torchgc.ops.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6), expected),
    raises_clear_error(lambda: torchgc.ops.offload(torch.ones(2)), expected),
    raises_clear_error(lambda: torchgc.BUILD_INFO, expected),
    raises_clear_error(lambda: torchgc.patch(fused_norm=True), expected),
]
assert kinds[:4] == ["ImportError"] * 4, kinds
assert not model.is_gradient_checkpointing
assert torchgc.patching.current_options().fused_norm is False  # the failed patch() changed nothing
compiled = torch.compile(lambda x: torchgc.ops.offload(x), backend="aot_eager", fullgraph=True)
raises_clear_error(lambda: compiled(torch.ones(2)), expected)
print("ok")
"""


@pytest.mark.parametrize("case", sorted(BROKEN_LIBRARY))
def test_a_broken_op_library_fails_only_where_an_op_is_needed(case):
    setup, expected = BROKEN_LIBRARY[case]
    done = _run_python(setup + "\n" + BROKEN_LIBRARY_SCRIPT.format(expected=expected))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]


def test_an_op_first_used_inside_a_compiled_region_loads_the_library_without_a_graph_break():
    code = (
        "import torch, torchgc\n"
        "x, w = torch.randn(4, 16), torch.rand(16) + 0.5\n"
        "f = torch.compile(lambda x, w: torchgc.ops.rms_norm(x, w, 1e-6), backend='aot_eager', fullgraph=True)\n"
        "y = f(x, w)\n"
        "assert torch.equal(y, torchgc.ops.rms_norm(x, w, 1e-6))\n"
    )
    done = _run_python(code)
    assert done.returncode == 0, done.stderr[-3000:]
