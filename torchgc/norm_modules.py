"""A model's norm modules routed through torchgc's fused norm ops (torchgc.ops.rms_norm and
layer_norm), optionally with fp32 weights. Everything here is undone by `.remove()` on the handle
returned. The public functions are torchgc.norm's.

Norm modules are picked by what they are, never by parameter names:

- `*RMSNorm` classes with `variance_epsilon` or `eps` and a 1-D `weight` parameter;
- `nn.LayerNorm` (and subclasses) with a 1-D affine weight;
- either of these inside a PEFT `ModulesToSaveWrapper` (its `original_module` and its
  `modules_to_save` copies are ordinary submodules, so the walk over `model.modules()` finds them).

How an RMSNorm computes is read from its `forward` source, which is how transformers writes the
two forms it has (transformers 5.6):

- offset: Gemma-style norms (Gemma, Gemma2, Gemma3, VaultGemma, T5Gemma, RecurrentGemma,
  Qwen3-Next, Qwen3.5) store a zero-initialised weight and multiply by `(1.0 + self.weight...)`;
  a forward whose source contains `1 + self.weight` / `self.weight + 1` gets offset 1. When the
  source cannot be read, class names starting with one of `_OFFSET_CLASS_PREFIXES` get offset 1.
- casting: LlamaRMSNorm ends with `self.weight * hidden_states.to(input_dtype)`, rounding the
  normalized row to the activation dtype before the weight; such forwards get casting "llama".
  Everything else (Gemma computes in fp32 and casts once) gets casting "fp32".

The choice is then checked by behaviour: the module's own forward runs once on a small float32
probe and must agree with the fused op, else the module is left alone (listed in
`handle.skipped`). That catches norm variants this reading does not know (gated norms, scales
applied elsewhere, a different eps placement).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from torchgc import counters, ops

__all__ = ["NormPatch", "fuse_norms", "upcast_layernorm"]

_OFFSET_RE = re.compile(r"(?<![\w.])1(\.0*)?\s*\+\s*self\.weight|self\.weight(\.float\(\))?\s*\+\s*1(\.0*)?\b")
_LLAMA_RE = re.compile(r"self\.weight\s*\*\s*\w+\.to\(\s*input_dtype\s*\)")
_OFFSET_CLASS_PREFIXES = ("Gemma", "Gemma2", "Gemma3", "VaultGemma", "T5Gemma", "RecurrentGemma", "Qwen3Next", "Qwen3_5")
_FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_STATE = "_torchgc_norm"  # attribute on a patched module: its _Fused record


@dataclass
class NormPatch:
    """What one call changed. `remove()` restores the forwards and weight dtypes it changed;
    calling it again does nothing."""

    fused: list[str] = field(default_factory=list)
    upcast: list[str] = field(default_factory=list)
    hooked: list[str] = field(default_factory=list)  # modules given a forward hook (the lm_head, torchgc.fp32_logits)
    skipped: dict[str, str] = field(default_factory=dict)
    _undo: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


@dataclass(frozen=True)
class _Spec:
    kind: str  # "rms" or "layer"
    offset: float = 0.0
    casting: str = "fp32"


def _forward_source(cls) -> str | None:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None


def _rms_eps(module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, (int, float)) and not isinstance(eps, bool):
            return float(eps)
    return None


def _norm_spec(module: nn.Module) -> _Spec | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return None
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            return None
        return _Spec("layer")
    cls = type(module)
    if not cls.__name__.endswith("RMSNorm") or _rms_eps(module) is None:
        return None
    source = _forward_source(cls)
    if source is None:
        offset = 1.0 if cls.__name__.startswith(_OFFSET_CLASS_PREFIXES) else 0.0
        return _Spec("rms", offset, "fp32")
    offset = 1.0 if _OFFSET_RE.search(source) else 0.0
    return _Spec("rms", offset, "llama" if _LLAMA_RE.search(source) else "fp32")


def _fused_call(module: nn.Module, spec: _Spec, x: torch.Tensor, fp32_output: bool = False) -> torch.Tensor:
    if spec.kind == "layer":
        return ops.layer_norm(x, module.weight, module.bias, module.eps, fp32_output=fp32_output)
    return ops.rms_norm(x, module.weight, _rms_eps(module), spec.offset, spec.casting, fp32_output=fp32_output)


def _agrees_with_module(module: nn.Module, spec: _Spec) -> str | None:
    """Runs the module's class forward (no hooks) and the fused op on one float32 probe;
    returns why they disagree, or None."""
    weight = module.weight
    if weight.device.type == "meta":
        return "weights on the meta device"
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(3, weight.shape[0], generator=gen, device=weight.device, dtype=torch.float32)
    saved = {name: p.data for name, p in module.named_parameters(recurse=False)}
    try:
        with torch.no_grad():
            for name, p in module.named_parameters(recurse=False):
                p.data = p.data.float()
            expected = type(module).forward(module, x)
            got = _fused_call(module, spec, x)
    except Exception as exc:  # noqa: BLE001  (any failure means: do not touch this module)
        return f"probe failed: {type(exc).__name__}: {exc}"
    finally:
        for name, p in module.named_parameters(recurse=False):
            p.data = saved[name]
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        return "its forward does not return one tensor of the input's shape"
    if not torch.allclose(expected.float(), got, rtol=1e-4, atol=1e-5):
        return f"its forward computes something else (max difference {(expected.float() - got).abs().max().item():.3g})"
    return None


# What torchgc leaves on a model is objects, not closures: a deep copy (TRL's reference model, an
# EMA copy) then points at its own modules, parameters and hooks through deepcopy's memo, and a
# pickled model loads.


@dataclass
class _Fused:
    spec: _Spec
    original_forward: object  # the instance attribute `forward` that was there, or None


class _FusedForward:
    """A norm module's forward through the fused op; anything the op does not take (extra
    arguments, other dtypes, empty input) goes to the module's own forward."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, hidden_states, *args, **kwargs):
        module = self.module
        state = getattr(module, _STATE)
        weight = module.weight
        bias = getattr(module, "bias", None) if state.spec.kind == "layer" else None
        usable = (
            not args and not kwargs and isinstance(hidden_states, torch.Tensor)
            and hidden_states.dtype in _FUSED_DTYPES and weight.dtype in (torch.float32, hidden_states.dtype)
            and (bias is None or bias.dtype == weight.dtype) and hidden_states.dim() > 0
        )
        if not usable:
            fallback = state.original_forward if state.original_forward is not None else type(module).forward.__get__(module)
            return fallback(hidden_states, *args, **kwargs)
        counters.add("fused_norm_calls")
        return _fused_call(module, state.spec, hidden_states)


@dataclass
class _RestoreForward:
    module: nn.Module

    def __call__(self):
        state = self.module.__dict__.pop(_STATE)
        if state.original_forward is None:
            del self.module.forward
        else:
            self.module.forward = state.original_forward


@dataclass
class _RestoreDtypes:
    changed: list  # (parameter, its dtype before the upcast)

    def __call__(self):
        for p, dtype in self.changed:
            p.data = p.data.to(dtype)
            if p.grad is not None:
                p.grad = p.grad.to(dtype)


def _patch_forward(module: nn.Module, spec: _Spec, patch: NormPatch, name: str) -> None:
    if getattr(module, _STATE, None) is not None:
        return  # already routed through the fused op (an earlier call owns the undo)
    setattr(module, _STATE, _Fused(spec, module.__dict__.get("forward")))
    module.forward = _FusedForward(module)
    patch._undo.append(_RestoreForward(module))
    patch.fused.append(name)


def _upcast_weights(module: nn.Module, patch: NormPatch, name: str) -> None:
    changed = []
    for pname in ("weight", "bias"):
        p = getattr(module, pname, None)
        if isinstance(p, nn.Parameter) and p.is_floating_point() and p.dtype != torch.float32:
            changed.append((p, p.dtype))
            p.data = p.data.float()
    if changed:
        patch._undo.append(_RestoreDtypes(changed))
        patch.upcast.append(name)


def _apply(model: nn.Module, upcast: bool) -> NormPatch:
    patch = NormPatch()
    for name, module in model.named_modules(remove_duplicate=True):
        state = getattr(module, _STATE, None)
        spec = state.spec if state is not None else _norm_spec(module)
        if spec is None:
            continue
        if state is None:
            why = _agrees_with_module(module, spec)
            if why is not None:
                patch.skipped[name] = why
                continue
        if upcast:
            _upcast_weights(module, patch, name)
        _patch_forward(module, spec, patch, name)
    return patch


def fuse_norms(model: nn.Module) -> NormPatch:
    """Routes the model's norm modules through torchgc's fused ops, leaving weight dtypes as they
    are. Output stays in the activation dtype."""
    return _apply(model, upcast=False)


def upcast_layernorm(model: nn.Module) -> NormPatch:
    """Puts the norm modules' weights (and biases) in fp32 and routes their forward through the
    fused ops, so the math is fp32 and the output stays in the activation dtype (HF's eager
    LlamaRMSNorm would return fp32 with an fp32 weight)."""
    return _apply(model, upcast=True)
