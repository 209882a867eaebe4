"""`torchgc bench` end to end on a tiny config, and its errors on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchgc
import torchgc.integrations.transformers as hf_integration
from torchgc import bench
from torchgc.bench import configs, measure, sweep, worker

# apply_config patches transformers for torchgc configurations, as a worker process does.
pytestmark = pytest.mark.usefixtures("clean_patch")

TINY = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return path


def test_sweep_writes_table_json_and_plot_with_gradient_agreement(tiny_config, tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "torchgc", "bench", "--config", str(tiny_config), "--seq-lens", "16", "--steps", "1",
           "--strategies", "none,hf,torchgc-offload,torchgc-selective", "--memory-budgets", "0.9", "--every-n-layers", "2", "--no-fused-norm", "--no-freeze",
           "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "bench.json").read_text())
    assert report["environment"]["torch"] and report["environment"]["transformers"]
    names = {(r["name"], r["seq_len"]) for r in report["results"]}
    expected = {"none", "hf-reentrant", "hf-nonreentrant", "torchgc-offload-reentrant", "torchgc-offload-nonreentrant",
                "torchgc-selective-nonreentrant", "torchgc-auto-nonreentrant+budget-0.9", "torchgc-checkpoint-reentrant",
                "torchgc-checkpoint-nonreentrant", "torchgc-checkpoint-nonreentrant+every-2"}
    assert names == {(n, 16) for n in expected}
    # Each configuration ran through the public path: transformers' own enable for "hf", and for
    # torchgc the enable that torchgc.patch() installs on PreTrainedModel, with the run's options.
    for row in report["results"]:
        reentrant = "use_reentrant=True" if "-reentrant" in row["name"] else "use_reentrant=False"
        if row["name"] == "none":
            assert row["enabled_with"] is None and row["checkpointed_with"] is None
        elif row["name"].startswith("hf-"):
            assert row["enabled_with"] == "transformers.modeling_utils.PreTrainedModel.gradient_checkpointing_enable", row
            assert row["checkpointed_with"].startswith("torch.utils.checkpoint.checkpoint("), row
            assert reentrant in row["checkpointed_with"], row
        else:
            assert row["enabled_with"] == "torchgc.patching.gradient_checkpointing_enable", row
            function = "torchgc.planner.Planner(" if "budget" in row["name"] else "torchgc.strategies.checkpoint("
            assert row["checkpointed_with"].startswith(function), row
            strategy = row["name"].split("-")[1]
            assert f"strategy='{strategy}'" in row["checkpointed_with"] and reentrant in row["checkpointed_with"], row
    saved = {row["name"]: row["saved_for_backward_bytes"] for row in report["results"]}
    assert all(saved[name] < saved["none"] for name in saved if name != "none"), saved
    for row in report["results"]:
        assert row["step_seconds"] > 0
        if row["name"] != "none":
            assert row["grads_bitwise_equal"] is True, row["name"]
        if row["name"].startswith("torchgc-offload"):
            assert row["host_offloaded_bytes"] > 0, row["name"]
    assert (out / "bench.png").stat().st_size > 1000
    assert "hf-nonreentrant" in proc.stdout and "bitwise equal" in proc.stdout and "saved MiB" in proc.stdout
    # every_n_layers=2 of these 2 layers checkpoints layer 0 only, and is set against the plans.
    assert saved["torchgc-checkpoint-nonreentrant"] < saved["torchgc-checkpoint-nonreentrant+every-2"] < saved["none"], saved
    assert "Fixed patterns against memory-budget plans at no more measured peak memory:" in proc.stdout
    assert "torchgc-checkpoint-nonreentrant+every-2" in proc.stdout.split("Fixed patterns")[1]


SEQ_LEN = 64


def _model(kind, use_reentrant=False, layers=TINY["num_hidden_layers"], fused_norm=False):
    model = worker.build_model({"model_config": dict(TINY, num_hidden_layers=layers)}, torch.device("cpu"))
    worker.apply_config(model, configs.RunConfig(kind, use_reentrant, fused_norm=fused_norm))
    return model


@pytest.mark.parametrize("kind", ["torchgc-checkpoint", "torchgc-offload"])
def test_torchgc_configurations_are_enabled_through_patch_and_gradient_checkpointing_enable(kind, monkeypatch):
    enabled = []
    real_enable = hf_integration.enable
    monkeypatch.setattr(hf_integration, "enable", lambda model, *a, **k: enabled.append((model, k["options"])) or real_enable(model, *a, **k))
    model = _model(kind, use_reentrant=True, fused_norm=True)
    assert len(enabled) == 1 and enabled[0][0] is model, "the bench must call the model's gradient_checkpointing_enable once"
    options = enabled[0][1]
    assert options == torchgc.patching.current_options(), "the enable call must see the options given to torchgc.patch()"
    assert (options.strategy, options.use_reentrant, options.min_offload_bytes, options.fused_norm) == (kind.split("-")[1], True, 0, True)
    assert worker.describe_checkpointing(model)["enabled_with"] == "torchgc.patching.gradient_checkpointing_enable"


def _batch():
    input_ids = torch.randint(0, TINY["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    return {"input_ids": input_ids, "labels": input_ids}


def _saved_bytes(kind, use_reentrant=False, layers=TINY["num_hidden_layers"]):
    return measure.saved_for_backward_bytes(_model(kind, use_reentrant, layers), _batch())


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("kind", ["hf", "torchgc-checkpoint"])
def test_checkpointed_saved_bytes_are_the_layer_inputs_and_what_runs_outside_the_layers(kind, use_reentrant):
    layers, s, h, v = TINY["num_hidden_layers"], SEQ_LEN, TINY["hidden_size"], TINY["vocab_size"]
    head_dim = h // TINY["num_attention_heads"]
    expected = 4 * (
        layers * s * h        # each checkpointed layer's input
        + s * s               # the eager causal mask, kept for the layers' recompute
        + 2 * s * head_dim    # rotary cos and sin, kept likewise
        + 3 * s * h           # final norm: its input and normalized input; lm_head: its input
        + s * v               # cross entropy's log-softmax
    )
    # Not in `expected`: int64 positions and labels, the norm's rstd, scalars (about 1.7%).
    saved = _saved_bytes(kind, use_reentrant)
    assert abs(saved - expected) <= 0.03 * expected, (saved, expected)
    assert _saved_bytes("none") > 5 * saved


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_offload_does_not_count_the_inputs_it_moved_to_the_host(use_reentrant):
    # Every layer's input but the last one's has gone to the host by the end of forward.
    layers = 3
    offloaded = (layers - 1) * SEQ_LEN * TINY["hidden_size"] * 4
    checkpointed = _saved_bytes("torchgc-checkpoint", use_reentrant, layers)
    assert _saved_bytes("torchgc-offload", use_reentrant, layers) == checkpointed - offloaded


@pytest.mark.parametrize("kind,use_reentrant", [("torchgc-offload", False), ("hf", True)])
def test_measuring_leaves_the_next_step_unchanged(kind, use_reentrant):
    def grads_of_one_step(measure_first):
        model = _model(kind, use_reentrant)
        if measure_first:
            measure.saved_for_backward_bytes(model, _batch())
            model.zero_grad(set_to_none=True)
        model(**_batch()).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, measured = grads_of_one_step(False), grads_of_one_step(True)
    assert all(torch.equal(plain[n], measured[n]) for n in plain)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategies", "none,fast"], "--strategies: unknown fast; expected a subset of none, hf, torchgc-checkpoint, torchgc-offload, torchgc-selective, torchgc-auto"),
        (["--memory-budgets", "0.5,2"], "--memory-budgets: expected comma-separated fractions in (0, 1], got '0.5,2'"),
        (["--model", "/no/such/model"], "--model: expected a local checkpoint directory with a config.json, got '/no/such/model'"),
        (["--config", "/no/such/config.json"], "--config: no such file '/no/such/config.json'"),
        (["--seq-lens", "0,128"], "--seq-lens: expected lengths between 1 and the model's maximum 8192, got [0]"),
        (["--seq-lens", "100000"], "--seq-lens: expected lengths between 1 and the model's maximum 8192, got [100000]"),
        (["--seq-lens", "abc"], "--seq-lens: expected comma-separated integers, got 'abc'"),
        (["--steps", "0"], "--steps: expected an integer >= 1, got 0"),
        (["--device", "tpu"], "--device: expected cpu or cuda, got 'tpu'"),
        (["--layers", "0"], "--layers: expected an integer >= 1, got 0"),
        (["--every-n-layers", "2,0"], "--every-n-layers: expected comma-separated integers >= 1, got '2,0'"),
        (["--rounds", "0"], "--rounds: expected an integer >= 1, got 0"),
        (["--compile", "regional,jit"], "--compile: expected a comma-separated subset of none, regional, model, got 'regional,jit'"),
    ],
)
def test_bad_input_exits_non_zero_with_a_clear_error(args, message, capsys, tmp_path):
    assert bench.main(args + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_a_configuration_that_fails_in_its_worker_names_it_and_shows_the_worker_traceback():
    broken = {"model_config": dict(TINY, hidden_act="no-such-activation")}
    with pytest.raises(RuntimeError, match=r"(?s)configuration .*'kind': 'none'.* failed .*no-such-activation"):
        sweep.sweep(broken, [configs.RunConfig("none")], [16], device="cpu", batch_size=1, steps=1, warmup=0, progress=False)


def test_workers_are_fresh_processes_with_their_own_peak_memory():
    # Two identical runs forked from the same server measure the same peak: the first run's
    # memory is neither inherited by the second nor counted twice.
    spec = {"model_config": TINY}
    first, second = sweep.sweep(spec, [configs.RunConfig("none")] * 2, [64], device="cpu", batch_size=1, steps=1, warmup=0, progress=False)
    assert first.peak_activation_bytes > 0
    assert abs(first.peak_activation_bytes - second.peak_activation_bytes) <= 0.25 * first.peak_activation_bytes


def test_rounds_run_every_configuration_again_in_alternating_order_and_pool_their_steps(monkeypatch):
    # The worker process is replaced by one that records the order and returns made-up figures:
    # what is checked here is the sweep's bookkeeping, not a measurement.
    calls = []

    def fake_run(spec, context):
        calls.append(spec["config"]["kind"])
        round_index = int(Path(spec["grads_file"]).stem.rsplit("-", 1)[1])
        step = {"none": 1.0, "hf": 2.0}[spec["config"]["kind"]] + round_index
        return {"step_seconds": step, "step_seconds_all": [step, step], "peak_activation_bytes": 100 * (round_index + 1),
                "peak_reserved_bytes": None, "host_offloaded_bytes": 0, "saved_for_backward_bytes": 1, "grads_file": spec["grads_file"]}

    monkeypatch.setattr(sweep, "_run_in_subprocess", fake_run)
    monkeypatch.setattr(sweep, "_compare_grads", lambda reference, got: (0.0, True))
    results = sweep.sweep({"model_config": TINY}, [configs.RunConfig("none"), configs.RunConfig("hf")], [16],
                          device="cpu", batch_size=1, steps=2, warmup=0, rounds=3, progress=False)
    assert calls == ["none", "hf", "hf", "none", "none", "hf"]
    none, hf = results
    assert none.step_seconds_all == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0] and none.step_seconds == 2.0
    assert hf.step_seconds_all == [2.0, 2.0, 3.0, 3.0, 4.0, 4.0] and hf.step_seconds == 3.0
    assert none.peak_activation_bytes == hf.peak_activation_bytes == 300  # the highest round's
    assert none.grads_bitwise_equal is None and hf.grads_bitwise_equal is True


def test_compiled_runs_report_compile_time_apart_and_offload_still_offloads(tiny_config, tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "torchgc", "bench", "--config", str(tiny_config), "--seq-lens", "16", "--steps", "1",
           "--strategies", "none,torchgc-offload", "--compile", "regional", "--no-fused-norm", "--no-freeze", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads((out / "bench.json").read_text())["results"]}
    eager, compiled = rows["torchgc-offload-nonreentrant"], rows["torchgc-offload-nonreentrant+compile-regional"]
    assert set(rows) == {"none", "none+compile-regional", "torchgc-offload-reentrant", "torchgc-offload-nonreentrant",
                         "torchgc-offload-nonreentrant+compile-regional"}
    assert compiled["compile_seconds"] > 0 and eager["compile_seconds"] is None
    assert compiled["host_offloaded_bytes"] == eager["host_offloaded_bytes"] > 0
    # Compared with the eager run without checkpointing, as every other run is.
    assert compiled["grad_max_abs_diff"] < 1e-4 and rows["none+compile-regional"]["grad_max_abs_diff"] < 1e-4
    assert "compile s" in (out / "bench.txt").read_text()
