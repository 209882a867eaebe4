"""One `torchgc bench` configuration, run inside its own worker process.

Every configuration is applied the way a user applies it: transformers' own
``gradient_checkpointing_enable`` for "hf", and ``torchgc.patch()`` followed by the same
``gradient_checkpointing_enable`` call for torchgc's. The result records which enable function
the model resolved and which function its layers checkpoint with, so a reader (and the tests)
can see that the public path ran.
"""

import statistics

import torch

from torchgc.bench import measure
from torchgc.bench.configs import RunConfig
from torchgc.integrations.transformers_layers import decoder_layers
from torchgc.measuring import synchronizer


def build_model(spec: dict, device):
    import transformers

    torch.manual_seed(0)
    if spec.get("model_path"):
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["model_path"], local_files_only=True, dtype=torch.float32)
    else:
        config = transformers.AutoConfig.for_model(**spec["model_config"])
        config._attn_implementation = "eager" if device.type == "cpu" else "sdpa"
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model.to(device).train()


def apply_config(model, config: RunConfig) -> list:
    """Freezes what the configuration freezes and enables its checkpointing through the public
    path; returns the parameters to train."""
    import torchgc

    layers = decoder_layers(model)
    if config.trainable_fraction < 1:
        model.requires_grad_(False)
        for layer in layers[: max(1, int(len(layers) * config.trainable_fraction))]:
            layer.requires_grad_(True)
    if config.kind == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": config.use_reentrant})
    elif config.kind.startswith("torchgc-"):
        # Every input is offloaded however small, so the tiny models of the tests offload too.
        torchgc.patch(strategy=config.kind.split("-", 1)[1], use_reentrant=config.use_reentrant, min_offload_bytes=0,
                      fused_norm=config.fused_norm, memory_budget=config.memory_budget, every_n_layers=config.every_n_layers)
        model.gradient_checkpointing_enable()
    return [p for p in model.parameters() if p.requires_grad] or list(model.parameters())


def compile_for_run(model, mode: str):
    """What the steps call: the model, with each decoder layer compiled and assigned back
    ("regional", torchtitan's form), or the whole model compiled ("model"); default backend."""
    if mode != "none":
        # Inductor's on-disk caches would give a run the graphs that an earlier run compiled:
        # every run's compile time is a cold one.
        import torch._functorch.config
        import torch._inductor.config

        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    if mode == "regional":
        _compile_each(model, decoder_layers(model))
    return torch.compile(model) if mode == "model" else model


def _compile_each(model, layers) -> None:
    """Replaces each of ``layers`` with torch.compile(layer) where its parent holds it."""
    wanted = {id(layer) for layer in layers}
    places = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children() if id(child) in wanted]
    for parent, name, child in places:
        setattr(parent, name, torch.compile(child))


def describe_checkpointing(model) -> dict:
    """Which enable function the model resolves, and which function (with which options) its
    layers checkpoint with; None for a run without checkpointing."""
    import torchgc

    checkpointed_with = torchgc.explain(model).get("checkpointed_with")
    if checkpointed_with is None:
        return {"enabled_with": None, "checkpointed_with": None}
    enable = type(model).gradient_checkpointing_enable
    return {"enabled_with": f"{enable.__module__}.{enable.__qualname__}", "checkpointed_with": checkpointed_with}


def run(spec: dict) -> dict:
    """Builds the model, applies the configuration, measures the bytes saved for backward in one
    untimed step, then times warm-up + timed steps; the first step's gradients go to
    spec["grads_file"] for the comparison with the run without checkpointing."""
    import torchgc

    torchgc.ops.load_library()  # here, not inside the first timed step (host_pool_stats needs it)
    config = RunConfig(**spec["config"])
    device = torch.device(spec["device"])
    model = build_model(spec, device)
    trainable = apply_config(model, config)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (spec["batch_size"], spec["seq_len"]), generator=generator).to(device)
    inputs = {"input_ids": input_ids, "labels": input_ids}
    sync = synchronizer(device)
    forward = compile_for_run(model, config.compile)
    first_seconds = None
    if config.compile != "none":  # the first step compiles: timed apart from the steps
        first_seconds = measure.timed_calls(lambda: forward(**inputs).loss.backward(), repeats=1, sync=sync)[0]
        for p in trainable:
            p.grad.zero_()
    if config.memory_budget is not None:
        # The planner's measuring step (every layer checkpointed), before the memory baseline, so
        # that what follows measures the plan. Its cost is in torchgc.planner's docstring.
        model(**inputs).loss.backward()
    base = _memory_baseline(device, sync)
    saved_bytes = measure.saved_for_backward_bytes(model, inputs) if config.compile == "none" else None
    times, observed = _timed_steps(model, forward, inputs, torch.optim.SGD(trainable, lr=1e-4), spec, sync)
    median = statistics.median(times)
    return {
        "step_seconds": median,
        "step_seconds_all": times,
        **_peak_memory(device, base),
        "host_offloaded_bytes": observed["host_bytes"],
        "saved_for_backward_bytes": saved_bytes,
        "compile_seconds": None if first_seconds is None else max(0.0, first_seconds - median),
        "loss": observed["first_loss"],
        "grads_file": spec["grads_file"],
        "plan_modes": [layer["mode"] for layer in plans[-1]["layers"]] if (plans := torchgc.explain(model).get("plans")) else None,
        **describe_checkpointing(model),
    }


def _memory_baseline(device, sync) -> int:
    """What the process holds before the steps (parameters, gradients, optimizer state), with the
    peak counters reset."""
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    measure.reset_peak_rss()
    return measure.rss_bytes()


def _peak_memory(device, base: int) -> dict:
    if device.type == "cuda":
        return {"peak_activation_bytes": torch.cuda.max_memory_allocated() - base, "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    return {"peak_activation_bytes": measure.peak_rss_bytes() - base, "peak_reserved_bytes": None}


def _timed_steps(model, forward, inputs: dict, optimizer, spec: dict, sync):
    """Warm-up and timed optimizer steps: their seconds, and what they observed (the most host
    memory offloading held, the first step's loss; its gradients go to spec["grads_file"])."""
    import torchgc

    observed = {"host_bytes": 0, "loss": None}

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss = forward(**inputs).loss
        observed["host_bytes"] = max(observed["host_bytes"], torchgc.ops.host_pool_stats().in_use_bytes)
        loss.backward()
        optimizer.step()
        observed["loss"] = loss

    def after(i):
        if i == 0:  # the optimizer step leaves .grad as backward made it
            observed["first_loss"] = observed["loss"].item()
            torch.save({n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, spec["grads_file"])

    times = measure.timed_calls(step, repeats=spec["steps"], warmup=spec["warmup"], sync=sync, after=after)
    return times, observed
