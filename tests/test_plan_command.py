"""`torchgc plan`: the plan a memory budget gives, printed with its predicted and measured bytes
and times, run as a user runs it (python -m torchgc plan ...)."""

import json
import subprocess
import sys

import pytest

import torchgc
from torchgc.bench import plan_command

CONFIG = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 6,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


def run_plan(*args):
    return subprocess.run([sys.executable, "-m", "torchgc", "plan", *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("budget", ["0.3", "0.6", "1.0"])
def test_prints_the_plan_with_predicted_and_measured_bytes_within_the_budget(config_file, tmp_path, budget):
    out = tmp_path / "plan.json"
    proc = run_plan("--config", config_file, "--seq-len", 256, "--memory-budget", budget, "--steps", 2, "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    plan, measured = result["plan"], result["measured"]
    assert len(plan["layers"]) == 6 and plan["shape"] == [1, 256, 64]
    total = plan["no_checkpoint_bytes"]
    assert plan["budget_bytes"] == int(float(budget) * total)
    # What a step under the plan measured is what the planner predicted, layer by layer and at the
    # peak, within 5% of the layers' peak without checkpointing; and the budget holds.
    for layer, kept in zip(plan["layers"], measured["kept_bytes"]):
        assert abs(kept - layer["kept_bytes"]) <= 0.05 * total / len(plan["layers"]), (layer, kept)
    assert abs(measured["peak_bytes"] - plan["predicted_bytes"]) <= 0.05 * total
    assert measured["peak_bytes"] <= 1.05 * plan["budget_bytes"]
    for layer, seconds in zip(plan["layers"], measured["recompute_seconds"]):
        assert (seconds == 0) == (layer["mode"] == "none"), (layer["mode"], seconds)
    table = proc.stdout
    assert f"memory_budget {budget} = " in table
    for i, layer in enumerate(plan["layers"]):
        assert f"{i:>5}  LlamaDecoderLayer        {layer['mode']:<10}" in table
    assert "activation peak: predicted" in table and "measured" in table


def test_a_budget_below_every_plan_exits_2_naming_the_smallest(config_file):
    proc = run_plan("--config", config_file, "--seq-len", 128, "--memory-budget", "0.02", "--steps", 1)
    assert proc.returncode == 2
    assert "torchgc plan: error: torchgc: memory_budget=0.02" in proc.stderr
    assert "is below the smallest activation memory" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory-budget", "lots"], "argument 'memory_budget' must be None, a fraction in (0, 1]"),
        (["--memory-budget", "0.5", "--seq-len", "0"], "--seq-len: expected an integer >= 1, got 0"),
        (["--memory-budget", "0.5", "--seq-len", "100000"], "--seq-len: expected at most the model's maximum 8192, got 100000"),
        (["--memory-budget", "0.5", "--config", "/no/such.json"], "--config: no such file '/no/such.json'"),
        (["--memory-budget", "0.5", "--device", "tpu"], "--device: expected cpu or cuda, got 'tpu'"),
    ],
)
def test_bad_input_exits_2_with_a_clear_error_and_leaves_torchgc_unpatched(args, message, capsys):
    assert plan_command.main(args) == 2
    assert message in capsys.readouterr().err
    assert torchgc.patching.current_options() is None
