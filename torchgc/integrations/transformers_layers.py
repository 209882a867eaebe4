"""A transformers model's decoder layers, the function they checkpoint with, and what torchgc's
checkpointing does to them (explain).

transformers calls a layer's checkpoint function as ``func(partial(layer.__call__, **kwargs),
*args)`` (GradientCheckpointingLayer) or, from 5.23, ``func(partial(forward, layer, **kwargs),
*args)``; layer_module finds the layer in either, for torchgc.layer_calls (the front door
registers it there).
"""

import functools
from typing import Callable, List, Optional

import torch

from torchgc import planner, strategies
from torchgc.layer_calls import bound_module


def decoder_layers(model) -> list:
    """The model's decoder layers in call order: its transformers GradientCheckpointingLayer modules
    (the layers transformers counts for every_n_layers), or in a model without them (written before
    transformers had them) the modules of its longest ModuleList."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        GradientCheckpointingLayer = None
    if GradientCheckpointingLayer is not None:
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if layers:
            return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    return list(max(lists, key=len)) if lists else []


def layer_module(function: Callable) -> Optional[torch.nn.Module]:
    """The layer a call from transformers belongs to, found inside its partials (transformers'
    GradientCheckpointingLayer passes ``partial(super().__call__, **kwargs)``, see LLaMA-Factory
    issue #7699; transformers 5.23 passes ``partial(forward, self, **kwargs)``)."""
    while isinstance(function, functools.partial):
        if function.args and isinstance(function.args[0], torch.nn.Module) and bound_module(function.func) is None:
            return function.args[0]
        function = function.func
    return bound_module(function)


def is_torchgc_function(function) -> bool:
    """True for a checkpoint function that torchgc's enable installed."""
    return isinstance(function, strategies.LayerCheckpoint)


def checkpoint_functions(model) -> List[Callable]:
    """The distinct functions the model's checkpointing modules call (their
    _gradient_checkpointing_func), in module order; [] when checkpointing is off."""
    found = {}
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            found.setdefault(id(m._gradient_checkpointing_func), m._gradient_checkpointing_func)
    return list(found.values())


def describe(function: Callable) -> str:
    """``module.name(keyword=value, ...)`` for a checkpoint function: a functools.partial
    (transformers' own) or torchgc's LayerCheckpoint, named after its chooser if it has one."""
    target = getattr(function, "chooser", None) or getattr(function, "func", function)
    name = f"{target.__module__}.{getattr(target, '__qualname__', type(target).__qualname__)}"
    if not hasattr(function, "keywords"):
        return name
    return name + "(" + ", ".join(f"{k}={v!r}" for k, v in sorted(function.keywords.items())) + ")"


def explain(model) -> dict:
    """What torchgc's checkpointing does to ``model``'s layers: the options in force and, under a
    memory budget, the plan per input shape (each layer's mode with its measured bytes and time)."""
    functions = checkpoint_functions(model)
    if not functions:
        return {"checkpointing": None}
    described = " | ".join(sorted(describe(f) for f in functions))
    function = functions[0]
    if not is_torchgc_function(function):
        return {"checkpointing": f"not torchgc: {function!r}", "checkpointed_with": described}
    explained = {"checkpointing": "torchgc", "checkpointed_with": described, "options": dict(function.keywords),
                 "checkpointed_layers": [i for i, m in enumerate(decoder_layers(model)) if getattr(m, "gradient_checkpointing", False)]}
    if isinstance(function.chooser, planner.Planner):
        explained.update(function.chooser.explain())
    return explained
