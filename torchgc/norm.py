"""torchgc.norm: what the norm options do to a model, as functions (the ops themselves are
torchgc.ops.rms_norm and torchgc.ops.layer_norm).

- fuse_norms(model): the model's norm modules compute through the fused ops, weights unchanged;
- upcast_layernorm(model): the same with fp32 norm weights (output in the activation dtype);
- upcast_lmhead_output(model): fp32 logits.

Each returns a NormPatch whose remove() undoes it. The option upcast_layernorm, fused_norm and
upcast_lmhead_output of torchgc.patch() apply them. How norm modules are found is in
torchgc.norm_modules; the logits hook is torchgc.fp32_logits.
"""

from torchgc.fp32_logits import upcast_lmhead_output
from torchgc.norm_modules import NormPatch, fuse_norms, upcast_layernorm

__all__ = ["NormPatch", "fuse_norms", "upcast_layernorm", "upcast_lmhead_output"]
