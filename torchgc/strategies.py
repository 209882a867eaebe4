"""torchgc's checkpoint: the object on a model's layers, and torchgc.checkpoint for one call.

A LayerCheckpoint is built once, from resolved options (config.Options), the keywords it passes to
torch's checkpoint, and optionally a chooser of modes (torchgc.planner's Planner under a memory
budget). transformers calls it as it calls torch.utils.checkpoint.checkpoint, once per layer call:
it runs the call as is where no gradient is wanted, takes the layer's mode (the strategy option,
or the chooser's), and hands the call to torchgc.modes, which ends in torch's checkpoint.
torchgc.checkpoint(function, *args, **options) checks its options and builds the same object for
that one call. Inside a region torch.compile traces, the call goes to torchgc.compiled.
"""

import inspect
from typing import Callable, Mapping, Optional, Protocol

import torch
import torch.utils.checkpoint

from torchgc import compiled, config, counters, modes
from torchgc.layer_calls import any_tensor_requires_grad, is_frozen, owning_module, partial_keywords
from torchgc.offload import ACCELERATORS, OffloadPolicy

# The keywords of torch's checkpoint that torchgc passes through (use_reentrant is an option).
TORCH_CHECKPOINT_KEYS = frozenset(
    name for name, p in inspect.signature(torch.utils.checkpoint.checkpoint).parameters.items()
    if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) and name not in ("function", "use_reentrant")
)
# Every keyword a checkpoint call may carry that configures the checkpoint; the others are the layer's own.
CHECKPOINT_KEYS = frozenset(config.CALL_OPTIONS) | TORCH_CHECKPOINT_KEYS


class Chooser(Protocol):
    """Gives each layer call a mode (a strategy, or "none": run it as is) while the layers' object
    runs; torchgc.planner.Planner is one."""

    def mode(self, module: Optional[torch.nn.Module], function: Callable, args: tuple, kwargs: dict) -> Optional[str]:
        """The mode of this call, or None to checkpoint it and then call measure() with it."""

    def measure(self, module: Optional[torch.nn.Module], function: Callable, args: tuple, kwargs: dict) -> None:
        ...

    def when_compiled(self) -> str:
        """The strategy for a call inside a compiled region, where nothing can be measured."""


class LayerCheckpoint:
    """The checkpoint function that torchgc puts on a model's layers; called as torch's checkpoint.

    ``options``: resolved options (use_reentrant a bool; the CALL_OPTIONS are read). ``torch_kwargs``:
    keywords for torch's checkpoint (preserve_rng_state, context_fn, ...). ``chooser``: gives each
    call its mode; None runs every call in the strategy option's. ``func`` and ``keywords`` say what
    a call amounts to, as a functools.partial would: torchgc.checkpoint with these keywords (the
    chooser, if any, picks each layer's strategy within keywords["strategy"]).
    """

    def __init__(self, options: config.Options, torch_kwargs: Optional[Mapping] = None, chooser: Optional[Chooser] = None):
        self.options = options
        self.torch_kwargs = dict(torch_kwargs or {})
        self.chooser = chooser
        self.keywords = {**{name: getattr(options, name) for name in config.CALL_OPTIONS}, **self.torch_kwargs}
        self._offload_policies = _offload_policies(options)

    @property
    def func(self) -> Callable:
        return checkpoint

    def __repr__(self) -> str:
        chooser = "" if self.chooser is None else f", chooser={self.chooser!r}"
        return f"LayerCheckpoint({', '.join(f'{k}={v!r}' for k, v in self.keywords.items())}{chooser})"

    def __call__(self, function: Callable, *args, **kwargs):
        if kwargs and not CHECKPOINT_KEYS.isdisjoint(kwargs):
            layer_kwargs = {k: v for k, v in kwargs.items() if k not in CHECKPOINT_KEYS}
            return self._with_call_keywords(kwargs)(function, *args, **layer_kwargs)
        if not torch.is_grad_enabled():
            return function(*args, **kwargs)
        if torch.compiler.is_compiling():
            # Inline, not in a method of its own: each frame between the compiled layer and offload's
            # eager calls (torchgc.compiled) costs one more graph break.
            strategy = self.options.strategy if self.chooser is None else self.chooser.when_compiled()
            policy = None if strategy == "selective" else self._offload_policies.get(strategy)
            return compiled.checkpoint(function, args, kwargs, selective_policy=strategy == "selective",
                                       offload=policy if modes.wants_offload(policy, args) else None, torch_kwargs=self.torch_kwargs)
        module = owning_module(function)
        mode = self.options.strategy if self.chooser is None else self.chooser.mode(module, function, args, kwargs)
        if mode == "none":
            return function(*args, **kwargs)
        out = self._checkpointed("checkpoint" if mode is None else mode, module, function, args, kwargs)
        if mode is None:
            self.chooser.measure(module, function, args, kwargs)
        return out

    def _checkpointed(self, strategy: str, module: Optional[torch.nn.Module], function: Callable, args: tuple, kwargs: dict):
        frozen = module is not None and is_frozen(module)
        inputs_need_grad = any_tensor_requires_grad(args, kwargs, partial_keywords(function))
        if self.options.only_trainable and frozen and not inputs_need_grad:  # no_gradient_reaches, each part computed once
            counters.record_checkpoint(module, "frozen")
            return function(*args, **kwargs)
        strategy = modes.usable_strategy(strategy, module)
        if strategy == "selective":
            return modes.run_selective(function, args, kwargs, module=module, use_reentrant=self.options.use_reentrant,
                                       torch_kwargs=self.torch_kwargs)
        return modes.run_recompute(function, args, kwargs, module=module, frozen=frozen, inputs_need_grad=inputs_need_grad,
                                   use_reentrant=self.options.use_reentrant, torch_kwargs=self.torch_kwargs,
                                   offload=self._offload_policies.get(strategy))

    def _with_call_keywords(self, kwargs: dict) -> "LayerCheckpoint":
        """This object with the checkpoint keywords a call passes itself taking precedence, as they
        would over a partial's."""
        arguments = {**self.keywords, **{k: v for k, v in kwargs.items() if k in CHECKPOINT_KEYS}}
        options = config.call_options("torchgc.checkpoint", arguments)
        return LayerCheckpoint(options, {k: v for k, v in arguments.items() if k in TORCH_CHECKPOINT_KEYS}, self.chooser)


def _offload_policies(options: config.Options) -> dict:
    """The offload policy of each strategy that offloads."""
    min_bytes = config.DEFAULT_MIN_OFFLOAD_BYTES if options.min_offload_bytes is None else options.min_offload_bytes
    common = dict(min_bytes=min_bytes, prefetch=options.prefetch, max_host_bytes=options.max_host_bytes)
    return {"offload": OffloadPolicy(devices=None, **common), "auto": OffloadPolicy(devices=ACCELERATORS, **common)}


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
    Other keywords of torch.utils.checkpoint.checkpoint (context_fn, ...) pass through to it.
    Inside a region that torch.compile traces, see torchgc.compiled.
    """
    arguments = dict(strategy=strategy, use_reentrant=use_reentrant, preserve_rng_state=preserve_rng_state, only_trainable=only_trainable,
                     prefetch=prefetch, min_offload_bytes=min_offload_bytes, max_host_bytes=max_host_bytes)
    options = config.call_options("torchgc.checkpoint", arguments)
    torch_kwargs = {"preserve_rng_state": preserve_rng_state, **{k: v for k, v in kwargs.items() if k in TORCH_CHECKPOINT_KEYS}}
    layer_kwargs = {k: v for k, v in kwargs.items() if k not in TORCH_CHECKPOINT_KEYS}
    return LayerCheckpoint(options, torch_kwargs)(function, *args, **layer_kwargs)
