"""Gradients that torchgc used to get silently wrong (issue 22, items 1 to 3), each asserted equal to
those of the same model without checkpointing (bitwise, CPU fp32), on every transformers torchgc
supports (the overlays 4.57.6 and 5.23.0 too).

1. transformers records router logits (and hidden states, attentions) from modules inside the
   checkpointed layer (5.x with forward hooks, 4.57 with wrappers of their forward). Reentrant
   checkpointing runs the layer's forward under no_grad, so the router logits it records carry no
   graph, and the MoE load-balancing loss built from them would send no gradient back to the routers
   or any layer below: torchgc runs those calls non-reentrant.
2. `selective` keeps a 4-D matmul's output (torch.matmul runs bmm and returns an _unsafe_view of
   it, with a version counter of its own), the layer then changes it in place (T5:
   `scores += position_bias`), and the recompute would read the changed values (the bias added
   twice): torchgc drops a kept output that is written into, and the recompute computes it again.
3. A router that breaks a tie one way in the forward and the other way in the recompute (as bf16
   GPU kernels that are not bitwise reproducible do with near-ties) would send tokens to other
   experts in the recompute: torchgc replays the forward's routing, in every strategy."""

import re
import warnings

import pytest
import torch

import torchgc
from family_models import qwen3_moe, step, t5
from patch_helpers import assert_same_grads

_references = {}


def reference(build_fn):
    if build_fn not in _references:
        _references[build_fn] = step(build_fn)[0]
    return _references[build_fn]


# --- 1. what forward hooks record inside a reentrant checkpoint -----------------------------------

@pytest.mark.parametrize("strategy", ["checkpoint", "offload"])
def test_moe_load_balancing_loss_gradients_under_reentrant_checkpointing(strategy):
    grads, stats, layers = step(qwen3_moe, strategy, use_reentrant=True)
    assert stats["checkpoint_calls"] == {strategy: len(layers)}, stats
    assert_same_grads(reference(qwen3_moe), grads)


# --- 2. selective and an in-place change to an output it keeps -----------------------------------

def test_t5_under_selective():
    grads, stats, layers = step(t5, "selective", use_reentrant=False)
    assert stats["checkpoint_calls"] == {"selective": len(layers)}, stats
    assert_same_grads(reference(t5), grads)


class ScoresWithBias(torch.nn.Module):
    """Any layer that changes a 4-D matmul's output in place, as T5's attention does."""

    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.bias = torch.nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x):  # (batch, heads, seq, dim)
        scores = torch.matmul(self.q(x), self.k(x).transpose(-1, -2))
        scores += self.bias
        return scores.softmax(-1).sum(-2)


def test_an_inplace_change_to_a_kept_matmul_output_is_recomputed_or_named():
    torch.manual_seed(0)
    layer, x = ScoresWithBias(), torch.randn(2, 4, 8, 16)

    def grads(run):
        layer.zero_grad()
        inputs = x.clone().requires_grad_()
        run(inputs).pow(2).sum().backward()
        return {**{name: p.grad.clone() for name, p in layer.named_parameters()}, "input": inputs.grad}

    expected = grads(layer)
    try:
        actual = grads(lambda inputs: torchgc.checkpoint(layer, inputs, strategy="selective", use_reentrant=False))
    except RuntimeError as error:  # failing loudly is the other acceptable outcome: naming the layer and the op
        assert "ScoresWithBias" in str(error) and re.search(r"bmm|matmul", str(error)), str(error)
        return
    assert_same_grads(expected, actual)


# --- 3. routing replay ----------------------------------------------------------------------------

_topk = torch.topk


class FlakyTopk:
    """torch.topk over scores where experts 0 and 1 are tied exactly (flaky_qwen3_moe gives them one
    gate row), breaking the tie toward expert 1 in odd calls and toward expert 0 in even calls. With
    two layers, each layer's forward and its recompute fall on calls of different parity (forward 1,
    2; recompute 3, 4 in reverse), as a router's forward and recompute can differ on a GPU. The
    values are the scores at the chosen experts, so they do not depend on how the tie was broken:
    only the routing does. Patched in as torch.topk, it serves every transformers' Qwen3-MoE (5.x's
    router module calls torch.topk, 4.57's MoE block does)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, scores, k, dim=-1, largest=True, sorted=True):
        self.calls += 1
        key = scores.detach().clone()
        favoured = self.calls % 2
        key[..., favoured] = torch.nextafter(key[..., favoured], torch.ones(()))
        indices = _topk(key, k, dim=dim, largest=largest, sorted=sorted).indices
        return torch.return_types.topk((scores.gather(dim, indices), indices))


def flaky_qwen3_moe():
    """Without output_router_logits, so that reentrant checkpointing runs reentrant (transformers
    collects nothing from inside the layers; see item 1)."""
    model, inputs = qwen3_moe()
    model.config.output_router_logits = False
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight[1] = layer.mlp.gate.weight[0]
    return model, inputs


@pytest.fixture
def flaky_router(monkeypatch):
    flaky = FlakyTopk()
    monkeypatch.setattr(torch, "topk", flaky)
    # The tie-break matters: two calls on the same tied scores route some tokens differently.
    scores = torch.rand(32, 4, generator=torch.Generator().manual_seed(3)).softmax(-1)
    scores[:, 1] = scores[:, 0]
    assert not torch.equal(torch.topk(scores, 2).indices, torch.topk(scores, 2).indices)
    flaky.calls = 0


@pytest.mark.parametrize("strategy,use_reentrant", [("checkpoint", True), ("checkpoint", False), ("offload", True), ("offload", False),
                                                    ("selective", False)])
def test_the_recompute_replays_the_forwards_routing(flaky_router, strategy, use_reentrant):
    expected = step(flaky_qwen3_moe)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads, stats, layers = step(flaky_qwen3_moe, strategy, use_reentrant)
    assert not [str(w.message) for w in caught if "non-reentrant" in str(w.message)], "the reentrant form did not run"
    assert stats["checkpoint_calls"] == {strategy: len(layers)}, stats
    assert stats["routing_decisions_replayed"] == len(layers), stats  # one top-k per layer, replayed in its recompute
    assert stats["routing_bytes_kept"] == len(layers) * 2 * 16 * 2 * 2, stats  # batch 2 x 16 tokens x top-2, int16
    assert_same_grads(expected, grads)
