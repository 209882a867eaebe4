"""Benchmark of torchgc's fused norms against the ways people run them today.

For RMSNorm and LayerNorm on (rows, hidden) with bf16 x and an fp32 weight, times forward and
forward+backward of:
  torchgc   torchgc.ops.rms_norm / layer_norm
  (a) eager HF LlamaRMSNorm / nn.LayerNorm holding the fp32 weight (what upcast_layernorm leaves)
  (b) torch.compile of (a)
  (c) F.rms_norm / F.layer_norm with the same arguments
  (d) x.clone(): a plain copy of x, the memory-bound limit of a forward (it allocates its output,
      as every norm here does; on CPU, first touch of a fresh 32 MiB block can cost more than
      the copy, so (e) shows the copy alone)
  (e) y.copy_(x) into a preallocated y: forward only
and prints medians, each baseline's median divided by torchgc's (>1: torchgc is faster), the
bytes moved per second, and the ceiling (a)/(d): the largest speedup over (a) that any kernel
could reach, since every norm allocates and writes at least what the copy does. Last, torchgc's
backward alone with a frozen weight (LoRA) against a trainable one, as frozen / trainable.
Usage: python -m benchmarks.bench_norm [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from torchgc.bench.measure import median_seconds
from torchgc.measuring import synchronizer

EPS = 1e-6


def _median_seconds(fn, device, repeats, warmup):
    return median_seconds(fn, repeats=repeats, warmup=warmup, sync=synchronizer(device))


def _eager_rms(weight):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = LlamaRMSNorm(weight.shape[0], eps=EPS).to(weight.device)
    module.weight = nn.Parameter(weight.detach().clone())
    return module


def _eager_layer(weight, bias):
    module = nn.LayerNorm(weight.shape[0], eps=EPS).to(weight.device)
    module.weight = nn.Parameter(weight.detach().clone())
    module.bias = nn.Parameter(bias.detach().clone())
    return module


def _candidates(kind, weight, bias):
    from torchgc import ops

    hidden = weight.shape[0]
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    if kind == "rms":
        eager = _eager_rms(weight)
        fused = lambda x: ops.rms_norm(x, w, EPS)  # noqa: E731
        functional = lambda x: F.rms_norm(x, (hidden,), w, EPS)  # noqa: E731
    else:
        eager = _eager_layer(weight, bias)
        fused = lambda x: ops.layer_norm(x, w, b, EPS)  # noqa: E731
        functional = lambda x: F.layer_norm(x, (hidden,), w, b, EPS)  # noqa: E731
    return {
        "torchgc": fused,
        "(a) eager": eager,
        "(b) compiled eager": torch.compile(eager),
        "(c) F." + ("rms_norm" if kind == "rms" else "layer_norm"): functional,
        "(d) copy of x": lambda x: x.clone(),
        "(e) copy_ preallocated": _preallocated_copy(),
    }


def _preallocated_copy():
    out = {}

    def copy(x):
        if "y" not in out:
            out["y"] = torch.empty_like(x)
        return out["y"].copy_(x)

    copy.forward_only = True
    return copy


def _bytes(x, y_dtype, weight, backward):
    n = x.numel()
    moved = n * x.element_size() + n * torch.tensor([], dtype=y_dtype).element_size() + weight.numel() * 4
    if backward:  # read x and grad_y, write dx, write dweight
        moved += 3 * n * x.element_size() + weight.numel() * 4
    return moved


def run(kind, rows, hidden, device, repeats, warmup):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen).to(device, torch.bfloat16)
    grad = torch.randn(rows, hidden, generator=gen).to(device, torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device)
    bias = (0.1 * torch.randn(hidden, generator=gen)).to(device)
    results = []
    for name, fn in _candidates(kind, weight, bias).items():
        def forward(fn=fn):
            with torch.no_grad():
                return fn(x)

        xg = x.detach().clone().requires_grad_(True)

        def train(fn=fn):
            xg.grad = None
            y = fn(xg)
            y.backward(grad.to(y.dtype))

        y_dtype = forward().dtype
        t_fwd = _median_seconds(forward, device, repeats, warmup)
        t_train = float("nan") if getattr(fn, "forward_only", False) else _median_seconds(train, device, repeats, warmup)
        results.append({
            "kind": kind, "name": name, "fwd_s": t_fwd, "fwd_bwd_s": t_train,
            "fwd_GBps": _bytes(x, y_dtype, weight, False) / t_fwd / 1e9,
            "fwd_bwd_GBps": _bytes(x, y_dtype, weight, True) / t_train / 1e9,
        })
    ours = results[0]
    for r in results:
        r["fwd_ratio"] = r["fwd_s"] / ours["fwd_s"]
        r["fwd_bwd_ratio"] = r["fwd_bwd_s"] / ours["fwd_bwd_s"]
    return results


def _peak_bandwidth_gbps(device):
    """A GPU's theoretical memory bandwidth: two transfers per memory clock (kHz) over the bus."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def _print(results, rows, hidden, device):
    print(f"\n{results[0]['kind']} norm, x [{rows}, {hidden}] bf16, weight fp32, device {device}, "
          f"{torch.get_num_threads()} threads (medians; ratio = time / torchgc's time)")
    print(f"{'':24} {'fwd ms':>9} {'ratio':>7} {'GB/s':>7} {'fwd+bwd ms':>11} {'ratio':>7} {'GB/s':>7}")
    for r in results:
        print(f"{r['name']:24} {r['fwd_s'] * 1e3:9.3f} {r['fwd_ratio']:7.2f} {r['fwd_GBps']:7.1f} "
              f"{r['fwd_bwd_s'] * 1e3:11.3f} {r['fwd_bwd_ratio']:7.2f} {r['fwd_bwd_GBps']:7.1f}")
    # A norm allocates and writes the same outputs as the copy and reads at least as much, so no
    # kernel can beat (a) by more than (a)'s time over (d)'s.
    by_name = {r["name"]: r for r in results}
    eager, copy = by_name["(a) eager"], by_name["(d) copy of x"]
    print(f"{'ceiling (a)/(d)':24} {eager['fwd_s'] / copy['fwd_s']:>17.2f} {'':7} "
          f"{eager['fwd_bwd_s'] / copy['fwd_bwd_s']:>19.2f}   (the most any kernel can gain over (a))")
    peak = _peak_bandwidth_gbps(device)
    if peak:
        ours = results[0]
        print(f"torchgc reaches {100 * ours['fwd_GBps'] / peak:.0f}% (forward) and {100 * ours['fwd_bwd_GBps'] / peak:.0f}% "
              f"(forward+backward) of the device's {peak:.0f} GB/s peak memory bandwidth")


def run_frozen_weight(kind, rows, hidden, device, repeats, warmup):
    """torchgc's backward alone, with a frozen norm weight (and bias) as under LoRA, where it skips
    the weight gradient and its reduction, and with a trainable one: medians and frozen / trainable."""
    from torchgc import ops

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen).to(device, torch.bfloat16).requires_grad_(True)
    grad = torch.randn(rows, hidden, generator=gen).to(device, torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device)
    bias = (0.1 * torch.randn(hidden, generator=gen)).to(device)
    times = {}
    for trainable in (True, False):
        w, b = (t.detach().clone().requires_grad_(trainable) for t in (weight, bias))
        y = ops.rms_norm(x, w, EPS) if kind == "rms" else ops.layer_norm(x, w, b, EPS)

        def backward(y=y, w=w, b=b):
            x.grad = w.grad = b.grad = None
            y.backward(grad, retain_graph=True)

        times["trainable_s" if trainable else "frozen_s"] = _median_seconds(backward, device, repeats, warmup)
    return {"kind": kind, **times, "ratio": times["frozen_s"] / times["trainable_s"]}


def _print_frozen_weight(results, rows, hidden, device):
    print(f"\ntorchgc backward with a frozen vs a trainable weight, x [{rows}, {hidden}] bf16, weight fp32, "
          f"device {device}, {torch.get_num_threads()} threads (medians; ratio = frozen / trainable)")
    print(f"{'':8} {'frozen ms':>10} {'trainable ms':>13} {'ratio':>7}")
    for r in results:
        print(f"{r['kind']:8} {r['frozen_s'] * 1e3:10.3f} {r['trainable_s'] * 1e3:13.3f} {r['ratio']:7.2f}")


def run_all(argv=None) -> list:
    """Runs and prints every table; returns the rows of the first ones (one dict per candidate)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller batch (smoke run)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, and cpu)")
    parser.add_argument("--rows", type=int, default=None, help="rows of x (default: 4096, or 512 with --quick)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    rows = args.rows or (512 if args.quick else 4096)
    repeats = args.repeats or (5 if args.quick else 30)
    warmup = 2 if args.quick else 5
    if args.device:
        devices = [torch.device(args.device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    all_results = []
    for device in devices:
        for kind in ("rms", "layer"):
            results = run(kind, rows, args.hidden, device, repeats, warmup)
            _print(results, rows, args.hidden, device)
            for r in results:
                r["device"] = str(device)
            all_results.extend(results)
    for device in devices:
        frozen = [run_frozen_weight(kind, rows, args.hidden, device, repeats, warmup) for kind in ("rms", "layer")]
        _print_frozen_weight(frozen, rows, args.hidden, device)
    return all_results


def main(argv=None) -> int:
    run_all(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
