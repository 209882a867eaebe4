"""Python bindings of torchgc's C++ ops: typed wrappers, fake kernels and autograd registration."""

from typing import NamedTuple

import torch

import torchgc._library  # noqa: F401  (loads the op library)


class HostPoolStats(NamedTuple):
    reserved_bytes: int
    in_use_bytes: int
    limit_bytes: int
    pinned_fallbacks: int


def offload(x: torch.Tensor) -> torch.Tensor:
    """Copies x to host memory: pinned and asynchronous on CUDA. Returns the host tensor."""
    return torch.ops.torchgc.offload.default(x)


def reload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Starts copying an offloaded host tensor back to `device` and returns at once. Call wait()
    on the result before its first use."""
    return torch.ops.torchgc.reload.default(host, torch.device(device))


def wait(x: torch.Tensor) -> None:
    """Makes the current stream wait for the pending reload into x (a no-op when none is)."""
    torch.ops.torchgc.wait.default(x)


def host_pool_stats() -> HostPoolStats:
    return HostPoolStats(*torch.ops.torchgc.host_pool_stats.default())


def set_host_pool_limit(nbytes: int) -> None:
    """Caps the pageable host bytes the pool keeps cached (0: no cap)."""
    torch.ops.torchgc.set_host_pool_limit.default(int(nbytes))


def empty_host_pool() -> None:
    torch.ops.torchgc.empty_host_pool.default()


@torch.library.register_fake("torchgc::offload")
def _offload_fake(x):
    return torch.empty(x.shape, dtype=x.dtype, device="cpu")


@torch.library.register_fake("torchgc::reload")
def _reload_fake(host, device):
    return torch.empty(host.shape, dtype=host.dtype, device=device)


@torch.library.register_fake("torchgc::wait")
def _wait_fake(x):
    return None


# ---------------------------------------------------------------------------------------------
# Fused norms: fp32 math for bf16/fp16/fp32 x (float64 math for float64 x, so gradcheck can run
# on the kernels themselves), weights in fp32 or x's dtype, y in x's dtype unless fp32_output.

_NORM_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_RMS_CASTINGS = ("fp32", "llama")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, casting: str = "fp32",
             fp32_output: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension: y = x * rsqrt(mean(x^2) + eps) * (offset + weight).

    casting="fp32" rounds once, at the end. casting="llama" rounds x * rstd to x's dtype before
    the weight multiplies it, as HF's LlamaRMSNorm does. Gemma's norms use offset=1.
    Differentiable with respect to x and weight."""
    if casting not in _RMS_CASTINGS:
        raise ValueError(f"torchgc.ops.rms_norm: expected casting to be one of {_RMS_CASTINGS}, got {casting!r}")
    y, _ = torch.ops.torchgc.rms_norm.default(x, weight, float(eps), float(offset), casting == "llama", bool(fp32_output))
    return y


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None", eps: float,
               fp32_output: bool = False) -> torch.Tensor:
    """LayerNorm over the last dimension with fp32 math; bias may be None. Differentiable with
    respect to x, weight and bias."""
    y, _, _ = torch.ops.torchgc.layer_norm.default(x, weight, bias, float(eps), bool(fp32_output))
    return y


def _norm_error(op, message):
    raise RuntimeError(f"torchgc::{op}: {message}")


def _check_norm_param(op, name, p, x):
    if p.device != x.device:
        _norm_error(op, f"expected argument '{name}' to be on x's device {x.device}, got one on {p.device}")
    if p.dim() != 1 or p.shape[0] != x.shape[-1]:
        _norm_error(op, f"expected argument '{name}' to have shape [{x.shape[-1]}] (x's last dimension), got {list(p.shape)}")
    if p.dtype not in (torch.float32, x.dtype):
        _norm_error(op, f"expected argument '{name}' to have dtype float32 or x's dtype ({x.dtype}), got {p.dtype}")


# The fake kernels check what the C++ kernels check, so a traced or compiled call fails the same way.
def _check_norm_forward(op, x, weight, bias, eps):
    if x.dtype not in _NORM_X_DTYPES:
        _norm_error(op, f"expected argument 'x' to have dtype bfloat16, float16, float32 or float64, got {x.dtype}")
    if x.dim() < 1 or x.numel() == 0:
        _norm_error(op, f"expected argument 'x' to be a non-empty tensor with at least one dimension, got shape {list(x.shape)}")
    _check_norm_param(op, "weight", weight, x)
    if bias is not None:
        _check_norm_param(op, "bias", bias, x)
        if bias.dtype != weight.dtype:
            _norm_error(op, f"expected argument 'bias' to have weight's dtype ({weight.dtype}), got {bias.dtype}")
    if not (eps >= 0 and eps != float("inf")):
        _norm_error(op, f"expected argument 'eps' to be finite and >= 0, got {eps}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_norm_backward(op, grad_y, x, weight, **stats):
    math = _check_norm_forward(op, x, weight, None, 0.0)
    if grad_y.device != x.device:
        _norm_error(op, f"expected argument 'grad_y' to be on x's device {x.device}, got one on {grad_y.device}")
    if grad_y.shape != x.shape or grad_y.dtype not in (x.dtype, torch.float32):
        _norm_error(op, f"expected argument 'grad_y' to have x's shape {list(x.shape)} and dtype float32 or {x.dtype}, "
                        f"got {list(grad_y.shape)} and {grad_y.dtype}")
    for name, t in stats.items():
        if t.shape != x.shape[:-1] or t.dtype != math or t.device != x.device:
            _norm_error(op, f"expected argument '{name}' to have shape {list(x.shape[:-1])} and dtype {math} on {x.device}, "
                            f"got {list(t.shape)} and {t.dtype} on {t.device}")


@torch.library.register_fake("torchgc::rms_norm")
def _rms_norm_fake(x, weight, eps, offset, llama_cast, fp32_output):
    math = _check_norm_forward("rms_norm", x, weight, None, eps)
    y = x.new_empty(x.shape, dtype=torch.float32 if fp32_output else x.dtype)
    return y, x.new_empty(x.shape[:-1], dtype=math)


def _masked_grads(output_mask, *likes):
    return tuple(t.new_empty(t.shape) if wanted else None for wanted, t in zip(output_mask, likes))


@torch.library.register_fake("torchgc::rms_norm_backward")
def _rms_norm_backward_fake(grad_y, x, weight, rstd, offset, llama_cast, output_mask):
    _check_norm_backward("rms_norm_backward", grad_y, x, weight, rstd=rstd)
    return _masked_grads(output_mask, x, weight)


@torch.library.register_fake("torchgc::layer_norm")
def _layer_norm_fake(x, weight, bias, eps, fp32_output):
    math = _check_norm_forward("layer_norm", x, weight, bias, eps)
    y = x.new_empty(x.shape, dtype=torch.float32 if fp32_output else x.dtype)
    return y, x.new_empty(x.shape[:-1], dtype=math), x.new_empty(x.shape[:-1], dtype=math)


@torch.library.register_fake("torchgc::layer_norm_backward")
def _layer_norm_backward_fake(grad_y, x, weight, mean, rstd, output_mask):
    _check_norm_backward("layer_norm_backward", grad_y, x, weight, mean=mean, rstd=rstd)
    return _masked_grads(output_mask, x, weight, weight)


# mean and rstd are saved statistics, not differentiable outputs: their incoming gradients are
# ignored (they are always zero or None unless a caller differentiates through them, which the
# wrappers above never expose). The backward ops compute only the gradients needs_input_grad
# asks for: under LoRA the norm weights are frozen, and their reduction is skipped.
def _rms_norm_setup(ctx, inputs, output):
    x, weight, _eps, offset, llama_cast, _fp32_output = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.offset, ctx.llama_cast = offset, llama_cast


def _rms_norm_backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = torch.ops.torchgc.rms_norm_backward.default(grad_y, x, weight, rstd, ctx.offset, ctx.llama_cast,
                                                              list(ctx.needs_input_grad[:2]))
    return dx, dweight, None, None, None, None


def _layer_norm_setup(ctx, inputs, output):
    x, weight, _bias, _eps, _fp32_output = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _layer_norm_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    # needs_input_grad is False for a None bias, so dbias is only computed for a real one.
    dx, dweight, dbias = torch.ops.torchgc.layer_norm_backward.default(grad_y, x, weight, mean, rstd,
                                                                       list(ctx.needs_input_grad[:3]))
    return dx, dweight, dbias, None, None


torch.library.register_autograd("torchgc::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup)
torch.library.register_autograd("torchgc::layer_norm", _layer_norm_backward, setup_context=_layer_norm_setup)
