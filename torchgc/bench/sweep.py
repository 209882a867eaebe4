"""Runs every (configuration, sequence length) of a `torchgc bench` sweep in a process of its own,
and compares each one's gradients with the run without checkpointing."""

import ctypes
import ctypes.util
import statistics
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import List

from torchgc.bench.configs import RunConfig, RunResult

# Each configuration runs in a fresh process, forked from a server that has already imported torch
# and transformers: its own address space (so its own peak memory) without paying about 9 s of
# imports each time. The server neither initializes CUDA nor runs a parallel op, so forking is safe.
_WORKER_PRELOAD = ["torch", "transformers", "transformers.models.auto.modeling_auto", "torchgc.bench.worker"]
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _worker_context():
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_WORKER_PRELOAD)
    return context


def _worker_main(spec: dict, conn) -> None:
    # A fixed threshold (glibc's default grows with use) makes freed activations go back to the
    # OS, so RSS follows them.
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(_M_MMAP_THRESHOLD, 65536)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: RSS may stay high after a peak, which only overstates later peaks
    try:
        from torchgc.bench import worker

        conn.send(("ok", worker.run(spec)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _run_in_subprocess(spec: dict, context) -> dict:
    receiver, sender = context.Pipe(duplex=False)
    proc = context.Process(target=_worker_main, args=(spec, sender), daemon=True)
    proc.start()
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", "the worker process died without a result"
    finally:
        receiver.close()
        proc.join()
    if status != "ok":
        raise RuntimeError(f"torchgc bench: configuration {spec['config']} at seq_len {spec['seq_len']} failed "
                           f"(exit code {proc.exitcode}):\n{payload[-3000:]}")
    return payload


def _compare_grads(reference_file: str, grads_file: str):
    import torch

    ref, got = torch.load(reference_file), torch.load(grads_file)
    shared = [n for n in got if n in ref]
    if not shared:
        return None, None
    diff = max((ref[n] - got[n]).abs().max().item() for n in shared)
    return diff, all(torch.equal(ref[n], got[n]) for n in shared)


def sweep(model_spec: dict, runs: List[RunConfig], seq_lens: List[int], *, device: str, batch_size: int, steps: int, warmup: int,
          rounds: int = 1, progress=True) -> List[RunResult]:
    """Every run at every sequence length, `rounds` times over, each time in a fresh process.
    Rounds alternate the order (forward, then backward, ...) so that a machine slowing down (or
    speeding up) during the sweep weighs on every configuration alike: each result's step time is
    the median over all its rounds' steps, its peak the highest of its rounds'."""
    jobs = [(seq_len, run) for seq_len in seq_lens for run in runs]
    bar = _progress(len(jobs) * rounds, progress)
    context = _worker_context()
    merged = {}
    with tempfile.TemporaryDirectory(prefix="torchgc-bench-") as tmp:
        for round_index in range(rounds):
            order = range(len(jobs)) if round_index % 2 == 0 else reversed(range(len(jobs)))
            for index in order:
                seq_len, run = jobs[index]
                bar.set_description(f"{run.name} @ {seq_len}" + (f" (round {round_index + 1}/{rounds})" if rounds > 1 else ""))
                spec = dict(model_spec, config=asdict(run), seq_len=seq_len, device=device, batch_size=batch_size, steps=steps, warmup=warmup,
                            grads_file=str(Path(tmp) / f"{run.name}-{seq_len}-{round_index}.pt"))
                result = RunResult(config=run, seq_len=seq_len, **_run_in_subprocess(spec, context))
                if round_index == 0:
                    merged[index] = result
                else:
                    _add_round(merged[index], result)
                bar.update(1)
            if round_index == 0:  # the gradients of each run's first step, against no checkpointing's
                reference = {r.seq_len: r.grads_file for r in merged.values() if r.config.is_reference}
                for result in merged.values():
                    if not result.config.is_reference and result.seq_len in reference:
                        result.grad_max_abs_diff, result.grads_bitwise_equal = _compare_grads(reference[result.seq_len], result.grads_file)
        bar.close()
    return [merged[index] for index in range(len(jobs))]


def _add_round(result: RunResult, again: RunResult) -> None:
    result.step_seconds_all = result.step_seconds_all + again.step_seconds_all
    result.step_seconds = statistics.median(result.step_seconds_all)
    result.peak_activation_bytes = max(result.peak_activation_bytes, again.peak_activation_bytes)
    if again.peak_reserved_bytes is not None:
        result.peak_reserved_bytes = max(result.peak_reserved_bytes or 0, again.peak_reserved_bytes)
    result.host_offloaded_bytes = max(result.host_offloaded_bytes, again.host_offloaded_bytes)
    if again.plan_modes != result.plan_modes:  # the plan comes from each process's own measuring step
        result.other_plan_modes.append(again.plan_modes)


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="run")
    except ImportError:
        class Plain:
            def set_description(self, text):
                if enabled:
                    print(f"torchgc bench: {text}", file=sys.stderr, flush=True)

            def update(self, n):
                pass

            def close(self):
                pass

        return Plain()
