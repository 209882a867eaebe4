"""LLaMA-Factory 0.9.5, unmodified, trains through torchgc: real `llamafactory-cli train` runs (a few
CPU steps each) with torchgc enabled only by `torchgc run` or by a wrapper that calls
torchgc.patch() and then LLaMA-Factory's own entry point.

LLaMA-Factory runs from the overlay that `make test` installs (.venv/overlays/llamafactory-0.9.5,
pinned in tests/constraints.txt), in subprocesses: its peft, trl, datasets and accelerate differ
from the main environment's. What torchgc did comes from the run itself, through
`torchgc run --report` (one JSON file per process, written by torchgc's own counters).
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from process_helpers import free_port, run_bounded
from tiny_models import VOCAB, tokenizer

TESTS = Path(__file__).resolve().parent


def overlay_dir() -> Path:
    line = next(line for line in (TESTS / "constraints.txt").read_text().splitlines() if line.startswith("#overlay llamafactory-"))
    return Path(sys.prefix) / "overlays" / line.split()[1]


OVERLAY = overlay_dir()
if not (OVERLAY / ".installed").is_file():
    if os.environ.get("CI"):
        raise RuntimeError(f"{OVERLAY} is not installed; `make test` installs it (make overlays)")
    pytest.skip(f"LLaMA-Factory's overlay {OVERLAY} is not installed (make overlays)", allow_module_level=True)

LAYERS = 3
STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama (fp32 and bf16 copies) with a word-level tokenizer, and an 8-row dataset."""
    root = tmp_path_factory.mktemp("llamafactory")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    for dtype, name in ((torch.float32, "model"), (torch.bfloat16, "model_bf16")):
        model.to(dtype).save_pretrained(root / name)
        tokenizer().save_pretrained(root / name)
    (root / "data").mkdir()
    rows = [{"instruction": " ".join(f"w{(i * 7 + j) % 90 + 3}" for j in range(6)), "input": "",
             "output": " ".join(f"w{(i * 5 + j) % 90 + 3}" for j in range(8))} for i in range(8)]
    (root / "data" / "tiny.json").write_text(json.dumps(rows))
    (root / "data" / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    return root


def config_file(assets, out: Path, finetuning="lora", model="model", **extra) -> Path:
    """A LLaMA-Factory training config: every step sees the same 8 rows, so the loss falls."""
    settings = {
        "model_name_or_path": str(assets / model), "stage": "sft", "do_train": True, "finetuning_type": finetuning,
        "dataset": "tiny", "dataset_dir": str(assets / "data"), "template": "default", "cutoff_len": 64,
        "overwrite_cache": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "output_dir": str(out),
        "overwrite_output_dir": True, "logging_steps": 1, "save_strategy": "no", "per_device_train_batch_size": 8,
        "learning_rate": 0.02 if finetuning == "lora" else 0.005, "max_steps": STEPS, "use_cpu": True, "report_to": "none",
        "bf16": False, "seed": 0, "lr_scheduler_type": "constant", **extra,
    }
    if finetuning == "lora":
        settings.setdefault("lora_target", "all")
        settings.setdefault("lora_rank", 4)
    path = out.parent / f"{out.name}.yaml"  # (0.9.5's .json reader is broken: json.load of a Path)
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings))
    return path


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHGC_") and k not in ("ACCELERATE_USE_FSDP", "FSDP_VERSION")}
    env["PYTHONPATH"] = os.pathsep.join([str(OVERLAY), str(TESTS / "stubs")])
    env["PATH"] = os.pathsep.join([str(OVERLAY / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DISABLE_VERSION_CHECK="1", **extra)
    return env


def run(command, cwd, env) -> subprocess.CompletedProcess:
    done = run_bounded(command, cwd=cwd, env=env)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stderr[-5000:]}"
    return done


def torchgc_run(*options, config, report, env=None, program=("llamafactory-cli",)) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torchgc", "run", *options, "--report", str(report), *program, "train", str(config)]
    return run(command, cwd=config.parent, env=env or environment())


def reports(directory: Path) -> list:
    """The reports of the processes that trained (torchgc run's own process counts nothing)."""
    found = [json.loads(path.read_text()) for path in sorted(directory.glob("torchgc-*.json"))]
    return [r for r in found if r["checkpoint_calls"]]


def losses(out: Path) -> list:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"] if (out / "trainer_state.json").exists() else None
    if history is None:  # the last trainer_state is in the newest checkpoint when save_strategy is steps
        history = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def assert_trained(out: Path, saved: str):
    values = losses(out)
    assert len(values) == STEPS and all(v == v and abs(v) < 1e6 for v in values), values
    assert values[-1] < values[0], f"the loss did not fall: {values}"
    assert (out / saved).is_file(), f"{saved} was not saved"


def assert_every_layer_ran(report: dict, how: str):
    assert report["checkpoint_calls"] == {how: LAYERS * STEPS}, report
    assert report["layer_calls"] == [["LlamaDecoderLayer", {how: STEPS}]] * LAYERS, report


def safetensors_dtypes(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {key: str(f.get_slice(key).get_dtype()) for key in f.keys()}


def test_lora_goes_through_torchgc_and_matches_llamafactorys_own_run_bit_for_bit(assets, tmp_path):
    # CPU fp32, checkpoint strategy: the same kernels in the same order as LLaMA-Factory's own
    # reentrant checkpointing, so every step's adapter has the same bits.
    own = tmp_path / "llamafactory"
    run(["llamafactory-cli", "train", str(config_file(assets, own, save_strategy="steps", save_steps=1))], cwd=tmp_path, env=environment())
    ours = tmp_path / "torchgc"
    torchgc_run("--strategy", "checkpoint", config=config_file(assets, ours, save_strategy="steps", save_steps=1), report=tmp_path / "report")
    (report,) = reports(tmp_path / "report")
    assert_every_layer_ran(report, "checkpoint")
    assert_trained(ours, "adapter_model.safetensors")
    assert losses(ours) == losses(own)
    for step in range(1, STEPS + 1):
        name = f"checkpoint-{step}/adapter_model.safetensors"
        assert (ours / name).read_bytes() == (own / name).read_bytes(), f"step {step}: the adapters differ"


def test_full_finetuning_with_upcast_layernorm_and_upcast_lmhead_output(assets, tmp_path):
    out = tmp_path / "full"
    config = config_file(assets, out, finetuning="full", upcast_layernorm=True, upcast_lmhead_output=True)
    torchgc_run(config=config, report=tmp_path / "report")
    (report,) = reports(tmp_path / "report")
    assert_every_layer_ran(report, "checkpoint")  # "auto" checkpoints CPU tensors
    assert report["fused_norm_calls"] == STEPS * (2 * LAYERS + 1 + 2 * LAYERS), "torchgc's fused norm did not run (forward and recompute)"
    assert_trained(out, "model.safetensors")
    norms = {k: v for k, v in safetensors_dtypes(out / "model.safetensors").items() if "norm" in k}
    assert len(norms) == 2 * LAYERS + 1 and set(norms.values()) == {"F32"}, norms


def test_lora_on_a_bf16_model_computes_norms_and_logits_in_fp32(assets, tmp_path):
    # On CPU LLaMA-Factory trains full models in fp32; a LoRA run on a model saved in bf16 keeps its
    # frozen weights bf16, so upcast_layernorm and upcast_lmhead_output have something to change.
    out = tmp_path / "bf16"
    config = config_file(assets, out, model="model_bf16", bf16=True, upcast_layernorm=True, upcast_lmhead_output=True)
    torchgc_run(config=config, report=tmp_path / "report")
    (report,) = reports(tmp_path / "report")
    assert_every_layer_ran(report, "checkpoint")
    assert report["fused_norm_calls"] > 0 and report["fp32_logits_calls"] == STEPS, report
    assert_trained(out, "adapter_model.safetensors")


def test_freeze_tuning_does_not_checkpoint_the_frozen_layers(assets, tmp_path):
    out = tmp_path / "freeze"
    config = config_file(assets, out, finetuning="freeze", freeze_trainable_layers=1)  # the top layer trains
    torchgc_run(config=config, report=tmp_path / "report", program=("-m", "llamafactory.cli"))  # the module form
    (report,) = reports(tmp_path / "report")
    assert report["layer_calls"] == [["LlamaDecoderLayer", {"frozen": STEPS}]] * (LAYERS - 1) + [["LlamaDecoderLayer", {"checkpoint": STEPS}]]
    assert_trained(out, "model.safetensors")


def test_use_unsloth_gc_selects_torchgcs_offload_on_any_device(assets, tmp_path):
    # LLaMA-Factory's own unsloth path hard-codes "cuda"; torchgc's offload runs on the CPU too.
    out = tmp_path / "unsloth"
    torchgc_run("--min-offload-bytes", "0", config=config_file(assets, out, use_unsloth_gc=True), report=tmp_path / "report")
    (report,) = reports(tmp_path / "report")
    assert_every_layer_ran(report, "offload")
    assert report["offloaded_bytes"] > 0
    assert_trained(out, "adapter_model.safetensors")


def test_two_processes_under_torchrun_are_both_patched(assets, tmp_path):
    # LLaMA-Factory relaunches itself under torchrun; the patch made by torchgc run must be in the workers.
    env = environment(FORCE_TORCHRUN="1", NNODES="1", NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    out = tmp_path / "ddp"
    torchgc_run("--strategy", "offload", "--min-offload-bytes", "0", config=config_file(assets, out, per_device_train_batch_size=4),
                report=tmp_path / "report", env=env)
    workers = reports(tmp_path / "report")
    assert sorted(r["rank"] for r in workers) == [0, 1], workers
    for report in workers:
        assert_every_layer_ran(report, "offload")
    assert_trained(out, "adapter_model.safetensors")


# A wrapper that patches, then runs LLaMA-Factory's own entry point; `order` says whether
# llamafactory is imported before or after torchgc.patch().
WRAPPER = textwrap.dedent(
    """
    import json, sys
    order, config, report = sys.argv[1:]
    if order == "after":
        from llamafactory.train.tuner import run_exp
    import torchgc
    torchgc.patch(strategy="checkpoint")
    if order == "before":
        from llamafactory.train.tuner import run_exp
    import llamafactory.model.patcher as patcher
    routed = patcher.prepare_model_for_training is torchgc.prepare_model_for_training
    import yaml
    run_exp(yaml.safe_load(open(config)))
    torchgc.unpatch()
    restored = patcher.prepare_model_for_training.__module__ == "llamafactory.model.model_utils.checkpointing"
    json.dump({"routed": routed, "restored": restored, **torchgc.stats()}, open(report, "w"))
    """
)


@pytest.mark.parametrize("order", ["before", "after"])
def test_patch_before_or_after_importing_llamafactory(assets, tmp_path, order):
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    out = tmp_path / "wrapped"
    config = config_file(assets, out)
    run([sys.executable, str(tmp_path / "wrapper.py"), order, str(config), str(tmp_path / "report.json")], cwd=tmp_path, env=environment())
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["routed"] and report["restored"], report
    assert_every_layer_ran(report, "checkpoint")
    assert_trained(out, "adapter_model.safetensors")


def test_another_llamafactory_version_gets_one_clear_warning(monkeypatch):
    import importlib.metadata
    import types
    import warnings

    import torchgc
    from torchgc.integrations import llamafactory

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.9.9" if name == "llamafactory" else "0")
    monkeypatch.setattr(llamafactory, "_warned_version", False)
    module = types.ModuleType(llamafactory.CHECKPOINTING_MODULE)
    module.prepare_model_for_training = lambda model, model_args: None
    monkeypatch.setitem(sys.modules, llamafactory.CHECKPOINTING_MODULE, module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llamafactory.route(torchgc.config.DEFAULTS)
        llamafactory.route(torchgc.config.DEFAULTS)
    try:
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and re.search(r"LLaMA-Factory 0\.9\.9 is installed.* routes the model preparation of LLaMA-Factory 0\.9\.5 only",
                                                messages[0]), messages
        assert module.prepare_model_for_training is llamafactory.prepare_model_for_training
    finally:
        llamafactory.unroute()
    assert module.prepare_model_for_training is not llamafactory.prepare_model_for_training
