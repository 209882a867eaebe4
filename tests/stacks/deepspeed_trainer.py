"""An ordinary HF Trainer script under DeepSpeed ZeRO on CPU (2 ranks, gloo), launched by
tests/test_stacks_deepspeed.py as `torchgc run torchrun ...` or `torchgc run deepspeed ...`. It never
imports torchgc.

One process trains several configurations in a row (a launch costs far more than a tiny run): no
checkpointing, then torchgc's checkpoint and offload, reentrant and not, chosen per run through
`gradient_checkpointing_kwargs` (and with --lora, a LoRA adapter with and without checkpointing).
Rank 0 writes, per run, every step's exact loss and the final weights gathered from all ranks."""

import argparse
import json
import os
import sys

import deepspeed
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny_models import build, token_rows  # noqa: E402

# (name, gradient_checkpointing_kwargs or None for no checkpointing, LoRA)
RUNS = [
    ("none", None, False),
    ("checkpoint-reentrant", {"strategy": "checkpoint", "use_reentrant": True}, False),
    ("checkpoint-nonreentrant", {"strategy": "checkpoint", "use_reentrant": False}, False),
    ("offload-reentrant", {"strategy": "offload", "use_reentrant": True, "min_offload_bytes": 0}, False),
    ("offload-nonreentrant", {"strategy": "offload", "use_reentrant": False, "min_offload_bytes": 0}, False),
]
LORA_RUNS = [
    ("lora-none", None, True),
    ("lora-checkpoint-reentrant", {"strategy": "checkpoint", "use_reentrant": True}, True),
    ("lora-offload-nonreentrant", {"strategy": "offload", "use_reentrant": False, "min_offload_bytes": 0}, True),
]
LAYERS = 2
STEPS = 2
ACCUMULATION = 2
MICRO_BATCH = 2


def deepspeed_config(stage: int) -> dict:
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        # Partition every parameter: with the default threshold a tiny model stays whole on each rank.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0, stage3_gather_16bit_weights_on_model_save=True)
    return {
        "zero_optimization": zero, "bf16": {"enabled": False}, "fp16": {"enabled": False},
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    }


class RecordingTrainer(transformers.Trainer):
    """Keeps every micro-batch's loss unrounded (the logged loss is rounded to 4 digits)."""

    losses: list

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        self.losses.append((loss[0] if isinstance(loss, tuple) else loss).item())
        return loss


def lora(model):
    import peft

    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def train(name, gc_kwargs, use_lora, stage, out_dir):
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out_dir, name), max_steps=STEPS, per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=ACCUMULATION,
        learning_rate=1e-3, max_grad_norm=0.0, lr_scheduler_type="constant", report_to="none", save_strategy="no", use_cpu=True,
        seed=0, dataloader_num_workers=0, disable_tqdm=True, deepspeed=deepspeed_config(stage),
        gradient_checkpointing=gc_kwargs is not None, gradient_checkpointing_kwargs=gc_kwargs,
    )
    model = build("llama", layers=LAYERS)  # after the arguments: under ZeRO-3, built partitioned (zero.Init)
    if use_lora:
        model = lora(model)
    rows = [torch.tensor(r) for r in token_rows(rows=STEPS * ACCUMULATION * MICRO_BATCH * 2)]
    trainer = RecordingTrainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    trainer.losses = []
    trainer.train()
    params = list(trainer.model.parameters())
    partitioned = all(hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel for p in params)
    with deepspeed.zero.GatheredParameters(params):
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return trainer.losses, weights, partitioned


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    options = parser.parse_args()
    # Without a GPU, accelerate shards the data only with use_cpu=True, and then leaves DeepSpeed's
    # communication (whose world size zero.Init reads) uninitialized: set up here, as DeepSpeed's own
    # examples do.
    deepspeed.init_distributed()
    rank = int(os.environ["RANK"])
    summary = {}
    for name, gc_kwargs, use_lora in RUNS + (LORA_RUNS if options.lora else []):
        losses, weights, partitioned = train(name, gc_kwargs, use_lora, options.stage, options.out_dir)
        summary[name] = {"losses": losses, "partitioned": partitioned}
        if rank == 0:
            torch.save(weights, os.path.join(options.out_dir, f"{name}.pt"))
    with open(os.path.join(options.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": torch.distributed.get_world_size(), "runs": summary}, f)
    # Left to interpreter exit, gloo's threads can abort the process (see tests/test_cli.py).
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
