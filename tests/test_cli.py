"""The launcher: `python -m torchgc run [options] script.py args...` and the `torchgc` console script."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from process_helpers import free_port, run_launcher
from torchgc import cli

# An ordinary training script: it never imports torchgc. After HF Trainer's step with
# gradient_checkpointing=True, it reports which function transformers' layers checkpoint with,
# and counts how often the layers call it in one more forward/backward.
TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    from helper import tiny_llama   # from the script's own directory, as with `python script.py`

    model = tiny_llama()
    rows = [torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=sys.argv[2], max_steps=1, per_device_train_batch_size=2, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, gradient_checkpointing=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=data).train()

    layers = model.model.layers
    installed = layers[0]._gradient_checkpointing_func
    calls = []
    for layer in layers:
        def counting(*a, _inner=layer._gradient_checkpointing_func, **k):
            calls.append(1)
            return _inner(*a, **k)
        layer._gradient_checkpointing_func = counting
    model(input_ids=rows[0][None], labels=rows[0][None]).loss.backward()
    target = getattr(installed, "func", installed)
    report = {
        "name": __name__,
        "argv": sys.argv,
        "function": target.__module__ + "." + target.__qualname__,
        "keywords": {k: v for k, v in getattr(installed, "keywords", {}).items() if isinstance(v, (str, bool, int, type(None)))},
        "calls": len(calls),
    }
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)
    """
)

HELPER = textwrap.dedent(
    """
    import torch, transformers

    def tiny_llama():
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(config)
    """
)


@pytest.fixture
def script(tmp_path):
    (tmp_path / "helper.py").write_text(HELPER)
    path = tmp_path / "train.py"
    path.write_text(TRAIN_SCRIPT)
    return path


def _environment(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHGC_")}
    env.update(extra)
    return env


def _launch(command, cwd, env=None):
    return subprocess.run(command, cwd=cwd, env=env or _environment(), capture_output=True, text=True, timeout=300)


def test_launcher_runs_an_unmodified_script_through_torchgc(script, tmp_path):
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-m", "torchgc", "run", "--strategy", "offload", "--no-prefetch", "--max-host-bytes", "64MiB",
               str(script), str(report_path), str(tmp_path / "out")]
    done = _launch(command, cwd=tmp_path.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["name"] == "__main__"
    assert report["argv"] == [str(script), str(report_path), str(tmp_path / "out")]
    assert report["function"] == "torchgc.strategies.checkpoint"
    assert report["keywords"]["strategy"] == "offload" and report["keywords"]["prefetch"] is False
    assert report["keywords"]["max_host_bytes"] == 64 * 2**20
    assert report["calls"] == 2, "each of the two layers should checkpoint through torchgc once"


def test_without_the_launcher_the_script_does_not_use_torchgc(script, tmp_path):
    report_path = tmp_path / "report.json"
    done = _launch([sys.executable, str(script), str(report_path), str(tmp_path / "out")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(report_path.read_text())["function"] == "torch.utils.checkpoint.checkpoint"


def test_console_script_and_environment_configuration(script, tmp_path):
    console = Path(sys.executable).parent / "torchgc"
    if not console.exists():
        pytest.skip(f"the torchgc console script is not installed next to {sys.executable}")
    report_path = tmp_path / "report.json"
    env = _environment(TORCHGC_STRATEGY="checkpoint", TORCHGC_USE_REENTRANT="false")
    done = _launch([str(console), "run", str(script), str(report_path), str(tmp_path / "out")], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    keywords = json.loads(report_path.read_text())["keywords"]
    assert (keywords["strategy"], keywords["use_reentrant"]) == ("checkpoint", False)


def test_bad_configuration_stops_the_launcher_with_a_clear_error(script, tmp_path):
    env = _environment(TORCHGC_STRATEGY="fastest")
    done = _launch([sys.executable, "-m", "torchgc", "run", str(script), "x", "y"], cwd=tmp_path, env=env)
    assert done.returncode != 0
    assert "environment variable TORCHGC_STRATEGY must be one of 'auto', 'checkpoint', 'offload', 'selective'; got 'fastest'" in done.stderr


def test_parser_passes_the_script_arguments_through_untouched():
    args = cli.build_parser().parse_args(["run", "--strategy", "auto", "train.py", "--strategy", "x", "-m", "y"])
    assert (args.strategy, args.target, args.args) == ("auto", "train.py", ["--strategy", "x", "-m", "y"])
    assert args.use_reentrant is None and args.prefetch is None  # not given: the environment decides
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--strategy", "fastest", "train.py"])


def test_run_module_mode(tmp_path, monkeypatch):
    (tmp_path / "tgc_probe_module.py").write_text(
        "import json, sys, transformers\n"
        "from transformers import PreTrainedModel\n"
        "report = [PreTrainedModel.gradient_checkpointing_enable.__module__, __name__, sys.argv]\n"
        "open(sys.argv[1], 'w').write(json.dumps(report))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out.json"
    saved_argv = list(sys.argv)
    # Options after the module name are the module's, even ones torchgc run has itself.
    module_args = [str(out), "--verbose", "--strategy", "mine", "-m", "x"]
    try:
        assert cli.main(["run", "--strategy", "checkpoint", "-m", "tgc_probe_module", *module_args]) == 0
    finally:
        sys.argv[:] = saved_argv
        import torchgc

        torchgc.unpatch()
    enable_module, name, argv = json.loads(out.read_text())
    assert (enable_module, name) == ("torchgc.patching", "__main__")
    assert argv == [str(tmp_path / "tgc_probe_module.py"), *module_args]  # argv[0] as `python -m` sets it


def test_run_without_a_program_says_what_to_give():
    for argv, message in ((["run", "-m"], "-m needs a module name"), (["run", "--strategy", "auto"], "give a script to run, or -m MODULE")):
        with pytest.raises(SystemExit, match=message):
            cli.main(argv)


# --- processes the program starts: torchrun workers ------------------------------------------

# An unmodified DDP program run by torchrun. Each worker reports which function its layers
# checkpoint with, with which options, how often it ran, and whether the user's own sitecustomize
# (which torchgc's must not hide) ran in it.
WORKER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist, transformers

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.gradient_checkpointing_enable()
    installed = model.model.layers[0]._gradient_checkpointing_func
    calls = []
    for layer in model.model.layers:
        def counting(*a, _inner=layer._gradient_checkpointing_func, **k):
            calls.append(1)
            return _inner(*a, **k)
        layer._gradient_checkpointing_func = counting
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    ddp(input_ids=ids, labels=ids).loss.backward()
    target = getattr(installed, "func", installed)
    report = {
        "function": target.__module__ + "." + target.__qualname__,
        "keywords": {k: v for k, v in getattr(installed, "keywords", {}).items() if isinstance(v, (str, bool, int, type(None)))},
        "calls": len(calls),
        "user_sitecustomize": os.environ.get("USER_SITECUSTOMIZE_RAN"),
    }
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    """
)


def test_torchrun_workers_are_patched_with_the_launcher_options(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER_SCRIPT)
    user_site = tmp_path / "user_site"
    user_site.mkdir()
    (user_site / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = 'yes'\n")
    out = tmp_path / "out"
    out.mkdir()
    env = _environment(PYTHONPATH=str(user_site), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torchgc", "run", "--strategy", "offload", "--no-prefetch", "--min-offload-bytes", "0",
               "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(tmp_path / "worker.py"), str(out)]
    done = run_launcher(command, cwd=tmp_path, env=env, outputs=[out])
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["function"] == "torchgc.strategies.checkpoint", report
        assert (report["keywords"]["strategy"], report["keywords"]["prefetch"], report["keywords"]["min_offload_bytes"]) == ("offload", False, 0)
        assert report["calls"] == 2, report
        assert report["user_sitecustomize"] == "yes", "torchgc's startup hook hid the user's sitecustomize"


def test_console_scripts_are_found_on_the_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "tgc-probe-tool"
    tool.write_text(f"#!{sys.executable}\nimport sys\nfrom transformers import PreTrainedModel\n"
                    "open(sys.argv[1], 'w').write(PreTrainedModel.gradient_checkpointing_enable.__module__)\n")
    tool.chmod(0o755)
    (bin_dir / "not-python").write_text("#!/bin/sh\necho hi\n")
    (bin_dir / "not-python").chmod(0o755)
    env = _environment(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    done = _launch([sys.executable, "-m", "torchgc", "run", "tgc-probe-tool", str(tmp_path / "out.txt")], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out.txt").read_text() == "torchgc.patching"
    # Any other executable runs in place of the launcher (issue 22; it used to stop with "is not a
    # Python script"), its exit status kept: tests/test_run_executable.py runs Python behind one.
    (bin_dir / "not-python").write_text("#!/bin/sh\necho hi \"$@\"\nexit 3\n")
    done = _launch([sys.executable, "-m", "torchgc", "run", "not-python", "a", "b"], cwd=tmp_path, env=env)
    assert (done.returncode, done.stdout) == (3, "hi a b\n"), done.stderr[-3000:]
    done = _launch([sys.executable, "-m", "torchgc", "run", "tgc-no-such-program"], cwd=tmp_path, env=env)
    assert done.returncode != 0 and "no such script or executable: tgc-no-such-program" in done.stderr


# An unmodified HF Trainer script under `accelerate launch` with an FSDP2 config, 2 CPU processes.
# On CPU accelerate sets its FSDP2 environment (ACCELERATE_USE_FSDP, FSDP_VERSION) but runs the
# processes data-parallel without sharding; real FSDP2 sharding is tested in test_distributed.py.
ACCELERATE_FSDP2_CONFIG = textwrap.dedent(
    """
    compute_environment: LOCAL_MACHINE
    distributed_type: FSDP
    fsdp_config:
      fsdp_version: 2
      fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
      fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
      fsdp_reshard_after_forward: true
      fsdp_cpu_ram_efficient_loading: false
    mixed_precision: 'no'
    machine_rank: 0
    num_machines: 1
    num_processes: 2
    use_cpu: true
    main_process_ip: 127.0.0.1
    main_process_port: {port}
    rdzv_backend: static
    same_network: true
    """
)

TRAINER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, warnings
    import torch, transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    rows = [torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    args = transformers.TrainingArguments(output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=2, report_to="none",
                                          save_strategy="no", use_cpu=True, disable_tqdm=True, gradient_checkpointing=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    installed = model.model.layers[0]._gradient_checkpointing_func
    report = {
        "function": installed.func.__module__ + "." + installed.func.__qualname__,
        "keywords": {k: v for k, v in installed.keywords.items() if isinstance(v, (str, bool, int, type(None)))},
        "fsdp2_warnings": sum("FSDP2 is in use" in str(w.message) for w in caught),
    }
    with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(report, f)
    # Left to interpreter exit, gloo's threads can abort the process ("terminate called without an
    # active exception"); seen once in make test.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    """
)


def test_accelerate_launch_with_fsdp2_patches_both_workers_and_forces_non_reentrant(tmp_path):
    (tmp_path / "train.py").write_text(TRAINER_SCRIPT)
    (tmp_path / "fsdp2.yaml").write_text(ACCELERATE_FSDP2_CONFIG.format(port=free_port()))
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "torchgc", "run", "--use-reentrant", "--strategy", "checkpoint", "--report", str(tmp_path / "report"),
               "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp2.yaml"), str(tmp_path / "train.py"), str(out)]
    done = run_launcher(command, cwd=tmp_path, env=_environment(OMP_NUM_THREADS="1"), outputs=[tmp_path / "report"])
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads(p.read_text()) for p in (tmp_path / "report").glob("torchgc-*.json")]
    assert sorted(r["rank"] for r in reports if r["checkpoint_calls"]) == [0, 1], reports
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["function"] == "torchgc.strategies.checkpoint", report
        # The launcher asked for reentrant; FSDP2 makes it non-reentrant, with one warning.
        assert (report["keywords"]["strategy"], report["keywords"]["use_reentrant"]) == ("checkpoint", False), report
        assert report["fsdp2_warnings"] == 1, report
