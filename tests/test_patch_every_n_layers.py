"""every_n_layers: checkpoint decoder layers 0, n, 2n, ... only, as transformers 5.x's argument of that
name does, on every transformers torchgc supports, through torchgc.patch() and
gradient_checkpointing_enable. Gradients stay bitwise equal to no checkpointing (CPU, fp32, dropout
on); where transformers has its own every_n_layers, torchgc checkpoints the same layers it does."""

import copy

import pytest
import torch

import torchgc
from test_checkpoint import assert_same_step, train_step
from tiny_models import batch, build
from transformers import PreTrainedModel

pytestmark = pytest.mark.usefixtures("clean_patch")

LAYERS = 5


def checkpointed_layers(model):
    return torchgc.explain(model)["checkpointed_layers"]


def layers_run_checkpointed(model, inputs):
    """The indices of the decoder layers that went through torchgc.checkpoint in one step."""
    torchgc.reset_stats()
    train_step(model, inputs)
    return [i for i, (_, calls) in enumerate(torchgc.stats()["layer_calls"]) if calls]


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_every_nth_layer_is_checkpointed_and_gradients_equal_no_checkpoint(name, use_reentrant):
    model = build(name, layers=LAYERS, dropout=0.1)
    inputs = batch()
    reference = train_step(copy.deepcopy(model), inputs)
    torchgc.patch(use_reentrant=use_reentrant)
    for n, expected in [(1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3]), (8, [0])]:
        candidate = copy.deepcopy(model)
        candidate.gradient_checkpointing_enable({"every_n_layers": n})
        assert checkpointed_layers(candidate) == expected
        torchgc.reset_stats()
        assert_same_step(reference, train_step(candidate, inputs))
        # Only the checkpointed layers reach torchgc.checkpoint; layer_calls lists them in call order.
        assert len(torchgc.stats()["layer_calls"]) == len(expected)


def test_the_option_comes_from_patch_the_environment_and_the_kwargs(monkeypatch):
    model = build("llama", layers=LAYERS)
    torchgc.patch(every_n_layers=2)
    model.gradient_checkpointing_enable()
    assert checkpointed_layers(model) == [0, 2, 4]
    model.gradient_checkpointing_enable({"every_n_layers": 1})  # a later enable resets the pattern
    assert checkpointed_layers(model) == [0, 1, 2, 3, 4]
    monkeypatch.setenv("TORCHGC_EVERY_N_LAYERS", "4")
    torchgc.patch()
    other = build("llama", layers=LAYERS)
    other.gradient_checkpointing_enable()
    assert checkpointed_layers(other) == [0, 4]
    other.gradient_checkpointing_disable()
    assert torchgc.explain(other) == {"checkpointing": None}


def test_bad_values_and_a_budget_with_a_pattern_are_clear_errors(monkeypatch):
    model = build("llama", layers=LAYERS)
    with pytest.raises(ValueError, match=r"torchgc.patch\(\): argument 'every_n_layers' must be an int >= 1; got 0"):
        torchgc.patch(every_n_layers=0)
    with pytest.raises(ValueError, match=r"every_n_layers=2 and memory_budget=0.5 both choose which layers to checkpoint"):
        torchgc.patch(every_n_layers=2, memory_budget=0.5)
    torchgc.patch(memory_budget=0.5)
    with pytest.raises(ValueError, match=r"gradient_checkpointing_enable\(\): every_n_layers=2 and memory_budget=0.5"):
        model.gradient_checkpointing_enable({"every_n_layers": 2})
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # nothing half-applied
    with pytest.raises(ValueError, match=r"gradient_checkpointing_kwargs\['every_n_layers'\] must be an int >= 1; got 'two'"):
        model.gradient_checkpointing_enable({"every_n_layers": "two"})
    monkeypatch.setenv("TORCHGC_EVERY_N_LAYERS", "two")
    with pytest.raises(ValueError, match="environment variable TORCHGC_EVERY_N_LAYERS must be an int >= 1; got 'two'"):
        torchgc.patch()


@pytest.mark.skipif("activation_checkpointing_enable" not in PreTrainedModel.__dict__,
                    reason="this transformers has no every_n_layers of its own to compare with")
@pytest.mark.parametrize("n", [2, 3])
def test_the_pattern_is_transformers_own(n):
    model = build("llama", layers=LAYERS)
    own = copy.deepcopy(model)
    own.activation_checkpointing_enable(every_n_layers=n)
    own_pattern = [i for i, m in enumerate(own.model.layers) if m.gradient_checkpointing]
    torchgc.patch()
    model.activation_checkpointing_enable(every_n_layers=n)
    assert checkpointed_layers(model) == own_pattern
    assert layers_run_checkpointed(model, batch()) == list(range(len(own_pattern)))
