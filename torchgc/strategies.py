"""torchgc's checkpoint strategies: plain recompute, offload or selective, reentrant or not.

Every strategy is torch's own checkpoint underneath, so RNG replay, autocast and tuple outputs
behave exactly as in torch; offloading adds saved-tensor hooks around the call (torchgc.offload),
and selective adds torch's selective checkpoint contexts with torchgc's policy (torchgc.selective).
"""

import contextlib
import functools
import inspect
import warnings
from typing import Any, Callable, List, Optional

import torch
import torch.utils.checkpoint
from torch.utils import _pytree as pytree

from torchgc import compiled, counters, selective
from torchgc.config import DEFAULT_MIN_OFFLOAD_BYTES, STRATEGIES
from torchgc.offload import OffloadPolicy, offload_hooks

# Checks consulted before every reentrant call: check(module) returns why reentrant checkpointing
# would go wrong for a layer of `module` (None: it would not). Integrations that know a training
# stack's rules register theirs with add_reentrant_check, so this layer needs no knowledge of them.
_reentrant_checks: List[Callable[[Optional[torch.nn.Module]], Optional[str]]] = []


def add_reentrant_check(check: Callable[[Optional[torch.nn.Module]], Optional[str]]) -> None:
    """Registers ``check(module) -> reason or None``; a reason makes torchgc.checkpoint use the
    non-reentrant form for that call, with a warning naming the reason. Registering the same
    check twice has no effect."""
    if check not in _reentrant_checks:
        _reentrant_checks.append(check)


def checkpoint(
    function: Callable,
    *args,
    strategy: str = "auto",
    use_reentrant: bool = False,
    preserve_rng_state: bool = True,
    min_offload_bytes: Optional[int] = None,
    only_trainable: bool = True,
    prefetch: bool = True,
    max_host_bytes: Optional[int] = None,
    **kwargs,
):
    """Runs ``function(*args, **kwargs)`` without keeping its activations for backward.

    strategy: "checkpoint" recomputes in backward; "offload" also moves the saved inputs to host
    memory and prefetches them back; "auto" offloads when an input lives on an accelerator and is
    at least ``min_offload_bytes`` large (default 2 MiB), and checkpoints otherwise; "selective"
    keeps the outputs of matmuls and attention and recomputes the rest (always non-reentrant:
    torch's selective checkpointing has no reentrant form).
    only_trainable: a layer that no gradient reaches runs as is, not recomputed: one with
    parameters, none of which requires grad, and no tensor input that requires grad (it builds no
    graph, so it keeps nothing for backward). A frozen layer that gradients flow through (one above
    a trainable layer) and a layer without parameters are checkpointed like any other.
    max_host_bytes: offloading stops while this many host bytes are in use (None: no cap).
    Inside a region that torch.compile traces, see torchgc.compiled.
    """
    flags = {"use_reentrant": use_reentrant, "preserve_rng_state": preserve_rng_state, "only_trainable": only_trainable, "prefetch": prefetch}
    _check_arguments(strategy, flags, min_offload_bytes, max_host_bytes)
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    if torch.compiler.is_compiling():
        offload = None
        if strategy != "selective" and _should_offload(strategy, args, min_offload_bytes):
            offload = _offload_policy_arguments(strategy, min_offload_bytes, prefetch, max_host_bytes)
        return compiled.checkpoint(function, args, kwargs, selective_policy=strategy == "selective", offload_policy=offload,
                                   preserve_rng_state=preserve_rng_state, sac_hooks=_SAC_HOOKS)
    module = owning_module(function)
    frozen = module is not None and _is_frozen(module)
    inputs_need_grad = _any_tensor_requires_grad(args, kwargs, partial_keywords(function))
    if only_trainable and frozen and not inputs_need_grad:  # no_gradient_reaches, each part computed once
        counters.record_checkpoint(module, "frozen")
        return function(*args, **kwargs)

    if strategy == "selective" and getattr(module, "_compiled_call_impl", None) is not None:
        # Compiled code writes into buffers it reuses (out= kernels), which the selective policy
        # would have cached for backward: torch raises "Tensor cached during selective activation
        # checkpoint has been mutated".
        warnings.warn(f"torchgc.checkpoint: strategy 'selective' cannot apply its policy inside {type(module).__name__}, "
                      "compiled with .compile(); checkpointing the layer whole instead. For selective, compile the layer "
                      "as layers[i] = torch.compile(layer), where the compiler applies the policy", stacklevel=2)
        strategy = "checkpoint"
    if strategy == "selective":
        if "context_fn" in kwargs:
            raise ValueError("torchgc.checkpoint: argument 'context_fn' cannot be combined with strategy 'selective', "
                             f"which brings its own; got context_fn={kwargs['context_fn']!r}")
        if use_reentrant:
            # One warning per process under Python's default filter: the call site is always this line.
            warnings.warn("torchgc.checkpoint: strategy 'selective' is built on torch's selective checkpoint contexts, which "
                          "only the non-reentrant form supports; using non-reentrant checkpointing for these layers", stacklevel=2)
            use_reentrant = False
        counters.record_checkpoint(module, "selective")
        return torch.utils.checkpoint.checkpoint(
            function, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state,
            context_fn=selective.context_fn, **_SAC_HOOKS, **kwargs
        )

    if use_reentrant and module is not None and not frozen and not inputs_need_grad:
        args = _with_an_input_requiring_grad(args)
    reason = _reentrant_would_fail(args, module) if use_reentrant else None
    if reason:
        warnings.warn(f"torchgc.checkpoint: {reason}; using the non-reentrant form for this layer", stacklevel=2)
        use_reentrant = False

    lifted = []
    if use_reentrant:
        function, args, lifted = _lift_tensor_kwargs(function, args, kwargs)
        kwargs = {}

    hooks = contextlib.nullcontext()
    if _should_offload(strategy, args, min_offload_bytes):
        keep = _parameter_pointers(module) | {t.data_ptr() for t in lifted}
        policy = OffloadPolicy(keep=frozenset(keep), **_offload_policy_arguments(strategy, min_offload_bytes, prefetch, max_host_bytes))
        hooks = offload_hooks(policy)
    counters.record_checkpoint(module, "checkpoint" if isinstance(hooks, contextlib.nullcontext) else "offload")
    with hooks:
        return torch.utils.checkpoint.checkpoint(
            function, *args, use_reentrant=use_reentrant, preserve_rng_state=preserve_rng_state, **kwargs
        )


def owning_module(function: Callable) -> Optional[torch.nn.Module]:
    """The module a layer call belongs to: a module itself, a bound method of one, or either inside
    functools.partial (transformers' GradientCheckpointingLayer passes
    ``partial(super().__call__, **kwargs)``; LLaMA-Factory issue #7699), or the module bound as
    the first argument of a partial (transformers 5.23 passes ``partial(forward, self, **kwargs)``)."""
    while isinstance(function, functools.partial):
        if function.args and isinstance(function.args[0], torch.nn.Module) and _bound_module(function.func) is None:
            return function.args[0]
        function = function.func
    return _bound_module(function)


def _bound_module(function: Callable) -> Optional[torch.nn.Module]:
    if isinstance(function, torch.nn.Module):
        return function
    owner = getattr(function, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


# Every keyword a checkpoint call may carry that configures the checkpoint (torchgc's and torch's);
# the others are the layer's own.
CHECKPOINT_KEYS = frozenset(
    name
    for fn in (checkpoint, torch.utils.checkpoint.checkpoint)
    for name, p in inspect.signature(fn).parameters.items()
    if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) and name != "function"
)

_ACCELERATORS = frozenset({"cuda", "xpu", "hpu", "mtia", "privateuseone"})
# Where torch has the switch, the outputs selective keeps pass through the saved-tensor hooks around
# the layer (save_on_cpu, a memory counter) like every other saved tensor; torch's old default
# bypasses them, and warns that it will change.
_SAC_HOOKS = (
    {"respect_saved_tensors_hooks": True}
    if "respect_saved_tensors_hooks" in inspect.signature(torch.utils.checkpoint.checkpoint).parameters else {}
)


def _check_arguments(strategy, flags, min_offload_bytes, max_host_bytes) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"torchgc.checkpoint: argument 'strategy' must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"torchgc.checkpoint: argument '{name}' must be True or False; got {value!r}")
    for name, value in (("min_offload_bytes", min_offload_bytes), ("max_host_bytes", max_host_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"torchgc.checkpoint: argument '{name}' must be None or an int >= 0; got {value!r}")


def no_gradient_reaches(module: torch.nn.Module, function: Callable, args: tuple, kwargs: dict) -> bool:
    """True for a layer call that builds no graph: every parameter frozen, no input requiring grad."""
    return _is_frozen(module) and not _any_tensor_requires_grad(args, kwargs, partial_keywords(function))


def _is_frozen(module: torch.nn.Module) -> bool:
    # A parameter-free block (an attention core, an activation stack) is not frozen: its
    # activations are as large as any layer's, and checkpointing it saves them.
    has_parameters = False
    for p in module.parameters():
        if p.requires_grad:
            return False
        has_parameters = True
    return has_parameters


def _reentrant_would_fail(args, module: Optional[torch.nn.Module]) -> Optional[str]:
    """Why reentrant checkpointing would go wrong for this call, if it would; the non-reentrant
    form gives the correct gradients in both cases."""
    if module is not None and not _is_frozen(module) and not _any_tensor_requires_grad(args):
        # Reentrant checkpoint drops every parameter gradient when no input requires grad, and this
        # layer has no floating-point input to lend one (see _with_an_input_requiring_grad).
        return "no input requires grad, so reentrant checkpointing would lose the layer's parameter gradients"
    for check in _reentrant_checks:
        reason = check(module)
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


def _any_tensor_requires_grad(*trees) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in pytree.tree_leaves(trees))


def partial_keywords(function: Callable) -> list:
    """The keywords bound by functools.partial around ``function`` (transformers binds a layer's
    keyword inputs that way)."""
    keywords = []
    while isinstance(function, functools.partial):
        keywords.append(function.keywords)
        function = function.func
    return keywords


def _should_offload(strategy: str, args, min_offload_bytes: Optional[int]) -> bool:
    if strategy == "checkpoint":
        return False
    if strategy == "offload":
        return True
    threshold = DEFAULT_MIN_OFFLOAD_BYTES if min_offload_bytes is None else min_offload_bytes
    return any(
        isinstance(a, torch.Tensor) and a.device.type in _ACCELERATORS and a.numel() * a.element_size() >= threshold
        for a in args
    )


def _offload_policy_arguments(strategy: str, min_offload_bytes: Optional[int], prefetch: bool, max_host_bytes: Optional[int]) -> dict:
    return {
        "min_bytes": DEFAULT_MIN_OFFLOAD_BYTES if min_offload_bytes is None else min_offload_bytes,
        "devices": None if strategy == "offload" else _ACCELERATORS,
        "prefetch": prefetch,
        "max_host_bytes": max_host_bytes,
    }


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
