"""The CUDA offload path: stream ordering, buffer lifetimes, and memory. Skipped without a GPU."""

import copy
import functools

import pytest
import torch

import torchgc
from torchgc import ops
from tiny_models import batch, build

pytestmark = pytest.mark.cuda

SLEEP_CYCLES = 50_000_000  # tens of milliseconds: long enough for an unordered copy to race


def test_offload_waits_for_the_kernel_that_produces_its_input():
    for _ in range(5):
        x = torch.zeros(16 * 1024 * 1024, device="cuda")
        torch.cuda._sleep(SLEEP_CYCLES)
        x.fill_(1.0)
        host = ops.offload(x)
        torch.cuda.synchronize()
        assert host.is_pinned()
        assert bool((host == 1.0).all()), "the copy read x before the kernel that wrote it finished"


def test_offloaded_source_is_not_reused_before_the_copy_reads_it():
    for _ in range(5):
        x = torch.full((16 * 1024 * 1024,), 1.0, device="cuda")
        torch.cuda._sleep(SLEEP_CYCLES)
        host = ops.offload(x)
        del x  # the compute stream may now reuse the block, but only after the copy
        y = torch.full((16 * 1024 * 1024,), 2.0, device="cuda")
        torch.cuda.synchronize()
        assert bool((host == 1.0).all()), "x's block was overwritten while the copy still read it"
        del y


def test_reload_then_wait_gives_the_values_back_on_the_compute_stream():
    x = torch.randn(8 * 1024 * 1024, device="cuda")
    host = ops.offload(x)
    back = ops.reload(host, x.device)
    ops.wait(back)
    assert torch.equal(back * 1, x)  # consumed on the compute stream, ordered only by wait


def test_reload_and_offload_return_without_waiting_for_the_compute_stream():
    x = torch.randn(1024 * 1024, device="cuda")
    ops.wait(ops.reload(ops.offload(x), x.device))  # warm: the copy stream and a pinned block exist
    torch.cuda.synchronize()
    torch.cuda._sleep(4 * SLEEP_CYCLES)
    host = ops.offload(x)
    back = ops.reload(host, x.device)
    # Neither call synchronized the host: the compute stream is still in its sleep.
    assert not torch.cuda.current_stream().query()
    ops.wait(back)
    ops.wait(back)  # the pending event was consumed; a second wait is a no-op
    assert torch.equal(back, x)


def test_reload_does_not_overwrite_a_block_that_queued_kernels_still_read():
    for _ in range(5):
        host = ops.offload(torch.full((16 * 1024 * 1024,), 3.0, device="cuda"))
        torch.cuda.synchronize()
        buf = torch.full((16 * 1024 * 1024,), 1.0, device="cuda")
        torch.cuda._sleep(SLEEP_CYCLES)
        doubled = buf * 2  # queued behind the sleep, reads buf
        del buf  # its block may go to the reload's output, which must wait for `doubled`
        back = ops.reload(host, torch.device("cuda"))
        ops.wait(back)
        torch.cuda.synchronize()
        assert bool((doubled == 2.0).all()), "the reload overwrote buf's block before a queued kernel read it"
        assert bool((back == 3.0).all())


def _peak_step_memory(model, inputs):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model(**inputs).loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _cuda_model(layers):
    return build("llama", layers=layers).cuda()


def test_offload_peak_memory_is_below_plain_checkpointing():
    inputs = {k: v.repeat(8, 32).cuda() for k, v in batch(seq_len=16).items()}  # 16 x 512 tokens
    peaks = {}
    for strategy in ("checkpoint", "offload"):
        model = _cuda_model(layers=12)
        func = functools.partial(torchgc.checkpoint, strategy=strategy, use_reentrant=False, min_offload_bytes=0)
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
        _peak_step_memory(model, inputs)  # warm up the allocators
        model.zero_grad(set_to_none=True)
        peaks[strategy] = _peak_step_memory(model, inputs)
    assert peaks["offload"] < peaks["checkpoint"], peaks


def test_offload_gradients_match_plain_checkpointing_on_cuda():
    # cuBLAS and the embedding backward may use atomics, so two CUDA runs can differ in the last
    # bits: compared with a relative tolerance of 1e-5 instead of bitwise.
    model = _cuda_model(layers=4)
    inputs = {k: v.cuda() for k, v in batch().items()}
    grads = {}
    for strategy in ("checkpoint", "offload"):
        m = copy.deepcopy(model)
        func = functools.partial(torchgc.checkpoint, strategy=strategy, use_reentrant=False, min_offload_bytes=0)
        m._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
        m(**inputs).loss.backward()
        grads[strategy] = {n: p.grad for n, p in m.named_parameters()}
    for name, ref in grads["checkpoint"].items():
        torch.testing.assert_close(grads["offload"][name], ref, rtol=1e-5, atol=1e-7, msg=name)
