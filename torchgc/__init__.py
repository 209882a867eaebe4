"""torchgc: gradient checkpointing for LLM fine-tuning that saves GPU memory at almost no speed cost."""

from torchgc._library import BUILD_INFO
from torchgc import ops
from torchgc.checkpoint import STRATEGIES, checkpoint

__version__ = "0.1.0"

__all__ = ["BUILD_INFO", "STRATEGIES", "checkpoint", "ops", "__version__"]
