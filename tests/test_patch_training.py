"""One real training step through HF Trainer, PEFT and TRL after torchgc.patch(): every parameter's
gradient equals the one of a run without checkpointing, bitwise (CPU, fp32, dropout 0: the
recompute runs the same kernels on the same inputs in the same order)."""

import warnings

import pytest
import torch

import torchgc
import torchgc.integrations.transformers as HF_INTEGRATION
from patch_helpers import assert_same_grads, sft_step, trainer_step
from tiny_models import build
from torchgc.integrations.transformers_layers import is_torchgc_function

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("clean_patch")

LAYERS = 2
MICRO_BATCHES = 2  # trainer_step runs one optimizer step over two micro-batches
_references = {}


def reference(key, run):
    """Gradients of a run without checkpointing, computed once per key."""
    if key not in _references:
        _references[key] = run()
    return _references[key]


def lora(model):
    # init_lora_weights=False: a zero lora_B would give lora_A zero gradients, which prove nothing.
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def lost_gradient_warnings(caught):
    return [str(w.message) for w in caught if "requires_grad" in str(w.message) or "requires grad" in str(w.message)]


def expected_reentrant(use_reentrant):
    return HF_INTEGRATION.default_use_reentrant() if use_reentrant is None else use_reentrant


@pytest.mark.parametrize("use_reentrant", [None, True, False], ids=["default", "reentrant", "non_reentrant"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2"])
def test_trainer_gradients_match_a_run_without_checkpointing(name, use_reentrant, tmp_path, checkpoint_calls):
    expected = reference(("trainer", name), lambda: trainer_step(build(name, layers=LAYERS), tmp_path / "ref", gradient_checkpointing=False))
    torchgc.patch(use_reentrant=use_reentrant)
    model = build(name, layers=LAYERS)
    result = trainer_step(model, tmp_path / "gc", gradient_checkpointing=True)
    assert_same_grads(expected, result)
    assert len(checkpoint_calls) == LAYERS * MICRO_BATCHES
    assert all(c["use_reentrant"] is expected_reentrant(use_reentrant) for c in checkpoint_calls)


@pytest.mark.parametrize("strategy", ["offload", "selective"])
def test_trainer_gradient_checkpointing_kwargs_choose_torchgc_options(strategy, tmp_path, checkpoint_calls):
    expected = reference(("trainer", "llama"), lambda: trainer_step(build("llama", layers=LAYERS), tmp_path / "ref", gradient_checkpointing=False))
    torchgc.patch()
    torchgc.reset_stats()
    gc_kwargs = {"strategy": strategy, "min_offload_bytes": 0, "use_reentrant": False}
    result = trainer_step(build("llama", layers=LAYERS), tmp_path / "gc", gradient_checkpointing=True, gc_kwargs=gc_kwargs)
    assert_same_grads(expected, result)
    assert len(checkpoint_calls) == LAYERS * MICRO_BATCHES
    assert all((c["strategy"], c["min_offload_bytes"]) == (strategy, 0) for c in checkpoint_calls)
    assert torchgc.stats()["checkpoint_calls"] == {strategy: LAYERS * MICRO_BATCHES}


@pytest.mark.parametrize("use_reentrant", [None, True, False], ids=["default", "reentrant", "non_reentrant"])
@pytest.mark.parametrize("order", ["peft_then_enable", "enable_then_peft"])
def test_lora_gradients_match(order, use_reentrant, tmp_path, checkpoint_calls):
    expected = reference(("lora", "llama"), lambda: trainer_step(lora(build("llama", layers=LAYERS)), tmp_path / "ref", gradient_checkpointing=False))
    torchgc.patch(use_reentrant=use_reentrant)
    if order == "peft_then_enable":
        model = lora(build("llama", layers=LAYERS))
        trainer_enables = True
    else:
        base = build("llama", layers=LAYERS)
        base.gradient_checkpointing_enable()
        model = lora(base)
        trainer_enables = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer_step(model, tmp_path / "gc", gradient_checkpointing=trainer_enables)
    assert not lost_gradient_warnings(caught)
    assert_same_grads(expected, result)
    assert len(checkpoint_calls) == LAYERS * MICRO_BATCHES
    assert all(c["use_reentrant"] is expected_reentrant(use_reentrant) for c in checkpoint_calls)


def _kbit_lora(use_gradient_checkpointing):
    model = build("llama", layers=LAYERS)
    # Stands in for a bitsandbytes load (no GPU here): PEFT keys its checkpointing path on this flag.
    model.is_loaded_in_8bit = True
    peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=use_gradient_checkpointing)
    del model.is_loaded_in_8bit
    return model


def test_prepare_model_for_kbit_training_enables_through_torchgc_and_a_second_enable_is_harmless(tmp_path, checkpoint_calls):
    expected = reference(("kbit", "llama"), lambda: trainer_step(lora(_kbit_lora(False)), tmp_path / "ref", gradient_checkpointing=False))
    torchgc.patch(use_reentrant=True)
    base = _kbit_lora(True)
    assert is_torchgc_function(base.model.layers[0]._gradient_checkpointing_func)
    embeddings = base.get_input_embeddings()
    model = lora(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer_step(model, tmp_path / "gc", gradient_checkpointing=True)  # enables again
    torchgc_hooks = [h for h in embeddings._forward_hooks.values() if h is HF_INTEGRATION._make_output_require_grad]
    # prepare_model_for_kbit_training and PEFT add transformers' input-grad hook; torchgc's
    # checkpoint needs none, so neither enable added its own.
    assert not torchgc_hooks and embeddings._forward_hooks
    assert not lost_gradient_warnings(caught)
    assert_same_grads(expected, result)
    assert len(checkpoint_calls) == LAYERS * MICRO_BATCHES


def _sft_reference(tmp_path, peft_config=None):
    torch.manual_seed(2)
    return sft_step(build("llama", layers=LAYERS), tmp_path / "ref", gradient_checkpointing=False, peft_config=peft_config)[1]


def test_sft_trainer_gradients_match(tmp_path, checkpoint_calls):
    pytest.importorskip("trl")
    expected = reference(("sft", "llama"), lambda: _sft_reference(tmp_path))
    torchgc.patch()
    torch.manual_seed(2)
    model, result = sft_step(build("llama", layers=LAYERS), tmp_path / "gc", gradient_checkpointing=True)
    assert is_torchgc_function(model.model.layers[0]._gradient_checkpointing_func)
    assert_same_grads(expected, result)
    assert len(checkpoint_calls) == LAYERS * MICRO_BATCHES


def test_sft_trainer_with_lora_gradients_match(tmp_path, checkpoint_calls):
    pytest.importorskip("trl")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    expected = reference(("sft_lora", "llama"), lambda: _sft_reference(tmp_path, config))
    torchgc.patch()
    torch.manual_seed(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, result = sft_step(
            build("llama", layers=LAYERS), tmp_path / "gc", gradient_checkpointing=True, gc_kwargs={"strategy": "offload"}, peft_config=config
        )
    assert not lost_gradient_warnings(caught)
    assert isinstance(model, peft.PeftModel)
    assert_same_grads(expected, result)
    assert len(checkpoint_calls) == LAYERS * MICRO_BATCHES
    assert all(c["strategy"] == "offload" for c in checkpoint_calls)


def test_trainer_with_norm_options_matches_the_same_norms_without_checkpointing(tmp_path, checkpoint_calls):
    from torchgc import norm

    def fused_reference():
        model = build("llama", layers=LAYERS)
        norm.upcast_layernorm(model)
        return trainer_step(model, tmp_path / "ref", gradient_checkpointing=False)

    expected = reference(("trainer_upcast_norm", "llama"), fused_reference)
    torchgc.patch(upcast_layernorm=True)
    model = build("llama", layers=LAYERS)
    result = trainer_step(model, tmp_path / "gc", gradient_checkpointing=True)
    assert HF_INTEGRATION._state(model).norm_handles["upcast_layernorm"].fused, "no norm was routed through torchgc.norm"
    assert_same_grads(expected, result)
    assert len(checkpoint_calls) == LAYERS * MICRO_BATCHES
