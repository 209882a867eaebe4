"""The outputs selective checkpointing keeps: taken in the forward, handed back in the recompute,
and never one that the layer changes afterwards.

contexts() returns the two dispatch modes that torch's non-reentrant checkpoint enters, one around
the forward and one around the recompute (its context_fn contract, the one torch's
create_selective_checkpoint_contexts fulfils). In the forward, the outputs of the ops that
torchgc.selective.policy keeps are stored, by op and call index; in the recompute, the same call of
the same op returns them instead of running. Every other op runs in both.

torch's own pair checks a kept tensor's version counter when it hands it back. That misses a change
made through a tensor with a counter of its own: a 4-D torch.matmul runs bmm and returns an
_unsafe_view of its output, so T5's `scores += position_bias` changes the kept bmm output unseen,
and the recompute would add the bias twice. Here every op that writes an argument (its schema
says so) into the storage of a kept output drops that output: the recompute computes it again,
and the gradients stay those of the layer without checkpointing.

Kept outputs pass through the saved-tensor hooks around the checkpoint (torch's save_on_cpu, a
memory counter), as every other saved tensor does.
"""

from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from torchgc import selective

_CONSUMED = object()
_written: Dict[Any, Tuple[Tuple[int, str], ...]] = {}  # op -> (position, name) of each argument it writes


def contexts():
    """(forward context, recompute context) for torch.utils.checkpoint's context_fn."""
    cache = _Cache(_user_saved_tensors_hooks())
    return _Keeping(cache), _Reusing(cache)


def _user_saved_tensors_hooks():
    """The saved-tensor hooks a tensor saved around this checkpoint would go through: the innermost
    pair, past any that torch's own checkpoints push (they point to the pair they found)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    while hooks is not None and getattr(hooks[0], "_checkpoint_internal", False):
        hooks = getattr(hooks[0], "_user_hooks", None)
    return hooks


class _Cache:
    def __init__(self, hooks):
        self.hooks = hooks
        self.entries: Dict[tuple, Any] = {}  # (op, call index) -> kept outputs, or _CONSUMED
        self.by_storage: Dict[int, tuple] = {}  # storage of a kept output -> its entry's key

    def keep(self, key: tuple, out) -> None:
        tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        for t in tensors:
            storage = _storage(t)
            if storage is not None:
                self.by_storage[storage] = key
        self.entries[key] = pytree.tree_map(self._pack, out)

    def _pack(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        x = _detached(x)
        return _Kept(x, x._version) if self.hooks is None else _Kept(self.hooks[0](x), None)

    def forget_written(self, op, args: tuple, kwargs: dict) -> None:
        """Drops every kept output whose storage ``op`` writes into."""
        for position, name in _written_arguments(op):
            value = args[position] if position < len(args) else kwargs.get(name)
            for t in pytree.tree_leaves(value):
                key = self.by_storage.pop(_storage(t), None) if isinstance(t, torch.Tensor) else None
                if key is not None:
                    self.entries.pop(key, None)

    def take(self, key: tuple) -> Optional[Any]:
        """The outputs kept for ``key``, or None where the recompute must run the op."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry is _CONSUMED:
            raise RuntimeError("torchgc.checkpoint: trying to backward through a layer under strategy 'selective' a second "
                               "time; its kept outputs are handed back once (use strategy 'checkpoint' to backward twice)")
        self.entries[key] = _CONSUMED
        return pytree.tree_map(self._unpack, entry)

    def _unpack(self, kept):
        if not isinstance(kept, _Kept):
            return kept
        if kept.version is None:
            return self.hooks[1](kept.value)
        if kept.value._version != kept.version:
            raise RuntimeError("torchgc.checkpoint: an output that strategy 'selective' kept for backward was changed in "
                               "place after the layer ran; change a copy of the layer's output instead")
        return kept.value


class _Kept:
    """One kept tensor: itself and its version, or what the saved-tensor hooks packed (version None)."""

    __slots__ = ("value", "version")

    def __init__(self, value, version: Optional[int]):
        self.value, self.version = value, version


class _Keeping(TorchDispatchMode):
    """Around the forward: runs each op, drops kept outputs it writes into, keeps the policy's."""

    def __init__(self, cache: _Cache):
        super().__init__()
        self.cache = cache
        self.calls: Dict[Any, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.cache.by_storage:
            self.cache.forget_written(func, args, kwargs)
        if func in selective.SAVED_OPS:
            index = self.calls[func] = self.calls.get(func, -1) + 1
            if selective.policy(None, func, *args, **kwargs) is CheckpointPolicy.MUST_SAVE:
                self.cache.keep((func, index), out)
        return out


class _Reusing(TorchDispatchMode):
    """Around the recompute: the policy's ops hand back what the forward kept, where it was kept."""

    def __init__(self, cache: _Cache):
        super().__init__()
        self.cache = cache
        self.calls: Dict[Any, int] = {}

    def __enter__(self):
        self.calls.clear()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in selective.SAVED_OPS:
            index = self.calls[func] = self.calls.get(func, -1) + 1
            kept = self.cache.take((func, index))
            if kept is not None:
                return kept
        return func(*args, **(kwargs or {}))


def _written_arguments(op) -> Tuple[Tuple[int, str], ...]:
    found = _written.get(op)
    if found is None:
        found = _written[op] = tuple((i, a.name) for i, a in enumerate(op._schema.arguments)
                                     if a.alias_info is not None and a.alias_info.is_write)
    return found


def _storage(t: torch.Tensor) -> Optional[int]:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # a tensor without storage (a wrapper subclass, sparse)
        return None


def _detached(x: torch.Tensor) -> torch.Tensor:
    # Below autograd, a detach made with the ADInplaceOrView key shares the version counter of x, so
    # a change to x itself is still seen; and the kept tensor holds no graph (no reference cycle).
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False):
        return x.detach()
