"""Every entry point of benchmarks/run.py runs to the end on a tiny size and exits with status 0
(make gpu-check runs them under pipefail, so a wrong status stops it). No timing is checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
TINY = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def run_benchmark(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHGC_")}
    return subprocess.run([sys.executable, str(RUN), *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def test_strategies(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    done = run_benchmark("strategies", "--config", str(config), "--seq-lens", "16", "--steps", "1", "--warmup", "0",
                         "--strategies", "none,torchgc-offload", "--no-freeze", "--no-fused-norm", "--quiet", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "bench.json").is_file()
    assert "torchgc-offload-nonreentrant" in done.stdout


def test_offload():
    done = run_benchmark("offload", "--quick", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reload+wait" in done.stdout


def test_norm():
    done = run_benchmark("norm", "--quick", "--device", "cpu", "--rows", "64", "--hidden", "256")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rms norm" in done.stdout and "layer norm" in done.stdout and "ceiling (a)/(d)" in done.stdout


@pytest.mark.parametrize("config", [None, "qwen3-moe-tiny.json"])
def test_overhead(tmp_path, config):
    extra = [] if config is None else ["--config", str(RUN.parent / config)]
    done = run_benchmark("overhead", "--layers", "2", "--steps", "3", "--warmup", "0", "--json", str(tmp_path / "overhead.json"), *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torchgc / hf per-layer time: median" in done.stdout
    result = json.loads((tmp_path / "overhead.json").read_text())
    assert result["settings"]["layers"] == 2
    # The MoE model's routing is replayed: batch 1 x 32 tokens x top-2 experts, as int16.
    assert result["routing_bytes_per_layer_call"] == (0 if config is None else 1 * 32 * 2 * 2), result["routing_bytes_per_layer_call"]


@pytest.mark.parametrize("args", [[], ["nosuch"]])
def test_an_unknown_benchmark_exits_with_status_2(args):
    done = run_benchmark(*args)
    assert done.returncode == 2
    assert "expected one of strategies, offload, norm" in done.stderr
