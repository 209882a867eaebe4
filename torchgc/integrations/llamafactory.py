"""torchgc's version of LLaMA-Factory's ``prepare_model_for_training`` for one model."""

import dataclasses
import types
import warnings
from typing import Optional

import torch

from torchgc import config
from torchgc.integrations import transformers as hf


def prepare_model_for_training(
    model: torch.nn.Module,
    *,
    strategy: Optional[str] = None,
    use_reentrant: Optional[bool] = True,
    upcast_layernorm: bool = False,
    upcast_lmhead_output: bool = False,
    disable_gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """Prepares ``model`` for fine-tuning the way LLaMA-Factory 0.9.5 does, with torchgc's
    checkpointing. In order:

    1. upcast_layernorm: norm weights in fp32 (torchgc.norm.upcast_layernorm);
    2. FSDP2: reentrant checkpointing is replaced by non-reentrant, with a warning;
    3. unless disable_gradient_checkpointing: installs torchgc's gradient_checkpointing_enable
       and _disable on this model only, enables checkpointing (use_reentrant as given, like
       LLaMA-Factory's use_reentrant_gc; None follows transformers) and sets use_cache=False;
    4. upcast_lmhead_output: the lm_head's output in fp32 (torchgc.norm.upcast_lmhead_output).

    strategy left at None comes from TORCHGC_STRATEGY, else "auto". Returns the model.
    """
    function = "torchgc.prepare_model_for_training()"
    for name, value in (
        ("upcast_layernorm", upcast_layernorm),
        ("upcast_lmhead_output", upcast_lmhead_output),
        ("disable_gradient_checkpointing", disable_gradient_checkpointing),
    ):
        if not isinstance(value, bool):
            raise ValueError(f"{function}: argument {name!r} must be True or False; got {value!r}")
    # use_reentrant=None means "follow transformers" here, not "read the environment".
    config.check(function, "use_reentrant", use_reentrant)
    options = dataclasses.replace(config.resolve(function, {"strategy": strategy}), use_reentrant=use_reentrant)

    norm = hf.norm_transforms(function) if upcast_layernorm or upcast_lmhead_output else {}

    handles = {}
    if upcast_layernorm:
        handles["upcast_layernorm"] = norm["upcast_layernorm"](model)

    if not disable_gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            warnings.warn(f"{function}: {type(model).__name__} does not support gradient checkpointing; left off")
        else:
            _install_on_model(model, options)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": options.use_reentrant})

    if upcast_lmhead_output:
        handles["upcast_lmhead_output"] = norm["upcast_lmhead_output"](model)
    if handles:
        model.__dict__.setdefault("_torchgc_handles", {}).update(handles)
    return model


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
