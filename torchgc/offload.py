"""Offloading of checkpointed inputs to host memory through saved-tensor hooks.

torch's checkpoint (reentrant and non-reentrant alike) saves a layer's tensor inputs where an
outer ``saved_tensors_hooks`` pair sees them, and nothing else of the layer. ``offload_hooks``
installs that pair around one checkpoint call: a layer's inputs stay on the device until the next
layer has run, then go to the host; unpack brings them back, starting the previous layer's reload
first so it overlaps this layer's recompute.
"""

import threading
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from torchgc import counters, ops


# The device types where strategy auto offloads; CPU tensors are checkpointed.
ACCELERATORS = frozenset({"cuda", "xpu", "hpu", "mtia", "privateuseone"})


@dataclass(frozen=True)
class OffloadPolicy:
    """Which saved tensors go to the host."""

    min_bytes: int = 0
    devices: Optional[frozenset] = None  # device types that offload; None means every device
    keep: frozenset = field(default_factory=frozenset)  # data pointers never offloaded
    prefetch: bool = True
    max_host_bytes: Optional[int] = None  # stop offloading while this much host memory is in use

    def wants(self, tensor: torch.Tensor) -> bool:
        if isinstance(tensor, torch.nn.Parameter) or tensor.layout != torch.strided:
            return False
        if self.devices is not None and tensor.device.type not in self.devices:
            return False
        nbytes = tensor.numel() * tensor.element_size()
        return nbytes >= max(self.min_bytes, 1) and tensor.data_ptr() not in self.keep


class _Entry:
    """One saved input: on the device until offloaded, then on the host until unpacked."""

    __slots__ = ("device_tensor", "host", "device", "reloaded", "previous", "shared", "version", "aliases",
                 "modified_at", "shape", "dtype", "__weakref__")

    def __init__(self, tensor: torch.Tensor, previous: Optional["_Entry"]):
        self.device_tensor = tensor
        self.host = None
        self.device, self.shape, self.dtype = tensor.device, tuple(tensor.shape), tensor.dtype
        self.reloaded = None
        self.previous = weakref.ref(previous) if previous is not None else None
        self.shared = False  # saved by more than one layer: offloading it would free nothing
        # Autograd checks a saved tensor's version counter when it unpacks it, but not one that a
        # saved-tensor hook packed; so this does. The tensor and its base share the counter, and
        # weak references to them keep nothing alive after offloading.
        self.version = tensor._version
        self.aliases = [weakref.ref(t) for t in (tensor, tensor._base) if t is not None]
        self.modified_at = None  # the version seen when the copy was made, if it had changed

    def offload(self) -> None:
        if self.device_tensor._version != self.version:
            self.modified_at = self.device_tensor._version  # raised at unpack, where autograd raises
        self.host = ops.offload(self.device_tensor)
        self.device_tensor = None
        counters.add("offloaded_bytes", self.host.numel() * self.host.element_size())

    def check_unmodified(self) -> None:
        versions = [self.modified_at] + [t._version for t in (ref() for ref in self.aliases) if t is not None]
        changed = [v for v in versions if v is not None and v != self.version]
        if changed:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"torchgc offload saved a checkpointed layer's input of shape {list(self.shape)} and dtype {self.dtype} "
                f"at version {self.version}, and it is now at version {changed[0]}. Modify a copy of it "
                "(x = x.clone()), or change it before the layer runs."
            )

    def start_reload(self) -> None:
        if self.host is not None and self.reloaded is None:
            self.reloaded = ops.reload(self.host, self.device)

    def unpack(self, prefetch: bool) -> torch.Tensor:
        self.check_unmodified()
        self.start_reload()
        # The previous layer's input is needed right after this layer's recompute: start its
        # copy now so it overlaps.
        previous = self.previous() if prefetch and self.previous is not None else None
        if previous is not None:
            previous.start_reload()
        if self.device_tensor is not None:
            return self.device_tensor
        tensor, self.reloaded = self.reloaded, None
        ops.wait(tensor)
        return tensor


class _Tracker(threading.local):
    """Per thread: the entries of the last finished checkpoint call, which the next call offloads,
    and the entry made last, which the next one prefetches. Weak references only, so an
    interrupted forward (an exception, an abandoned graph) frees its tensors."""

    def __init__(self):
        self.previous_call = {}
        self.last_entry = None

    def live_previous_entries(self):
        return [entry for entry in (ref() for ref in self.previous_call.values()) if entry is not None]


_tracker = _Tracker()


def _identity(tensor: torch.Tensor):
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor._version)


class offload_hooks:
    """Context manager around one checkpoint call. On exit it offloads the previous call's inputs,
    so each copy overlaps the next layer's forward, and the last layer's input stays resident."""

    def __init__(self, policy: OffloadPolicy):
        self.policy = policy
        self.entries = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc_info):
        self.hooks.__exit__(*exc_info)
        if exc_info[0] is None:
            for entry in _tracker.live_previous_entries():
                if not entry.shared and entry.device_tensor is not None and _host_has_room(entry.device_tensor, self.policy):
                    entry.offload()
            _tracker.previous_call = self.entries
        return False

    def pack(self, tensor: torch.Tensor):
        if not self.policy.wants(tensor):
            return tensor
        key = _identity(tensor)
        entry = _resident(self.entries.get(key))
        if entry is None:
            entry = _resident(_tracker.previous_call.get(key))
            if entry is not None:
                entry.shared = True
        if entry is None:
            entry = _Entry(tensor, _live(_tracker.last_entry))
            _tracker.last_entry = weakref.ref(entry)
        self.entries[key] = weakref.ref(entry)
        return entry

    def unpack(self, packed):
        if not isinstance(packed, _Entry):
            return packed
        return packed.unpack(self.policy.prefetch)


def _live(ref):
    return ref() if ref is not None else None


def _resident(ref):
    # Only an entry still holding its device tensor keeps that storage alive; once offloaded, the
    # storage may be freed and its address reused, so an identity match would be a false one.
    entry = _live(ref)
    return entry if entry is not None and entry.device_tensor is not None else None


def _host_has_room(tensor: torch.Tensor, policy: OffloadPolicy) -> bool:
    if policy.max_host_bytes is None:
        return True
    in_use = ops.host_pool_stats().in_use_bytes
    return in_use + tensor.numel() * tensor.element_size() <= policy.max_host_bytes
