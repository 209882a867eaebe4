"""One layer's costs in each checkpointing mode, measured on its real input (the planner's data).

measure_layer runs the layer's forward twice with grad on, under a forked RNG, and drops the
results: once counting the bytes autograd saves (what mode none keeps) and timing it (what a
recompute costs); once watching every op (_ForwardProbe): the outputs the selective policy keeps,
the time of those ops, and after each op the bytes the forward holds (its working set: input, what
it saves and its temporaries, which every mode holds while the layer runs). On an accelerator a
round trip of the input to pinned memory prices offload.
"""

import dataclasses
import time
from typing import Callable, Dict, List, Optional

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from torchgc import selective
from torchgc.layer_calls import partial_keywords
from torchgc.measuring import LiveStorages, strided_tensors, synchronizer


@dataclasses.dataclass
class LayerCost:
    """One layer's measured costs at one input shape."""

    name: str
    kept_bytes: Dict[str, int]  # mode -> device bytes held for backward from forward until backward
    extra_seconds: Dict[str, float]  # mode -> time the mode adds to the step (recompute, copies)
    full_bytes: int  # everything the layer saves without checkpointing (= kept_bytes["none"])
    # The most bytes the layer's forward holds at once: its input, what it saves and its
    # temporaries (None: taken as full_bytes).
    working_bytes: Optional[int] = None

    def working(self) -> int:
        return self.full_bytes if self.working_bytes is None else self.working_bytes


def free_layer(name: str) -> LayerCost:
    """The cost of a layer that no gradient reaches: it keeps nothing, whatever the mode."""
    return LayerCost(name, {"none": 0}, {"none": 0.0}, 0)


def measure_layer(name: str, module: torch.nn.Module, function: Callable, args: tuple, kwargs: dict) -> LayerCost:
    """Runs the layer's forward twice with grad on under a forked RNG, dropping the results: the
    bytes autograd saves and the time (mode none, and the cost of a recompute), then the bytes and
    time of the outputs the selective policy keeps."""
    devices = sorted({t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}, key=str)
    sync = synchronizer(devices)
    shared = [*module.parameters(), *module.buffers(), *strided_tensors((kwargs, partial_keywords(function)))]
    excluded = {t.untyped_storage().data_ptr() for t in shared}
    inputs = [t for t in strided_tensors(args) if t.is_floating_point() and t.untyped_storage().data_ptr() not in excluded]
    input_bytes = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in inputs}.values())
    accelerators = [d for d in devices if d.type != "cpu"]
    with torch.random.fork_rng(devices=[d for d in accelerators if d.type == "cuda"]), torch.enable_grad():
        full, forward_seconds = _saved_bytes_and_seconds(function, args, kwargs, excluded, sync)
        probe = _ForwardProbe(sync, excluded, inputs)
        with probe:
            out = function(*args, **kwargs)
        del out
    kept = {"none": full, "checkpoint": input_bytes, "selective": input_bytes + probe.selected_bytes}
    extra = {"none": 0.0, "checkpoint": forward_seconds, "selective": max(0.0, forward_seconds - probe.seconds)}
    if accelerators:
        kept["offload"] = 0
        extra["offload"] = forward_seconds + _host_round_trip_seconds(args, sync)
    return LayerCost(name, kept, extra, full, working_bytes=max(probe.peak_bytes, full))


def _saved_bytes_and_seconds(function: Callable, args: tuple, kwargs: dict, excluded: set, sync) -> tuple:
    """One forward: the bytes of the storages autograd saves (each once) and its seconds."""
    saved: Dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    sync()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = function(*args, **kwargs)
    sync()
    seconds = time.perf_counter() - start
    del out
    return sum(saved.values()), seconds


class _ForwardProbe(TorchDispatchMode):
    """Watches one forward of a layer: the bytes of the outputs of the ops that the selective policy
    saves (each storage once) and the time those ops take; and the most bytes the forward holds at
    once (its inputs and every storage it made that is still alive, sampled after each op)."""

    def __init__(self, sync, excluded, inputs: List[torch.Tensor]):
        super().__init__()
        self.sync = sync
        self.live = LiveStorages(excluded)
        self.selected = LiveStorages(excluded)
        self.selected_bytes = 0
        self.seconds = 0.0
        self.live.add(inputs)
        self.peak_bytes = self.live.live_bytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        selected = selective.policy(None, func, *args, **kwargs) is CheckpointPolicy.MUST_SAVE
        if selected:
            self.sync()
            start = time.perf_counter()
        out = func(*args, **kwargs)
        outputs = strided_tensors(out)
        if selected:
            self.sync()
            self.seconds += time.perf_counter() - start
            self.selected_bytes += self.selected.add(outputs)
        self.live.add(outputs)
        self.peak_bytes = max(self.peak_bytes, self.live.prune())
        return out


def _host_round_trip_seconds(args, sync) -> float:
    """Offload's copies if none overlapped compute: each floating-point input to host and back."""
    seconds = 0.0
    for t in strided_tensors(args):
        if t.is_floating_point() and t.device.type != "cpu":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            sync()
            start = time.perf_counter()
            host.copy_(t)
            t.new_empty(t.shape).copy_(host)
            sync()
            seconds += time.perf_counter() - start
    return seconds
