"""torchgc: gradient checkpointing for LLM fine-tuning that saves GPU memory at almost no speed cost."""

from torchgc._library import BUILD_INFO
from torchgc import norm, ops
from torchgc.checkpoint import STRATEGIES, checkpoint

# transformers is imported only when these are called, so `import torchgc` stays cheap.
from torchgc.patch import patch, patched, unpatch
from torchgc.integrations.llamafactory import prepare_model_for_training

__version__ = "0.1.0"

__all__ = [
    "BUILD_INFO", "STRATEGIES", "checkpoint", "norm", "ops", "patch", "patched", "prepare_model_for_training", "unpatch", "__version__",
]
