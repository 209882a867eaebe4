"""What torchgc's gradient checkpointing does to one transformers model.

``enable`` and ``disable`` are the bodies of torchgc's ``gradient_checkpointing_enable`` and
``_disable``: they resolve the options of the call once (config), build the layers' checkpoint
function (torchgc.strategies.LayerCheckpoint, with the model's Planner under a memory budget)
and install it through transformers' _set_gradient_checkpointing; they keep the
per-model state that disable undoes and re-enable repeats (the input-grad hook, ``use_cache``, the
last call's kwargs), and apply the norm options. ``torchgc.patching`` calls them for every model;
other integrations call them for one model. transformers is imported only when they run.
"""

import dataclasses
import functools
import inspect
import warnings
from typing import Any, Callable, Dict, Optional

import torch
import torch.utils.checkpoint

from torchgc import config, ops, planner, strategies
from torchgc.integrations import distributed
from torchgc.integrations.transformers_layers import decoder_layers, describe

ENABLE = "gradient_checkpointing_enable"
DISABLE = "gradient_checkpointing_disable"
# Newer transformers 5.x (5.23 has them) renamed the pair; the old names became deprecated aliases.
AC_ENABLE = "activation_checkpointing_enable"
AC_DISABLE = "activation_checkpointing_disable"

NORM_OPTIONS = ("upcast_layernorm", "fused_norm", "upcast_lmhead_output")


class _ModelState:
    """What torchgc changed on one model, so disable can undo it and re-enable can repeat it."""

    def __init__(self):
        self.call_kwargs: Dict[str, Any] = {}  # the last non-empty gradient_checkpointing_kwargs
        self.input_grad_hook = None
        self.saved_use_cache: list = []  # (config, value) pairs set to False by enable
        self.norm_handles: Dict[str, Any] = {}
        self.warned_fsdp2 = False
        self.warned_context_fn = False
        self.planner: Optional[planner.Planner] = None  # the chooser of modes under a memory budget


def _state(model) -> _ModelState:
    state = model.__dict__.get("_torchgc_state")
    if state is None:
        state = _ModelState()
        model.__dict__["_torchgc_state"] = state
    return state


def default_use_reentrant() -> bool:
    """transformers before 5.0 defaults to reentrant checkpointing; 5.0 switched to non-reentrant
    (transformers PR #43203)."""
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


def norm_transforms(function: str) -> Dict[str, Callable]:
    """torchgc.norm's model transforms by option name; each returns a handle whose remove() undoes
    it. Raises ImportError naming ``function`` and the options when the norm ops cannot load, so
    a caller can fail before it changes anything."""
    try:
        from torchgc import norm

        ops.load_library()
    except ImportError as exc:
        raise ImportError(f"{function}: the options {', '.join(NORM_OPTIONS)} need torchgc's norm ops, which failed to load: {exc}") from exc
    return {"upcast_layernorm": norm.upcast_layernorm, "fused_norm": norm.fuse_norms, "upcast_lmhead_output": norm.upcast_lmhead_output}


def enable(
    model,
    kwargs: Optional[dict] = None,
    *,
    method: str = ENABLE,
    every_n_layers: int = 1,
    offload: bool = False,
    options: Optional[config.Options] = None,
) -> None:
    """Turns on gradient checkpointing through torchgc's LayerCheckpoint for ``model``.

    kwargs: the call's gradient_checkpointing_kwargs, which refine ``options`` (default: the
    TORCHGC_* environment); None or {} repeats the previous enable's kwargs. method names the
    method the user called, for error messages. every_n_layers (transformers 5.x's argument) other
    than 1 overrides the option of that name. Checks everything before it changes the model.
    """
    function = f"{type(model).__name__}.{method}()"
    argument = "activation_checkpointing_kwargs" if method == AC_ENABLE else "gradient_checkpointing_kwargs"
    _check_arguments(model, function, argument, kwargs, every_n_layers, offload)
    state = _state(model)
    # No kwargs after an earlier enable: keep that configuration (TRL disables around generation
    # and re-enables with no arguments).
    call_kwargs = dict(kwargs) if kwargs else dict(state.call_kwargs)
    if offload:
        call_kwargs.setdefault("strategy", "offload")
    base = config.resolve(function, {}) if options is None else options
    options, torch_kwargs = _split_kwargs(function, argument, base, call_kwargs, every_n_layers)
    torch_kwargs = _without_a_second_policy(state, options, torch_kwargs, function, argument)
    _norm_transforms_to_apply(state, options, function)  # fails here, before anything changes, if it must
    if options.strategy == "offload":
        _require_offload_ops(function)
    old_format = _uses_old_format(model)
    skipped_layers = _layers_not_checkpointed(model, options, function, old_format)
    options = dataclasses.replace(options, use_reentrant=_use_reentrant(model, state, options, function))
    _install(model, strategies.LayerCheckpoint(options, torch_kwargs, _chooser(state, options)), skipped_layers, old_format, function)
    if kwargs or offload:
        state.call_kwargs = call_kwargs
    if getattr(model, "_hf_peft_config_loaded", False) and state.input_grad_hook is None:
        state.input_grad_hook = _require_input_grads(model)
    _turn_off_cache(model, state)
    apply_norm_options(model, options, function)


def _check_arguments(model, function: str, argument: str, kwargs, every_n_layers, offload) -> None:
    if not model.supports_gradient_checkpointing:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing.")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"{function}: {argument} must be a dict or None; got {kwargs!r}")
    config.check(function, "every_n_layers", every_n_layers)
    if not isinstance(offload, bool):
        raise ValueError(f"{function}: argument 'offload' must be True or False; got {offload!r}")


def _split_kwargs(function: str, argument: str, base: config.Options, kwargs: Dict[str, Any], every_n_layers: int):
    """The options of an enable call (``base``, refined by torchgc's keys of ``kwargs`` and by
    every_n_layers), and the keys of ``kwargs`` that go to torch's checkpoint."""
    forwarded = {k: v for k, v in kwargs.items() if k not in config.OPTION_NAMES}
    unknown = sorted(set(forwarded) - strategies.TORCH_CHECKPOINT_KEYS)
    if unknown:
        valid = ", ".join(sorted(set(config.OPTION_NAMES) | strategies.TORCH_CHECKPOINT_KEYS))
        raise ValueError(f"{function}: {argument} has unknown key(s) {unknown}; valid keys are {valid}")
    if "preserve_rng_state" in forwarded:
        config.check_call_argument(function, "preserve_rng_state", forwarded["preserve_rng_state"], where=f"{argument}['preserve_rng_state']")
    options = config.override(function, base, kwargs, argument)
    if every_n_layers != 1:
        options = config.checked_together(function, dataclasses.replace(options, every_n_layers=every_n_layers))
    return options, forwarded


def _without_a_second_policy(state: _ModelState, options: config.Options, torch_kwargs: dict, function: str, argument: str) -> dict:
    """torch_kwargs without a context_fn where torchgc chooses what each layer keeps itself: strategy
    selective brings its policy, and a memory budget picks each layer's mode (selective included)
    from measurements made without one. TRL's {"selective": True} passes such a context_fn (its
    policy keeps attention outputs, a subset of what torchgc's selective keeps). One warning per model."""
    if "context_fn" not in torch_kwargs or (options.strategy != "selective" and options.memory_budget is None):
        return torch_kwargs
    if not state.warned_context_fn:
        why = ("strategy 'selective' applies torchgc's selective policy (it keeps the outputs of matmuls and attention)"
               if options.strategy == "selective" else "memory_budget chooses each layer's mode, selective included, itself")
        warnings.warn(f"{function}: {argument}['context_fn'] ({describe(torch_kwargs['context_fn'])}) is not used: {why}. "
                      "To use that context_fn instead, choose strategy 'checkpoint' and no memory_budget", stacklevel=4)
        state.warned_context_fn = True
    return {k: v for k, v in torch_kwargs.items() if k != "context_fn"}


def torch_checkpoint_keywords(function: Optional[Callable]) -> Optional[dict]:
    """The keywords of a layers' checkpoint function that is torch's own checkpoint (None stands for
    it: transformers' default) or a functools.partial of it, as transformers' own enable builds
    (partial(checkpoint, **gradient_checkpointing_kwargs)); None for any other function."""
    keywords: Dict[str, Any] = {}
    if function is None:
        return keywords
    while isinstance(function, functools.partial) and not function.args:
        keywords = {**function.keywords, **keywords}
        function = function.func
    return keywords if function is torch.utils.checkpoint.checkpoint else None


def _use_reentrant(model, state: _ModelState, options: config.Options, function: str) -> bool:
    """The option, else transformers' default; never under FSDP2, whose hooks reentrant
    checkpointing breaks (one warning per model)."""
    use_reentrant = default_use_reentrant() if options.use_reentrant is None else options.use_reentrant
    if not use_reentrant or not distributed.uses_fsdp2(model):
        return use_reentrant
    if not state.warned_fsdp2:
        warnings.warn(f"{function}: FSDP2 is in use, and reentrant checkpointing breaks its hooks; torchgc uses "
                      "non-reentrant checkpointing instead", stacklevel=4)
        state.warned_fsdp2 = True
    return False


def _chooser(state: _ModelState, options: config.Options) -> Optional[planner.Planner]:
    """With a memory budget, the model's Planner (kept across enables with the same budget and
    strategy, so its measured plans survive TRL's disable/enable cycles); else None."""
    if options.memory_budget is None:
        state.planner = None
    elif state.planner is None or (state.planner.budget, state.planner.strategy) != (options.memory_budget, options.strategy):
        state.planner = planner.Planner(options.memory_budget, options.strategy)
    return state.planner


def _install(model, layer_checkpoint: strategies.LayerCheckpoint, skipped_layers: list, old_format: bool, function: str) -> None:
    if old_format:
        warnings.warn(
            f"{function}: this model's _set_gradient_checkpointing uses the pre-4.35 (module, value) form and "
            "calls torch's checkpoint itself; torchgc cannot route it and leaves the model's own checkpointing on",
            stacklevel=4,
        )
        model.apply(functools.partial(model._set_gradient_checkpointing, value=True))
        return
    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=layer_checkpoint)
    for layer in skipped_layers:
        layer.gradient_checkpointing = False


def _layers_not_checkpointed(model, options: config.Options, function: str, old_format: bool) -> list:
    """The layers every_n_layers leaves without checkpointing: all decoder layers but 0, n, 2n, ...,
    the pattern of transformers 5.x's own every_n_layers (torchgc sets it, so any transformers has it)."""
    n = options.every_n_layers
    if n == 1:
        return []
    layers = [] if old_format else decoder_layers(model)
    if not layers or not all(hasattr(layer, "gradient_checkpointing") for layer in layers):
        raise ValueError(
            f"{function}: argument 'every_n_layers' needs a model whose layers are transformers "
            f"GradientCheckpointingLayer modules; {type(model).__name__} has none; got every_n_layers={n}"
        )
    return [layer for index, layer in enumerate(layers) if index % n != 0]


def apply_norm_options(model, options: config.Options, function: str) -> None:
    """Applies the norm options that are on in ``options`` and not applied to ``model`` yet, and
    records them, so a later enable does not apply them again."""
    state = _state(model)
    for name, transform in _norm_transforms_to_apply(state, options, function).items():
        state.norm_handles[name] = transform(model)


def disable(model) -> None:
    """Turns gradient checkpointing off and undoes what enable set on the model, except the norm
    options, which outlive it (see _norm_transforms_to_apply)."""
    if model.supports_gradient_checkpointing:
        if _uses_old_format(model):
            model.apply(functools.partial(model._set_gradient_checkpointing, value=False))
        else:
            model._set_gradient_checkpointing(enable=False)
    state = _state(model)
    if state.input_grad_hook is not None:
        state.input_grad_hook.remove()
        state.input_grad_hook = None
    for cfg, value in state.saved_use_cache:
        cfg.use_cache = value
    state.saved_use_cache = []


def _require_offload_ops(function: str) -> None:
    try:
        ops.load_library()
    except ImportError as exc:
        raise ImportError(f"{function}: strategy 'offload' needs torchgc's offload ops, which failed to load: {exc}") from exc


def _uses_old_format(model) -> bool:
    # Hub code written before transformers 4.35 overrides _set_gradient_checkpointing(module, value).
    return "value" in inspect.signature(model._set_gradient_checkpointing).parameters


def _make_output_require_grad(module, inputs, output):
    if isinstance(output, torch.Tensor) and output.is_floating_point() and torch.is_grad_enabled():
        output.requires_grad_(True)


def _require_input_grads(model):
    """transformers makes the embedding output require grad when a PEFT adapter is loaded (for
    reentrant checkpoint, which computes no parameter gradient when no input requires grad); so
    does torchgc, with a hook it owns and removes. torchgc.checkpoint needs no such help, so it is
    not added otherwise: with it, gradients would flow through frozen layers below the trainable
    ones, which then could not run as they are."""
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    if not isinstance(embeddings, torch.nn.Module):
        return None
    return embeddings.register_forward_hook(_make_output_require_grad)


def _configs(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    found = [cfg]
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if text is not cfg:
        found.append(text)
    return [c for c in found if hasattr(c, "use_cache")]


def _turn_off_cache(model, state: _ModelState) -> None:
    # A KV cache is useless while checkpointing (the layers drop it) and wastes memory.
    for cfg in _configs(model):
        if not any(saved is cfg for saved, _ in state.saved_use_cache):
            state.saved_use_cache.append((cfg, cfg.use_cache))
        cfg.use_cache = False


def _norm_transforms_to_apply(state: _ModelState, options: config.Options, function: str) -> Dict[str, Callable]:
    # Norm changes outlive disable: TRL disables checkpointing around every generation, and
    # round-tripping fp32 norm weights through the model dtype each time would lose precision.
    missing = [name for name in NORM_OPTIONS if getattr(options, name) and name not in state.norm_handles]
    if not missing:
        return {}
    transforms = norm_transforms(function)
    return {name: transforms[name] for name in missing}
