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
