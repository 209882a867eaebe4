"""LLaMA-Factory: its ``prepare_model_for_training(model, model_args)``, checkpointing through torchgc.

LLaMA-Factory 0.9.5 prepares every model in
``llamafactory.model.model_utils.checkpointing.prepare_model_for_training``, which
``llamafactory.model.patcher`` imports by name. That function installs LLaMA-Factory's own
``gradient_checkpointing_enable`` on the instance (types.MethodType), which hides torchgc's
class-level one. So ``route()`` (called by torchgc.patch()) replaces the function in both modules
with this module's ``prepare_model_for_training``, which reads the same flags from ``model_args``;
when llamafactory is not imported yet, it does so as soon as the module loads (an import hook).
``unroute()`` (torchgc.unpatch()) puts LLaMA-Factory's function back. The front door registers
the two with torchgc.patching, which calls them with the options that patch() resolved.

Flags, read from model_args with LLaMA-Factory's defaults:
- use_unsloth_gc: torchgc's offload strategy (on any device);
- use_reentrant_gc: use_reentrant; under FSDP2 it is set to False, as LLaMA-Factory does;
- upcast_layernorm: fp32 norm weights computed by torchgc's fused norm (the output stays in the
  activation dtype, where LLaMA-Factory's eager norm returns fp32);
- upcast_lmhead_output: fp32 logits;
- disable_gradient_checkpointing: no checkpointing (the norm flags still apply).
Options given to torchgc.patch() (or torchgc run) or set in TORCHGC_* variables override them
(config.fill_in). torchgc exports the function as torchgc.llamafactory_prepare_model_for_training.
"""

import dataclasses
import importlib.abc
import importlib.metadata
import importlib.util
import sys
import types
import warnings
from types import SimpleNamespace
from typing import Any, Dict, Optional

from torchgc import config
from torchgc.integrations import distributed
from torchgc.integrations import transformers as hf

SUPPORTED_VERSIONS = ("0.9.5",)
CHECKPOINTING_MODULE = "llamafactory.model.model_utils.checkpointing"
PATCHER_MODULE = "llamafactory.model.patcher"
FUNCTION = "prepare_model_for_training"

# LLaMA-Factory's ModelArguments fields that this reads, with their defaults.
FLAGS = {"use_unsloth_gc": False, "use_reentrant_gc": True, "upcast_layernorm": False, "upcast_lmhead_output": False,
         "disable_gradient_checkpointing": False}

_options: Optional[config.Options] = None  # the options of the active torchgc.patch(), while routed
_original = None  # LLaMA-Factory's prepare_model_for_training, while routed
_hook: Optional["_RouteWhenLoaded"] = None
_warned_version = False
_FUNCTION = "torchgc.llamafactory_prepare_model_for_training()"


def prepare_model_for_training(model, model_args=None, **flags) -> None:
    """Prepares ``model`` for training as LLaMA-Factory 0.9.5 does, with torchgc's checkpointing.

    ``model_args`` is LLaMA-Factory's ModelArguments (or anything with its flag attributes); flags
    can also be given as keywords (``use_unsloth_gc=True``). In LLaMA-Factory's order: 1. upcast
    norms; 2. FSDP2 forces non-reentrant checkpointing; 3. unless disabled, installs torchgc's
    gradient_checkpointing_enable/_disable on this model only and enables checkpointing, with
    use_cache off; 4. fp32 logits. Options given to torchgc.patch() or in TORCHGC_* variables
    override the flags.
    """
    args = _read_flags(_FUNCTION, model_args, flags)
    _no_reentrant_under_fsdp2(args, model_args)
    base = config.resolve(_FUNCTION, {}) if _options is None else _options
    options = config.fill_in(_FUNCTION, base, _options_from_flags(args))
    hf.apply_norm_options(model, dataclasses.replace(options, fused_norm=False, upcast_lmhead_output=False), _FUNCTION)
    if not args.disable_gradient_checkpointing:
        _enable(model, options)
    hf.apply_norm_options(model, options, _FUNCTION)


def _options_from_flags(args: SimpleNamespace) -> Dict[str, Any]:
    from_flags = {"use_reentrant": args.use_reentrant_gc, "upcast_layernorm": args.upcast_layernorm,
                  "upcast_lmhead_output": args.upcast_lmhead_output}
    if args.use_unsloth_gc:
        from_flags["strategy"] = "offload"
    return from_flags


def _no_reentrant_under_fsdp2(args: SimpleNamespace, model_args) -> None:
    if distributed.accelerate_requests_fsdp2() and args.use_reentrant_gc:
        warnings.warn(f"{_FUNCTION}: FSDP2 is in use, so use_reentrant_gc is set to False (reentrant checkpointing breaks its hooks)",
                      stacklevel=3)
        args.use_reentrant_gc = False
        if model_args is not None and hasattr(model_args, "use_reentrant_gc"):
            model_args.use_reentrant_gc = False  # as LLaMA-Factory does


def _enable(model, options: config.Options) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        warnings.warn(f"{_FUNCTION}: {type(model).__name__} does not support gradient checkpointing; left off", stacklevel=3)
        return
    _install_on_model(model, options)
    model.gradient_checkpointing_enable()


def _read_flags(function: str, model_args, flags: Dict[str, Any]) -> SimpleNamespace:
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise ValueError(f"{function}: unknown flag(s) {unknown}; LLaMA-Factory's flags are {', '.join(FLAGS)}")
    values = {name: flags.get(name, getattr(model_args, name, default)) for name, default in FLAGS.items()}
    for name, value in values.items():
        if not isinstance(value, bool):
            raise ValueError(f"{function}: flag {name!r} must be True or False; got {value!r}")
    return SimpleNamespace(**values)


def _install_on_model(model, options: config.Options) -> None:
    """Gives one model torchgc's enable/disable as instance methods bound to ``options``, leaving
    transformers' classes untouched (what LLaMA-Factory does with MethodType)."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """torchgc's gradient_checkpointing_enable for this model, with prepare_model_for_training's
        options as the base that gradient_checkpointing_kwargs refine."""
        hf.enable(self, gradient_checkpointing_kwargs, options=options, **kwargs)

    def gradient_checkpointing_disable(self):
        hf.disable(self)

    model.gradient_checkpointing_enable = types.MethodType(gradient_checkpointing_enable, model)
    model.gradient_checkpointing_disable = types.MethodType(gradient_checkpointing_disable, model)


# ---------------------------------------------------------------------------------------------
# Routing LLaMA-Factory's model preparation through prepare_model_for_training


def route(options: config.Options) -> None:
    """Makes LLaMA-Factory prepare its models with prepare_model_for_training, now if it is
    imported, else as soon as it is. ``options``: those of torchgc.patch(), which take precedence
    over LLaMA-Factory's flags where they were given or set in the environment."""
    global _options, _hook
    _options = options
    module = sys.modules.get(CHECKPOINTING_MODULE)
    if module is not None:
        _replace(module)
    elif _hook is None:
        _hook = _RouteWhenLoaded()
        sys.meta_path.insert(0, _hook)


def unroute() -> None:
    """Puts LLaMA-Factory's own prepare_model_for_training back."""
    global _original, _hook, _options
    _options = None
    if _hook is not None:
        if _hook in sys.meta_path:
            sys.meta_path.remove(_hook)
        _hook = None
    if _original is not None:
        for name in (CHECKPOINTING_MODULE, PATCHER_MODULE):
            module = sys.modules.get(name)
            if module is not None and getattr(module, FUNCTION, None) is prepare_model_for_training:
                setattr(module, FUNCTION, _original)
        _original = None


def _replace(checkpointing) -> None:
    global _original
    _check_version()
    original = getattr(checkpointing, FUNCTION, None)
    if original is None:
        warnings.warn(f"torchgc: {CHECKPOINTING_MODULE} has no {FUNCTION}, so torchgc cannot route LLaMA-Factory's "
                      f"gradient checkpointing, and LLaMA-Factory's own runs (supported versions: {', '.join(SUPPORTED_VERSIONS)})")
        return
    if original is not prepare_model_for_training:
        _original = original
    for name in (CHECKPOINTING_MODULE, PATCHER_MODULE):
        module = sys.modules.get(name)
        if module is not None:
            setattr(module, FUNCTION, prepare_model_for_training)


def _check_version() -> None:
    global _warned_version
    try:
        found = importlib.metadata.version("llamafactory")
    except importlib.metadata.PackageNotFoundError:
        found = "unknown (no package metadata)"
    if found not in SUPPORTED_VERSIONS and not _warned_version:
        _warned_version = True
        warnings.warn(f"torchgc: LLaMA-Factory {found} is installed, and torchgc routes the model preparation of "
                      f"LLaMA-Factory {', '.join(SUPPORTED_VERSIONS)} only; it replaces {FUNCTION} all the same, but the flags "
                      "it reads may differ in this version")


class _RouteWhenLoaded(importlib.abc.MetaPathFinder):
    """Replaces the function right after LLaMA-Factory's checkpointing module first loads, before
    the patcher module imports it by name."""

    def find_spec(self, name, path=None, target=None):
        if name != CHECKPOINTING_MODULE:
            return None
        sys.meta_path.remove(self)  # not for the lookup below
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def load_then_route(module):
            load(module)
            _replace(module)

        spec.loader.exec_module = load_then_route
        return spec
