"""Measurements shared by `torchgc bench`, `torchgc plan` and benchmarks/: timing, process memory,
the bytes the autograd graph holds for backward, and the decoder layers' activations. Nothing
here imports transformers. Device synchronization and storage tracking are torchgc.measuring's."""

import functools
import resource
import statistics
import time
from typing import Callable, List, Optional

import torch
from torchgc.measuring import LiveStorages, strided_tensors


def timed_calls(fn: Callable[[], object], *, repeats: int, warmup: int = 0, sync: Optional[Callable[[], None]] = None,
                after: Optional[Callable[[int], None]] = None) -> List[float]:
    """Calls fn() warmup + repeats times, each call synchronized before and after, and returns the
    seconds of the last `repeats` calls. after(i), if given, runs untimed after call i (0-based,
    warm-up calls included)."""
    sync = sync or (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
        if after is not None:
            after(i)
    return times


def median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int = 1, sync: Optional[Callable[[], None]] = None) -> float:
    """The median time of fn() over `repeats` synchronized calls after `warmup` untimed ones."""
    return statistics.median(timed_calls(fn, repeats=repeats, warmup=warmup, sync=sync))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    # A forked worker inherits the server's high-water mark; "5" resets it (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak below may include the server's, and only ever overstates


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def saved_for_backward_bytes(model, inputs: dict) -> int:
    """Runs one training step (forward and backward, no optimizer step) and returns the bytes of
    the activation storages that the autograd graph holds for backward at the end of its forward.

    Candidates are every tensor that a saved-tensor hook around the model packs (what autograd
    saves outside checkpointed regions, and the inputs that reentrant and non-reentrant checkpoint
    save) and every tensor passed to a module (a checkpointed layer's inputs: the checkpoint keeps
    its keyword arguments in its recompute function, not as saved tensors, and torchgc's offload
    hooks, being innermost, pack its saved inputs out of the outer hook's sight). A candidate counts
    if its storage is still alive when the forward returns: an input that offloading moved to host
    memory has been released on the device by then (host_offloaded_bytes reports the host side), one
    that offloading keeps (the last layer's, one shared by layers) has not. Each storage counts
    once and in full, since it stays allocated while any view of it is held. Not counted:
    parameters, buffers and the batch, which stay resident regardless, and the RNG state that a
    checkpoint keeps (about 5 KiB a layer), which is no activation.
    """
    kept_anyway = [*model.parameters(), *model.buffers(), *inputs.values()]
    candidates = LiveStorages(excluded={t.untyped_storage().data_ptr() for t in kept_anyway})

    def pack(tensor):
        candidates.add(strided_tensors(tensor))
        # Detached: a saved output holding its own grad_fn would be a cycle that outlives a failed step.
        return tensor.detach()

    def record_inputs(module, args, kwargs):
        candidates.add(strided_tensors((args, kwargs)))

    handles = [m.register_forward_pre_hook(record_inputs, with_kwargs=True) for m in model.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(**inputs).loss
    finally:
        for handle in handles:
            handle.remove()
    nbytes = candidates.live_bytes()
    loss.backward()
    return nbytes


class LayerActivations:
    """Watches the decoder layers through one or more training steps: the bytes of activations each
    layer holds when the forward ends, the most activation bytes held at once over the step, and
    the seconds each layer spends in backward recomputing its forward.

    A layer's activations are the storages allocated by ops inside its forward (the first run and
    any recompute; views and in-place results belong to the tensor they alias) plus its inputs.
    Gradients, parameters and tensors made outside the layers are not counted. Each storage counts
    once and is attributed to the last layer that made it or received it. Call forward_done()
    when the model's forward has returned, and close() (or leave the with block) at the end.
    """

    def __init__(self, layers, sync: Optional[Callable[[], None]] = None, count_bytes: bool = True):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.sync = sync or (lambda: None)
        self.peak_bytes = 0
        self.kept_at_forward_end: List[int] = [0] * len(layers)
        self.recompute_seconds: List[float] = [0.0] * len(layers)
        self._live = LiveStorages()  # tagged with the index of the layer they belong to
        self._stack: List[tuple] = []  # (layer index, start time) of the layers running
        self._backward = False
        self._handles = []
        for index, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(functools.partial(self._enter, index)))
            # always_call: non-reentrant checkpoint stops a recompute early by raising out of it.
            self._handles.append(layer.register_forward_hook(self._leave, always_call=True))
        watcher = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return watcher._dispatch(func, args, kwargs or {})

        self._mode = _Mode() if count_bytes else None
        if self._mode is not None:
            self._mode.__enter__()

    def forward_done(self) -> None:
        self._live.prune()
        by_layer = self._live.live_bytes_by_tag()
        self.kept_at_forward_end = [by_layer.get(index, 0) for index in range(len(self.kept_at_forward_end))]
        self._backward = True

    def close(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _enter(self, index, module, args):
        if self._backward:
            self.sync()
        self._stack.append((index, time.perf_counter()))
        self._live.add([t for t in strided_tensors(args) if t.is_floating_point()], index)

    def _leave(self, module, args, output):
        index, start = self._stack.pop()
        if self._backward:
            self.sync()
            self.recompute_seconds[index] += time.perf_counter() - start

    def _dispatch(self, func, args, kwargs):
        out = func(*args, **kwargs)
        if self._stack:
            used = {t.untyped_storage().data_ptr() for t in strided_tensors((args, kwargs))}
            made = [t for t in strided_tensors(out) if t.untyped_storage().data_ptr() not in used]
            self._live.add(made, self._stack[-1][0])
        self.peak_bytes = max(self.peak_bytes, self._live.prune())
        return out
