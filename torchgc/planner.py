"""Per-layer checkpointing from a memory budget: the Planner, the chooser of modes of a model's
LayerCheckpoint (torchgc.strategies) when ``memory_budget`` is set.

Modes. Each decoder layer gets one: none (keep every activation), selective, checkpoint (keep the
input) or offload (keep the input on the host; accelerators only), chosen so that the predicted
step time is smallest while the predicted activation memory fits the budget. The strategy option
narrows the choice: auto allows every mode; checkpoint, selective or offload allow that one and none.

What the budget counts. A fraction (0.3) is of the decoder layers' activation peak without
checkpointing; bytes ("12GiB") are absolute. The predicted peak (_peak) takes the layers in call
order: layer i, in its forward and again in the backward that recomputes it, holds its working set
(what it saves plus its temporaries) while the layers before it hold what they kept (in backward,
the layers after it hold nothing any more). Parameters, gradients, optimizer state and what lies
outside the layers (embeddings, logits) are not in it.

Measuring. For each new input shape, the first training step runs every layer checkpointed (its
gradients are those of any other step) and measures each layer (torchgc.layer_cost): two more
forwards per layer than a checkpointed step, holding one layer's activations more at a time. The plan is made when the next step starts (the first layer
measured is called again), cached per shape; after MAX_MEASURED_SHAPES shapes, a new shorter one
reuses the plan of the nearest longer shape measured (a longer one is measured).

Solving. choose_modes is a knapsack over the layers in order whose state is the bytes the layers
before hold, solved exactly over the budget cut into _BYTE_UNITS (bytes rounded up, so the
prediction only overstates). A budget that the fastest modes fit takes them without rounding
(budget 1.0 is no checkpointing). A budget below every plan raises BudgetError when the next step
starts, naming the smallest budget in bytes and as a fraction.

Checked (tests/test_planner.py). Every mode recomputes exactly: gradients are bitwise those of no
checkpointing (CPU, fp32; 8-layer Llama, Qwen2, Gemma and GPT-2 with dropout, budgets from the
smallest possible to 1.0, reentrant and not). Watching every op of a step under the plan, the
measured activation peak of an 8-layer Llama at budgets 0.25 to 1.0 is the predicted one within 5%
of the peak without checkpointing, and within the budget.

Limits. Inside a torch.compile region nothing can be measured: compiled layers are checkpointed
whole, with a warning once. The plan is made per process; under torch.distributed each rank
plans on its own. Offload plans have not run on a GPU yet.
"""

import dataclasses
import math
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from torchgc.layer_calls import no_gradient_reaches
from torchgc.layer_cost import LayerCost, free_layer, measure_layer
from torchgc.measuring import mib

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
            f"torchgc: memory_budget={budget!r} ({mib(budget_bytes, 2)} MiB) is below the smallest activation memory this "
            f"model reaches on inputs of shape {list(shape[0])}: {mib(smallest, 2)} MiB, a fraction {math.ceil(1000 * smallest / total) / 1000:.3f} of "
            f"its layers' {mib(total, 2)} MiB without checkpointing (modes allowed: {', '.join(allowed)}); give a budget "
            f"of at least that"
        )
    seconds = sum(layer.extra_seconds[m] for layer, m in zip(layers, modes))
    return Plan(shape, budget_bytes, layers, modes, _peak(layers, modes), seconds)


class Planner:
    """The chooser of modes under a memory budget, for a model's LayerCheckpoint: each layer call
    gets the mode its input shape's plan gives its layer; a shape without a plan yet is measured
    (see the module)."""

    def __init__(self, budget, strategy: str):
        self.budget, self.strategy = budget, strategy
        self.allowed = ALLOWED_MODES[strategy]
        self.costs: Dict[Tuple, Dict[int, LayerCost]] = {}  # shape -> id(layer) -> cost, in call order
        self.plans: Dict[Tuple, Plan] = {}
        self._modes: Dict[Tuple, Dict[int, str]] = {}

    def mode(self, module, function: Callable, args: tuple, kwargs: dict) -> Optional[str]:
        """The mode of this layer call: its plan's; the strategy where no plan applies (no module,
        no floating-point input); None while its shape is measured (checkpoint it, then measure)."""
        shape = _shape_key(args)
        if module is None or shape is None:
            return self.strategy
        plan_modes = self._modes_for(shape, module)
        return None if plan_modes is None else plan_modes.get(id(module), "checkpoint")

    def measure(self, module, function: Callable, args: tuple, kwargs: dict) -> None:
        """Measures one layer call of the measuring step (mode() returned None for it)."""
        name = type(module).__name__
        free = no_gradient_reaches(module, function, args, kwargs)
        cost = free_layer(name) if free else measure_layer(name, module, function, args, kwargs)
        self.costs.setdefault(_shape_key(args), {})[id(module)] = cost

    def when_compiled(self) -> str:
        _warn_no_plan_when_compiled(self.strategy)
        return self.strategy

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


def _shape_key(args) -> Optional[Tuple]:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return (tuple(a.shape), str(a.dtype), str(a.device))
    return None


def _tokens(shape) -> int:
    return math.prod(shape[0])
