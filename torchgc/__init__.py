"""torchgc: gradient checkpointing for LLM fine-tuning that saves GPU memory at almost no speed cost.

Importing torchgc neither loads the op library (that happens on the first op call) nor imports
transformers (that happens when patch() or a model's enable runs).
"""

from torchgc import norm, ops
from torchgc.counters import reset as reset_stats
from torchgc.counters import snapshot as stats
from torchgc.config import STRATEGIES
from torchgc.integrations import distributed as _distributed
from torchgc.integrations.llamafactory import prepare_model_for_training
from torchgc.integrations.transformers import explain
from torchgc.patching import patch, patched, unpatch
from torchgc.strategies import add_reentrant_check as _add_reentrant_check
from torchgc.strategies import checkpoint

# torchgc.checkpoint falls back to non-reentrant checkpointing inside DDP(find_unused_parameters=True).
_add_reentrant_check(_distributed.ddp_reentrant_conflict)

__version__ = "0.1.0"

__all__ = [
    "BUILD_INFO", "STRATEGIES", "checkpoint", "explain", "norm", "ops", "patch", "patched", "prepare_model_for_training", "reset_stats", "stats",
    "unpatch", "__version__",
]


def __getattr__(name):
    # BUILD_INFO loads the op library, so it is computed on first access.
    if name == "BUILD_INFO":
        return ops.load_library()
    raise AttributeError(f"module 'torchgc' has no attribute {name!r}")
