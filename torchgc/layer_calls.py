"""What torchgc reads from one layer call before it checkpoints it: the module the call belongs
to, and whether any gradient reaches it.

A layer call arrives as a function: a module, a bound method of one, or a wrapper that a training
stack builds around either. Wrappers are each stack's own business, so integrations teach this
module theirs with add_module_finder (transformers' partials are in torchgc.integrations).
"""

import functools
from typing import Callable, List, Optional

import torch
from torch.utils import _pytree as pytree

ModuleFinder = Callable[[Callable], Optional[torch.nn.Module]]
_module_finders: List[ModuleFinder] = []


def add_module_finder(finder: ModuleFinder) -> None:
    """Registers ``finder(function) -> module or None`` for layer-call shapes that are neither a
    module nor a bound method of one. Registering the same finder twice has no effect."""
    if finder not in _module_finders:
        _module_finders.append(finder)


def owning_module(function: Callable) -> Optional[torch.nn.Module]:
    """The module a layer call belongs to, or None when no registered finder knows its shape."""
    module = bound_module(function)
    if module is not None:
        return module
    for finder in _module_finders:
        module = finder(function)
        if module is not None:
            return module
    return None


def bound_module(function: Callable) -> Optional[torch.nn.Module]:
    """``function`` itself when it is a module, the module a bound method belongs to, else None."""
    if isinstance(function, torch.nn.Module):
        return function
    owner = getattr(function, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def partial_keywords(function: Callable) -> list:
    """The keywords bound by functools.partial around ``function`` (a layer's keyword inputs can
    be bound that way)."""
    keywords = []
    while isinstance(function, functools.partial):
        keywords.append(function.keywords)
        function = function.func
    return keywords


def is_frozen(module: torch.nn.Module) -> bool:
    """True for a module with parameters, none of which requires grad. A parameter-free block (an
    attention core, an activation stack) is not frozen: its activations are as large as any
    layer's, and checkpointing it saves them."""
    has_parameters = False
    for p in module.parameters():
        if p.requires_grad:
            return False
        has_parameters = True
    return has_parameters


def any_tensor_requires_grad(*trees) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in pytree.tree_leaves(trees))


def no_gradient_reaches(module: torch.nn.Module, function: Callable, args: tuple, kwargs: dict) -> bool:
    """True for a layer call that builds no graph: every parameter frozen, no input requiring grad."""
    return is_frozen(module) and not any_tensor_requires_grad(args, kwargs, partial_keywords(function))
