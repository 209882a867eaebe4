"""What torchgc did in this process, counted where it happens: checkpoint calls by strategy and by
layer, bytes offloaded, routing decisions kept and replayed, fused norm calls, fp32 logits. `torchgc.stats()` returns snapshot(); `torchgc run
--report DIR` writes it at exit, one file per process, so a run can show that torchgc was active
in every worker. Counting is a dict update per call; nothing here synchronizes a device."""

import json
import os
from typing import Dict

import torch

# How a torchgc.checkpoint call ran: "checkpoint" (recompute), "offload" (recompute, inputs to the
# host), "selective" (recompute all but matmuls and attention), or "frozen" (a layer whose parameters are all frozen, run as is). Calls made without
# grad mode (eval, generation) are not counted, nor calls inside a compiled region, where this
# Python runs once, at trace time.
_calls: Dict[str, int] = {}
_layers: Dict[int, list] = {}  # id(module) -> [class name, {how: calls}], in the order first seen
_counters: Dict[str, int] = {"offloaded_bytes": 0, "routing_bytes_kept": 0, "routing_decisions_replayed": 0, "fused_norm_calls": 0,
                             "fp32_logits_calls": 0}


def record_checkpoint(module, how: str) -> None:
    if torch.compiler.is_compiling():
        return
    _calls[how] = _calls.get(how, 0) + 1
    if module is not None:
        counts = _layers.setdefault(id(module), [type(module).__name__, {}])[1]
        counts[how] = counts.get(how, 0) + 1


def add(counter: str, amount: int = 1) -> None:
    if not torch.compiler.is_compiling():
        _counters[counter] += amount


def snapshot() -> dict:
    """{"checkpoint_calls": {how: n}, "layer_calls": [[class, {how: n}], ...] (layers in the order of
    their first call), "offloaded_bytes", "routing_bytes_kept" (the MoE routing decisions kept for
    recomputes, summed over forwards), "routing_decisions_replayed", "fused_norm_calls",
    "fp32_logits_calls"}."""
    layers = [[name, dict(counts)] for name, counts in _layers.values()]
    return {"checkpoint_calls": dict(_calls), "layer_calls": layers, **_counters}


def reset() -> None:
    _calls.clear()
    _layers.clear()
    for name in _counters:
        _counters[name] = 0


def write_report(directory: str) -> str:
    """Writes snapshot() with the process's rank and pid to DIRECTORY/torchgc-<pid>.json."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"torchgc-{os.getpid()}.json")
    rank = os.environ.get("RANK")
    report = {"pid": os.getpid(), "rank": None if rank is None else int(rank), **snapshot()}
    with open(path, "w") as f:
        json.dump(report, f)
    return path
