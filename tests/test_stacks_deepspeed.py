"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (DS_ACCELERATOR=cpu, gloo), 2 ranks, on the user's path: an
unmodified HF Trainer script (tests/stacks/deepspeed_trainer.py) with a DeepSpeed config, launched
as `torchgc run torchrun ...` and as `torchgc run deepspeed ...`. Every configuration's losses and
final weights (gathered from the ranks) are bitwise those of the same run without checkpointing:
per rank the same fp32 ops run in the same order, and the reduction of two ranks' values does not
depend on their order. `torchgc run --report` shows torchgc ran in both workers.

One launch per ZeRO stage runs every configuration (a launch costs far more than a tiny run). The
first launch on a machine builds DeepSpeed's shared-memory comm op with ninja and g++ (about 40 s,
then cached under ~/.cache/torch_extensions)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from process_helpers import free_port
from stack_helpers import torchgc_launch, worker_reports
from tiny_models import build

pytest.importorskip("deepspeed")

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "stacks" / "deepspeed_trainer.py"
sys.path.insert(0, str(SCRIPT.parent))
import deepspeed_trainer as script  # noqa: E402  (the run names and sizes the script uses)


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHGC_")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


def assert_runs_match_no_checkpointing(out: Path, runs, *, partitioned: bool):
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # The ranks trained on different rows, so the gradients were really reduced across them.
    assert ranks[0]["runs"]["none"]["losses"] != ranks[1]["runs"]["none"]["losses"]
    for name, gc_kwargs, _ in runs:
        for rank in ranks:
            assert rank["runs"][name]["partitioned"] is partitioned, (name, "ZeRO-3 partitions every parameter; ZeRO-2 none")
        if gc_kwargs is None:
            continue
        reference = "lora-none" if name.startswith("lora-") else "none"
        for rank in ranks:
            assert rank["runs"][name]["losses"] == rank["runs"][reference]["losses"], name
        expected, actual = torch.load(out / f"{reference}.pt"), torch.load(out / f"{name}.pt")
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}: {key} differs from the run without checkpointing"
    initial = build("llama", layers=script.LAYERS).state_dict()
    trained = torch.load(out / "none.pt")
    assert all(not torch.equal(initial[key], trained[key]) for key in initial), "a weight did not change: the comparison proves little"


def expected_calls(runs) -> dict:
    calls = {}
    for _, gc_kwargs, _ in runs:
        if gc_kwargs is not None:
            calls[gc_kwargs["strategy"]] = calls.get(gc_kwargs["strategy"], 0) + script.LAYERS * script.STEPS * script.ACCUMULATION
    return calls


def test_zero2_under_torchrun(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    torchgc_launch(["torchrun", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(SCRIPT), str(out), "--stage", "2"], tmp_path / "report", tmp_path, environment())
    assert_runs_match_no_checkpointing(out, script.RUNS, partitioned=False)
    reports = worker_reports(tmp_path / "report")
    assert sorted(reports) == [0, 1]
    for report in reports.values():
        assert report["checkpoint_calls"] == expected_calls(script.RUNS), report
        assert report["offloaded_bytes"] > 0


def test_zero3_with_lora_under_the_deepspeed_launcher(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # The deepspeed launcher passes --local_rank to the script, which accepts it.
    torchgc_launch(["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(SCRIPT), str(out), "--stage", "3", "--lora"], tmp_path / "report", tmp_path, environment())
    runs = script.RUNS + script.LORA_RUNS
    assert_runs_match_no_checkpointing(out, runs, partitioned=True)
    reports = worker_reports(tmp_path / "report")
    assert sorted(reports) == [0, 1]
    for report in reports.values():
        assert report["checkpoint_calls"] == expected_calls(runs), report
