"""Frozen layers under only_trainable, through torchgc.patch() and gradient_checkpointing_enable:
a frozen layer that no gradient reaches runs as is (it builds no graph, so it keeps nothing), and
one that gradients flow through (above a trainable layer) is checkpointed like any other, so it
does not keep its activations. Gradients are bitwise equal to no checkpointing (CPU, fp32)."""

import copy

import pytest
import torch

import torchgc
from test_checkpoint import STRATEGIES, STRATEGY_IDS, assert_same_step, train_step
from tiny_models import batch, build
from torchgc.bench.measure import saved_for_backward_bytes

pytestmark = pytest.mark.usefixtures("clean_patch")

LAYERS = 4


def model_with_frozen(placement):
    """A Llama whose two bottom (frozen-below, with the embeddings) or two top (frozen-above)
    layers are frozen."""
    model = build("llama", layers=LAYERS)
    layers = model.model.layers
    frozen = [model.model.embed_tokens, layers[0], layers[1]] if placement == "frozen-below" else [layers[2], layers[3]]
    for module in frozen:
        module.requires_grad_(False)
    return model


def enabled(model, strategy, use_reentrant):
    torchgc.patch(strategy=strategy, use_reentrant=use_reentrant, min_offload_bytes=0)
    model = copy.deepcopy(model)
    model.gradient_checkpointing_enable()
    return model


@pytest.mark.filterwarnings("ignore:.*is built on torch's selective checkpoint contexts")
@pytest.mark.parametrize("strategy,use_reentrant", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize("placement", ["frozen-below", "frozen-above"])
def test_frozen_layers_gradients_and_what_is_checkpointed(placement, strategy, use_reentrant):
    model = model_with_frozen(placement)
    reference = train_step(copy.deepcopy(model), batch())
    candidate_model = enabled(model, strategy, use_reentrant)
    torchgc.reset_stats()
    assert_same_step(reference, train_step(candidate_model, batch()))

    how = "checkpoint" if strategy in ("checkpoint", "auto") else strategy
    calls = [counts for _, counts in torchgc.stats()["layer_calls"]]
    if placement == "frozen-above":
        # Gradients from the trainable layers below flow through every layer.
        assert calls == [{how: 1}] * LAYERS
    else:
        assert calls == [{"frozen": 1}] * 2 + [{how: 1}] * 2


@pytest.mark.parametrize("placement", ["frozen-below", "frozen-above"])
def test_frozen_layers_keep_no_more_than_trainable_ones(placement):
    """Bytes held for backward at the end of forward: with frozen layers, never more than with
    every layer trainable, and for frozen-above far less than without checkpointing."""
    inputs = batch(seq_len=64)
    all_trainable = saved_for_backward_bytes(enabled(build("llama", layers=LAYERS), "checkpoint", False), inputs)
    torchgc.unpatch()
    plain = saved_for_backward_bytes(model_with_frozen(placement), inputs)
    with_frozen = saved_for_backward_bytes(enabled(model_with_frozen(placement), "checkpoint", False), inputs)
    assert with_frozen <= all_trainable, (with_frozen, all_trainable)
    if placement == "frozen-above":
        # Without checkpointing, the frozen layers above keep all their activations for backward.
        assert with_frozen == all_trainable and plain > 2 * with_frozen, (plain, with_frozen)
