"""Routes transformers' gradient checkpointing through torchgc.checkpoint.

``patch()`` replaces ``gradient_checkpointing_enable``/``_disable`` (and, where a newer 5.x has
them, their ``activation_checkpointing_*`` successors) on ``transformers.PreTrainedModel`` itself,
so every model class, models built later, and PEFT wrappers (which forward to the base model) go
through torchgc. ``unpatch()`` puts the original function objects back.
"""

import contextlib
import functools
import inspect
import threading
import types
import warnings
from typing import Any, Callable, Dict, Optional

import torch

from torchgc import config
from torchgc.integrations import fsdp

_ENABLE = "gradient_checkpointing_enable"
_DISABLE = "gradient_checkpointing_disable"
# Newer transformers 5.x (5.23 has them) renamed the pair; the old names became deprecated aliases.
_AC_ENABLE = "activation_checkpointing_enable"
_AC_DISABLE = "activation_checkpointing_disable"

_lock = threading.RLock()
_originals: Dict[str, Any] = {}  # attribute name -> PreTrainedModel.__dict__ entry before patch()
_options: Optional[config.Options] = None


class _ModelState:
    """What torchgc changed on one model, so disable can undo it and re-enable can repeat it."""

    def __init__(self):
        self.call_kwargs: Dict[str, Any] = {}  # the last non-empty gradient_checkpointing_kwargs
        self.input_grad_hook = None
        self.saved_use_cache: list = []  # (config, value) pairs set to False by enable
        self.norm_handles: Dict[str, Any] = {}
        self.warned_fsdp2 = False


def _state(model) -> _ModelState:
    state = model.__dict__.get("_torchgc_state")
    if state is None:
        state = _ModelState()
        model.__dict__["_torchgc_state"] = state
    return state


def _pretrained_model_class():
    from transformers import PreTrainedModel

    return PreTrainedModel


def default_use_reentrant() -> bool:
    """transformers before 5.0 defaults to reentrant checkpointing; 5.0 switched to non-reentrant
    (transformers PR #43203)."""
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


# ---------------------------------------------------------------------------------------------
# The replacement methods


def _split_kwargs(function: str, base: config.Options, kwargs: Dict[str, Any], argument: str):
    """Separates torchgc's options from the keys forwarded to torch.utils.checkpoint."""
    from torchgc.checkpoint import checkpoint

    forwarded = {k: v for k, v in kwargs.items() if k not in config.OPTION_NAMES}
    allowed = _forwardable_keys(checkpoint)
    unknown = sorted(set(forwarded) - allowed)
    if unknown:
        valid = ", ".join(sorted(set(config.OPTION_NAMES) | allowed))
        raise ValueError(f"{function}: {argument} has unknown key(s) {unknown}; valid keys are {valid}")
    return config.override(function, base, kwargs, argument), forwarded


@functools.lru_cache(maxsize=None)
def _forwardable_keys(checkpoint: Callable) -> frozenset:
    keys = set()
    for fn in (checkpoint, torch.utils.checkpoint.checkpoint):
        for p in inspect.signature(fn).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY or (
                p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name != "function"
            ):
                keys.add(p.name)
    return frozenset(keys - set(config.OPTION_NAMES))


def _uses_old_format(model) -> bool:
    # Hub code written before transformers 4.35 overrides _set_gradient_checkpointing(module, value).
    return "value" in inspect.signature(model._set_gradient_checkpointing).parameters


def _enable(
    model, kwargs, method: str, every_n_layers: int = 1, offload: bool = False, base: Optional[config.Options] = None
) -> None:
    """``base``: the options the call's kwargs refine; default: torchgc.patch()'s, or when
    transformers is not patched, the environment's."""
    function = f"{type(model).__name__}.{method}()"
    argument = "activation_checkpointing_kwargs" if method == _AC_ENABLE else "gradient_checkpointing_kwargs"
    if not model.supports_gradient_checkpointing:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing.")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"{function}: {argument} must be a dict or None; got {kwargs!r}")
    if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise ValueError(f"{function}: argument 'every_n_layers' must be an int >= 1; got {every_n_layers!r}")
    if not isinstance(offload, bool):
        raise ValueError(f"{function}: argument 'offload' must be True or False; got {offload!r}")

    state = _state(model)
    # No kwargs after an earlier enable: keep that configuration (TRL disables around generation
    # and re-enables with no arguments).
    call_kwargs = dict(kwargs) if kwargs else dict(state.call_kwargs)
    if offload:
        call_kwargs.setdefault("strategy", "offload")
    remember = bool(kwargs) or offload
    if base is None:
        base = current_options() or config.resolve(function, {})
    options, forwarded = _split_kwargs(function, base, call_kwargs, argument)
    use_reentrant = default_use_reentrant() if options.use_reentrant is None else options.use_reentrant
    norm_transforms = _norm_transforms_to_apply(state, options, function)
    old_format = _uses_old_format(model)
    if every_n_layers != 1 and (
        old_format or "every_n_layers" not in inspect.signature(model._set_gradient_checkpointing).parameters
    ):
        raise ValueError(
            f"{function}: argument 'every_n_layers' needs a transformers whose _set_gradient_checkpointing takes "
            f"it; got every_n_layers={every_n_layers}"
        )
    if use_reentrant and fsdp.uses_fsdp2(model):
        if not state.warned_fsdp2:
            warnings.warn(
                f"{function}: FSDP2 is in use, and reentrant checkpointing breaks its hooks; torchgc uses "
                "non-reentrant checkpointing instead",
                stacklevel=3,
            )
            state.warned_fsdp2 = True
        use_reentrant = False

    from torchgc.checkpoint import checkpoint

    gc_func = functools.partial(
        checkpoint,
        strategy=options.strategy,
        use_reentrant=use_reentrant,
        only_trainable=options.only_trainable,
        prefetch=options.prefetch,
        min_offload_bytes=options.min_offload_bytes,
        **forwarded,
    )
    if old_format:
        warnings.warn(
            f"{function}: this model's _set_gradient_checkpointing uses the pre-4.35 (module, value) form and "
            "calls torch's checkpoint itself; torchgc cannot route it and leaves the model's own checkpointing on",
            stacklevel=3,
        )
        model.apply(functools.partial(model._set_gradient_checkpointing, value=True))
    elif every_n_layers != 1:
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=gc_func, every_n_layers=every_n_layers)
    else:
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=gc_func)

    if remember:
        state.call_kwargs = call_kwargs
    needs_input_grads = use_reentrant or getattr(model, "_hf_peft_config_loaded", False)
    if needs_input_grads and state.input_grad_hook is None:
        state.input_grad_hook = _require_input_grads(model)
    _turn_off_cache(model, state)
    for name, transform in norm_transforms.items():
        state.norm_handles[name] = transform(model)


def _disable(model) -> None:
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


def _make_output_require_grad(module, inputs, output):
    if isinstance(output, torch.Tensor) and output.is_floating_point() and torch.is_grad_enabled():
        output.requires_grad_(True)


def _require_input_grads(model):
    """Frozen embeddings (LoRA, k-bit) give the first layer an input that needs no grad; reentrant
    checkpoint then computes no parameter gradient inside the layer. transformers and PEFT make the
    embedding output require grad for that; so does torchgc, with a hook it owns and removes."""
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


NORM_OPTIONS = ("upcast_layernorm", "fused_norm", "upcast_lmhead_output")


def norm_functions(function: str) -> Dict[str, Callable]:
    """torchgc.norm's model transforms by option name; each returns a handle whose remove() undoes it."""
    try:
        from torchgc import norm
    except ImportError as exc:
        raise ImportError(f"{function}: the options {', '.join(NORM_OPTIONS)} need torchgc.norm, which failed to import: {exc}") from exc
    return {"upcast_layernorm": norm.upcast_layernorm, "fused_norm": norm.fuse_norms, "upcast_lmhead_output": norm.upcast_lmhead_output}


def _norm_transforms_to_apply(state: _ModelState, options: config.Options, function: str) -> Dict[str, Callable]:
    # Norm changes outlive disable: TRL disables checkpointing around every generation, and
    # round-tripping fp32 norm weights through the model dtype each time would lose precision.
    missing = [name for name in NORM_OPTIONS if getattr(options, name) and name not in state.norm_handles]
    if not missing:
        return {}
    functions = norm_functions(function)
    return {name: functions[name] for name in missing}


def _delegate_to_override(model, name: str):
    """The instance's ``name`` when a subclass or an instance wrapper overrides torchgc's (remote
    code; TRL's selective-checkpointing wrapper), else None."""
    bound = getattr(model, name, None)
    if bound is None or getattr(bound, "__func__", None) is _REPLACEMENTS[name]:
        return None
    return bound


def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
    """Activates gradient checkpointing through torchgc.checkpoint.

    gradient_checkpointing_kwargs may hold torchgc's options (strategy, use_reentrant,
    only_trainable, prefetch, min_offload_bytes, upcast_layernorm, fused_norm,
    upcast_lmhead_output) and torch.utils.checkpoint's (preserve_rng_state, context_fn, ...).
    None or {} keeps the configuration of the previous enable, or torchgc.patch()'s.
    """
    _enable(self, gradient_checkpointing_kwargs, _ENABLE, **kwargs)


def gradient_checkpointing_disable(self):
    """Deactivates gradient checkpointing and undoes what torchgc's enable set on the model."""
    _disable(self)


def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False):
    """Newer transformers 5.x's name for gradient_checkpointing_enable, routed through torchgc.
    offload=True selects torchgc's offload strategy unless the kwargs name another."""
    override = _delegate_to_override(self, _ENABLE)
    if override is not None:
        extra = {}
        if every_n_layers != 1:
            extra["every_n_layers"] = every_n_layers
        if offload:
            extra["offload"] = offload
        return override(gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **extra)
    _enable(self, activation_checkpointing_kwargs, _AC_ENABLE, every_n_layers=every_n_layers, offload=offload)


def activation_checkpointing_disable(self):
    """Newer transformers 5.x's name for gradient_checkpointing_disable, routed through torchgc."""
    override = _delegate_to_override(self, _DISABLE)
    if override is not None:
        return override()
    _disable(self)


_REPLACEMENTS = {
    _ENABLE: gradient_checkpointing_enable,
    _DISABLE: gradient_checkpointing_disable,
    _AC_ENABLE: activation_checkpointing_enable,
    _AC_DISABLE: activation_checkpointing_disable,
}


# ---------------------------------------------------------------------------------------------
# Public API


def patch(
    strategy: Optional[str] = None,
    *,
    use_reentrant: Optional[bool] = None,
    only_trainable: Optional[bool] = None,
    upcast_layernorm: Optional[bool] = None,
    fused_norm: Optional[bool] = None,
    upcast_lmhead_output: Optional[bool] = None,
    prefetch: Optional[bool] = None,
    min_offload_bytes: Optional[int] = None,
) -> config.Options:
    """Routes every transformers model's gradient_checkpointing_enable through torchgc.

    An argument left at None comes from its TORCHGC_* environment variable, else its default:
    strategy "auto", use_reentrant as the installed transformers (True before 5.0, False from
    5.0), only_trainable True, prefetch True, min_offload_bytes torchgc.checkpoint's default, the
    norm options False. Calling patch() again only updates the options. Returns them.
    """
    global _options
    given = dict(
        strategy=strategy,
        use_reentrant=use_reentrant,
        only_trainable=only_trainable,
        upcast_layernorm=upcast_layernorm,
        fused_norm=fused_norm,
        upcast_lmhead_output=upcast_lmhead_output,
        prefetch=prefetch,
        min_offload_bytes=min_offload_bytes,
    )
    options = config.resolve("torchgc.patch()", given)
    if any(getattr(options, name) for name in NORM_OPTIONS):
        norm_functions("torchgc.patch()")
    cls = _pretrained_model_class()
    with _lock:
        if not _originals:
            originals = {name: cls.__dict__[name] for name in _REPLACEMENTS if name in cls.__dict__}
            try:
                for name in originals:
                    setattr(cls, name, _REPLACEMENTS[name])
            except BaseException:
                for name, original in originals.items():
                    setattr(cls, name, original)
                raise
            _originals.update(originals)
        _options = options
    return options


def unpatch() -> None:
    """Puts transformers' original functions back. Models already enabled keep torchgc's
    checkpoint function until their checkpointing is disabled or enabled again."""
    global _options
    with _lock:
        if _originals:
            cls = _pretrained_model_class()
            for name, original in _originals.items():
                setattr(cls, name, original)
            _originals.clear()
        _options = None


def is_patched() -> bool:
    return bool(_originals)


def current_options() -> Optional[config.Options]:
    """The options of the active patch, or None when transformers is not patched."""
    return _options if _originals else None


@contextlib.contextmanager
def patched(strategy: Optional[str] = None, **options):
    """``with torchgc.patched(...):`` patches for the block and restores the previous state after."""
    with _lock:
        previous = current_options()
    result = patch(strategy, **options)
    try:
        yield result
    finally:
        if previous is None:
            unpatch()
        else:
            _set_options(previous)


def _set_options(options: config.Options) -> None:
    global _options
    with _lock:
        _options = options


def install_on_model(model, options: config.Options) -> None:
    """Gives one model torchgc's enable/disable as instance methods bound to ``options``, leaving
    transformers' classes untouched (what LLaMA-Factory does with MethodType)."""

    def enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        _enable(self, gradient_checkpointing_kwargs, _ENABLE, base=options, **kwargs)

    enable.__doc__ = gradient_checkpointing_enable.__doc__
    model.gradient_checkpointing_enable = types.MethodType(enable, model)
    model.gradient_checkpointing_disable = types.MethodType(gradient_checkpointing_disable, model)
