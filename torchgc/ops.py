"""Python bindings of torchgc's C++ ops: typed wrappers, fake kernels and autograd registration.

The op libraries load on the first call that needs them (or on load_library()), not at import, so
`import torchgc`, `torchgc.patch()` and the checkpoint strategy keep working when they are missing
or cannot run here; that first call raises the ImportError saying why, and what to do.

The list of ops is not kept here: it is read from the schemas the library defines (csrc/ops.cpp).
"""

import math
import threading
import warnings
from numbers import Real
from typing import NamedTuple, Optional

import torch

from torchgc import _library

_lock = threading.Lock()
_build_info = None  # what the loaded library was built against, once loaded


# Under torch.compile this runs at trace time, so an op's first call inside a compiled region
# loads the library instead of breaking the graph.
@torch.compiler.assume_constant_result
def _load_once() -> bool:
    global _build_info
    with _lock:
        if _build_info is None:
            info = _library.load()
            _register_python_kernels()
            _build_info = info
    return True


def load_library() -> _library.BuildInfo:
    """Loads torchgc's op library (once) and returns what it was built against. Raises ImportError
    naming the cause and the rebuild command when it is missing or was built for another torch."""
    if _build_info is None:
        _load_once()
    return _build_info


def _op(name: str):
    load_library()
    return getattr(torch.ops.torchgc, name).default


def op_names() -> list:
    """Every op the loaded library defines, by name."""
    load_library()
    return _defined_ops()


def _defined_ops() -> list:
    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("torchgc::"))


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def missing_kernel(op: str, device: "torch.device | str") -> Optional[str]:
    """Why the loaded libraries cannot run `op` on the device type of `device`, or None when they
    can. A CPU-only torch loads no CUDA kernels, and a build without nvcc has the CUDA offload
    kernels but not the CUDA norm ones."""
    device_type = torch.device(device).type
    key = _DISPATCH_KEYS.get(device_type)
    if key is None:
        return f"torchgc has no kernels for {device_type} devices"
    try:
        info = load_library()
    except ImportError as exc:
        return f"torchgc's op library cannot load: {exc}"
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"torchgc::{op}", key):
        return None
    if device_type == "cuda" and not info.with_cuda:
        return "torchgc's CUDA library is not loaded (torch is a CPU-only build, or torchgc was built without it)"
    return f"this build of torchgc has no {key} kernel of torchgc::{op} (the CUDA norm kernels need nvcc at build time)"


def supports(op: str, device: "torch.device | str") -> bool:
    """Whether the loaded libraries have a kernel of `op` for the device type of `device` (False
    when they cannot load)."""
    return missing_kernel(op, device) is None


_usable = {}  # (op, device type) -> whether the loaded libraries run it there


# Under torch.compile this runs at trace time (no graph break); the answer is fixed per process,
# and asked on every layer and norm call on an accelerator, so it is kept after the first.
@torch.compiler.assume_constant_result
def usable_on(op: str, device_type: str, instead: str) -> bool:
    """supports(op, device_type), warning once per op and device type when it does not, naming
    why and what runs `instead`."""
    usable = _usable.get((op, device_type))
    if usable is None:
        why = missing_kernel(op, device_type)
        if why is not None:
            warnings.warn(f"torchgc: {why}; on {device_type}, {instead}", stacklevel=3)
        usable = _usable[(op, device_type)] = why is None
    return usable


class HostPoolStats(NamedTuple):
    reserved_bytes: int  # pageable host bytes the pool holds, in use or cached
    in_use_bytes: int  # bytes of live offloaded host tensors, pageable and pinned
    limit_bytes: int  # the cap on cached bytes in force
    pinned_fallbacks: int  # times pinning failed and pageable memory was used instead
    cached_bytes: int  # pageable bytes kept for reuse, in use by no tensor


def offload(x: torch.Tensor) -> torch.Tensor:
    """Copies x to host memory: pinned and asynchronous on CUDA. Returns the host tensor."""
    return _op("offload")(x)


def reload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Starts copying an offloaded host tensor back to `device` and returns at once. Call wait()
    on the result before its first use."""
    return _op("reload")(host, torch.device(device))


def wait(x: torch.Tensor) -> None:
    """Makes the current stream wait for the pending reload into x (a no-op when none is)."""
    _op("wait")(x)


def host_pool_stats() -> HostPoolStats:
    """What the host pool of pageable offload memory holds (pinned CUDA memory is torch's caching
    host allocator's, and counts only in in_use_bytes)."""
    return HostPoolStats(*_op("host_pool_stats")())


def set_host_pool_limit(nbytes: Optional[int]) -> None:
    """Caps the pageable host bytes the pool keeps cached for reuse while no tensor uses them:
    an int >= 0 (0 caches nothing), or None for the automatic limit, the default: as many bytes as
    were ever in use at once, so a steady training step reuses every block and the pool holds at
    most twice its peak. Blocks beyond the cap go back to the OS, least recently used first."""
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes < 2**63):
        raise ValueError(f"torchgc.ops.set_host_pool_limit: argument 'nbytes' must be None or an int from 0 to 2**63 - 1; got {nbytes!r}")
    _op("set_host_pool_limit")(-1 if nbytes is None else nbytes)


def empty_host_pool() -> None:
    """Returns every cached block to the OS (in-use blocks follow when their tensors are freed), and
    restarts the automatic limit's peak from the bytes in use now."""
    _op("empty_host_pool")()


def _offload_fake(x):
    return torch.empty(x.shape, dtype=x.dtype, device="cpu")


def _reload_fake(host, device):
    return torch.empty(host.shape, dtype=host.dtype, device=device)


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
    _check_scalars("rms_norm", eps=eps, offset=offset, fp32_output=fp32_output)
    if not _fused_on(x, "rms_norm"):
        return _rms_norm_composite(x, weight, float(eps), float(offset), casting == "llama", fp32_output)
    y, _ = _op("rms_norm")(x, weight, float(eps), float(offset), casting == "llama", fp32_output)
    return y


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None", eps: float,
               fp32_output: bool = False) -> torch.Tensor:
    """LayerNorm over the last dimension with fp32 math; bias may be None. Differentiable with
    respect to x, weight and bias."""
    _check_scalars("layer_norm", eps=eps, fp32_output=fp32_output)
    if not _fused_on(x, "layer_norm"):
        return _layer_norm_composite(x, weight, bias, float(eps), fp32_output)
    y, _, _ = _op("layer_norm")(x, weight, bias, float(eps), fp32_output)
    return y


def _fused_on(x: torch.Tensor, op: str) -> bool:
    """Whether x's device has the fused kernel. On an accelerator without it (a build without
    nvcc), the same fp32 math runs as torch ops instead, after one warning: never an error at the
    first training step."""
    if x.device.type in ("cpu", "meta"):
        return True  # meta tensors run the fake kernels
    return usable_on(op, x.device.type, "the same fp32 norm runs as torch ops instead, slower")


def _check_scalars(op, *, fp32_output, **scalars):
    # float() would turn "1e-6" into a number and bool() any object into a flag, silently.
    if not isinstance(fp32_output, bool):
        raise ValueError(f"torchgc.ops.{op}: argument 'fp32_output' must be True or False; got {fp32_output!r}")
    for name, value in scalars.items():
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ValueError(f"torchgc.ops.{op}: argument '{name}' must be a real number; got {value!r}")


def _op_error(op, message):
    raise RuntimeError(f"torchgc::{op}: {message}")


def _check_norm_param(op, name, p, x):
    if p.device != x.device:
        _op_error(op, f"expected argument '{name}' to be on x's device {x.device}, got one on {p.device}")
    if p.dim() != 1 or p.shape[0] != x.shape[-1]:
        _op_error(op, f"expected argument '{name}' to have shape [{x.shape[-1]}] (x's last dimension), got {list(p.shape)}")
    if p.dtype not in (torch.float32, x.dtype):
        _op_error(op, f"expected argument '{name}' to have dtype float32 or x's dtype ({x.dtype}), got {p.dtype}")


# The fake kernels check what the C++ kernels check, so a traced or compiled call fails the same way.
def _check_norm_forward(op, x, weight, bias, eps):
    if x.dtype not in _NORM_X_DTYPES:
        _op_error(op, f"expected argument 'x' to have dtype bfloat16, float16, float32 or float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        _op_error(op, f"expected argument 'x' to have at least one dimension and a last dimension of size >= 1, got shape {list(x.shape)}")
    _check_norm_param(op, "weight", weight, x)
    if bias is not None:
        _check_norm_param(op, "bias", bias, x)
        if bias.dtype != weight.dtype:
            _op_error(op, f"expected argument 'bias' to have weight's dtype ({weight.dtype}), got {bias.dtype}")
    if not (eps >= 0 and eps != float("inf")):
        _op_error(op, f"expected argument 'eps' to be finite and >= 0, got {eps}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_norm_backward(op, grad_y, x, weight, **stats):
    math_dtype = _check_norm_forward(op, x, weight, None, 0.0)
    if grad_y.device != x.device:
        _op_error(op, f"expected argument 'grad_y' to be on x's device {x.device}, got one on {grad_y.device}")
    if grad_y.shape != x.shape or grad_y.dtype not in (x.dtype, torch.float32):
        _op_error(op, f"expected argument 'grad_y' to have x's shape {list(x.shape)} and dtype float32 or {x.dtype}, "
                        f"got {list(grad_y.shape)} and {grad_y.dtype}")
    for name, t in stats.items():
        if t.shape != x.shape[:-1] or t.dtype != math_dtype or t.device != x.device:
            _op_error(op, f"expected argument '{name}' to have shape {list(x.shape[:-1])} and dtype {math_dtype} on {x.device}, "
                            f"got {list(t.shape)} and {t.dtype} on {t.device}")


def _check_offset(op, offset):
    if not math.isfinite(offset):
        _op_error(op, f"expected argument 'offset' to be finite, got {offset}")


def _rms_norm_fake(x, weight, eps, offset, llama_cast, fp32_output):
    math_dtype = _check_norm_forward("rms_norm", x, weight, None, eps)
    _check_offset("rms_norm", offset)
    y = x.new_empty(x.shape, dtype=torch.float32 if fp32_output else x.dtype)
    return y, x.new_empty(x.shape[:-1], dtype=math_dtype)


def _masked_grads(output_mask, *likes):
    return tuple(t.new_empty(t.shape) if wanted else None for wanted, t in zip(output_mask, likes))


def _rms_norm_backward_fake(grad_y, x, weight, rstd, offset, llama_cast, output_mask):
    _check_norm_backward("rms_norm_backward", grad_y, x, weight, rstd=rstd)
    _check_offset("rms_norm_backward", offset)
    return _masked_grads(output_mask, x, weight)


def _layer_norm_fake(x, weight, bias, eps, fp32_output):
    math_dtype = _check_norm_forward("layer_norm", x, weight, bias, eps)
    y = x.new_empty(x.shape, dtype=torch.float32 if fp32_output else x.dtype)
    return y, x.new_empty(x.shape[:-1], dtype=math_dtype), x.new_empty(x.shape[:-1], dtype=math_dtype)


def _layer_norm_backward_fake(grad_y, x, weight, mean, rstd, output_mask):
    _check_norm_backward("layer_norm_backward", grad_y, x, weight, mean=mean, rstd=rstd)
    return _masked_grads(output_mask, x, weight, weight)


# mean and rstd are saved statistics, not differentiable outputs: their incoming gradients are
# ignored (they are always zero or None unless a caller differentiates through them, which the
# wrappers above never expose). The backward ops compute only the gradients needs_input_grad
# asks for: under LoRA the norm weights are frozen, and their reduction is skipped.
#
# The backward kernels are not differentiable themselves. When a backward runs with grad mode on
# (create_graph=True: a gradient penalty, a Hessian-vector product), the gradients come instead
# from differentiating the same norm written in torch ops, which autograd can differentiate again;
# they equal the kernels' up to the order of fp32 rounding.
def _math_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rms_norm_composite(x, weight, eps, offset, llama_cast, fp32_output):
    xf = x.to(_math_dtype(x))
    xhat = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if llama_cast:
        xhat = xhat.to(x.dtype).to(xf.dtype)
    y = xhat * (offset + weight.to(xf.dtype))
    return y if fp32_output else y.to(x.dtype)


def _layer_norm_composite(x, weight, bias, eps, fp32_output):
    acc = _math_dtype(x)
    y = torch.nn.functional.layer_norm(x.to(acc), x.shape[-1:], weight.to(acc), None if bias is None else bias.to(acc), eps)
    return y if fp32_output else y.to(x.dtype)


def _differentiable_grads(composite, ctx, grad_y, tensors, options):
    """Gradients of composite(*tensors, *options) for the tensors needs_input_grad asks for (None
    for the others), with a graph of their own."""
    wanted = [i for i, t in enumerate(tensors) if t is not None and ctx.needs_input_grad[i]]
    y = composite(*tensors, *options)
    grads = torch.autograd.grad(y, [tensors[i] for i in wanted], grad_y, create_graph=True)
    out = [None] * len(tensors)
    for i, grad in zip(wanted, grads):
        out[i] = grad
    return out


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps, offset, llama_cast, fp32_output = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.options = (eps, offset, llama_cast, fp32_output)


def _rms_norm_backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        dx, dweight = _differentiable_grads(_rms_norm_composite, ctx, grad_y, (x, weight), ctx.options)
    else:
        _eps, offset, llama_cast, _fp32_output = ctx.options
        dx, dweight = torch.ops.torchgc.rms_norm_backward.default(grad_y, x, weight, rstd, offset, llama_cast,
                                                                  list(ctx.needs_input_grad[:2]))
    return dx, dweight, None, None, None, None


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, eps, fp32_output = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.options = (eps, fp32_output)


def _layer_norm_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        dx, dweight, dbias = _differentiable_grads(_layer_norm_composite, ctx, grad_y, (x, weight, bias), ctx.options)
    else:
        # needs_input_grad is False for a None bias, so dbias is only computed for a real one.
        dx, dweight, dbias = torch.ops.torchgc.layer_norm_backward.default(grad_y, x, weight, mean, rstd,
                                                                           list(ctx.needs_input_grad[:3]))
    return dx, dweight, dbias, None, None


# Python kernels for dispatch keys the C++ kernels leave out. Kept alive: a Library deregisters
# what it registered when it is freed.
_python_kernels = []


def _fake_kernel(name: str):
    fake = globals().get(f"_{name}_fake")
    if fake is None:
        raise ImportError(f"torchgc: the op library defines torchgc::{name}, and torchgc.ops has no _{name}_fake for it")
    return fake


def _layout_name(layout: torch.layout) -> str:
    return {torch.sparse_coo: "Sparse", torch.sparse_csr: "SparseCsr", torch.sparse_csc: "SparseCsc",
            torch.sparse_bsr: "SparseBsr", torch.sparse_bsc: "SparseBsc"}.get(layout, str(layout))


def _rejecting_sparse(name: str):
    """A kernel for the sparse dispatch keys: every torchgc op takes dense tensors only, and this
    names the op and the argument instead of the dispatcher's "Could not run ... 'SparseCPU'"."""
    arguments = [a.name for a in getattr(torch.ops.torchgc, name).default._schema.arguments]

    def reject(*args, **kwargs):
        for argument, value in zip(arguments, args):
            if isinstance(value, torch.Tensor) and value.layout != torch.strided:
                _op_error(name, f"expected argument '{argument}' to be a dense (strided) tensor, got layout {_layout_name(value.layout)}")
        _op_error(name, "expected dense (strided) tensors only")

    return reject


_SPARSE_KEYS = ("SparseCPU", "SparseCUDA", "SparseCsrCPU", "SparseCsrCUDA")
# Offloading moves saved tensors' bytes; it is not part of the differentiated computation, so its
# outputs carry no autograd history.
_NOT_DIFFERENTIATED = ("offload", "reload", "wait")


def _register_python_kernels() -> None:
    """Fake (meta) kernels, autograd, and the sparse and Autograd keys; the schemas must be loaded first."""
    library = torch.library.Library("torchgc", "IMPL")
    _python_kernels.append(library)
    for name in _defined_ops():
        schema = getattr(torch.ops.torchgc, name).default._schema
        if not any("Tensor" in str(a.type) for a in schema.arguments):
            continue  # bookkeeping: no tensors, nothing to trace
        torch.library.register_fake(f"torchgc::{name}")(_fake_kernel(name))
        for key in _SPARSE_KEYS:
            library.impl(name, _rejecting_sparse(name), key)
    for name in _NOT_DIFFERENTIATED:
        library.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_autograd("torchgc::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup)
    torch.library.register_autograd("torchgc::layer_norm", _layer_norm_backward, setup_context=_layer_norm_setup)

