"""torch.distributed wrappers that reentrant checkpointing breaks: FSDP2 and DDP.

- FSDP2 (fully_shard): the reentrant recompute runs outside autograd's view of FSDP2's
  pre/post-backward hooks, which breaks their resharding (mixed Tensor/DTensor errors, abnormal
  memory). Detected per model, when checkpointing is enabled.
- DDP with find_unused_parameters=True: its reducer marks a parameter ready from each autograd
  hook, and the reentrant backward fires them a second time ("Expected to mark a variable ready
  only once"). Detected per call, since DDP wraps the model after checkpointing is enabled.
"""

import os
from typing import Callable, Optional, Tuple

import torch


def _fsdp_module_classes() -> Tuple[type, ...]:
    classes = []
    # torch >= 2.6 exports FSDPModule from torch.distributed.fsdp; before, only from _composable.
    for path in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            module = __import__(path, fromlist=["FSDPModule"])
        except ImportError:
            continue
        cls = getattr(module, "FSDPModule", None)
        if isinstance(cls, type) and cls not in classes:
            classes.append(cls)
    return tuple(classes)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    # torch.compile's OptimizedModule keeps the real module in _orig_mod.
    while isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        module = module._orig_mod
    return module


def accelerate_requests_fsdp2() -> bool:
    """accelerate's launcher exports ACCELERATE_USE_FSDP=true and FSDP_VERSION=2 for FSDP2 runs,
    before the model is wrapped (Trainer enables checkpointing before accelerate shards)."""
    use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")
    return use_fsdp and os.environ.get("FSDP_VERSION", "1").strip() == "2"


def uses_fsdp2(model: torch.nn.Module) -> bool:
    """True when the model or one of its submodules is sharded by FSDP2, or accelerate is set to
    shard it with FSDP2."""
    if accelerate_requests_fsdp2():
        return True
    classes = _fsdp_module_classes()
    if not classes or not torch.distributed.is_available():
        return False
    return any(isinstance(_unwrap(m), classes) for m in _unwrap(model).modules())


def ddp_reentrant_conflict(module: Optional[torch.nn.Module] = None, function: Optional[Callable] = None) -> Optional[str]:
    """Why reentrant checkpointing would fail inside the DistributedDataParallel forward running
    now, if it would (for torchgc.modes.add_reentrant_check)."""
    if not torch.distributed.is_available():
        return None
    ddp = torch.nn.parallel.DistributedDataParallel._get_active_ddp_module()
    if ddp is not None and ddp.find_unused_parameters and not ddp.static_graph:
        return "DistributedDataParallel with find_unused_parameters=True cannot run reentrant checkpointing"
    return None
