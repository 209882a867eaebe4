"""torchgc's selective (per-op) checkpoint policy: keep what is expensive to recompute.

Inside a selectively checkpointed layer, the outputs of matrix multiplications (mm, addmm, bmm,
baddbmm, _grouped_mm, convolution) and of fused attention (every _scaled_dot_product_*_attention
kernel) are saved for backward, and everything else (norms, activations, rotary embeddings,
elementwise ops, softmax, dropout) is recomputed. The matmuls hold most of a decoder layer's
compute and the cheap ops most of its activation bytes, so this keeps most of checkpointing's
recompute time and gives back part of its memory saving. Two exceptions (see policy): a batched
matmul whose output outgrows its inputs (eager attention's Q·Kᵀ) and a fused attention with
dropout are recomputed. The policy runs inside torch's non-reentrant checkpoint, with the contexts
of torchgc.selective_cache in eager mode (which never keep an output the layer changes afterwards)
and with torch's selective checkpoint contexts (context_fn, below) inside a compiled region; RNG and
autocast replay stay torch's own, and selective is always non-reentrant (asking for reentrant
warns once and runs non-reentrant; the gradients are the same).
"""

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_aten = torch.ops.aten


def _overloads(names):
    found = set()
    for name in names:
        packet = getattr(_aten, name, None)
        if packet is not None:
            found.update(getattr(packet, overload) for overload in packet.overloads())
    return frozenset(found)


# Every overload of each op (mm.out, addmm.default, ...): the policy sees the dispatched overload.
SAVED_OPS = _overloads([
    "mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward", "_efficient_attention_forward",
])


def _dropout_p(op, args, kwargs) -> float:
    for index, argument in enumerate(op._schema.arguments):
        if argument.name == "dropout_p":
            if argument.name in kwargs:
                return kwargs[argument.name]
            return args[index] if index < len(args) else (argument.default_value or 0.0)
    return 0.0


_BATCHED_MATMULS = _overloads(["bmm", "baddbmm"])


def _output_outgrows_inputs(args) -> bool:
    """For bmm(a, b) and baddbmm(bias, a, b): is the output larger than a and b together?"""
    a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
    return a.shape[0] * a.shape[1] * b.shape[-1] > a.numel() + b.numel()


def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save the outputs of SAVED_OPS, recompute the rest, with two exceptions.

    A batched matmul whose output is larger than its inputs together is recomputed: in eager
    attention that is Q·Kᵀ, sequence × sequence per head, the layer's largest activation and among
    its cheapest per byte to recompute (the projections dispatch to mm/addmm and are always kept).
    A fused attention with dropout draws random numbers, so it is recomputed too: were it read from
    the cache, the recompute would draw fewer numbers than the forward did, and every later dropout
    mask would differ."""
    if op not in SAVED_OPS:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if op in _BATCHED_MATMULS and _output_outgrows_inputs(args):
        return CheckpointPolicy.PREFER_RECOMPUTE
    if torch.Tag.nondeterministic_seeded in op.tags and _dropout_p(op, args, kwargs) != 0:
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


# torch's selective checkpoint contexts with this policy: what the compiler applies (torchgc.compiled).
context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
