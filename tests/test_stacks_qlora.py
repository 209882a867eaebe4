"""QLoRA on CPU: bitsandbytes nf4 with double quantization (fp32 compute), through
peft.prepare_model_for_kbit_training(use_gradient_checkpointing=True) and LoRA under HF Trainer, and
a 4-bit model given to TRL's SFTTrainer. Every trainable gradient equals the run without
checkpointing, bitwise: the 4-bit weights dequantize to the same fp32 values in the forward and in
the recompute."""

import pytest
import torch
import transformers

import torchgc
from patch_helpers import assert_same_grads, sft_step, trainer_step
from tiny_models import build

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("qlora") / "llama"
    build("llama", layers=2).save_pretrained(path)
    return path


def load_4bit(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=transformers.BitsAndBytesConfig(**NF4),
                                                              device_map="cpu", dtype=torch.float32)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.uint8 and q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested
    return model


def lora_config():
    # init_lora_weights=False: a zero lora_B would give lora_A zero gradients, which prove nothing.
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)


def qlora(path, use_gradient_checkpointing):
    model = peft.prepare_model_for_kbit_training(load_4bit(path), use_gradient_checkpointing=use_gradient_checkpointing)
    torch.manual_seed(1)
    return peft.get_peft_model(model, lora_config())


@pytest.mark.parametrize("strategy,use_reentrant", [("checkpoint", True), ("offload", False)])
def test_prepare_model_for_kbit_training_and_lora_under_trainer(saved_model, tmp_path, strategy, use_reentrant):
    expected = trainer_step(qlora(saved_model, False), tmp_path / "ref", gradient_checkpointing=False)
    torchgc.reset_stats()
    with torchgc.patched(strategy, use_reentrant=use_reentrant, min_offload_bytes=0):
        actual = trainer_step(qlora(saved_model, True), tmp_path / "gc", gradient_checkpointing=True)
    assert torchgc.stats()["checkpoint_calls"] == {strategy: 2 * 2}  # 2 layers, 2 micro-batches
    assert_same_grads(expected, actual)


def test_sft_trainer_given_a_4bit_model(saved_model, tmp_path):
    pytest.importorskip("trl")
    torch.manual_seed(2)
    expected = sft_step(load_4bit(saved_model), tmp_path / "ref", gradient_checkpointing=False, peft_config=lora_config())[1]
    torchgc.reset_stats()
    with torchgc.patched("checkpoint"):
        torch.manual_seed(2)
        model, actual = sft_step(load_4bit(saved_model), tmp_path / "gc", gradient_checkpointing=True, peft_config=lora_config())
    assert isinstance(model, peft.PeftModel)
    assert torchgc.stats()["checkpoint_calls"] == {"checkpoint": 2 * 2}
    assert_same_grads(expected, actual)
