"""torchgc under torch.distributed with two real ranks (gloo, CPU): DDP and FSDP2.

Each rank trains on its own batch, so the gradients are reduced across ranks. Every strategy's
reduced gradients must be bitwise equal to the same wrapper without checkpointing: per rank the
same fp32 ops run in the same order, and a sum of two values does not depend on their order.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torchgc
from patch_helpers import assert_same_grads, recording_checkpoint_calls
from tiny_models import batch, build

WORLD_SIZE = 2

# (name, strategy or None for no checkpointing, use_reentrant, bottom layers trainable or None)
RUNS = [
    ("none", None, False, None),
    ("checkpoint-reentrant", "checkpoint", True, None),
    ("checkpoint-nonreentrant", "checkpoint", False, None),
    ("offload-reentrant", "offload", True, None),
    ("offload-nonreentrant", "offload", False, None),
    ("none-bottom-1", None, False, 1),
    ("checkpoint-reentrant-bottom-1", "checkpoint", True, 1),
]


def _wrap(model, wrapper, find_unused):
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, find_unused_parameters=find_unused)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full_grads(model):
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = grad.detach().clone()
        else:
            grads[name] = None
    return grads


def _rank_main(rank, store, out_dir, wrapper, find_unused):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        with recording_checkpoint_calls() as calls:
            for name, strategy, use_reentrant, trainable_layers in RUNS:
                torchgc.unpatch()
                model = build("llama", layers=3)
                if trainable_layers is not None:
                    model.requires_grad_(False)
                    model.model.layers[:trainable_layers].requires_grad_(True)
                # HF Trainer enables checkpointing before DDP wraps the model. Under FSDP2 torchgc must
                # see the sharded model to force non-reentrant (or read accelerate's environment).
                wrapped = _wrap(model, wrapper, find_unused) if wrapper == "fsdp2" else model
                if strategy is not None:
                    torchgc.patch(strategy, use_reentrant=use_reentrant, min_offload_bytes=0)
                    model.gradient_checkpointing_enable()
                if wrapper == "ddp":
                    wrapped = _wrap(model, wrapper, find_unused)
                calls.clear()
                wrapped(**batch(seed=10 + rank)).loss.backward()
                if strategy is not None:
                    assert len(calls) == len(model.model.layers), (name, len(calls))
                grads = _full_grads(model)
                if rank == 0:
                    torch.save(grads, os.path.join(out_dir, f"{name}.pt"))
    finally:
        torchgc.unpatch()
        dist.destroy_process_group()


def _run_ranks(tmp_path, wrapper, find_unused=False):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), str(tmp_path), wrapper, find_unused), nprocs=WORLD_SIZE, join=True)
    return {name: torch.load(tmp_path / f"{name}.pt") for name, *_ in RUNS}


def _assert_all_match_no_checkpointing(results):
    # The two ranks saw different batches; a reduced gradient that ignored the other rank differs.
    for name, strategy, _, trainable_layers in RUNS:
        reference = results["none" if trainable_layers is None else f"none-bottom-{trainable_layers}"]
        assert_same_grads(reference, results[name])


@pytest.mark.parametrize("find_unused", [False, True], ids=["static", "find-unused"])
def test_ddp_gradients_match_ddp_without_checkpointing(tmp_path, find_unused):
    results = _run_ranks(tmp_path, "ddp", find_unused)
    _assert_all_match_no_checkpointing(results)
    single = build("llama", layers=3)
    single(**batch(seed=10)).loss.backward()
    # The reduction really happened: rank 0's own gradient is not the averaged one.
    assert not torch.equal(single.lm_head.weight.grad, results["none"]["lm_head.weight"])


def test_fsdp2_gradients_match_fsdp2_without_checkpointing(tmp_path):
    results = _run_ranks(tmp_path, "fsdp2")
    _assert_all_match_no_checkpointing(results)
