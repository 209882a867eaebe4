"""LLaMA-Factory 0.9.5 with a DeepSpeed ZeRO-2 config (the keys of its examples/deepspeed/
ds_z2_config.json) on CPU, 2 ranks: `torchgc run llamafactory-cli train` with FORCE_TORCHRUN=1, once
through torchgc (LLaMA-Factory's default reentrant checkpointing) and once without checkpointing,
with the same losses and the same saved LoRA adapter, bit for bit.

ZeRO-3 is tested with HF Trainer (tests/test_stacks_deepspeed.py), not here: on a machine without
GPUs, accelerate shards the data only with use_cpu, and then does not set up DeepSpeed's
communication, so the zero.Init that loading a model under ZeRO-3 enters sees a world of 1 and stops
("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size"), with or
without torchgc; the HF script sets it up itself, LLaMA-Factory cannot be told to.

LLaMA-Factory runs from its overlay, as in tests/test_llamafactory.py, whose helpers this reuses."""

import json
from pathlib import Path

import pytest

from process_helpers import free_port
from stack_helpers import torchgc_launch, worker_reports
from test_llamafactory import LAYERS, STEPS, assets, config_file, environment, losses  # noqa: F401 (assets: a fixture)

pytest.importorskip("deepspeed")

DS_Z2_CONFIG = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 5e8, "overlap_comm": False, "reduce_scatter": True,
                          "reduce_bucket_size": 5e8, "contiguous_gradients": True, "round_robin_gradients": True},
}


def test_zero2_lora_through_torchgc_matches_no_checkpointing(assets, tmp_path):
    (tmp_path / "ds_z2_config.json").write_text(json.dumps(DS_Z2_CONFIG))
    outs = {}
    for name, extra in (("none", {"disable_gradient_checkpointing": True}), ("torchgc", {})):
        outs[name] = tmp_path / name
        config = config_file(assets, outs[name], deepspeed=str(tmp_path / "ds_z2_config.json"), per_device_train_batch_size=4, **extra)
        env = environment(DS_ACCELERATOR="cpu", FORCE_TORCHRUN="1", NNODES="1", NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        torchgc_launch(["llamafactory-cli", "train", str(config)], tmp_path / f"report-{name}", tmp_path, env)
    assert losses(outs["torchgc"]) == losses(outs["none"]) and len(losses(outs["none"])) == STEPS
    assert losses(outs["none"])[-1] < losses(outs["none"])[0], "the loss did not fall"
    adapter = "adapter_model.safetensors"
    assert (outs["torchgc"] / adapter).read_bytes() == (outs["none"] / adapter).read_bytes(), "the adapters differ"
    workers = worker_reports(tmp_path / "report-torchgc")
    assert sorted(workers) == [0, 1], workers
    for report in workers.values():
        assert report["checkpoint_calls"] == {"checkpoint": LAYERS * STEPS}, report
