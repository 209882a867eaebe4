"""What transformers records inside a layer while a model's forward runs, and why reentrant
checkpointing of that layer would lose its gradient.

transformers collects some outputs of submodules (router logits, attention weights, hidden states)
as the submodules produce them, not from the layers' return values:
- 5.x: forward hooks (output_capturing_hook, from transformers.utils.output_capturing) that append
  to the collector a model's forward sets for the outputs asked for (output_router_logits, ...);
- 4.57: check_model_inputs replaces each recorded module's forward, for the duration of the model's
  forward, with a wrapper (wrapped_forward) that appends its output.
Reentrant checkpointing runs the layer's forward under no_grad, so what is collected there has no
graph: a loss built from it (the MoE load-balancing loss from the router logits) sends no gradient
back to the routers or anything below them. reentrant_records names what would be collected, for
torchgc.modes.add_reentrant_check, so that such a call runs non-reentrant, where the gradients
equal those without checkpointing.
"""

import functools
import sys
import weakref
from typing import Callable, Optional

import torch

_CAPTURING = "transformers.utils.output_capturing"
_inner = weakref.WeakKeyDictionary()  # layer -> its submodules, the layer itself excluded


def reentrant_records(module: Optional[torch.nn.Module], function: Optional[Callable] = None) -> Optional[str]:
    """Why reentrant checkpointing of this layer call would lose gradients: transformers collects
    outputs from inside it during the forward running now (None: it does not)."""
    if module is None:
        return None
    modules = _inner_modules(module) + ((module,) if _runs_own_hooks(module, function) else ())
    capturing = sys.modules.get(_CAPTURING)
    keys = _hooked_keys(capturing, modules) if capturing is not None else _wrapped_keys(modules)
    if not keys:
        return None
    return (f"transformers collects {', '.join(sorted(keys))} from inside {type(module).__name__} during this forward, and "
            "under reentrant checkpointing what it collects would carry no gradient (a load-balancing loss built from "
            "router logits would send none back to the routers)")


def _hooked_keys(capturing, modules) -> set:
    collector = capturing._active_collector.get()
    if not collector:
        return set()
    keys = set()
    for m in modules:
        for hook in m._forward_hooks.values():
            if getattr(hook, "__module__", None) == _CAPTURING and getattr(hook, "__name__", None) == "output_capturing_hook":
                keys.add(_closure_value(hook, "key"))
    return keys & set(collector)


def _wrapped_keys(modules) -> set:
    keys = set()
    for m in modules:
        forward = m.__dict__.get("forward")
        if getattr(getattr(forward, "__code__", None), "co_name", None) == "wrapped_forward":
            keys.add(_closure_value(forward, "key"))
    keys.discard(None)
    return keys


def _closure_value(function: Callable, name: str):
    code = function.__code__
    if name not in code.co_freevars:
        return None
    return function.__closure__[code.co_freevars.index(name)].cell_contents


def _inner_modules(module: torch.nn.Module) -> tuple:
    found = _inner.get(module)
    if found is None:
        found = _inner[module] = tuple(m for m in module.modules() if m is not module)
    return found


def _runs_own_hooks(module: torch.nn.Module, function: Optional[Callable]) -> bool:
    """Whether the call runs ``module``'s own hooks (and forward) inside the checkpoint: transformers
    4.57 to 5.6 pass partial(layer.__call__, ...); 5.23 passes partial(forward, layer, ...), and the
    layer's hooks run outside the checkpoint."""
    while isinstance(function, functools.partial):
        function = function.func
    if function is module:
        return True
    return getattr(function, "__self__", None) is module and getattr(function, "__name__", "") in ("__call__", "_wrapped_call_impl", "_call_impl")
