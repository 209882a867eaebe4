"""Routing replay: in the recompute, an MoE layer sends each token to the experts its forward chose.

A router picks experts with torch.topk (or argmax) over its scores. GPU kernels in bf16 are not
bitwise reproducible, so a recomputed router can choose other experts for near-ties: the recompute
then computes another layer than the forward did (a CheckpointError on metadata, or silently wrong
gradients). So torchgc keeps each routing decision of a checkpointed layer call (the indices the
forward's topk or argmax returned) and, in every recompute of that call, returns them again. topk's
values are read from the recomputed scores at those indices, with topk's own backward (the gradient
scattered to those indices) and the same tensor saved for it, so the recompute builds the forward's
graph. Every strategy replays, reentrant included; a layer compiled with .compile() does not.

Where: in the routers of the layer (a module named gate, router or router_gate, or whose class name
contains Router or Gating) and in the code of the blocks that hold them (an MoE block's own code
picks the experts in DeepSeek-V3's family), through a TorchFunctionMode entered for the call and
left inside the blocks' other children (the experts), by hooks that live as long as the call. A
layer without routers is called as is: the only cost is one lookup per call.

Memory: the indices, int16 where the scores have at most 32767 experts (int32 otherwise), kept
until the layer's backward: B * S * k * 2 bytes per router call for B sequences of S tokens routed
to k experts each (DeepSeek-V3's group choice adds B * S * topk_group * 2).
"""

import contextlib
import re
import weakref
from typing import Callable, Optional

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode
from torch.utils._python_dispatch import _disable_current_modes, _len_torch_dispatch_stack

from torchgc import counters

_ROUTER_CLASS = re.compile(r"Router|Gating")
_ROUTER_NAMES = frozenset({"gate", "router", "router_gate"})
_DECISIONS = {torch.topk: "topk", torch.Tensor.topk: "topk", torch.argmax: "argmax", torch.Tensor.argmax: "argmax"}
_plans = weakref.WeakKeyDictionary()  # layer -> _Plan, or None for a layer without routers


class _Plan:
    """Where a layer's routing decisions are made. The mode is entered by the routers and by the
    blocks that hold them (``entries``; the layer itself by the call, when it holds a router), and
    left inside the blocks' other children (``paused``)."""

    def __init__(self, layer: torch.nn.Module, routers: list):
        modules = dict(layer.named_modules())
        routers = [name for name in routers if not any(name.startswith(other + ".") for other in routers)]
        blocks = {modules[name.rpartition(".")[0]] for name in routers}
        router_modules = {modules[name] for name in routers}
        self.layer_name = type(layer).__name__
        self.layer_holds_router = layer in blocks
        self.entries = tuple((blocks - {layer}) | router_modules)
        self.paused = tuple(m for block in blocks for child in block.children() if child not in router_modules for m in _called(child))


def _called(module: torch.nn.Module) -> list:
    """The modules that run when code reaches for ``module``: a ModuleList or ModuleDict is never
    called itself (its hooks would not fire), its members are."""
    if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
        return [m for child in module.children() for m in _called(child)]
    return [module]


def plan(module: Optional[torch.nn.Module]) -> Optional[_Plan]:
    """The layer's routing plan, found once per layer; None where there is nothing to replay."""
    if module is None:
        return None
    try:
        return _plans[module]
    except KeyError:
        pass
    found = None
    if getattr(module, "_compiled_call_impl", None) is None:  # modes and per-call hooks would recompile a compiled layer
        routers = [name for name, m in module.named_modules() if m is not module and _is_router(name, m)]
        found = _Plan(module, routers) if routers else None
    _plans[module] = found
    return found


def _is_router(name: str, module: torch.nn.Module) -> bool:
    return name.rsplit(".", 1)[-1] in _ROUTER_NAMES or _ROUTER_CLASS.search(type(module).__name__) is not None


def replayed(function: Callable, module: Optional[torch.nn.Module]) -> Callable:
    """``function`` itself for a layer without routers; else a function whose first call records the
    routing decisions and whose later calls (the recomputes) replay them."""
    layer_plan = plan(module)
    if layer_plan is None:
        return function
    decisions = _Decisions(layer_plan.layer_name)

    def with_routing(*args, **kwargs):
        decisions.start()
        with _Scope(layer_plan, _Routing(decisions)):
            out = function(*args, **kwargs)
        decisions.finish()
        return out

    return with_routing


class _Decisions:
    """One layer call's routing decisions: recorded by its first call, replayed by every later one."""

    def __init__(self, layer_name: str):
        self.layer_name = layer_name
        self.kept = []  # (kind, shape of the scores, indices)
        self.calls = 0
        self.replaying = False
        self.next = 0

    def start(self) -> None:
        self.replaying, self.next = self.calls > 0, 0
        self.calls += 1

    def finish(self) -> None:
        if self.replaying and self.next != len(self.kept):
            raise RuntimeError(f"torchgc.checkpoint: the recompute of {self.layer_name} made {self.next} routing decisions, and its "
                               f"forward made {len(self.kept)}: the layer does not run the same code in its recompute")

    def record(self, func, args: tuple, kwargs: dict):
        out = func(*args, **kwargs)
        kind, scores, dim = _DECISIONS[func], args[0], _dim(func, args, kwargs)
        with _unseen():
            indices = _compact(out.indices if kind == "topk" else out, scores.numel() if dim is None else scores.shape[dim])
        self.kept.append((kind, scores.shape, indices))
        counters.add("routing_bytes_kept", indices.numel() * indices.element_size())
        return out

    def replay(self, func, args: tuple, kwargs: dict):
        kind, scores = _DECISIONS[func], args[0]
        if self.next >= len(self.kept) or self.kept[self.next][:2] != (kind, scores.shape):
            made = [f"{k} over {list(shape)}" for k, shape, _ in self.kept]
            raise RuntimeError(f"torchgc.checkpoint: the recompute of {self.layer_name} asked for routing decision {self.next + 1}, "
                               f"{kind} over {list(scores.shape)}, and its forward made {made}")
        kept = self.kept[self.next][2]
        self.next += 1
        counters.add("routing_decisions_replayed")
        with _unseen():
            indices = kept.long()
        if kind == "argmax":
            return indices
        return torch.return_types.topk((_Chosen.apply(scores, indices, _dim(func, args, kwargs)), indices))


def _unseen():
    """Where torchgc's own ops run unseen by the dispatch modes around the layer (a selective
    checkpoint's cache counts the layer's ops, and these are none of them)."""
    return _disable_current_modes() if _len_torch_dispatch_stack() else contextlib.nullcontext()


def _dim(func, args: tuple, kwargs: dict) -> Optional[int]:
    """The dim argument of topk(input, k, dim=-1, ...) or argmax(input, dim=None, ...)."""
    position, default = (2, -1) if _DECISIONS[func] == "topk" else (1, None)
    return args[position] if len(args) > position else kwargs.get("dim", default)


def _compact(indices: torch.Tensor, span: int) -> torch.Tensor:
    """The indices in the smallest integer type that holds an index below ``span``."""
    dtype = torch.int16 if span <= torch.iinfo(torch.int16).max else torch.int32 if span <= torch.iinfo(torch.int32).max else indices.dtype
    return indices.to(dtype)


class _Chosen(torch.autograd.Function):
    """topk's values at given indices, with topk's backward (the gradient scattered into zeros at the
    indices) and, as topk, the indices saved for it: the recompute's graph is the forward's."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, indices: torch.Tensor, dim: int):
        ctx.save_for_backward(indices)
        ctx.dim, ctx.shape = dim, scores.shape
        with _unseen():
            return scores.gather(dim, indices)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (indices,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).scatter(ctx.dim, indices, grad), None, None


class _Routing(TorchFunctionMode):
    """Sends topk and argmax to the layer call's decisions; every other function runs as is."""

    def __init__(self, decisions: _Decisions):
        super().__init__()
        self.decisions = decisions

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DECISIONS and args and "out" not in kwargs:
            decisions = self.decisions
            return decisions.replay(func, args, kwargs) if decisions.replaying else decisions.record(func, args, kwargs)
        return func(*args, **kwargs)


class _Scope:
    """The mode for one layer call: entered by the plan's entries (and by the call itself where the
    layer holds a router), left inside its paused modules, through hooks that live as long as the call."""

    def __init__(self, layer_plan: _Plan, mode: _Routing):
        self.plan, self.mode = layer_plan, mode
        self.handles = []
        self.changed = []  # per hooked module being run: whether its pre-hook entered or left the mode

    def __enter__(self):
        for module in self.plan.entries:
            self.handles += [module.register_forward_pre_hook(self._enter, prepend=True),
                             module.register_forward_hook(self._leave, always_call=True)]
        for module in self.plan.paused:
            self.handles += [module.register_forward_pre_hook(self._pause, prepend=True),
                             module.register_forward_hook(self._resume, always_call=True)]
        if self.plan.layer_holds_router:
            self.mode.__enter__()
        return self

    def __exit__(self, *exc_info):
        try:
            if self.plan.layer_holds_router:
                self.mode.__exit__(*exc_info)
        finally:
            for handle in self.handles:
                handle.remove()
        return False

    def _enter(self, module, args) -> None:
        entering = _get_current_function_mode() is not self.mode
        if entering:
            self.mode.__enter__()
        self.changed.append(entering)

    def _leave(self, module, args, output) -> None:
        if self.changed.pop():
            self.mode.__exit__(None, None, None)

    def _pause(self, module, args) -> None:
        leaving = _get_current_function_mode() is self.mode
        if leaving:
            self.mode.__exit__(None, None, None)
        self.changed.append(leaving)

    def _resume(self, module, args, output) -> None:
        if self.changed.pop():
            self.mode.__enter__()
