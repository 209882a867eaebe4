"""One entry point for torchgc's benchmarks: `python benchmarks/run.py {strategies,offload,norm,overhead} [options]`.

strategies: memory and step time of every checkpointing strategy (the same as `torchgc bench`).
offload:    copy bandwidth of the offload/reload ops against a plain copy.
norm:       the fused norm ops against HF's eager norm, torch.compile, F.rms_norm and a copy.
overhead:   per-layer time of torchgc's checkpointing against transformers' own, where Python dominates."""

import importlib
import sys
from pathlib import Path

BENCHMARKS = {
    "strategies": "torchgc.bench",
    "offload": "bench_offload",
    "norm": "bench_norm",
    "overhead": "bench_overhead",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(__doc__)
        print(f"error: expected one of {', '.join(BENCHMARKS)} as the first argument, got {argv[0] if argv else 'nothing'}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
