"""fp32 logits: a forward hook on a model's output embedding (the lm_head) that returns its output
in fp32, as LLaMA-Factory's upcast_lmhead_output does. Undone by `.remove()` on the handle."""

from dataclasses import dataclass

import torch
from torch import nn

from torchgc import counters
from torchgc.norm_modules import NormPatch

__all__ = ["upcast_lmhead_output"]


@dataclass
class _RemoveLogitsHook:
    head: nn.Module
    hook: object  # torch.utils.hooks.RemovableHandle

    def __call__(self):
        self.hook.remove()
        del self.head._torchgc_fp32_logits


def _logits_to_fp32(_module, _args, output):
    counters.add("fp32_logits_calls")
    return output.float()


def upcast_lmhead_output(model: nn.Module) -> NormPatch:
    """fp32 logits through a forward hook on the output embedding, when that is an nn.Linear
    whose weight is not fp32 already."""
    patch = NormPatch()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear) or head.weight.dtype == torch.float32 or getattr(head, "_torchgc_fp32_logits", False):
        return patch

    hook = head.register_forward_hook(_logits_to_fp32)
    head._torchgc_fp32_logits = True
    patch._undo.append(_RemoveLogitsHook(head, hook))
    patch.hooked.append("output_embeddings")
    return patch
