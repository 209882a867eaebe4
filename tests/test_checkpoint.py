"""torchgc.checkpoint on CPU: every strategy gives the gradients of a run without checkpointing.

On CPU in fp32 a checkpointed run executes the same kernels in the same order as a plain one, and
offloading only copies bytes, so every comparison here is bitwise (torch.equal)."""

import contextlib
import copy
import functools
import warnings

import pytest
import torch

import torchgc
from torchgc import offload as offload_module
from tiny_models import TINY_CONFIGS, batch, build

STRATEGIES = [(s, r) for s in ("checkpoint", "offload", "selective") for r in (False, True)]
STRATEGY_IDS = [f"{s}-{'reentrant' if r else 'nonreentrant'}" for s, r in STRATEGIES]


def enable(model, strategy, use_reentrant, **options):
    func = functools.partial(torchgc.checkpoint, strategy=strategy, use_reentrant=use_reentrant, min_offload_bytes=0, **options)
    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
    return model


def train_step(model, inputs, seed=123):
    """One forward and backward. Returns the loss, every parameter's gradient, and the gradient
    of the input embeddings (the embedding layer's output)."""
    captured = {}

    def keep_embeddings(module, args, output):
        if output.requires_grad:
            output.retain_grad()
        captured["embeddings"] = output

    handle = model.get_input_embeddings().register_forward_hook(keep_embeddings)
    try:
        torch.manual_seed(seed)
        loss = model(**inputs).loss
        loss.backward()
    finally:
        handle.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, captured["embeddings"].grad


def assert_same_step(reference, candidate):
    ref_loss, ref_grads, ref_embed_grad = reference
    loss, grads, embed_grad = candidate
    assert torch.equal(ref_loss, loss)
    assert ref_grads.keys() == grads.keys(), "a different set of parameters received gradients"
    assert len(ref_grads) > 0
    for name in ref_grads:
        assert torch.equal(ref_grads[name], grads[name]), f"gradient of {name} differs"
    if ref_embed_grad is None:
        assert embed_grad is None
    else:
        assert torch.equal(ref_embed_grad, embed_grad), "gradient of the input embeddings differs"


def compare(model, strategy, use_reentrant, inputs=None, **options):
    inputs = inputs or batch()
    reference = train_step(copy.deepcopy(model), inputs)
    candidate = train_step(enable(copy.deepcopy(model), strategy, use_reentrant, **options), inputs)
    assert_same_step(reference, candidate)


@contextlib.contextmanager
def expect_reentrant_without_fallback(use_reentrant, strategy):
    """Where no layer input requires grad, reentrant checkpointing still runs, silently (it lends
    the layer a detached input that does); only selective, which has no reentrant form, warns."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    messages = [str(w.message) for w in caught if "torchgc" in str(w.message)]
    if use_reentrant and strategy == "selective":
        assert any("selective' is built on" in m for m in messages), messages
    else:
        assert not messages, messages


@pytest.fixture
def count_offloads(monkeypatch):
    calls = []
    real = offload_module.ops.offload

    def counting(x):
        calls.append(x.shape)
        return real(x)

    monkeypatch.setattr(offload_module.ops, "offload", counting)
    return calls


@pytest.mark.parametrize("strategy,use_reentrant", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_model_gradients_equal_no_checkpoint(name, strategy, use_reentrant, count_offloads):
    compare(build(name), strategy, use_reentrant)
    # Each layer's input goes to the host except the last layer's, which backward needs first.
    assert len(count_offloads) == (2 if strategy == "offload" else 0)


@pytest.mark.parametrize("strategy,use_reentrant", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_dropout_is_replayed_in_the_recompute(name, strategy, use_reentrant):
    model = build(name, dropout=0.2)
    compare(model, strategy, use_reentrant)
    # The check above can only fail if dropout is really active: two runs with different seeds differ.
    assert not torch.equal(train_step(copy.deepcopy(model), batch(), seed=1)[0], train_step(copy.deepcopy(model), batch(), seed=2)[0])


@pytest.mark.parametrize("strategy,use_reentrant", STRATEGIES, ids=STRATEGY_IDS)
def test_lora_gradients_equal_no_checkpoint(strategy, use_reentrant):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(build("llama"), config)
    # Embeddings are frozen, so no layer input requires grad: torchgc must not lose the LoRA
    # gradients (torch's reentrant checkpoint alone would).
    with expect_reentrant_without_fallback(use_reentrant, strategy):
        compare(model, strategy, use_reentrant)


@pytest.mark.parametrize("strategy,use_reentrant", STRATEGIES, ids=STRATEGY_IDS)
def test_frozen_lower_layers_are_not_checkpointed(strategy, use_reentrant, monkeypatch):
    model = build("llama", layers=4)
    for module in (model.model.embed_tokens, model.model.layers[0], model.model.layers[1]):
        module.requires_grad_(False)
    # The first trainable layer's input does not require grad: reentrant must keep its gradients.
    with expect_reentrant_without_fallback(use_reentrant, strategy):
        compare(model, strategy, use_reentrant)

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    with expect_reentrant_without_fallback(use_reentrant, strategy):
        train_step(enable(copy.deepcopy(model), strategy, use_reentrant), batch())
    assert len(calls) == 2


def bytes_saved_for_backward(run):
    """The bytes autograd saves for backward while run() executes (checkpointed regions save their
    inputs; torch's checkpoint packs their insides with its own, innermost hooks)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(saved), out


@pytest.mark.parametrize("strategy,use_reentrant", STRATEGIES, ids=STRATEGY_IDS)
def test_a_block_without_parameters_is_checkpointed(strategy, use_reentrant):
    # Not "frozen": it has no parameters at all, and its activations are as big as any layer's.
    block = torch.nn.Sequential(*[torch.nn.GELU(), torch.nn.Tanh(), torch.nn.SiLU(), torch.nn.Softmax(-1)] * 4)
    x = torch.randn(64, 1024, requires_grad=True)
    one_input = x.numel() * x.element_size()
    kept_plain, plain = bytes_saved_for_backward(lambda: block(x))
    kept, out = bytes_saved_for_backward(lambda: torchgc.checkpoint(block, x, strategy=strategy, use_reentrant=use_reentrant, min_offload_bytes=0))
    assert kept_plain >= 10 * one_input
    # The checkpoint saves its input (offload's own hooks take it out of this count).
    assert kept == (0 if strategy == "offload" else one_input), (kept, one_input)
    plain.square().sum().backward()
    expected, x.grad = x.grad, None
    out.square().sum().backward()
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("strategy,use_reentrant", STRATEGIES, ids=STRATEGY_IDS)
def test_a_frozen_layer_without_trainable_inputs_is_not_checkpointed(strategy, use_reentrant):
    layer = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).requires_grad_(False)
    x = torch.randn(8, 64)
    kept, out = bytes_saved_for_backward(lambda: torchgc.checkpoint(layer, x, strategy=strategy, use_reentrant=use_reentrant))
    assert kept == 0 and not out.requires_grad
    assert torch.equal(out, layer(x))


class KwargLayer(torch.nn.Module):
    """A layer whose extra inputs arrive as keyword tensors, and whose output is a bare tensor."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x, *, scale, pair):
        return torch.tanh(self.linear(x)) * scale + pair[0] * pair[1]


@pytest.mark.parametrize("strategy,use_reentrant", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize("bound_in_partial", [False, True])
def test_tensor_kwargs_get_their_gradients(strategy, use_reentrant, bound_in_partial):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(KwargLayer() for _ in range(3))
    x0 = torch.randn(4, 8, requires_grad=True)
    scale = torch.randn(8, requires_grad=True)
    pair = (torch.randn(8, requires_grad=True), torch.randn(4, 8))

    def run(checkpointed):
        for t in (x0, scale, pair[0], *layers.parameters()):
            t.grad = None
        shared_scale = scale * 2  # a non-leaf shared by every layer
        h = x0 * 1.0
        for layer in layers:
            if not checkpointed:
                h = layer(h, scale=shared_scale, pair=pair)
            elif bound_in_partial:
                h = torchgc.checkpoint(functools.partial(layer.__call__, scale=shared_scale, pair=pair), h, strategy=strategy, use_reentrant=use_reentrant, min_offload_bytes=0)
            else:
                h = torchgc.checkpoint(layer, h, scale=shared_scale, pair=pair, strategy=strategy, use_reentrant=use_reentrant, min_offload_bytes=0)
        h.sum().backward()
        return [t.grad.clone() for t in (x0, scale, pair[0], *layers.parameters())]

    for ref, got in zip(run(False), run(True)):
        assert torch.equal(ref, got)


@pytest.mark.parametrize("strategy,use_reentrant", STRATEGIES, ids=STRATEGY_IDS)
def test_an_input_shared_by_two_layers(strategy, use_reentrant):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)

    def run(checkpointed):
        x.grad = a.weight.grad = b.weight.grad = None
        h = torch.relu(x)
        call = (lambda f, t: torchgc.checkpoint(f, t, strategy=strategy, use_reentrant=use_reentrant, min_offload_bytes=0)) if checkpointed else (lambda f, t: f(t))
        (call(a, h) * call(b, h)).sum().backward()
        return x.grad.clone(), a.weight.grad.clone(), b.weight.grad.clone()

    for ref, got in zip(run(False), run(True)):
        assert torch.equal(ref, got)


# Where the in-place change hits: the first layer's input (offloaded by the time it happens), the
# last layer's (kept on the device), or the base of a view that was the first layer's input and
# no longer exists itself (the base shares its version counter).
INPLACE_TARGETS = ["offloaded-input", "resident-input", "base-of-a-dropped-view"]


@pytest.mark.parametrize("target", INPLACE_TARGETS)
@pytest.mark.parametrize("strategy,use_reentrant", STRATEGIES, ids=STRATEGY_IDS)
def test_an_input_changed_in_place_before_backward_raises_like_autograd(strategy, use_reentrant, target, count_offloads):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8) for _ in range(3)]
    x = torch.randn(4, 8, requires_grad=True)
    base = x * 1.0
    h = base.view(4, 8) if target == "base-of-a-dropped-view" else base
    inputs = []
    for layer in layers:
        inputs.append(h)
        h = torchgc.checkpoint(layer, h, strategy=strategy, use_reentrant=use_reentrant, min_offload_bytes=0)
    assert len(count_offloads) == (2 if strategy == "offload" else 0)
    if target == "base-of-a-dropped-view":
        del inputs[0]
        base.mul_(2)
    else:
        inputs[0 if target == "offloaded-input" else -1].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()


def test_gradient_accumulation_and_several_forwards_before_backward():
    model = build("llama")
    micro = [batch(seed=s) for s in (1, 2, 3)]

    def accumulate(m):
        losses = [m(**inputs).loss for inputs in micro]  # all forwards first
        sum(losses).backward()
        m(**micro[0]).loss.backward()  # then one more micro-batch, accumulated
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    ref = accumulate(copy.deepcopy(model))
    got = accumulate(enable(copy.deepcopy(model), "offload", False))
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_a_forward_that_raises_leaves_nothing_behind():
    model = enable(build("llama"), "offload", False)
    baseline = torchgc.ops.host_pool_stats().in_use_bytes
    layer = model.model.layers[2]
    real_forward = layer.forward

    def failing(*args, **kwargs):
        raise RuntimeError("boom")

    layer.forward = failing
    with pytest.raises(RuntimeError, match="boom"):
        model(**batch())
    layer.forward = real_forward
    assert torchgc.ops.host_pool_stats().in_use_bytes == baseline
    assert offload_module._tracker.live_previous_entries() == []
    # The next step is unaffected.
    reference = train_step(copy.deepcopy(build("llama")), batch())
    model.zero_grad(set_to_none=True)
    assert_same_step(reference, train_step(model, batch()))


def test_eval_no_grad_and_inference_passes_in_between(count_offloads):
    model = enable(build("llama"), "offload", True)
    reference_model = build("llama")
    inputs = batch()
    for m in (model, reference_model):
        m.eval()
        with torch.no_grad():
            m(**inputs)
        with torch.inference_mode():
            m(**inputs)
        m.train()
        with torch.no_grad():
            m(**inputs)
    assert count_offloads == []
    assert_same_step(train_step(reference_model, inputs), train_step(model, inputs))


def test_host_pool_stays_constant_across_200_steps():
    model = enable(build("llama", layers=3), "offload", False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    inputs = batch()
    baseline_in_use = torchgc.ops.host_pool_stats().in_use_bytes
    reserved_after_first = None
    for step in range(200):
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()
        stats = torchgc.ops.host_pool_stats()
        assert stats.in_use_bytes == baseline_in_use, f"step {step}: offloaded buffers outlived backward"
        if reserved_after_first is None:
            reserved_after_first = stats.reserved_bytes
            assert reserved_after_first > 0
        assert stats.reserved_bytes == reserved_after_first, f"step {step}: host pool grew"


def test_prefetch_starts_the_previous_reload_before_waiting(monkeypatch):
    events = []
    for name in ("reload", "wait"):
        real = getattr(offload_module.ops, name)
        monkeypatch.setattr(offload_module.ops, name, functools.partial(lambda real, name, *a: events.append(name) or real(*a), real, name))

    def backward_order(prefetch):
        events.clear()
        model = enable(build("llama", layers=4), "offload", False, prefetch=prefetch)
        model(**batch()).loss.backward()
        return list(events)

    # Three offloaded inputs (the fourth layer's stays on the device).
    assert backward_order(prefetch=False) == ["reload", "wait"] * 3
    assert backward_order(prefetch=True) == ["reload", "reload", "wait", "reload", "wait", "wait"]


def test_auto_does_not_offload_cpu_tensors(count_offloads):
    compare(build("llama"), "auto", False)
    assert count_offloads == []


def test_host_cap_keeps_tensors_on_the_device(count_offloads):
    compare(build("llama"), "offload", False, max_host_bytes=0)
    assert count_offloads == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"strategy": "fast"}, r"torchgc.checkpoint: argument 'strategy' must be one of auto, checkpoint, offload, selective; got 'fast'"),
        ({"use_reentrant": "yes"}, r"argument 'use_reentrant' must be True or False; got 'yes'"),
        ({"min_offload_bytes": -1}, r"argument 'min_offload_bytes' must be None or an int >= 0; got -1"),
        ({"max_host_bytes": 1.5}, r"argument 'max_host_bytes' must be None or an int >= 0; got 1.5"),
        ({"only_trainable": "no"}, r"torchgc.checkpoint: argument 'only_trainable' must be True or False; got 'no'"),
        ({"prefetch": 0}, r"torchgc.checkpoint: argument 'prefetch' must be True or False; got 0"),
        ({"preserve_rng_state": None}, r"torchgc.checkpoint: argument 'preserve_rng_state' must be True or False; got None"),
    ],
)
def test_bad_arguments_raise_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        torchgc.checkpoint(torch.nn.Linear(2, 2), torch.randn(1, 2), **kwargs)


def test_selective_keeps_its_outputs_through_the_hooks_around_it():
    # An outer saved-tensor hook (torch's save_on_cpu, a memory counter) sees what selective keeps,
    # as it sees every other saved tensor, and torch has nothing to warn about.
    layer = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    x = torch.randn(8, 64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept, out = bytes_saved_for_backward(lambda: torchgc.checkpoint(layer, x, strategy="selective"))
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    assert kept >= x.numel() * 4 + 8 * 256 * 4, kept  # the input, and at least the first matmul's output
    out.sum().backward()
    assert x.grad is not None


def test_the_selective_policy_keeps_matmuls_but_not_attention_scores_or_seeded_attention():
    from torch.utils.checkpoint import CheckpointPolicy

    from torchgc.selective import policy

    aten = torch.ops.aten
    q, k_t, v = torch.randn(2, 64, 8), torch.randn(2, 8, 64), torch.randn(2, 64, 8)
    scores = torch.randn(2, 64, 64)
    x, w = torch.randn(64, 32), torch.randn(32, 96)
    save, recompute = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(None, aten.mm.default, x, w) is save  # a projection, even one that widens
    assert policy(None, aten.bmm.default, scores, v) is save  # attention weights times V
    assert policy(None, aten.bmm.default, q, k_t) is recompute  # Q·Kᵀ: 64 x 64 from two 64 x 8
    assert policy(None, aten.gelu.default, x) is recompute
    attention = aten._scaled_dot_product_flash_attention_for_cpu.default
    q4 = torch.randn(1, 2, 16, 8)
    assert policy(None, attention, q4, q4, q4) is save
    assert policy(None, attention, q4, q4, q4, 0.1) is recompute


def test_the_owning_module_is_found_in_every_form_transformers_passes():
    layer = torch.nn.Linear(4, 4)
    owning_module = torchgc.layer_calls.owning_module
    assert owning_module(layer) is layer
    assert owning_module(functools.partial(layer.__call__, bias=None)) is layer  # transformers 4.x, 5.x
    assert owning_module(functools.partial(type(layer).forward, layer)) is layer  # transformers 5.23
    assert owning_module(functools.partial(torch.tanh)) is None
