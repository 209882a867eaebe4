"""`torchgc bench` end to end on a tiny config, and its errors on bad input."""

import json
import subprocess
import sys

import pytest

from torchgc import bench

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
           "--strategies", "none,hf,torchgc-offload", "--no-fused-norm", "--no-freeze", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "bench.json").read_text())
    assert report["environment"]["torch"] and report["environment"]["transformers"]
    names = {(r["name"], r["seq_len"]) for r in report["results"]}
    expected = {"none", "hf-reentrant", "hf-nonreentrant", "torchgc-offload-reentrant", "torchgc-offload-nonreentrant"}
    assert names == {(n, 16) for n in expected}
    for row in report["results"]:
        assert row["step_seconds"] > 0
        if row["name"] != "none":
            assert row["grads_bitwise_equal"] is True, row["name"]
        if row["name"].startswith("torchgc-offload"):
            assert row["host_offloaded_bytes"] > 0, row["name"]
    assert (out / "bench.png").stat().st_size > 1000
    assert "hf-nonreentrant" in proc.stdout and "bitwise equal" in proc.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategies", "none,fast"], "--strategies: unknown fast; expected a subset of none, hf, torchgc-checkpoint, torchgc-offload"),
        (["--model", "/no/such/model"], "--model: expected a local checkpoint directory with a config.json, got '/no/such/model'"),
        (["--config", "/no/such/config.json"], "--config: no such file '/no/such/config.json'"),
        (["--seq-lens", "0,128"], "--seq-lens: expected lengths between 1 and the model's maximum 8192, got [0]"),
        (["--seq-lens", "100000"], "--seq-lens: expected lengths between 1 and the model's maximum 8192, got [100000]"),
        (["--seq-lens", "abc"], "--seq-lens: expected comma-separated integers, got 'abc'"),
        (["--steps", "0"], "--steps: expected an integer >= 1, got 0"),
        (["--device", "tpu"], "--device: expected cpu or cuda, got 'tpu'"),
        (["--layers", "0"], "--layers: expected an integer >= 1, got 0"),
    ],
)
def test_bad_input_exits_non_zero_with_a_clear_error(args, message, capsys, tmp_path):
    assert bench.main(args + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()
