"""The offload ops from Python: values, schemas and fake kernels (opcheck), torch.compile, errors."""

import functools

import pytest
import torch

import torchgc
from torchgc import ops

ops.load_library()  # these tests call torch.ops.torchgc directly
from tiny_models import batch, build


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_round_trip_keeps_values_shape_and_dtype(dtype):
    x = (torch.randn(3, 5, 7) * 10).to(dtype)
    host = ops.offload(x)
    assert host.data_ptr() != x.data_ptr()
    back = ops.reload(host, x.device)
    ops.wait(back)
    assert back.dtype == dtype and back.shape == x.shape
    assert torch.equal(back, x)


def test_non_contiguous_input():
    x = torch.randn(6, 8).t()
    assert torch.equal(ops.reload(ops.offload(x), "cpu"), x)


@pytest.mark.parametrize(
    "op,args",
    [
        ("offload", lambda: (torch.randn(3, 4),)),
        ("reload", lambda: (ops.offload(torch.randn(3, 4)), torch.device("cpu"))),
        ("wait", lambda: (torch.randn(3, 4),)),
    ],
)
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.torchgc, op).default, args())


def test_ops_trace_in_a_full_graph():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def round_trip(x):
        back = torch.ops.torchgc.reload(torch.ops.torchgc.offload(x * 2), x.device)
        torch.ops.torchgc.wait(back)
        return back + 1

    x = torch.randn(4, 4)
    assert torch.equal(round_trip(x), x * 2 + 1)


def test_compiled_model_trains_with_offload_without_recompiling():
    torch._dynamo.reset()
    reference = build("llama", layers=2)
    model = build("llama", layers=2)
    func = functools.partial(torchgc.checkpoint, strategy="offload", use_reentrant=False, min_offload_bytes=0)
    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
    compiled = torch.compile(model, backend="aot_eager")
    inputs = batch()
    reference(**inputs).loss.backward()
    compiled(**inputs).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(2):
        model.zero_grad()
        compiled(**inputs).loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames, "recompiled on a later step"


def test_reload_to_an_unsupported_device_names_the_argument():
    with pytest.raises(RuntimeError, match=r"torchgc::reload: expected argument 'device' to be cpu"):
        ops.reload(ops.offload(torch.randn(2)), torch.device("meta"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_reload_to_cuda_without_a_gpu_says_so():
    # Without the check, a raw "CUDA driver version is insufficient" error from the first CUDA call.
    message = "no CUDA GPU is available" if ops.load_library().with_cuda else "this build of torchgc has no CUDA kernels"
    with pytest.raises(RuntimeError, match=rf"torchgc::reload: expected argument 'device' .*{message}"):
        ops.reload(ops.offload(torch.randn(2)), "cuda:0")


@pytest.mark.parametrize("op", ["offload", "wait"])
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_sparse_input_is_rejected_naming_the_op_and_the_argument(op, layout):
    x = torch.randn(2, 3)
    x = x.to_sparse() if layout == "sparse_coo" else x.to_sparse_csr()
    with pytest.raises(RuntimeError, match=rf"torchgc::{op}: expected argument 'x' to be a dense \(strided\) tensor, got layout Sparse"):
        getattr(ops, op)(x)


def test_reload_of_a_device_tensor_names_the_argument():
    with pytest.raises(RuntimeError, match=r"torchgc::reload: expected argument 'host' to be a CPU tensor, got one on meta"):
        torch.ops.torchgc.reload.default.redispatch(torch._C.DispatchKeySet("CPU"), torch.empty(2, device="meta"), torch.device("cpu"))


def test_host_pool_limit_and_stats():
    ops.empty_host_pool()
    before = ops.host_pool_stats()
    held = [ops.offload(torch.randn(1024)) for _ in range(4)]
    assert ops.host_pool_stats().in_use_bytes == before.in_use_bytes + 4 * 4096
    del held
    after = ops.host_pool_stats()
    assert after.reserved_bytes >= before.reserved_bytes + 4 * 4096
    assert after.cached_bytes == 4 * 4096 and after.limit_bytes >= 4 * 4096  # the automatic limit: the peak in use
    ops.set_host_pool_limit(4096)
    try:
        stats = ops.host_pool_stats()
        assert stats.cached_bytes <= 4096 and stats.limit_bytes == 4096
        with pytest.raises(RuntimeError, match=r"torchgc::set_host_pool_limit: expected argument 'bytes' >= 0, or -1 for the automatic limit, got -5"):
            torch.ops.torchgc.set_host_pool_limit.default(-5)
    finally:
        ops.set_host_pool_limit(None)
    assert ops.host_pool_stats().limit_bytes >= 4 * 4096


@pytest.mark.parametrize("nbytes", [1.5, 2**70, -1, True, "8GiB"])
def test_set_host_pool_limit_rejects_what_is_not_a_byte_count(nbytes):
    limit = ops.host_pool_stats().limit_bytes
    with pytest.raises(ValueError) as error:
        ops.set_host_pool_limit(nbytes)
    assert str(error.value) == (f"torchgc.ops.set_host_pool_limit: argument 'nbytes' must be None or an int from 0 to 2**63 - 1; "
                                f"got {nbytes!r}")
    assert ops.host_pool_stats().limit_bytes == limit
