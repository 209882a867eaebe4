"""Copy bandwidth of torchgc's offload/reload ops against a plain copy of the same bytes.

CPU: offload into the host pool vs `torch.empty_like(x).copy_(x)`. CUDA: offload (device to
pinned host, on the copy stream) and reload + wait vs a non-blocking copy into pinned memory
and `.to(device)` back. A reload allocates its result, and so does its baseline. Reports medians in GB/s and the ratio to the plain copy."""

import argparse

import torch

from torchgc import ops
from torchgc.bench.measure import median_seconds
from torchgc.measuring import synchronizer


def measure(device: str, megabytes: int, repeats: int):
    x = torch.randn(megabytes * 2**20 // 4, device=device)
    nbytes = x.numel() * 4
    sync = synchronizer(device)
    host = ops.offload(x)
    sync()
    if device == "cuda":
        pinned = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        plain_out = lambda: pinned.copy_(x, non_blocking=True)  # noqa: E731
        plain_in = lambda: pinned.to(x.device, non_blocking=True)  # noqa: E731
    else:
        dst = torch.empty_like(x)
        plain_out = lambda: dst.copy_(x)  # noqa: E731
        plain_in = lambda: host.clone()  # reload allocates its result too  # noqa: E731

    def reload_and_wait():
        ops.wait(ops.reload(host, x.device))

    def median(fn):
        return median_seconds(fn, repeats=repeats, warmup=1, sync=sync)

    rows = [
        ("offload", median(lambda: ops.offload(x)), median(plain_out)),
        ("reload+wait", median(reload_and_wait), median(plain_in)),
    ]
    return [(name, nbytes / t / 1e9, nbytes / base / 1e9, base / t) for name, t, base in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller copies")
    args = parser.parse_args(argv)
    if args.quick:
        args.megabytes, args.repeats = 16, 5
    print(f"offload copy bandwidth on {args.device}, {args.megabytes} MiB, median of {args.repeats}")
    print(f"{'op':14} {'GB/s':>8} {'plain GB/s':>11} {'x plain':>8}")
    for name, gbps, base_gbps, ratio in measure(args.device, args.megabytes, args.repeats):
        print(f"{name:14} {gbps:8.2f} {base_gbps:11.2f} {ratio:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
