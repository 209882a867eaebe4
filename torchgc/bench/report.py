"""`torchgc bench` results for people: a terminal table with ratios against transformers' own
checkpointing, JSON with the environment, and a PNG plot."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from torchgc.bench.configs import BASELINE, RunResult
from torchgc.measuring import mib


def _ratio(result: RunResult, base: Optional[RunResult], attribute: str) -> str:
    base_value = getattr(base, attribute) if base else 0
    value = getattr(result, attribute)
    return f"{value / base_value:6.3f}" if value is not None and base_value else "     -"


def format_table(results: List[RunResult]) -> str:
    baseline = {r.seq_len: r for r in results if r.config.name == BASELINE}
    header = (f"{'strategy':50} {'seq':>6} {'step s':>8} {'x hf':>6} {'peak act MiB':>13} {'x hf':>6} {'saved MiB':>10} {'x hf':>6} "
              f"{'host MiB':>9} {'compile s':>9} {'grad max|diff|':>15}")
    lines = [header, "-" * len(header)]
    for r in results:
        base = baseline.get(r.seq_len)
        if r.grad_max_abs_diff is None:
            grad = "reference" if r.config.is_reference else "-"
        else:
            grad = "bitwise equal" if r.grads_bitwise_equal else f"{r.grad_max_abs_diff:.2e}"
        lines.append(
            f"{r.config.name:50} {r.seq_len:6d} {r.step_seconds:8.3f} {_ratio(r, base, 'step_seconds')} "
            f"{mib(r.peak_activation_bytes):>13} {_ratio(r, base, 'peak_activation_bytes')} "
            f"{mib(r.saved_for_backward_bytes):>10} {_ratio(r, base, 'saved_for_backward_bytes')} "
            f"{mib(r.host_offloaded_bytes):>9} {'-' if r.compile_seconds is None else f'{r.compile_seconds:.1f}':>9} {grad:>15}"
        )
    return "\n".join(lines)


def fixed_patterns_against_plans(results: List[RunResult]) -> str:
    """For each fixed pattern (every layer checkpointed, by transformers or torchgc, and every
    n-th layer), the fastest memory-budget plan whose measured peak is no higher, per sequence
    length: the comparison at equal peak memory."""
    lines = []
    for seq_len in sorted({r.seq_len for r in results}):
        rows = [r for r in results if r.seq_len == seq_len and r.config.trainable_fraction == 1 and not r.config.fused_norm and r.config.compile == "none"]
        plans = [r for r in rows if r.config.kind == "torchgc-auto"]
        patterns = [r for r in rows if not r.config.use_reentrant and (r.config.kind == "hf" or (r.config.kind == "torchgc-checkpoint"))]
        for pattern in patterns if plans else []:
            within = [p for p in plans if p.peak_activation_bytes <= pattern.peak_activation_bytes]
            line = f"seq {seq_len:6d}  {pattern.config.name:50} peak {mib(pattern.peak_activation_bytes):>8} MiB, step {pattern.step_seconds:7.3f} s"
            if within:
                best = min(within, key=lambda p: p.step_seconds)
                line += (f" | fastest plan within that peak: budget {best.config.memory_budget:g}, peak "
                         f"{mib(best.peak_activation_bytes):>8} MiB, step {best.step_seconds:7.3f} s = "
                         f"{best.step_seconds / pattern.step_seconds:5.3f}x")
            else:
                line += " | no plan measured within that peak"
            lines.append(line)
    if not lines:
        return ""
    return "Fixed patterns against memory-budget plans at no more measured peak memory:\n" + "\n".join(lines)


def plot(results: List[RunResult], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_mem, ax_time, ax_trade) = plt.subplots(1, 3, figsize=(18, 4.5))
    longest = max(r.seq_len for r in results)
    for name in dict.fromkeys(r.config.name for r in results):
        rows = sorted((r for r in results if r.config.name == name), key=lambda r: r.seq_len)
        seqs = [r.seq_len for r in rows]
        ax_mem.plot(seqs, [r.peak_activation_bytes / 2**20 for r in rows], marker="o", label=name)
        ax_time.plot(seqs, [r.step_seconds for r in rows], marker="o", label=name)
        for r in rows:
            if r.seq_len == longest:
                ax_trade.scatter(r.peak_activation_bytes / 2**20, r.step_seconds)
                ax_trade.annotate(name, (r.peak_activation_bytes / 2**20, r.step_seconds), fontsize=6)
    ax_mem.set(xlabel="sequence length", ylabel="peak activation memory (MiB)", title="Peak memory per step")
    ax_time.set(xlabel="sequence length", ylabel="step time (s, median)", title="Step time")
    ax_trade.set(xlabel="peak activation memory (MiB)", ylabel="step time (s, median)", title=f"Step time against memory, seq {longest}")
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log", base=2)
    for ax in (ax_mem, ax_time, ax_trade):
        ax.grid(True, alpha=0.3)
    ax_time.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def environment(device: str) -> dict:
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
        "commit": commit,
        "python": sys.version.split()[0],
    }


def write(results: List[RunResult], out: Path, *, device: str, settings: dict) -> str:
    """Prints the table and writes bench.json, bench.txt and (with matplotlib) bench.png to `out`;
    returns the line that says what was written."""
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    comparison = fixed_patterns_against_plans(results)
    if comparison:
        table += "\n\n" + comparison
    print(table)
    report = {
        "environment": environment(device),
        "settings": settings,
        "baseline": BASELINE,
        "results": [dict(asdict(r), name=r.config.name) for r in results],
    }
    for row in report["results"]:
        row.pop("grads_file", None)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.txt").write_text(table + "\n")
    png = plot(results, out / "bench.png")
    return f"wrote {out / 'bench.json'}, {out / 'bench.txt'}" + (f" and {png}" if png else " (no matplotlib: no plot)")
