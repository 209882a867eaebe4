"""The build: every op has its kernels in the dispatcher, and the libraries load only where they can run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchgc
from torchgc import _library, ops

ops.load_library()  # the dispatcher checks below need the schemas



def argument_types(op):
    return [str(a.type) for a in getattr(torch.ops.torchgc, op).default._schema.arguments]


# The ops, by how they dispatch, read from the schemas the library defines:
# ops without tensor arguments (bookkeeping) have one kernel for every key;
UTILITY_OPS = [op for op in ops.op_names() if not any("Tensor" in t for t in argument_types(op))]
# ops whose dispatch key is not the device they work on: reload dispatches on its host argument and
# routes by its `device` argument inside one kernel;
ROUTED_OPS = [op for op in ops.op_names() if "Device" in argument_types(op)]
# and ops that take a device tensor, with a kernel per backend.
DEVICE_OPS = [op for op in ops.op_names() if op not in UTILITY_OPS + ROUTED_OPS]
NORM_OPS = [op for op in DEVICE_OPS if "norm" in op]


def has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"torchgc::{op}", key)


def cuda_build_expected():
    return os.environ.get("TORCHGC_CUDA", "").upper() not in ("0", "OFF") and torch.version.cuda is not None


def nvcc_found():
    return bool(shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"))


def test_the_ops_are_the_ones_torchgc_knows():
    assert set(DEVICE_OPS) == {"offload", "wait", "rms_norm", "rms_norm_backward", "layer_norm", "layer_norm_backward"}
    assert ROUTED_OPS == ["reload"]


@pytest.mark.parametrize("op", DEVICE_OPS)
def test_device_op_has_cpu_and_cuda_kernels(op):
    assert has_kernel(op, "CPU")
    with_cuda_kernel = torchgc.BUILD_INFO.cuda_norm if op in NORM_OPS else torchgc.BUILD_INFO.with_cuda
    assert has_kernel(op, "CUDA") == with_cuda_kernel
    assert ops.supports(op, "cuda") == with_cuda_kernel


@pytest.mark.parametrize("op", DEVICE_OPS + ROUTED_OPS)
def test_every_op_with_tensors_has_a_fake_kernel_and_rejects_sparse_tensors(op):
    assert has_kernel(op, "Meta")
    assert has_kernel(op, "SparseCPU") and has_kernel(op, "SparseCsrCPU")


@pytest.mark.parametrize("op", ROUTED_OPS)
def test_routed_op_has_a_kernel_for_every_backend(op):
    assert has_kernel(op, "CompositeExplicitAutograd")
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"torchgc::{op}", key)


def test_build_had_cuda_under_a_cuda_torch_and_the_norm_kernels_with_nvcc():
    # A silent CPU-only build under a CUDA torch fails here; the offload kernels need no nvcc.
    assert torchgc.BUILD_INFO.with_cuda == cuda_build_expected()
    assert torchgc.BUILD_INFO.cuda_norm == (cuda_build_expected() and nvcc_found())


def test_an_older_torch_names_the_minimum():
    with pytest.raises(ImportError, match=r"torchgc needs torch 2\.11 or newer: .*torch 2\.10\.0 is installed.*pip install 'torch>=2\.11'"):
        _library.check_torch_supported("2.10.0")
    _library.check_torch_supported("2.11.0")
    _library.check_torch_supported("3.0.0a0+git")


def test_a_cuda_major_other_than_the_builds_names_both():
    with pytest.raises(ImportError, match=r"built for CUDA 13\.0, and torch \S+ is built with CUDA 12\.8.*built for CUDA 12"):
        _library.check_cuda_match({"cuda": "13.0"}, "12.8")
    assert _library.check_cuda_match({"cuda": "13.0"}, "13.2")
    assert not _library.check_cuda_match({"cuda": "13.0"}, None)  # a CPU-only torch: never loaded
    assert not _library.check_cuda_match({"cuda": None}, "13.0")


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
    (package / "_build.json").write_text((Path(_library.__file__).parent / "_build.json").read_text())
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(package / "_C.so"), str(tmp_path / "lib.c"), f"-L{tmp_path}",
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


# A library that cannot load: missing, or built for another CUDA major version than torch's (a cu12
# torch, simulated by changing the CUDA version the running torch reports).
BROKEN_LIBRARY = {
    "missing": ("import torchgc._library, pathlib; torchgc._library._PACKAGE_DIR = pathlib.Path('/nonexistent')",
                r"the op library \(torchgc/_C\*\.so\) is missing .*Build it with: pip install --no-build-isolation"),
    "other-cuda": ("import torch; torch.version.cuda = '12.8'",
                   r"its CUDA library was built for CUDA 13\.0, and torch \S+ is built with CUDA 12\.8"),
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
    if case == "other-cuda" and _library.read_build()["cuda"] != "13.0":
        pytest.skip("the build has no CUDA 13 library to mismatch")
    setup, expected = BROKEN_LIBRARY[case]
    done = _run_python(setup + "\n" + BROKEN_LIBRARY_SCRIPT.format(expected=expected))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]


def test_importing_torchgc_under_a_torch_older_than_2_11_names_the_minimum():
    done = _run_python("import torch; torch.__version__ = '2.10.0'\nimport torchgc")
    assert done.returncode != 0
    assert "ImportError: torchgc needs torch 2.11 or newer" in done.stderr and "torch 2.10.0 is installed" in done.stderr, done.stderr[-3000:]


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
