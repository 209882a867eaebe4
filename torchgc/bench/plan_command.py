"""`torchgc plan`: the per-layer plan that a memory budget gives one model on one batch shape,
with what the planner predicted and what a step under the plan measured.

The model is built and trained on random tokens the way a user's script would: torchgc.patch()
with the budget, gradient_checkpointing_enable, then training steps. The first step is the
planner's measuring step; the steps after it run the plan and are measured: each layer's
activation bytes when the forward ends and the layers' activation peak over the step (counted op
by op, so that step runs slower and is not timed), then the timed steps (median step time, and
the seconds each layer spends recomputing in backward).
"""

import argparse
import json
import statistics
from pathlib import Path
from typing import Optional

from torchgc import config
from torchgc.bench import measure
from torchgc.bench.cli import add_model_arguments, fail, model_source, pick_device
from torchgc.measuring import mib, synchronizer

DESCRIPTION = ("the per-layer checkpointing plan a memory budget gives a model at one batch shape, with the "
               "bytes and times the planner predicted and those a step under the plan measured")


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="torchgc plan", description=DESCRIPTION)
    add_model_arguments(parser)
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default: 2048)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--memory-budget", required=True, metavar="BUDGET",
                        help="a fraction of the layers' activation peak without checkpointing (0.3) or a size (12GiB)")
    parser.add_argument("--strategy", choices=config.STRATEGIES, default="auto",
                        help="modes the plan may use: auto (all), or none plus this one (default: auto)")
    parser.add_argument("--use-reentrant", action=argparse.BooleanOptionalAction, default=None,
                        help="reentrant checkpointing (default: as the installed transformers)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps under the plan (the median is reported)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", metavar="FILE", help="also write the plan and the measurements to FILE")
    return parser


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    model_spec, config_dict = model_source(args)
    if isinstance(model_spec, str):
        return fail(model_spec, "plan")
    for name, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value < 1:
            return fail(f"{name}: expected an integer >= 1, got {value}", "plan")
    max_len = config_dict.get("max_position_embeddings") or config_dict.get("n_positions")
    if max_len and args.seq_len > max_len:
        return fail(f"--seq-len: expected at most the model's maximum {max_len}, got {args.seq_len}", "plan")
    device = pick_device(args.device)
    if device.startswith("--device"):
        return fail(device, "plan")

    import torch

    import torchgc
    from torchgc.planner import BudgetError

    device = torch.device(device)
    try:
        torchgc.patch(strategy=args.strategy, use_reentrant=args.use_reentrant, memory_budget=args.memory_budget)
    except ValueError as exc:
        return fail(str(exc), "plan")
    try:
        model, measured = _run(model_spec, device, args)
    except BudgetError as exc:
        return fail(str(exc), "plan")
    finally:
        torchgc.unpatch()
    plan = torchgc.explain(model)["plans"][-1]  # the only shape run
    print(render(type(model).__name__, str(device), args, plan, measured))
    if args.json:
        Path(args.json).write_text(json.dumps({"plan": plan, "measured": measured}, indent=1))
    return 0


def _run(model_spec: dict, device, args):
    """The measuring step, one step watched op by op, then the timed steps: the model and what
    was measured."""
    import torch

    from torchgc.bench.worker import build_model
    from torchgc.integrations.transformers_layers import decoder_layers

    model = build_model(model_spec, device)
    model.gradient_checkpointing_enable()
    layers = decoder_layers(model)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=generator).to(device)
    inputs = {"input_ids": input_ids, "labels": input_ids}
    sync = synchronizer(device)

    def step(watch: Optional[measure.LayerActivations] = None):
        loss = model(**inputs).loss
        if watch is not None:
            watch.forward_done()
        loss.backward()
        model.zero_grad(set_to_none=True)

    measuring_seconds = measure.timed_calls(step, repeats=1, sync=sync)[0]
    with measure.LayerActivations(layers, sync) as watch:
        step(watch)
    timings = [measure.LayerActivations(layers, sync, count_bytes=False) for _ in range(args.steps)]
    step_seconds = []
    for timing in timings:
        with timing:
            step_seconds += measure.timed_calls(lambda: step(timing), repeats=1, sync=sync)
    return model, {
        "measuring_step_seconds": measuring_seconds,
        "step_seconds": statistics.median(step_seconds),
        "peak_bytes": watch.peak_bytes,
        "kept_bytes": watch.kept_at_forward_end,
        "recompute_seconds": [statistics.median(t.recompute_seconds[i] for t in timings) for i in range(len(layers))],
    }

def render(model_name: str, device: str, args, plan: dict, measured: dict) -> str:
    lines = [
        f"torchgc plan: {model_name}, {len(plan['layers'])} layers, batch {args.batch_size} x {args.seq_len} tokens, {device}, "
        f"memory_budget {args.memory_budget} = {mib(plan['budget_bytes'])} MiB "
        f"(the layers' activation peak without checkpointing: {mib(plan['no_checkpoint_bytes'])} MiB)",
        "",
        f"{'layer':>5}  {'name':<24} {'mode':<10} {'kept MiB':>10} {'measured':>9}  {'recompute ms':>12} {'measured':>9}",
    ]
    for i, layer in enumerate(plan["layers"]):
        lines.append(
            f"{i:>5}  {layer['name'][:24]:<24} {layer['mode']:<10} {mib(layer['kept_bytes']):>10} {mib(measured['kept_bytes'][i]):>9}  "
            f"{1000 * layer['extra_seconds']:>12.1f} {1000 * measured['recompute_seconds'][i]:>9.1f}"
        )
    lines += [
        "",
        f"activation peak: predicted {mib(plan['predicted_bytes'])} MiB, measured {mib(measured['peak_bytes'])} MiB "
        f"(budget {mib(plan['budget_bytes'])} MiB)",
        f"recompute: predicted {1000 * plan['predicted_extra_seconds']:.1f} ms a step, measured "
        f"{1000 * sum(measured['recompute_seconds']):.1f} ms",
        f"step time under the plan: {measured['step_seconds']:.3f} s (median of {args.steps}); "
        f"the measuring step took {measured['measuring_step_seconds']:.3f} s",
        "kept: activation bytes a layer holds when the forward ends (its input included); recompute: time in its "
        "forward during backward (offload's copies in the prediction)",
    ]
    return "\n".join(lines)
