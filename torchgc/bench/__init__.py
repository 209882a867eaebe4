"""`torchgc bench`: memory and speed of every checkpointing strategy on one model.

Each (strategy, sequence length) runs in a fresh process (sweep.py) so peak memory is its own: on
CUDA the allocator's peak above the memory held before the step (parameters, gradients,
optimizer state); on CPU the peak RSS above the RSS before the first step. Every configuration is
enabled the way users enable it (worker.py): transformers' own gradient_checkpointing_enable, or
torchgc.patch() and then the same call. One extra step ahead of the warm-up, untimed, measures the
activation bytes that the autograd graph holds for backward at the end of its forward
(measure.py). Step time is the median of the timed steps after warm-up. The first step's gradients
are compared with the no-checkpoint run. Results (report.py): a terminal table with ratios against
transformers' own checkpointing, JSON with the environment, and a PNG plot.
"""

from torchgc.bench.cli import build_parser, main

__all__ = ["build_parser", "main"]
