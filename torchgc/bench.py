"""`torchgc bench`: memory and speed of every checkpointing strategy on one model.

Each (strategy, sequence length) runs in a fresh process (see _worker_context) so peak memory is
its own: on CUDA the allocator's peak above the memory held before the step (parameters,
gradients, optimizer state); on CPU the peak RSS above the RSS before the first step. One extra
step ahead of the warm-up, untimed, measures the activation bytes that the autograd graph holds
for backward at the end of its forward. Step time is the median of the timed steps after
warm-up. Gradients after the step that follows the measuring one are compared with the
no-checkpoint run. Results: a terminal table with ratios against transformers' own
checkpointing, JSON with the environment, and a PNG plot.
"""

import argparse
import ctypes
import ctypes.util
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

# A small Llama that runs a 2048-token step in about a second on two CPU cores.
DEFAULT_MODEL_CONFIG = {
    "model_type": "llama",
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}

STRATEGY_KINDS = ("none", "hf", "torchgc-checkpoint", "torchgc-offload")
BASELINE = "hf-nonreentrant"


@dataclass(frozen=True)
class RunConfig:
    kind: str
    use_reentrant: bool = False
    fused_norm: bool = False
    trainable_fraction: float = 1.0  # < 1: only the bottom fraction of layers is trained

    @property
    def name(self) -> str:
        name = self.kind if self.kind == "none" else f"{self.kind}-{'reentrant' if self.use_reentrant else 'nonreentrant'}"
        if self.fused_norm:
            name += "+fused-norm"
        if self.trainable_fraction < 1:
            name += f"+train-bottom-{self.trainable_fraction:g}"
        return name


@dataclass
class RunResult:
    config: RunConfig
    seq_len: int
    step_seconds: float
    step_seconds_all: List[float]
    peak_activation_bytes: int
    peak_reserved_bytes: Optional[int]
    host_offloaded_bytes: int
    saved_for_backward_bytes: int
    grad_max_abs_diff: Optional[float] = None
    grads_bitwise_equal: Optional[bool] = None
    loss: float = 0.0
    grads_file: str = field(default="", repr=False)


def default_runs(fused_norm: bool, freeze: bool) -> List[RunConfig]:
    runs = [RunConfig("none")]
    for kind in ("hf", "torchgc-checkpoint", "torchgc-offload"):
        for reentrant in (True, False):
            runs.append(RunConfig(kind, reentrant))
    if fused_norm:
        runs.append(RunConfig("torchgc-checkpoint", False, fused_norm=True))
    if freeze:
        runs += [RunConfig("hf", False, trainable_fraction=0.25), RunConfig("torchgc-checkpoint", False, trainable_fraction=0.25)]
    return runs


# ---------------------------------------------------------------------------------------------
# Worker: one configuration in its own process.


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    # A forked worker inherits the server's high-water mark; "5" resets it (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak below may include the server's, and only ever overstates


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _build_model(spec: dict, device):
    import torch
    import transformers

    torch.manual_seed(0)
    if spec.get("model_path"):
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["model_path"], local_files_only=True, dtype=torch.float32)
    else:
        config = transformers.AutoConfig.for_model(**spec["model_config"])
        config._attn_implementation = "eager" if device.type == "cpu" else "sdpa"
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model.to(device).train()


def _apply_config(model, config: RunConfig):
    import torch

    import torchgc

    layers = _decoder_layers(model)
    if config.trainable_fraction < 1:
        model.requires_grad_(False)
        for layer in layers[: max(1, int(len(layers) * config.trainable_fraction))]:
            layer.requires_grad_(True)
    if config.fused_norm:
        from torchgc import norm

        norm.fuse_norms(model)
    if config.kind == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": config.use_reentrant})
    elif config.kind.startswith("torchgc-"):
        strategy = config.kind.split("-", 1)[1]
        func = functools.partial(torchgc.checkpoint, strategy=strategy, use_reentrant=config.use_reentrant, min_offload_bytes=0)
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
        if config.use_reentrant:
            model.enable_input_require_grads()  # as transformers' own enable does
    return [p for p in model.parameters() if p.requires_grad] or list(torch.nn.Module.parameters(model))


def _decoder_layers(model):
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    return max(lists, key=len) if lists else []


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
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils import _pytree as pytree

    kept_anyway = [*model.parameters(), *model.buffers(), *inputs.values()]
    excluded = {t.untyped_storage().data_ptr() for t in kept_anyway}
    # By address: a storage recorded at an address that a later one reuses has been freed.
    candidates = {}

    def record(tensor):
        if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
            storage = tensor.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in excluded:
                candidates[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())

    def pack(tensor):
        record(tensor)
        # Detached: a saved output holding its own grad_fn would be a cycle that outlives a failed step.
        return tensor.detach()

    def record_inputs(module, args, kwargs):
        for leaf in pytree.tree_leaves((args, kwargs)):
            record(leaf)

    handles = [m.register_forward_pre_hook(record_inputs, with_kwargs=True) for m in model.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(**inputs).loss
    finally:
        for handle in handles:
            handle.remove()
    nbytes = sum(size for ref, size in candidates.values() if not ref.expired())
    loss.backward()
    return nbytes


def run_worker(spec: dict) -> dict:
    import torch

    import torchgc

    config = RunConfig(**spec["config"])
    device = torch.device(spec["device"])
    model = _build_model(spec, device)
    trainable = _apply_config(model, config)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.SGD(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (spec["batch_size"], spec["seq_len"]), generator=generator).to(device)
    inputs = {"input_ids": input_ids, "labels": input_ids}

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
        base = _rss_bytes()
    saved_bytes = saved_for_backward_bytes(model, inputs)
    times, host_bytes, loss_value = [], 0, 0.0
    grads_file = spec["grads_file"]
    for step in range(spec["warmup"] + spec["steps"]):
        optimizer.zero_grad(set_to_none=False)
        sync()
        start = time.perf_counter()
        loss = model(**inputs).loss
        host_bytes = max(host_bytes, torchgc.ops.host_pool_stats().in_use_bytes)
        loss.backward()
        optimizer.step()
        sync()
        elapsed = time.perf_counter() - start
        if step >= spec["warmup"]:
            times.append(elapsed)
        if step == 0:  # the optimizer step leaves .grad as backward made it
            loss_value = loss.item()
            torch.save({n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, grads_file)
    if device.type == "cuda":
        peak, reserved = torch.cuda.max_memory_allocated() - base, torch.cuda.max_memory_reserved()
    else:
        peak, reserved = _peak_rss_bytes() - base, None
    return {
        "step_seconds": statistics.median(times),
        "step_seconds_all": times,
        "peak_activation_bytes": peak,
        "peak_reserved_bytes": reserved,
        "host_offloaded_bytes": host_bytes,
        "saved_for_backward_bytes": saved_bytes,
        "loss": loss_value,
        "grads_file": grads_file,
    }


# ---------------------------------------------------------------------------------------------
# Driver.


# Each configuration runs in a fresh process, forked from a server that has already imported torch
# and transformers: its own address space (so its own peak memory) without paying about 9 s of
# imports each time. The server neither initializes CUDA nor runs a parallel op, so forking is safe.
_WORKER_PRELOAD = ["torch", "transformers", "transformers.models.auto.modeling_auto", "torchgc.bench"]
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
        conn.send(("ok", run_worker(spec)))
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


def sweep(model_spec: dict, runs: List[RunConfig], seq_lens: List[int], *, device: str, batch_size: int, steps: int, warmup: int, progress=True) -> List[RunResult]:
    results = []
    jobs = [(seq_len, run) for seq_len in seq_lens for run in runs]
    bar = _progress(len(jobs), progress)
    context = _worker_context()
    with tempfile.TemporaryDirectory(prefix="torchgc-bench-") as tmp:
        reference = {}
        for seq_len, run in jobs:
            bar.set_description(f"{run.name} @ {seq_len}")
            spec = dict(model_spec, config=asdict(run), seq_len=seq_len, device=device, batch_size=batch_size, steps=steps, warmup=warmup,
                        grads_file=str(Path(tmp) / f"{run.name}-{seq_len}.pt"))
            out = _run_in_subprocess(spec, context)
            result = RunResult(config=run, seq_len=seq_len, **out)
            if run.kind == "none":
                reference[seq_len] = result.grads_file
            elif seq_len in reference:
                result.grad_max_abs_diff, result.grads_bitwise_equal = _compare_grads(reference[seq_len], result.grads_file)
            results.append(result)
            bar.update(1)
        bar.close()
    return results


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


def _ratio(result: RunResult, base: Optional[RunResult], attribute: str) -> str:
    base_value = getattr(base, attribute) if base else 0
    return f"{getattr(result, attribute) / base_value:6.3f}" if base_value > 0 else "     -"


def format_table(results: List[RunResult]) -> str:
    baseline = {r.seq_len: r for r in results if r.config.name == BASELINE}
    header = (f"{'strategy':50} {'seq':>6} {'step s':>8} {'x hf':>6} {'peak act MiB':>13} {'x hf':>6} {'saved MiB':>10} {'x hf':>6} "
              f"{'host MiB':>9} {'grad max|diff|':>15}")
    lines = [header, "-" * len(header)]
    for r in results:
        base = baseline.get(r.seq_len)
        if r.grad_max_abs_diff is None:
            grad = "reference" if r.config.kind == "none" else "-"
        else:
            grad = "bitwise equal" if r.grads_bitwise_equal else f"{r.grad_max_abs_diff:.2e}"
        lines.append(
            f"{r.config.name:50} {r.seq_len:6d} {r.step_seconds:8.3f} {_ratio(r, base, 'step_seconds')} "
            f"{r.peak_activation_bytes / 2**20:13.1f} {_ratio(r, base, 'peak_activation_bytes')} "
            f"{r.saved_for_backward_bytes / 2**20:10.1f} {_ratio(r, base, 'saved_for_backward_bytes')} "
            f"{r.host_offloaded_bytes / 2**20:9.1f} {grad:>15}"
        )
    return "\n".join(lines)


def plot(results: List[RunResult], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r.config.name for r in results):
        rows = sorted((r for r in results if r.config.name == name), key=lambda r: r.seq_len)
        seqs = [r.seq_len for r in rows]
        ax_mem.plot(seqs, [r.peak_activation_bytes / 2**20 for r in rows], marker="o", label=name)
        ax_time.plot(seqs, [r.step_seconds for r in rows], marker="o", label=name)
    ax_mem.set(xlabel="sequence length", ylabel="peak activation memory (MiB)", title="Peak memory per step")
    ax_time.set(xlabel="sequence length", ylabel="step time (s, median)", title="Step time")
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log", base=2)
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


# ---------------------------------------------------------------------------------------------
# Command line.


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="torchgc bench", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a local Hugging Face checkpoint directory")
    source.add_argument("--config", help="a transformers config.json (the model is built with random weights)")
    parser.add_argument("--layers", type=int, default=None, help="override the model's number of layers (with --config or the default)")
    parser.add_argument("--seq-lens", default="512,2048", help="comma-separated sequence lengths (default: 512,2048)")
    parser.add_argument("--strategies", default=",".join(STRATEGY_KINDS), help=f"comma-separated subset of {', '.join(STRATEGY_KINDS)}")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-fused-norm", action="store_true", help="skip the fused-norm variant")
    parser.add_argument("--no-freeze", action="store_true", help="skip the bottom-quarter-trainable variants")
    parser.add_argument("--out", default="results", help="folder for bench.json and bench.png (default: results)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _fail(message: str) -> int:
    print(f"torchgc bench: error: {message}", file=sys.stderr)
    return 2


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    kinds = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [k for k in kinds if k not in STRATEGY_KINDS]
    if unknown or not kinds:
        return _fail(f"--strategies: unknown {', '.join(unknown) or '(none given)'}; expected a subset of {', '.join(STRATEGY_KINDS)}")
    try:
        seq_lens = [int(s) for s in args.seq_lens.split(",") if s.strip()]
    except ValueError:
        return _fail(f"--seq-lens: expected comma-separated integers, got {args.seq_lens!r}")
    checked = [("--batch-size", args.batch_size), ("--steps", args.steps)] + ([("--layers", args.layers)] if args.layers is not None else [])
    for name, value in checked:
        if value < 1:
            return _fail(f"{name}: expected an integer >= 1, got {value}")
    if args.warmup < 0:
        return _fail(f"--warmup: expected an integer >= 0, got {args.warmup}")

    if args.model:
        if not (Path(args.model) / "config.json").is_file():
            return _fail(f"--model: expected a local checkpoint directory with a config.json, got {args.model!r}")
        model_spec = {"model_path": str(Path(args.model).resolve())}
        config_dict = json.loads((Path(args.model) / "config.json").read_text())
    elif args.config:
        if not Path(args.config).is_file():
            return _fail(f"--config: no such file {args.config!r}")
        config_dict = json.loads(Path(args.config).read_text())
        model_spec = {"model_config": config_dict}
    else:
        config_dict = DEFAULT_MODEL_CONFIG
        model_spec = {"model_config": dict(DEFAULT_MODEL_CONFIG)}
    if args.layers is not None:
        if "model_config" not in model_spec:
            return _fail("--layers: only with --config or the built-in model, not with --model")
        model_spec["model_config"]["num_hidden_layers"] = args.layers
    max_len = config_dict.get("max_position_embeddings") or config_dict.get("n_positions")
    bad = [s for s in seq_lens if s < 1 or (max_len and s > max_len)]
    if bad or not seq_lens:
        return _fail(f"--seq-lens: expected lengths between 1 and the model's maximum {max_len}, got {bad or '(none)'}")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return _fail("--device: cuda was asked for but no CUDA GPU is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        return _fail(f"--device: expected cpu or cuda, got {device!r}")

    runs = [r for r in default_runs(fused_norm=not args.no_fused_norm, freeze=not args.no_freeze) if r.kind in kinds]
    if not args.no_fused_norm and not _fused_norm_available():
        runs = [r for r in runs if not r.fused_norm]

    try:
        results = sweep(model_spec, runs, seq_lens, device=device, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, progress=not args.quiet)
    except RuntimeError as exc:
        return _fail(str(exc).removeprefix("torchgc bench: "))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    print(table)
    report = {
        "environment": environment(device),
        "settings": {"seq_lens": seq_lens, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "model": model_spec},
        "baseline": BASELINE,
        "results": [dict(asdict(r), name=r.config.name) for r in results],
    }
    for row in report["results"]:
        row.pop("grads_file", None)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.txt").write_text(table + "\n")
    png = plot(results, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.txt'}" + (f" and {png}" if png else " (no matplotlib: no plot)"))
    return 0


def _fused_norm_available() -> bool:
    try:
        from torchgc import norm  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
