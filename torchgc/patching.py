"""The class-level switch: ``patch()`` routes transformers' gradient checkpointing through torchgc.

``patch()`` replaces ``gradient_checkpointing_enable``/``_disable`` (and, where a newer 5.x has
them, their ``activation_checkpointing_*`` successors) on ``transformers.PreTrainedModel`` itself,
so every model class, models built later, and PEFT wrappers (which forward to the base model) go
through torchgc. ``unpatch()`` puts the original function objects back. What the replacements do
to a model is torchgc.integrations.transformers' job; this module holds the switch and the
options it was given. Integrations that act on patch() (LLaMA-Factory) plug in with add_integration.
"""

import contextlib
import functools
import threading
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

from torchgc import config
from torchgc.integrations import transformers as hf
from torchgc.integrations.transformers_layers import is_torchgc_function

_lock = threading.RLock()
_originals: Dict[str, Any] = {}  # attribute name -> PreTrainedModel.__dict__ entry before patch()
_options: Optional[config.Options] = None
# What other integrations do when transformers is patched and unpatched, (on_patch(options),
# on_unpatch()) pairs: LLaMA-Factory routes its model preparation. The front door registers them.
_integrations: List[Tuple[Callable[[config.Options], None], Callable[[], None]]] = []


def add_integration(on_patch: Callable[[config.Options], None], on_unpatch: Callable[[], None]) -> None:
    """Registers a pair that patch() calls with its resolved options (on every call, so a new
    patch() passes them on again) and unpatch() calls with nothing. Registering a pair twice has no
    effect."""
    if (on_patch, on_unpatch) not in _integrations:
        _integrations.append((on_patch, on_unpatch))


def _pretrained_model_class():
    try:
        from transformers import PreTrainedModel
    except ImportError as exc:
        raise ImportError(
            f"torchgc.patch(): patching needs transformers, which failed to import ({exc}); install it "
            "(pip install transformers), or call torchgc.checkpoint(layer, *args) yourself, which needs no transformers"
        ) from exc
    return PreTrainedModel


# ---------------------------------------------------------------------------------------------
# The replacement methods


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
    only_trainable, prefetch, min_offload_bytes, max_host_bytes, upcast_layernorm, fused_norm,
    upcast_lmhead_output, memory_budget, every_n_layers) and torch.utils.checkpoint's
    (preserve_rng_state, context_fn, ...).
    None or {} keeps the configuration of the previous enable, or torchgc.patch()'s.
    """
    hf.enable(self, gradient_checkpointing_kwargs, method=hf.ENABLE, options=current_options(), **kwargs)


def gradient_checkpointing_disable(self):
    """Deactivates gradient checkpointing and undoes what torchgc's enable set on the model."""
    hf.disable(self)


def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False):
    """Newer transformers 5.x's name for gradient_checkpointing_enable, routed through torchgc.
    offload=True selects torchgc's offload strategy unless the kwargs name another."""
    override = _delegate_to_override(self, hf.ENABLE)
    if override is not None:
        extra = {}
        if every_n_layers != 1:
            extra["every_n_layers"] = every_n_layers
        if offload:
            extra["offload"] = offload
        return override(gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **extra)
    hf.enable(self, activation_checkpointing_kwargs, method=hf.AC_ENABLE, every_n_layers=every_n_layers, offload=offload,
              options=current_options())


def activation_checkpointing_disable(self):
    """Newer transformers 5.x's name for gradient_checkpointing_disable, routed through torchgc."""
    override = _delegate_to_override(self, hf.DISABLE)
    if override is not None:
        return override()
    hf.disable(self)


_SET = "_set_gradient_checkpointing"
_warned_bypass = set()


def _checking(set_gradient_checkpointing):
    """transformers' _set_gradient_checkpointing, which every enable ends in, with its signature
    (torchgc reads it). torch's own checkpoint arriving here (transformers' original enable, captured
    before patch() by a wrapper such as TRL's selective one, or a direct call) is routed through
    torchgc with its keywords, so patch() works before or after such a wrapper is built. Any other
    function that is not torchgc's warns once: an override (LLaMA-Factory's is routed; another
    framework's MethodType, remote code) enabled checkpointing past torchgc."""

    @functools.wraps(set_gradient_checkpointing)
    def _set_gradient_checkpointing(self, *args, **kwargs):
        enable = kwargs.get("enable", args[0] if args else True)
        function = kwargs.get("gradient_checkpointing_func", args[1] if len(args) > 1 else None)
        if enable and not is_torchgc_function(function):
            keywords = hf.torch_checkpoint_keywords(function)
            options = current_options()
            if keywords is not None and options is not None:
                return hf.enable(self, keywords, options=options)
            _warn_bypass(self, function)
        return set_gradient_checkpointing(self, *args, **kwargs)

    return _set_gradient_checkpointing


def _warn_bypass(model, function) -> None:
    cls = type(model).__name__
    override = model.__dict__.get(hf.ENABLE)
    if override is not None:
        what = f"an instance-level gradient_checkpointing_enable ({_name(override)}) set on this {cls}"
    elif getattr(type(model), hf.ENABLE, None) is not gradient_checkpointing_enable:
        what = f"{cls}.gradient_checkpointing_enable ({_name(getattr(type(model), hf.ENABLE))}), which overrides torchgc's"
    else:
        what = f"a direct call of {cls}._set_gradient_checkpointing"
    if (type(model), what) in _warned_bypass:
        return
    _warned_bypass.add((type(model), what))
    installed = "torch.utils.checkpoint.checkpoint" if function is None else _name(function)
    warnings.warn(f"torchgc: gradient checkpointing of {cls} was enabled by {what}, which gives its layers {installed}: "
                  "they checkpoint past torchgc, and torchgc's options do not apply to them. Enable checkpointing through "
                  "the model's class method (or let the override call torchgc.checkpoint) to use torchgc.", stacklevel=3)


def _name(function) -> str:
    while True:
        if isinstance(function, functools.partial):
            function = function.func
        elif hasattr(function, "__func__"):
            function = function.__func__
        else:
            break
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


_REPLACEMENTS = {
    hf.ENABLE: gradient_checkpointing_enable,
    hf.DISABLE: gradient_checkpointing_disable,
    hf.AC_ENABLE: activation_checkpointing_enable,
    hf.AC_DISABLE: activation_checkpointing_disable,
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
    max_host_bytes: Optional[int] = None,
    memory_budget=None,
    every_n_layers: Optional[int] = None,
) -> config.Options:
    """Routes every transformers model's gradient_checkpointing_enable through torchgc.

    An argument left at None comes from its TORCHGC_* environment variable, else its default:
    strategy "auto", use_reentrant as the installed transformers (True before 5.0, False from
    5.0), only_trainable True, prefetch True, min_offload_bytes torchgc.checkpoint's default (2 MiB),
    max_host_bytes no cap, the norm options False, memory_budget None (checkpoint every layer; a
    fraction such as 0.3 or a size such as "12GiB" plans a mode per layer, see torchgc.planner),
    every_n_layers 1 (n checkpoints decoder layers 0, n, 2n, ... only, as transformers' argument does).
    The byte counts also take sizes such as "8GiB".
    Calling patch() again only updates the options. Returns them.
    """
    global _options
    arguments = locals()
    options = config.resolve("torchgc.patch()", {name: arguments[name] for name in config.OPTION_NAMES})
    if any(getattr(options, name) for name in hf.NORM_OPTIONS):
        hf.norm_transforms("torchgc.patch()")  # fails here, before anything changes
    cls = _pretrained_model_class()
    with _lock:
        if not _originals:
            _replace_class_functions(cls)
        _options = options
        for on_patch, _ in _integrations:
            on_patch(options)
    return options


def _replace_class_functions(cls) -> None:
    """Puts torchgc's functions on ``cls`` and keeps the originals; all or none."""
    originals = {name: cls.__dict__[name] for name in (*_REPLACEMENTS, _SET) if name in cls.__dict__}
    replacements = {**_REPLACEMENTS, _SET: _checking(originals[_SET])} if _SET in originals else _REPLACEMENTS
    try:
        for name in originals:
            setattr(cls, name, replacements[name])
    except BaseException:
        for name, original in originals.items():
            setattr(cls, name, original)
        raise
    _originals.update(originals)


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
        for _, on_unpatch in _integrations:
            on_unpatch()


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
        for on_patch, _ in _integrations:
            on_patch(options)
