"""torchgc: gradient checkpointing for LLM fine-tuning that saves GPU memory at almost no speed cost.

Importing torchgc neither loads the op library (that happens on the first op call) nor imports
transformers (that happens when patch() or a model's enable runs). It plugs the integrations into
the layers below, which know nothing of them.
"""

from torchgc import config, layer_calls, modes, norm, ops, patching
from torchgc.config import STRATEGIES
from torchgc.counters import reset as reset_stats
from torchgc.counters import snapshot as stats
from torchgc.integrations import distributed as _distributed
from torchgc.integrations import llamafactory as _llamafactory
from torchgc.integrations import transformers_layers as _transformers_layers
from torchgc.integrations import transformers_outputs as _transformers_outputs
from torchgc.integrations.llamafactory import prepare_model_for_training as llamafactory_prepare_model_for_training
from torchgc.integrations.transformers_layers import explain
from torchgc.patching import patch, patched, unpatch
from torchgc.strategies import checkpoint

# torchgc.checkpoint falls back to non-reentrant checkpointing inside DDP(find_unused_parameters=True).
modes.add_reentrant_check(_distributed.ddp_reentrant_conflict)
# ... and where transformers collects outputs from inside the layer (router logits for the MoE
# load-balancing loss), which a reentrant forward would collect without their graph.
modes.add_reentrant_check(_transformers_outputs.reentrant_records)
# It finds the layer inside the partials transformers passes.
layer_calls.add_module_finder(_transformers_layers.layer_module)
# torchgc.patch() routes LLaMA-Factory's model preparation.
patching.add_integration(_llamafactory.route, _llamafactory.unroute)

# The name before llamafactory_prepare_model_for_training: the same function.
prepare_model_for_training = llamafactory_prepare_model_for_training

__version__ = "0.1.0"

__all__ = [
    "BUILD_INFO", "STRATEGIES", "checkpoint", "explain", "llamafactory_prepare_model_for_training", "norm", "ops", "patch",
    "patched", "prepare_model_for_training", "reset_stats", "stats", "unpatch", "__version__",
]


def __getattr__(name):
    # BUILD_INFO loads the op library, so it is computed on first access.
    if name == "BUILD_INFO":
        return ops.load_library()
    raise AttributeError(f"module 'torchgc' has no attribute {name!r}")
