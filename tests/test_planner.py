"""memory_budget: a mode per layer planned from the layers measured on the real batch, through
torchgc.patch() and gradient_checkpointing_enable. Gradients are bitwise equal to no checkpointing
at every budget (CPU, fp32, dropout on); the plan's predicted bytes fit the budget and match the
bytes measured at the end of forward; a budget too small for any plan is a clear error."""

import copy
import itertools
import random
import re

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

import torchgc
from test_checkpoint import assert_same_step, train_step
from tiny_models import batch, build
from torchgc import planner
from torchgc.bench.measure import LayerActivations
from torchgc.measuring import LiveStorages, strided_tensors

LAYERS = 4
SEQ = 32
pytestmark = [pytest.mark.filterwarnings("ignore:.*is built on torch's selective checkpoint contexts"), pytest.mark.usefixtures("clean_patch")]


def planned(model, budget, **options):
    torchgc.patch(memory_budget=budget, **options)
    model = copy.deepcopy(model)
    model.gradient_checkpointing_enable()
    return model


def plans(model):
    return torchgc.explain(model)["plans"]


def smallest_fraction(error: planner.BudgetError) -> float:
    return float(re.search(r"a fraction (\d\.\d+) of", str(error)).group(1))


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma", "gpt2"])
def test_gradients_equal_no_checkpoint_at_every_budget(name, use_reentrant):
    model = build(name, layers=8, dropout=0.1)
    inputs = batch(seq_len=SEQ)
    references = [train_step(copy.deepcopy(model), inputs, seed=s) for s in range(2)]
    # 0.1 is below every plan of these 8 layers (each keeps at least its input, and one layer at a
    # time is recomputed): a clear error naming the smallest fraction, a plan at which then runs.
    too_small = planned(model, 0.1, use_reentrant=use_reentrant)
    train_step(too_small, inputs)
    with pytest.raises(planner.BudgetError) as error:
        train_step(too_small, inputs)
    smallest = smallest_fraction(error.value)
    assert 0.1 < smallest < 0.25
    modes_seen = set()
    for budget in (smallest + 0.001, 0.25, 0.5, 0.75, 1.0):
        candidate = planned(model, budget, use_reentrant=use_reentrant)
        for seed in range(2):  # the measuring step, then a step under the plan
            assert_same_step(references[seed], train_step(candidate, inputs, seed=seed))
            for p in candidate.parameters():
                p.grad = None
        (plan,) = plans(candidate)
        assert plan["predicted_bytes"] <= plan["budget_bytes"]
        modes_seen.update(layer["mode"] for layer in plan["layers"])
    # The budgets above span the modes, so each ran in the comparisons.
    assert {"none", "selective", "checkpoint"} <= modes_seen, modes_seen


class LiveActivations(TorchDispatchMode):
    """Bytes of the storages created under it that are still alive (each storage once)."""

    def __init__(self):
        super().__init__()
        self.storages = LiveStorages()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.storages.add(strided_tensors(out))
        return out

    def live_bytes(self):
        return self.storages.live_bytes()


def bytes_alive_after_forward(model, inputs):
    train_step(model, inputs)  # measures, when it is the first step of a plan
    with LiveActivations() as tracker:
        loss = model(**inputs).loss
    alive = tracker.live_bytes()
    loss.backward()
    return alive


def test_predicted_bytes_fit_the_budget_and_match_the_bytes_alive_after_forward():
    model = build("llama", layers=LAYERS)
    inputs = batch(seq_len=64)
    hidden_bytes = inputs["input_ids"].numel() * model.config.hidden_size * 4
    torchgc.patch(strategy="checkpoint")
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    baseline = bytes_alive_after_forward(checkpointed, inputs)  # every layer keeps only its input
    for budget in (0.35, 0.5, 0.75, 1.0):
        candidate = planned(model, budget)
        alive = bytes_alive_after_forward(candidate, inputs)
        (plan,) = plans(candidate)
        kept = sum(layer["kept_bytes"] for layer in plan["layers"])
        assert plan["predicted_bytes"] <= plan["budget_bytes"] == int(budget * plan["no_checkpoint_bytes"])
        # Beyond the layer inputs, the bytes alive are the plan's, within 5% of the layers' bytes
        # without checkpointing.
        assert abs((alive - baseline) - (kept - LAYERS * hidden_bytes)) <= 0.05 * plan["no_checkpoint_bytes"], (budget, alive, baseline, kept)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_the_measured_peak_of_the_step_stays_within_the_budget(use_reentrant):
    model = build("llama", layers=8)
    inputs = batch(seq_len=64)
    peaks = []
    for budget in (0.25, 0.5, 0.75, 1.0):
        candidate = planned(model, budget, use_reentrant=use_reentrant)
        train_step(candidate, inputs)  # the measuring step
        with LayerActivations(candidate.model.layers) as tracker:
            train_step(candidate, inputs)
        (plan,) = plans(candidate)
        total = plan["no_checkpoint_bytes"]
        # The plan's prediction is what was measured, within 5% of the layers' peak without
        # checkpointing, and the budget holds.
        assert abs(tracker.peak_bytes - plan["predicted_bytes"]) <= 0.05 * total, (budget, tracker.peak_bytes, plan["predicted_bytes"])
        assert tracker.peak_bytes <= plan["budget_bytes"] + 0.05 * total, (budget, tracker.peak_bytes, plan["budget_bytes"])
        peaks.append(tracker.peak_bytes)
    assert peaks == sorted(peaks) and peaks[0] < 0.3 * peaks[-1], peaks


def test_a_budget_below_every_plan_names_the_smallest():
    candidate = planned(build("llama", layers=LAYERS), 0.1)
    train_step(candidate, batch(seq_len=SEQ))  # the measuring step runs every layer checkpointed
    with pytest.raises(planner.BudgetError, match=r"memory_budget=0.1 \(.* MiB\) is below the smallest activation memory .* a fraction 0\.\d+ of"):
        train_step(candidate, batch(seq_len=SEQ))


def test_each_input_shape_gets_its_own_plan():
    candidate = planned(build("llama", layers=LAYERS), 0.5)
    for seq_len in (SEQ, SEQ, 2 * SEQ, 2 * SEQ, SEQ):
        train_step(candidate, batch(seq_len=seq_len))
    assert [p["shape"][1] for p in plans(candidate)] == [SEQ, 2 * SEQ]


def test_frozen_layers_below_the_trainable_ones_cost_nothing_in_the_plan():
    model = build("llama", layers=LAYERS)
    for module in (model.model.embed_tokens, model.model.layers[0], model.model.layers[1]):
        module.requires_grad_(False)
    reference = train_step(copy.deepcopy(model), batch(seq_len=SEQ))
    candidate = planned(model, 0.75)  # of the two trainable layers' bytes: the frozen ones have none
    for _ in range(2):
        assert_same_step(reference, train_step(candidate, batch(seq_len=SEQ)))
        for p in candidate.parameters():
            p.grad = None
    (plan,) = plans(candidate)
    assert [(layer["mode"], layer["kept_bytes"]) for layer in plan["layers"][:2]] == [("none", 0)] * 2


def test_budget_from_the_environment_and_gradient_checkpointing_kwargs(monkeypatch):
    monkeypatch.setenv("TORCHGC_MEMORY_BUDGET", "0.5")
    torchgc.patch()
    model = build("llama", layers=2)
    model.gradient_checkpointing_enable()
    assert torchgc.explain(model)["memory_budget"] == 0.5
    model.gradient_checkpointing_enable({"memory_budget": "64MiB"})
    assert torchgc.explain(model)["memory_budget"] == 64 * 2**20
    with pytest.raises(ValueError, match=r"gradient_checkpointing_kwargs\['memory_budget'\] must be None, a fraction in \(0, 1\]"):
        model.gradient_checkpointing_enable({"memory_budget": 1.5})
    monkeypatch.setenv("TORCHGC_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match="environment variable TORCHGC_MEMORY_BUDGET must be"):
        torchgc.patch()


def brute_force(layers, budget_bytes, allowed):
    best = None
    for modes in itertools.product(*[[m for m in allowed if m in layer.kept_bytes] for layer in layers]):
        if planner._peak(layers, list(modes)) <= budget_bytes:
            seconds = sum(layer.extra_seconds[m] for layer, m in zip(layers, modes))
            best = seconds if best is None else min(best, seconds)
    return best


def test_the_solver_finds_the_fastest_plan_that_fits():
    rng = random.Random(0)
    for _ in range(200):
        layers = []
        for i in range(rng.randint(1, 5)):
            full = rng.randint(100, 1000)
            kept = {"none": full, "selective": rng.randint(10, full), "checkpoint": rng.randint(1, 50)}
            recompute = rng.uniform(0.5, 2.0)
            layers.append(planner.LayerCost(f"l{i}", kept, {"none": 0.0, "selective": recompute * rng.uniform(0.1, 0.9), "checkpoint": recompute}, full))
        allowed = ("none", "selective", "checkpoint")
        budget = rng.randint(50, 5000)
        modes = planner.choose_modes(layers, budget, allowed)
        # Bytes are rounded up to 1/2048 of the budget per layer, so a plan within that slack of the
        # budget may be missed; none is ever accepted over the budget.
        slack = len(layers) * budget / 2048 + len(layers)
        exact, tight = brute_force(layers, budget, allowed), brute_force(layers, budget - slack, allowed)
        if modes is None:
            assert tight is None
            assert planner.smallest_peak(layers, allowed) > budget - slack
        else:
            assert planner._peak(layers, modes) <= budget
            seconds = sum(layer.extra_seconds[m] for layer, m in zip(layers, modes))
            assert seconds >= exact - 1e-12 and (tight is None or seconds <= tight + 1e-12)
