"""Per-layer time of checkpointing through torchgc against transformers' own, on a model small
enough that Python's per-call overhead dominates the step.

Three copies of one model train side by side, each enabled the way a user enables it:
  none     no checkpointing (for scale)
  hf       transformers' own model.gradient_checkpointing_enable()
  torchgc  torchgc.patch(strategy=...) and then the same model.gradient_checkpointing_enable()
Both checkpointing runs take their defaults otherwise (the same use_reentrant). For an MoE model,
torchgc's time includes replaying each layer's routing in its recompute (transformers' own does not
replay it), and the bytes kept for that are printed. Steps run in
pairs whose order alternates, so drift on a shared machine weighs on both alike. A step is one
forward and backward on random tokens; its time over the number of decoder layers is the
per-layer time. The figure to read is the median of torchgc's step time over hf's, pair by pair.

Another model: --config FILE (a transformers config.json; random weights), with --layers to
change its depth; --kwargs adds gradient_checkpointing_kwargs to the torchgc run only.
Usage: python benchmarks/run.py overhead [--config FILE] [--layers N] [--seq-len 32] [--steps 200]
"""

import argparse
import json
import statistics
from typing import Callable, Dict

import torch

# A 16-layer Llama with hidden size 64: a layer's arithmetic takes microseconds, so the step time
# is mostly the Python of the layer calls, checkpointing's included.
DEFAULT_MODEL_CONFIG = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def build_models(config: dict, device: torch.device, strategy: str, kwargs: dict) -> Dict[str, torch.nn.Module]:
    """The same model three times: without checkpointing, with transformers' own, with torchgc's."""
    import torchgc
    from torchgc.bench.worker import build_model

    spec = {"model_config": config}
    models = {name: build_model(spec, device) for name in ("none", "hf", "torchgc")}
    models["hf"].gradient_checkpointing_enable()
    with torchgc.patched(strategy=strategy):
        models["torchgc"].gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
    return models


def training_step(model: torch.nn.Module, inputs: dict) -> Callable[[], None]:
    def step():
        model(**inputs).loss.backward()

    return step


def paired_step_times(models: Dict[str, torch.nn.Module], inputs: dict, steps: int, warmup: int) -> Dict[str, list]:
    """Each model's step times, the models taking turns, in an order that reverses every step."""
    from torchgc.bench.measure import timed_calls

    calls = {name: training_step(model, inputs) for name, model in models.items()}
    names = list(models)
    for name in names:
        timed_calls(calls[name], repeats=warmup)
    times = {name: [] for name in names}
    for i in range(steps):
        for name in names if i % 2 == 0 else reversed(names):
            times[name] += timed_calls(calls[name], repeats=1)
            models[name].zero_grad(set_to_none=True)
    return times


def routing_bytes_per_layer_call(model: torch.nn.Module, inputs: dict) -> float:
    """What torchgc keeps per checkpointed layer call to replay an MoE layer's routing (0 for a
    dense model), from torchgc.stats() over one step."""
    import torchgc

    torchgc.reset_stats()
    training_step(model, inputs)()
    model.zero_grad(set_to_none=True)
    stats = torchgc.stats()
    return stats["routing_bytes_kept"] / max(1, sum(stats["checkpoint_calls"].values()))


def summarize(times: Dict[str, list], layers: int) -> dict:
    ratios = sorted(t / h for t, h in zip(times["torchgc"], times["hf"]))
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        "per_layer_seconds": {name: statistics.median(values) / layers for name, values in times.items()},
        "torchgc_over_hf": statistics.median(ratios),
        "torchgc_over_hf_quartiles": [quartiles[0], quartiles[2]],
    }


def render(summary: dict, settings: dict) -> str:
    per_layer = summary["per_layer_seconds"]
    lines = [
        f"overhead: {settings['model']}, {settings['layers']} layers, batch {settings['batch_size']} x {settings['seq_len']} tokens, "
        f"{settings['device']}, {settings['threads']} thread(s), {settings['steps']} steps each, torchgc strategy {settings['strategy']!r}",
        f"{'run':10} {'per layer us':>13} {'x hf':>6}",
    ]
    for name, seconds in per_layer.items():
        lines.append(f"{name:10} {seconds * 1e6:13.1f} {seconds / per_layer['hf']:6.3f}")
    low, high = summary["torchgc_over_hf_quartiles"]
    lines.append(f"torchgc / hf per-layer time: median {summary['torchgc_over_hf']:.3f} over {settings['steps']} pairs of steps "
                 f"(quartiles {low:.3f} to {high:.3f})")
    if summary.get("routing_bytes_per_layer_call"):
        lines.append(f"routing replay: {summary['routing_bytes_per_layer_call']:.0f} bytes of expert choices kept per layer call")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a transformers config.json (default: the 16-layer Llama above)")
    parser.add_argument("--layers", type=int, default=None, help="override the model's number of layers")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each run (default: 200)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--strategy", default="checkpoint", help="torchgc's strategy (default: checkpoint, plain recompute)")
    parser.add_argument("--kwargs", default="{}", help="JSON: gradient_checkpointing_kwargs for the torchgc run only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1; the ops are too small to share)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="FILE", help="also write the settings, the step times and the summary to FILE")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config = dict(DEFAULT_MODEL_CONFIG)
    if args.config:
        with open(args.config) as f:
            config = json.load(f)
    if args.layers is not None:
        config["num_hidden_layers"] = args.layers
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = build_models(config, device, args.strategy, json.loads(args.kwargs))
    layers = models["none"].config.num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, models["none"].config.vocab_size, (args.batch_size, args.seq_len), generator=generator).to(device)
    inputs = {"input_ids": input_ids, "labels": input_ids}
    times = paired_step_times(models, inputs, args.steps, args.warmup)
    summary = {**summarize(times, layers), "routing_bytes_per_layer_call": routing_bytes_per_layer_call(models["torchgc"], inputs)}
    settings = {"model": type(models["none"]).__name__, "layers": layers, "batch_size": args.batch_size, "seq_len": args.seq_len,
                "device": str(device), "threads": args.threads, "steps": args.steps, "strategy": args.strategy, "config": config}
    print(render(summary, settings))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "step_seconds": times, **summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
