"""torchgc's checkpoint while torch.compile traces it (a compiled layer, or a compiled model).

Dynamo turns torch's non-reentrant checkpoint into one higher-order op (tag_activation_checkpoint)
whose body it traces whole, and the compiler recomputes that body in backward. So inside a
compiled region every strategy becomes that op: the layer body is compiled, not run eager. The
reentrant form has no compiled counterpart; gradients are the same either way. selective passes
its policy to the compiler. A memory budget cannot measure layers inside a compiled region: the
planner checkpoints them whole, with a warning once.

Saved-tensor hooks are not traced (pytorch #148222), but a compiled graph saves its tensors at
run time through whatever hooks are active then. So for offload, two calls that dynamo runs eagerly
(one graph break each) push torchgc's hooks before the layer's graph and pop them after it: the
inputs the graph keeps for its recompute go to the host as in eager. An exception between the two
leaves the hooks pushed; the next region removes them before it pushes its own. Those are the
only graph breaks torchgc makes; checkpoint and selective make none.

The forms, as tests/test_compile.py checks them (the ops dynamo captures per layer equal those of
the layer compiled without checkpointing; no recompile after the first step):
- layers[i] = torch.compile(layer) (torchtitan's form, regional) or torch.compile(model): the
  compiled region contains torchgc's call, which comes here;
- layer.compile(): the layer's body is compiled and torchgc's checkpoint runs eagerly around it,
  exactly as without compile. selective cannot work this way (the compiled kernels write into
  buffers they reuse, which the policy would have cached), so such a layer is checkpointed whole,
  with a warning (torchgc.modes.usable_strategy).
"""

import inspect
import threading
from typing import Callable, Optional

import torch
import torch.utils.checkpoint

from torchgc import selective
from torchgc.offload import OffloadPolicy, offload_hooks

# Where torch has the switch, the outputs selective keeps pass through the saved-tensor hooks around
# the layer (save_on_cpu, a memory counter) like every other saved tensor; torch's old default
# bypasses them, and warns that it will change.
SAC_HOOKS = (
    {"respect_saved_tensors_hooks": True}
    if "respect_saved_tensors_hooks" in inspect.signature(torch.utils.checkpoint.checkpoint).parameters else {}
)


def checkpoint(function: Callable, args: tuple, kwargs: dict, *, selective_policy: bool, offload: Optional[OffloadPolicy],
               torch_kwargs: dict):
    """One checkpointed layer call inside a compiled region; offload: the policy to offload with,
    or None not to offload."""
    extra = {"context_fn": selective.context_fn, **SAC_HOOKS} if selective_policy else {}
    if offload is not None:
        _begin_offload(offload)
    out = torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **extra, **torch_kwargs, **kwargs)
    if offload is not None:
        _end_offload()
    return out


class _OpenRegions(threading.local):
    def __init__(self):
        self.hooks = []  # offload_hooks pushed by _begin_offload and not yet popped


_open = _OpenRegions()


@torch._dynamo.disable(reason="torchgc offload pushes its saved-tensor hooks eagerly, around the compiled layer")
def _begin_offload(policy: OffloadPolicy) -> None:
    _close_abandoned_regions()
    hooks = offload_hooks(policy)
    hooks.__enter__()
    _open.hooks.append(hooks)


@torch._dynamo.disable(reason="torchgc offload pops its saved-tensor hooks eagerly, after the compiled layer")
def _end_offload() -> None:
    _open.hooks.pop().__exit__(None, None, None)


def _close_abandoned_regions() -> None:
    """Regions do not nest, so one still open here was left by an exception raised inside it. Its
    hooks are the innermost (every `with` inside it has unwound): pop them, without offloading."""
    while _open.hooks:
        hooks = _open.hooks.pop()
        top = torch._C._autograd._top_saved_tensors_default_hooks(True)
        if top is not None and top[0] == hooks.pack:
            hooks.__exit__(RuntimeError, RuntimeError("abandoned"), None)
