"""Per-layer checkpointing from a memory budget.

With ``memory_budget`` set, the layers' checkpoint function is a Planner. For each new input shape
it measures every layer during the first training step, then gives each layer one mode (none,
selective, checkpoint, offload) so that the predicted step time is smallest and the predicted
activation memory stays within the budget.

The measuring step runs every layer checkpointed (its gradients are those of any other step) and,
besides, runs each layer's forward twice more with grad on, under a forked RNG, and drops those
results: once counting the bytes autograd saves (mode none) and timing it (the recompute cost), once
counting the outputs that the selective policy would keep, timing those ops, and sampling after
every op the bytes the forward holds (its working set: what it saves plus its temporaries, which
every mode holds while the layer runs, and a recomputing mode again in backward). So that step
costs about three forwards per layer instead of two, and holds one layer's activations more at a
time. Gradients never differ from no checkpointing: every mode recomputes exactly.
"""

import dataclasses
import math
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from torchgc import selective, strategies

MODES = ("none", "selective", "checkpoint", "offload")
# Modes the planner may give a layer, by the strategy option: the strategy names the recompute.
ALLOWED_MODES = {
    "auto": MODES,
    "checkpoint": ("none", "checkpoint"),
    "selective": ("none", "selective"),
    "offload": ("none", "offload"),
}
# Shapes measured before new shorter ones reuse the plan of the nearest longer shape measured.
MAX_MEASURED_SHAPES = 8
_BYTE_UNITS = 2048  # the budget's resolution in the solver


class BudgetError(ValueError):
    """A memory budget below the smallest activation memory any plan reaches for this batch."""


@dataclasses.dataclass
class LayerCost:
    """One layer's measured costs at one input shape."""

    name: str
    kept_bytes: Dict[str, int]  # mode -> device bytes held for backward from forward until backward
    extra_seconds: Dict[str, float]  # mode -> time the mode adds to the step (recompute, copies)
    full_bytes: int  # everything the layer saves without checkpointing (= kept_bytes["none"])
    # The most bytes the layer's forward holds at once: its input, what it saves and its
    # temporaries (None: taken as full_bytes).
    working_bytes: Optional[int] = None

    def working(self) -> int:
        return self.full_bytes if self.working_bytes is None else self.working_bytes


@dataclasses.dataclass
class Plan:
    shape: Tuple
    budget_bytes: int
    layers: List[LayerCost]
    modes: List[str]
    predicted_bytes: int  # the layers' predicted activation peak (_peak)
    predicted_seconds: float

    def as_dict(self) -> dict:
        return {
            "shape": list(self.shape[0]), "dtype": self.shape[1], "budget_bytes": self.budget_bytes,
            "predicted_bytes": self.predicted_bytes, "predicted_extra_seconds": self.predicted_seconds,
            "no_checkpoint_bytes": no_checkpoint_peak(self.layers),
            "layers": [
                {"layer": i, "name": layer.name, "mode": mode, "kept_bytes": layer.kept_bytes[mode],
                 "extra_seconds": layer.extra_seconds[mode], "measured": {"kept_bytes": layer.kept_bytes, "extra_seconds": layer.extra_seconds}}
                for i, (layer, mode) in enumerate(zip(self.layers, self.modes))
            ],
        }


def budget_in_bytes(budget, layers: List[LayerCost]) -> int:
    """A fraction counts against the layers' peak activation bytes without checkpointing."""
    if isinstance(budget, float):
        return int(budget * no_checkpoint_peak(layers))
    return budget


def _peak(layers: List[LayerCost], modes: List[str]) -> int:
    """The predicted peak of the layers' activations, the layers in call order. Layer i holds its
    working set in its forward, and again in backward when it recomputes, while the layers before
    it hold their kept bytes (in backward, the layers after it hold nothing any more)."""
    peak = prefix = 0
    for layer, mode in zip(layers, modes):
        peak = max(peak, prefix + layer.working())
        prefix += layer.kept_bytes[mode]
    return max(peak, prefix)


def no_checkpoint_peak(layers: List[LayerCost]) -> int:
    return _peak(layers, ["none"] * len(layers))


def choose_modes(layers: List[LayerCost], budget_bytes: int, allowed: Tuple[str, ...]) -> Optional[List[str]]:
    """The modes of least predicted extra time whose predicted peak (_peak) fits budget_bytes, or
    None when none fits: a knapsack over the layers in order whose state is the bytes the layers
    before hold, solved exactly over the budget cut into _BYTE_UNITS (bytes rounded up, so the
    prediction only overstates). Layer i may run only from states leaving room for its working set."""
    fastest = [min((m for m in allowed if m in layer.kept_bytes), key=layer.extra_seconds.get) for layer in layers]
    if _peak(layers, fastest) <= budget_bytes:
        return fastest  # without rounding: budget 1.0 is no checkpointing
    unit = max(1.0, budget_bytes / _BYTE_UNITS)
    size = int(budget_bytes // unit) + 1
    if size <= 0:
        return None
    inf = float("inf")
    cost = torch.full((size,), inf, dtype=torch.float64)
    cost[0] = 0.0
    options, picks = [], []
    for layer in layers:
        room = (budget_bytes - layer.working()) // unit  # the largest state from which the layer fits
        if room < 0:
            return None
        cost[int(room) + 1:] = inf
        modes = [m for m in allowed if m in layer.kept_bytes]
        new_cost = torch.full((size,), inf, dtype=torch.float64)
        pick = torch.full((size,), -1, dtype=torch.int64)
        for index, mode in enumerate(modes):
            units = math.ceil(layer.kept_bytes[mode] / unit)
            if units >= size:
                continue
            candidate = torch.full((size,), inf, dtype=torch.float64)
            candidate[units:] = cost[: size - units] + layer.extra_seconds[mode]
            better = candidate < new_cost
            new_cost = torch.where(better, candidate, new_cost)
            pick = torch.where(better, torch.tensor(index), pick)
        cost = new_cost
        options.append(modes)
        picks.append(pick)
    used = int(torch.argmin(cost))
    if math.isinf(float(cost[used])):
        return None
    chosen = []
    for layer, layer_modes, pick in zip(reversed(layers), reversed(options), reversed(picks)):
        mode = layer_modes[int(pick[used])]
        chosen.append(mode)
        used -= math.ceil(layer.kept_bytes[mode] / unit)
    return chosen[::-1]


def smallest_peak(layers: List[LayerCost], allowed: Tuple[str, ...]) -> int:
    """The least predicted peak any plan reaches: every layer in its smallest mode."""
    return _peak(layers, [min((m for m in allowed if m in layer.kept_bytes), key=layer.kept_bytes.get) for layer in layers])


def make_plan(shape, layers: List[LayerCost], budget, allowed: Tuple[str, ...]) -> Plan:
    budget_bytes = budget_in_bytes(budget, layers)
    modes = choose_modes(layers, budget_bytes, allowed)
    if modes is None:
        smallest = smallest_peak(layers, allowed)
        total = no_checkpoint_peak(layers) or 1
        raise BudgetError(
            f"torchgc: memory_budget={budget!r} ({_mib(budget_bytes)}) is below the smallest activation memory this "
            f"model reaches on inputs of shape {list(shape[0])}: {_mib(smallest)}, a fraction {math.ceil(1000 * smallest / total) / 1000:.3f} of "
            f"its layers' {_mib(total)} without checkpointing (modes allowed: {', '.join(allowed)}); give a budget "
            f"of at least that"
        )
    seconds = sum(layer.extra_seconds[m] for layer, m in zip(layers, modes))
    return Plan(shape, budget_bytes, layers, modes, _peak(layers, modes), seconds)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


class Planner:
    """The checkpoint function of a model under a memory budget: called as torchgc.checkpoint is,
    it runs each layer in the mode its shape's plan gives it (measuring first, see the module)."""

    def __init__(self, budget, strategy: str):
        self.budget, self.strategy = budget, strategy
        self.allowed = ALLOWED_MODES[strategy]
        self.costs: Dict[Tuple, Dict[int, LayerCost]] = {}  # shape -> id(layer) -> cost, in call order
        self.plans: Dict[Tuple, Plan] = {}
        self._modes: Dict[Tuple, Dict[int, str]] = {}

    def __call__(self, function: Callable, *args, **kwargs):
        if torch.compiler.is_compiling():
            _warn_no_plan_when_compiled(self.strategy)
            return strategies.checkpoint(function, *args, **kwargs)
        module = strategies.owning_module(function)
        shape = _shape_key(args)
        if module is None or shape is None or not torch.is_grad_enabled():
            return strategies.checkpoint(function, *args, **kwargs)
        plan_modes = self._modes_for(shape, module)
        if plan_modes is None:
            out = strategies.checkpoint(function, *args, **{**kwargs, "strategy": "checkpoint"})
            self._measure(shape, module, function, args, kwargs)
            return out
        mode = plan_modes.get(id(module), "checkpoint")
        if mode == "none":
            return function(*args, **_layer_kwargs(kwargs))
        return strategies.checkpoint(function, *args, **{**kwargs, "strategy": mode})

    def explain(self) -> dict:
        return {"memory_budget": self.budget, "modes_allowed": list(self.allowed),
                "plans": [plan.as_dict() for plan in self.plans.values()],
                "measuring": [list(shape[0]) for shape in self.costs if shape not in self.plans]}

    def _modes_for(self, shape, module) -> Optional[Dict[int, str]]:
        if shape in self._modes:
            return self._modes[shape]
        measured = self.costs.get(shape)
        if measured and id(module) in measured:
            # The first layer measured is called again: the measuring step has seen every layer.
            plan = make_plan(shape, list(measured.values()), self.budget, self.allowed)
            self.plans[shape] = plan
            self._modes[shape] = dict(zip(measured.keys(), plan.modes))
            return self._modes[shape]
        if measured is None and len(self.costs) >= MAX_MEASURED_SHAPES:
            longer = [s for s in self._modes if _tokens(s) >= _tokens(shape)]
            if longer:
                return self._modes[min(longer, key=_tokens)]
        return None

    def _measure(self, shape, module, function, args, kwargs) -> None:
        layer_kwargs = _layer_kwargs(kwargs)
        name = type(module).__name__
        if strategies.no_gradient_reaches(module, function, args, layer_kwargs):
            cost = LayerCost(name, {"none": 0}, {"none": 0.0}, 0)  # it keeps nothing, whatever the mode
        else:
            cost = measure_layer(name, module, function, args, layer_kwargs)
        self.costs.setdefault(shape, {})[id(module)] = cost


_warned_compiled = False


# Under torch.compile this runs at trace time (no graph break).
@torch.compiler.assume_constant_result
def _warn_no_plan_when_compiled(strategy: str) -> bool:
    global _warned_compiled
    if _warned_compiled:
        return True
    _warned_compiled = True
    warnings.warn(
        f"torchgc: memory_budget plans come from measuring layers in eager mode, which a torch.compile region cannot do; "
        f"the compiled layers are checkpointed whole with strategy {strategy!r} instead, which fits any budget a plan "
        "can meet but recomputes every layer. For a plan, train without torch.compile; to compile, leave memory_budget out",
        stacklevel=2,
    )
    return True


def measure_layer(name: str, module: torch.nn.Module, function: Callable, args: tuple, kwargs: dict) -> LayerCost:
    """Runs the layer's forward twice with grad on under a forked RNG, dropping the results: the
    bytes autograd saves and the time (mode none, and the cost of a recompute), then the bytes and
    time of the outputs the selective policy keeps."""
    devices = sorted({a.device for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}, key=str)
    sync = _synchronizer(devices)
    shared = [*module.parameters(), *module.buffers(), *_tensors((kwargs, strategies.partial_keywords(function)))]
    excluded = {t.untyped_storage().data_ptr() for t in shared}
    inputs = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
              for t in _tensors(args) if t.is_floating_point() and t.untyped_storage().data_ptr() not in excluded}
    accelerators = [d for d in devices if d.type != "cpu"]
    with torch.random.fork_rng(devices=[d for d in accelerators if d.type == "cuda"]), torch.enable_grad():
        saved: Dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in excluded:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        sync()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = function(*args, **kwargs)
        sync()
        forward_seconds = time.perf_counter() - start
        del out
        probe = _ForwardProbe(sync, excluded, [t for t in _tensors(args) if t.untyped_storage().data_ptr() in inputs])
        with probe:
            out = function(*args, **kwargs)
        del out
    full = sum(saved.values())
    input_bytes = sum(inputs.values())
    kept = {"none": full, "checkpoint": input_bytes, "selective": input_bytes + probe.selected_bytes}
    extra = {"none": 0.0, "checkpoint": forward_seconds, "selective": max(0.0, forward_seconds - probe.seconds)}
    if accelerators:
        kept["offload"] = 0
        extra["offload"] = forward_seconds + _host_round_trip_seconds(args, sync)
    return LayerCost(name, kept, extra, full, working_bytes=max(probe.peak_bytes, full))


class _ForwardProbe(TorchDispatchMode):
    """Watches one forward of a layer: the bytes of the outputs of the ops that the selective policy
    saves (each storage once) and the time those ops take; and the most bytes the forward holds at
    once (its inputs and every storage it made that is still alive, sampled after each op)."""

    def __init__(self, sync, excluded, inputs: List[torch.Tensor]):
        super().__init__()
        self.sync, self.excluded = sync, excluded
        self.live: Dict[int, tuple] = {}  # data_ptr -> (StorageWeakRef, bytes)
        self.selected: Dict[int, tuple] = {}
        self.selected_bytes = 0
        self.seconds = 0.0
        self._track(inputs, selected=False)
        self.peak_bytes = sum(size for _, size in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        selected = selective.policy(None, func, *args, **kwargs) is CheckpointPolicy.MUST_SAVE
        if selected:
            self.sync()
            start = time.perf_counter()
        out = func(*args, **kwargs)
        if selected:
            self.sync()
            self.seconds += time.perf_counter() - start
        self._track(_tensors(out), selected)
        self.live = {ptr: entry for ptr, entry in self.live.items() if not entry[0].expired()}
        self.peak_bytes = max(self.peak_bytes, sum(size for _, size in self.live.values()))
        return out

    def _track(self, tensors, selected: bool) -> None:
        # By address, with a weak reference: an address seen before whose storage has died holds a
        # new storage, which counts again.
        for t in tensors:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.excluded or not storage.nbytes():
                continue
            tables = (self.live, self.selected) if selected else (self.live,)
            for table in tables:
                entry = table.get(ptr)
                if entry is None or entry[0].expired():
                    table[ptr] = (StorageWeakRef(storage), storage.nbytes())
                    if table is self.selected:
                        self.selected_bytes += storage.nbytes()


def _host_round_trip_seconds(args, sync) -> float:
    """Offload's copies if none overlapped compute: each floating-point input to host and back."""
    seconds = 0.0
    for t in _tensors(args):
        if t.is_floating_point() and t.device.type != "cpu":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            sync()
            start = time.perf_counter()
            host.copy_(t)
            t.new_empty(t.shape).copy_(host)
            sync()
            seconds += time.perf_counter() - start
    return seconds


def _layer_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in strategies.CHECKPOINT_KEYS}


def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.layout == torch.strided]


def _shape_key(args) -> Optional[Tuple]:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return (tuple(a.shape), str(a.dtype), str(a.device))
    return None


def _tokens(shape) -> int:
    return math.prod(shape[0])


def _synchronizer(devices) -> Callable[[], None]:
    cuda = [d for d in devices if d.type == "cuda"]
    return (lambda: [torch.cuda.synchronize(d) for d in cuda]) if cuda else (lambda: None)
