"""Shared by the tests that patch: a recorder of torchgc's layer checkpoint calls, and one-step
training runs that return every parameter's gradient. The fixtures clean_patch and
checkpoint_calls are in conftest.py."""

import contextlib

import torch
import transformers

from torchgc import strategies

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


@contextlib.contextmanager
def recording_checkpoint_calls():
    """Yields a list that gets, for each call of torchgc's layer checkpoint (torchgc.checkpoint
    included) while the block runs, the keywords of the call: the object's and the call's own."""
    calls = []
    real = strategies.LayerCheckpoint.__call__

    def recording(self, function, *args, **kwargs):
        calls.append({**self.keywords, **kwargs})
        return real(self, function, *args, **kwargs)

    strategies.LayerCheckpoint.__call__ = recording
    try:
        yield calls
    finally:
        strategies.LayerCheckpoint.__call__ = real


class _GradientSnapshot(transformers.TrainerCallback):
    """Copies every parameter's gradient just before the optimizer step."""

    def __init__(self, model):
        self.model = model
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {
            name: None if p.grad is None else p.grad.detach().clone() for name, p in self.model.named_parameters()
        }


def _common_args(output_dir, gradient_checkpointing, gc_kwargs):
    return dict(
        output_dir=str(output_dir),
        max_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_grad_norm=0.0,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs=gc_kwargs,
    )


def trainer_step(model, output_dir, *, gradient_checkpointing, gc_kwargs=None, rows=None, **training_arguments):
    """One optimizer step (two micro-batches) of HF Trainer; returns {name: grad}. Extra keyword
    arguments go to TrainingArguments."""
    from tiny_models import token_rows

    rows = rows or token_rows()
    data = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows]
    snapshot = _GradientSnapshot(model)
    args = transformers.TrainingArguments(**_common_args(output_dir, gradient_checkpointing, gc_kwargs), **training_arguments)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[snapshot])
    trainer.train()
    assert snapshot.grads is not None, "the optimizer step was never reached"
    return snapshot.grads


def sft_step(model, output_dir, *, gradient_checkpointing, gc_kwargs=None, peft_config=None):
    """One optimizer step of TRL's SFTTrainer on pre-tokenized rows; returns (trainer model, grads)."""
    import datasets
    import trl

    from tiny_models import token_rows, tokenizer

    dataset = datasets.Dataset.from_dict({"input_ids": token_rows()})
    args = trl.SFTConfig(**_common_args(output_dir, gradient_checkpointing, gc_kwargs), packing=False, max_length=32)
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer(), peft_config=peft_config
    )
    snapshot = _GradientSnapshot(trainer.model)
    trainer.add_callback(snapshot)
    trainer.train()
    assert snapshot.grads is not None, "the optimizer step was never reached"
    return trainer.model, snapshot.grads


def assert_same_grads(expected, actual):
    """Every parameter's gradient is bitwise equal: same ops in the same order on CPU fp32, dropout 0."""
    assert expected.keys() == actual.keys()
    with_grad = [name for name, g in expected.items() if g is not None]
    assert with_grad, "no parameter received a gradient"
    for name in expected:
        a, b = expected[name], actual[name]
        assert (a is None) == (b is None), f"{name}: gradient present in one run only"
        if a is not None:
            assert torch.equal(a, b), f"{name}: gradients differ (max abs diff {(a - b).abs().max().item():.3g})"
            assert a.abs().sum() > 0, f"{name}: gradient is all zeros, so comparing it proves nothing"
