"""How one layer call runs in each checkpointing mode, through torch's own checkpoint.

- checkpoint: torch's checkpoint, reentrant or not, as asked;
- offload: the same call inside torchgc.offload's saved-tensor hooks, which move the inputs torch's
  checkpoint saves to host memory (auto: only where an input lives on an accelerator and is large
  enough);
- selective: torch's non-reentrant checkpoint with torchgc.selective_cache's contexts, which keep
  the outputs of torchgc.selective's policy (non-reentrant only).

In every mode, the recompute of an MoE layer replays the routing of its forward (torchgc.routing).

The reentrant form has gaps that this closes: a layer whose inputs need no gradient gets a view of
one that does (else its parameter gradients are lost), tensors passed as keywords travel as
positional inputs (else their gradients are), and a registered check (add_reentrant_check) can
make one call non-reentrant where a training stack's rules say reentrant would go wrong.
"""

import contextlib
import dataclasses
import functools
import warnings
from typing import Any, Callable, List, Optional

import torch
import torch.utils.checkpoint
from torch.utils import _pytree as pytree

from torchgc import counters, ops, routing, selective_cache
from torchgc.layer_calls import any_tensor_requires_grad, is_frozen
from torchgc.offload import OffloadPolicy, offload_hooks

# Warnings here name the line that called the layers' checkpoint (this module, LayerCheckpoint's
# dispatch and its __call__ lie in between), a fixed line, so each shows once per process.
_CALLER = 4

# Checks consulted before every reentrant call: check(module, function) returns why reentrant
# checkpointing would go wrong for this call of layer `module` (None: it would not). Integrations
# that know a training stack's rules register theirs with add_reentrant_check, so this layer needs
# no knowledge of them.
ReentrantCheck = Callable[[Optional[torch.nn.Module], Callable], Optional[str]]
_reentrant_checks: List[ReentrantCheck] = []

def add_reentrant_check(check: ReentrantCheck) -> None:
    """Registers ``check(module, function) -> reason or None``; a reason makes torchgc.checkpoint use the
    non-reentrant form for that call, with a warning naming the reason. Registering the same
    check twice has no effect."""
    if check not in _reentrant_checks:
        _reentrant_checks.append(check)


def usable_strategy(strategy: str, module: Optional[torch.nn.Module]) -> str:
    """``strategy``, except "checkpoint", with a warning, for selective inside a layer compiled with
    .compile(): compiled code writes into buffers it reuses (out= kernels), which the selective
    policy would have cached for backward (torch raises "Tensor cached during selective activation
    checkpoint has been mutated")."""
    if strategy != "selective" or getattr(module, "_compiled_call_impl", None) is None:
        return strategy
    warnings.warn(f"torchgc.checkpoint: strategy 'selective' cannot apply its policy inside {type(module).__name__}, "
                  "compiled with .compile(); checkpointing the layer whole instead. For selective, compile the layer "
                  "as layers[i] = torch.compile(layer), where the compiler applies the policy", stacklevel=_CALLER)
    return "checkpoint"


def run_selective(function: Callable, args: tuple, kwargs: dict, *, module, use_reentrant: bool, torch_kwargs: dict):
    """The call under torch's non-reentrant checkpoint, keeping what torchgc's selective policy keeps."""
    if "context_fn" in torch_kwargs:
        raise ValueError("torchgc.checkpoint: argument 'context_fn' cannot be combined with strategy 'selective', "
                         f"which brings its own; got context_fn={torch_kwargs['context_fn']!r}")
    if use_reentrant:
        warnings.warn("torchgc.checkpoint: strategy 'selective' is built on torch's checkpoint contexts (context_fn), which "
                      "only the non-reentrant form supports; using non-reentrant checkpointing for these layers", stacklevel=_CALLER)
    counters.record_checkpoint(module, "selective")
    return torch.utils.checkpoint.checkpoint(routing.replayed(function, module), *args, use_reentrant=False, context_fn=selective_cache.contexts,
                                             **torch_kwargs, **kwargs)


def run_recompute(function: Callable, args: tuple, kwargs: dict, *, module, frozen: bool, inputs_need_grad: bool,
                  use_reentrant: bool, torch_kwargs: dict, offload: Optional[OffloadPolicy]):
    """The call under torch's checkpoint, inside offload hooks when ``offload`` (the policy of
    strategy offload or auto; None for checkpoint) wants its inputs."""
    if use_reentrant and module is not None and not frozen and not inputs_need_grad:
        args = _with_an_input_requiring_grad(args)
    reason = _reentrant_would_fail(function, args, module) if use_reentrant else None
    if reason:
        warnings.warn(f"torchgc.checkpoint: {reason}; using the non-reentrant form for this layer", stacklevel=_CALLER)
        use_reentrant = False
    lifted = []
    if use_reentrant:
        function, args, lifted = _lift_tensor_kwargs(function, args, kwargs)
        kwargs = {}
    hooks = contextlib.nullcontext()
    if wants_offload(offload, args):
        keep = _parameter_pointers(module) | {t.data_ptr() for t in lifted}
        hooks = offload_hooks(dataclasses.replace(offload, keep=frozenset(keep)))
    counters.record_checkpoint(module, "checkpoint" if isinstance(hooks, contextlib.nullcontext) else "offload")
    with hooks:
        return torch.utils.checkpoint.checkpoint(routing.replayed(function, module), *args, use_reentrant=use_reentrant,
                                                 **torch_kwargs, **kwargs)


def wants_offload(policy: Optional[OffloadPolicy], args: tuple) -> bool:
    """Whether a call with ``args`` offloads under ``policy``: always for strategy offload (every
    device), and for auto when an input lives on one of its devices and is at least its min_bytes,
    and the loaded op libraries can offload from that device (else auto checkpoints, after one
    warning naming why: it never chooses what the libraries cannot run)."""
    if policy is None:
        return False
    if policy.devices is None:
        return True
    return any(
        isinstance(a, torch.Tensor) and a.device.type in policy.devices and a.numel() * a.element_size() >= policy.min_bytes
        and ops.usable_on("offload", a.device.type, "strategy 'auto' checkpoints instead of offloading")
        for a in args
    )


def _reentrant_would_fail(function: Callable, args, module: Optional[torch.nn.Module]) -> Optional[str]:
    """Why reentrant checkpointing would go wrong for this call, if it would; the non-reentrant
    form gives the correct gradients in both cases."""
    if module is not None and not is_frozen(module) and not any_tensor_requires_grad(args):
        # Reentrant checkpoint drops every parameter gradient when no input requires grad, and this
        # layer has no floating-point input to lend one (see _with_an_input_requiring_grad).
        return "no input requires grad, so reentrant checkpointing would lose the layer's parameter gradients"
    for check in _reentrant_checks:
        reason = check(module, function)
        if reason:
            return reason
    return None


def _with_an_input_requiring_grad(args: tuple) -> tuple:
    """Reentrant checkpoint computes no parameter gradient when no input requires grad (frozen
    embeddings under LoRA, the first trainable layer of freeze tuning). No gradient can flow below
    such a call, so giving it a detached view of its first floating-point input that requires grad
    changes nothing else: the view shares storage and version counter with the input (no copy, and
    an in-place change is still caught), and the gradient backward computes for it is dropped."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return (*args[:i], a.detach().requires_grad_(), *args[i + 1:])
    return args


def _parameter_pointers(module: Optional[torch.nn.Module]) -> set:
    if module is None:
        return set()
    tensors = list(module.parameters()) + list(module.buffers())
    return {t.data_ptr() for t in tensors}


def _lift_tensor_kwargs(function: Callable, args: tuple, kwargs: dict):
    """Reentrant checkpoint takes no kwargs, and tensors bound in a partial would get their
    gradients outside the checkpoint's graph. Moves every tensor found in kwargs, and in a
    partial's keywords when one requires grad, to trailing positional args, and rebuilds the
    keywords inside the call. Returns (function, args, lifted tensors)."""
    bound = {}
    if isinstance(function, functools.partial) and not function.args:
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in pytree.tree_leaves(function.keywords)):
            bound, function = dict(function.keywords), function.func
    keywords = {**bound, **kwargs}
    if not keywords:
        return function, args, []
    leaves, spec = pytree.tree_flatten(keywords)
    tensor_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    lifted = [leaves[i] for i in tensor_slots]
    n_args = len(args)

    def call_with_keywords(*all_args: Any):
        rebuilt = list(leaves)
        for slot, tensor in zip(tensor_slots, all_args[n_args:]):
            rebuilt[slot] = tensor
        return function(*all_args[:n_args], **pytree.tree_unflatten(rebuilt, spec))

    return call_with_keywords, (*args, *lifted), lifted
