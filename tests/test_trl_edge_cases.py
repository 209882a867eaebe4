"""TRL edge cases a user hits (issue 22, items 4 and 5); both fail until the fix.

4. TRL's gradient_checkpointing_kwargs={"selective": True} together with torchgc's `selective`
   strategy stops at the first training forward today ("'context_fn' cannot be combined with
   strategy 'selective'"). It must train, with one warning, and exact gradients.
5. SFTTrainer(..., gradient_checkpointing_kwargs={"selective": True}) wraps the model's
   gradient_checkpointing_enable around the original method it finds. torchgc.patch() called after
   the trainer is built must still route the layers through torchgc (README: patch() works before or
   after the model is built); today it makes no torchgc call."""

import warnings

import pytest
import torch

import torchgc
from patch_helpers import _common_args, _GradientSnapshot, assert_same_grads, sft_step
from tiny_models import build, token_rows, tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

LAYERS = 2
MICRO_BATCHES = 2
SELECTIVE = {"selective": True}
_references = []


def reference(tmp_path):
    if not _references:
        torch.manual_seed(2)
        _references.append(sft_step(build("llama", layers=LAYERS), tmp_path / "ref", gradient_checkpointing=False)[1])
    return _references[0]


def test_trl_selective_with_torchgc_selective(tmp_path):
    expected = reference(tmp_path)
    torchgc.reset_stats()
    with torchgc.patched("selective"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(2)
        _, actual = sft_step(build("llama", layers=LAYERS), tmp_path / "gc", gradient_checkpointing=True, gc_kwargs=dict(SELECTIVE))
    calls = torchgc.stats()["checkpoint_calls"]
    assert sum(calls.values()) == LAYERS * MICRO_BATCHES, calls
    about_both = [str(w.message) for w in caught if "selective" in str(w.message)]
    assert len(about_both) == 1, about_both  # which policy won (or that they compose), said once
    assert_same_grads(expected, actual)


def test_patch_after_an_sft_trainer_with_trl_selective_is_built(tmp_path):
    expected = reference(tmp_path)
    torch.manual_seed(2)
    args = trl.SFTConfig(**_common_args(tmp_path / "gc", True, dict(SELECTIVE)), packing=False, max_length=32)
    trainer = trl.SFTTrainer(model=build("llama", layers=LAYERS), args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": token_rows()}),
                             processing_class=tokenizer())
    snapshot = _GradientSnapshot(trainer.model)
    trainer.add_callback(snapshot)
    torchgc.reset_stats()
    with torchgc.patched("checkpoint"):
        trainer.train()
    assert torchgc.stats()["checkpoint_calls"] == {"checkpoint": LAYERS * MICRO_BATCHES}
    assert_same_grads(expected, snapshot.grads)
