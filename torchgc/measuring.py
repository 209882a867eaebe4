"""What the planner and `torchgc bench` measure with: the storages still alive, a device
synchronizer for timers, and bytes written in MiB."""

from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree


def strided_tensors(tree) -> List[torch.Tensor]:
    """The dense tensors among the leaves of a pytree (what has a storage of its own)."""
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.layout == torch.strided]


class LiveStorages:
    """Storages recorded by address, each once, with their bytes and a tag, for as long as they live.

    A weak reference tells when a storage has been freed: an address recorded again after that holds
    a new storage. Recording a live storage again only moves it to the new tag. Empty storages and
    the addresses in ``excluded`` (parameters, inputs held anyway) are never recorded.
    """

    def __init__(self, excluded: Iterable[int] = ()):
        self.excluded = set(excluded)
        self._entries: Dict[int, tuple] = {}  # data_ptr -> (StorageWeakRef, bytes, tag)

    def add(self, tensors: Iterable[torch.Tensor], tag=None) -> int:
        """Records the storages of ``tensors``; returns the bytes of those not alive here before."""
        new_bytes = 0
        for t in tensors:
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if not nbytes or ptr in self.excluded:
                continue
            entry = self._entries.get(ptr)
            if entry is None or entry[0].expired():
                new_bytes += nbytes
                entry = (StorageWeakRef(storage), nbytes, tag)
            self._entries[ptr] = (entry[0], entry[1], tag)
        return new_bytes

    def prune(self) -> int:
        """Forgets the storages that have been freed; returns the bytes of those alive."""
        self._entries = {ptr: entry for ptr, entry in self._entries.items() if not entry[0].expired()}
        return sum(size for _, size, _ in self._entries.values())

    def live_bytes(self) -> int:
        return sum(size for ref, size, _ in self._entries.values() if not ref.expired())

    def live_bytes_by_tag(self) -> Dict[object, int]:
        by_tag: Dict[object, int] = {}
        for ref, size, tag in self._entries.values():
            if not ref.expired():
                by_tag[tag] = by_tag.get(tag, 0) + size
        return by_tag


def synchronizer(devices) -> Callable[[], None]:
    """What makes the host wait for the queued work of ``devices`` (one device or several), so a
    timer sees the work itself."""
    devices = [devices] if isinstance(devices, (str, torch.device)) else devices
    cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    if not cuda:
        return lambda: None
    return lambda: [torch.cuda.synchronize(d) for d in cuda]


def mib(nbytes: Optional[int], digits: int = 1) -> str:
    """Bytes as MiB with ``digits`` decimals ("-" for None)."""
    return "-" if nbytes is None else f"{nbytes / 2**20:.{digits}f}"
