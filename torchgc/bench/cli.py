"""`torchgc bench`'s command line: checks the arguments, runs the sweep, writes the report."""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from torchgc.bench import report
from torchgc.bench.configs import COMPILE_MODES, DEFAULT_MODEL_CONFIG, STRATEGY_KINDS, default_runs
from torchgc.bench.sweep import sweep

DESCRIPTION = "memory and speed of every checkpointing strategy on one model"


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="torchgc bench", description=DESCRIPTION)
    add_model_arguments(parser)
    parser.add_argument("--seq-lens", default="512,2048", help="comma-separated sequence lengths (default: 512,2048)")
    parser.add_argument("--strategies", default=",".join(STRATEGY_KINDS), help=f"comma-separated subset of {', '.join(STRATEGY_KINDS)}")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, in alternating order, so that "
                        "the machine's drift during the sweep weighs on all alike (default: 1)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-fused-norm", action="store_true", help="skip the fused-norm variant")
    parser.add_argument("--memory-budgets", default="", help="comma-separated fractions, each a torchgc-auto run planned within it (e.g. 0.25,0.5,0.75)")
    parser.add_argument("--every-n-layers", default="", help="comma-separated n, each a torchgc-checkpoint run of layers 0, n, 2n, ... only "
                        "(transformers' every_n_layers pattern), compared with the plans at equal peak memory (e.g. 2,4)")
    parser.add_argument("--compile", default="none", help="comma-separated subset of none, regional (each decoder layer torch.compile'd "
                        "and assigned back) and model (torch.compile(model)): compiled runs of no checkpointing, hf and torchgc's "
                        "checkpoint, offload and selective, with the compile time apart from the step time")
    parser.add_argument("--no-freeze", action="store_true", help="skip the bottom-quarter-trainable variants")
    parser.add_argument("--out", default="results", help="folder for bench.json and bench.png (default: results)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a local Hugging Face checkpoint directory")
    source.add_argument("--config", help="a transformers config.json (the model is built with random weights)")
    parser.add_argument("--layers", type=int, default=None, help="override the model's number of layers (with --config or the default)")


def model_source(args: argparse.Namespace):
    """(model spec for worker.build_model, config dict) from --model, --config, --layers, or
    (an error message, None)."""
    if args.model:
        if not (Path(args.model) / "config.json").is_file():
            return f"--model: expected a local checkpoint directory with a config.json, got {args.model!r}", None
        model_spec = {"model_path": str(Path(args.model).resolve())}
        config_dict = json.loads((Path(args.model) / "config.json").read_text())
    elif args.config:
        if not Path(args.config).is_file():
            return f"--config: no such file {args.config!r}", None
        config_dict = json.loads(Path(args.config).read_text())
        model_spec = {"model_config": config_dict}
    else:
        config_dict = DEFAULT_MODEL_CONFIG
        model_spec = {"model_config": dict(DEFAULT_MODEL_CONFIG)}
    if args.layers is not None:
        if args.layers < 1:
            return f"--layers: expected an integer >= 1, got {args.layers}", None
        if "model_config" not in model_spec:
            return "--layers: only with --config or the built-in model, not with --model", None
        model_spec["model_config"]["num_hidden_layers"] = args.layers
    return model_spec, config_dict


def pick_device(asked: Optional[str]) -> str:
    """The device to run on (default: cuda when available), or an error message starting "--device"."""
    import torch

    device = asked or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "--device: cuda was asked for but no CUDA GPU is available"
    if device not in ("cpu",) and not device.startswith("cuda"):
        return f"--device: expected cpu or cuda, got {device!r}"
    return device


def fail(message: str, command: str = "bench") -> int:
    """Prints `torchgc COMMAND: error: MESSAGE` and returns the exit status of bad input."""
    print(f"torchgc {command}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    lists = _lists(args)
    if isinstance(lists, str):
        return fail(lists)
    kinds, seq_lens, budgets, every, compile_modes = lists
    for name, value in [("--batch-size", args.batch_size), ("--steps", args.steps), ("--rounds", args.rounds)]:
        if value < 1:
            return fail(f"{name}: expected an integer >= 1, got {value}")
    if args.warmup < 0:
        return fail(f"--warmup: expected an integer >= 0, got {args.warmup}")
    model_spec, config_dict = model_source(args)
    if isinstance(model_spec, str):
        return fail(model_spec)
    max_len = config_dict.get("max_position_embeddings") or config_dict.get("n_positions")
    bad = [s for s in seq_lens if s < 1 or (max_len and s > max_len)]
    if bad or not seq_lens:
        return fail(f"--seq-lens: expected lengths between 1 and the model's maximum {max_len}, got {bad or '(none)'}")
    device = pick_device(args.device)
    if device.startswith("--device"):
        return fail(device)
    runs = [r for r in default_runs(fused_norm=not args.no_fused_norm, freeze=not args.no_freeze, memory_budgets=budgets, every_n_layers=every,
                                     compile_modes=compile_modes) if r.kind in kinds]
    try:
        results = sweep(model_spec, runs, seq_lens, device=device, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                        rounds=args.rounds, progress=not args.quiet)
    except RuntimeError as exc:
        return fail(str(exc).removeprefix("torchgc bench: "))
    settings = {"seq_lens": seq_lens, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "compile": compile_modes, "model": model_spec}
    written = report.write(results, Path(args.out), device=device, settings=settings)
    print(f"\n{written}")
    return 0


def _lists(args: argparse.Namespace):
    """The comma-separated arguments, parsed and checked: (strategy kinds, sequence lengths,
    budgets, every_n_layers values, compile modes), or an error message. A budget adds the
    torchgc-auto runs it needs, an every_n_layers value the torchgc-checkpoint ones."""
    kinds = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [k for k in kinds if k not in STRATEGY_KINDS]
    if unknown or not kinds:
        return f"--strategies: unknown {', '.join(unknown) or '(none given)'}; expected a subset of {', '.join(STRATEGY_KINDS)}"
    try:
        seq_lens = [int(s) for s in args.seq_lens.split(",") if s.strip()]
    except ValueError:
        return f"--seq-lens: expected comma-separated integers, got {args.seq_lens!r}"
    budgets = _numbers(args.memory_budgets, float)
    if budgets is None or any(not 0 < b <= 1 for b in budgets):
        return f"--memory-budgets: expected comma-separated fractions in (0, 1], got {args.memory_budgets!r}"
    every = _numbers(args.every_n_layers, int)
    if every is None or any(n < 1 for n in every):
        return f"--every-n-layers: expected comma-separated integers >= 1, got {args.every_n_layers!r}"
    compile_modes = [s.strip() for s in args.compile.split(",") if s.strip()]
    if not compile_modes or any(m not in COMPILE_MODES for m in compile_modes):
        return f"--compile: expected a comma-separated subset of {', '.join(COMPILE_MODES)}, got {args.compile!r}"
    if budgets and "torchgc-auto" not in kinds:
        kinds.append("torchgc-auto")
    if every and "torchgc-checkpoint" not in kinds:
        kinds.append("torchgc-checkpoint")
    return kinds, seq_lens, budgets, every, compile_modes


def _numbers(text: str, kind):
    try:
        return [kind(s) for s in text.split(",") if s.strip()]
    except ValueError:
        return None
