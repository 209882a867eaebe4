"""TRL 1.16's preference and RL trainers after torchgc.patched(...): DPO with LoRA (the reference
model is the same model with its adapter disabled) and GRPO with transformers' generate (no vLLM).
One optimizer step each; every gradient equals the run without checkpointing, bitwise (CPU fp32).
SFT is in tests/test_patch_training.py and, with a 4-bit model, in tests/test_stacks_qlora.py."""

import pytest
import torch

import torchgc
from patch_helpers import _common_args, _GradientSnapshot, assert_same_grads
from tiny_models import build, tokenizer

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

LAYERS = 2
MICRO_BATCHES = 2  # _common_args: one optimizer step over two micro-batches
_references = {}


def words(i, n):
    return " ".join(f"w{(i * 7 + j * 3) % 90 + 3}" for j in range(n))


def dpo(output_dir, gradient_checkpointing):
    data = datasets.Dataset.from_dict({"prompt": [words(i, 6) for i in range(4)], "chosen": [words(i + 1, 4) for i in range(4)],
                                       "rejected": [words(i + 2, 4) for i in range(4)]})
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    args = trl.DPOConfig(**_common_args(output_dir, gradient_checkpointing, None), max_length=32)
    torch.manual_seed(2)
    trainer = trl.DPOTrainer(model=build("llama", layers=LAYERS), args=args, train_dataset=data, processing_class=tokenizer(), peft_config=lora)
    assert trainer.ref_model is None  # the reference log-probs come from the model with its adapter disabled
    return trainer


def grpo(output_dir, gradient_checkpointing):
    data = datasets.Dataset.from_dict({"prompt": [words(i, 6) for i in range(4)]})

    def reward(completions, **kwargs):
        return [completion.count("w1") - len(completion) / 10 for completion in completions]

    args = trl.GRPOConfig(**{**_common_args(output_dir, gradient_checkpointing, None), "per_device_train_batch_size": 2},
                          num_generations=2, max_completion_length=4, use_vllm=False)
    torch.manual_seed(2)
    return trl.GRPOTrainer(model=build("llama", layers=LAYERS), reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer())


def gradients(make_trainer, output_dir, gradient_checkpointing):
    trainer = make_trainer(output_dir, gradient_checkpointing)
    snapshot = _GradientSnapshot(trainer.model)
    trainer.add_callback(snapshot)
    trainer.train()
    assert snapshot.grads is not None, "the optimizer step was never reached"
    return snapshot.grads


@pytest.mark.parametrize("make_trainer", [dpo, grpo])
@pytest.mark.parametrize("strategy,use_reentrant", [("checkpoint", True), ("offload", False)])
def test_gradients_match_no_checkpointing(make_trainer, strategy, use_reentrant, tmp_path):
    if make_trainer not in _references:
        _references[make_trainer] = gradients(make_trainer, tmp_path / "ref", False)
    expected = _references[make_trainer]
    torchgc.reset_stats()
    with torchgc.patched(strategy, use_reentrant=use_reentrant, min_offload_bytes=0):
        actual = gradients(make_trainer, tmp_path / "gc", True)
    # Generation and DPO's reference pass run without grad: only the training forwards checkpoint.
    assert torchgc.stats()["checkpoint_calls"] == {strategy: LAYERS * MICRO_BATCHES}
    assert_same_grads(expected, actual)
