"""What `torchgc bench` runs: the default model, the configurations, and one result."""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

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

STRATEGY_KINDS = ("none", "hf", "torchgc-checkpoint", "torchgc-offload", "torchgc-selective", "torchgc-auto")
COMPILE_MODES = ("none", "regional", "model")  # regional: each decoder layer torch.compile'd and assigned back
BASELINE = "hf-nonreentrant"


@dataclass(frozen=True)
class RunConfig:
    kind: str
    use_reentrant: bool = False
    fused_norm: bool = False
    trainable_fraction: float = 1.0  # < 1: only the bottom fraction of layers is trained
    memory_budget: Optional[float] = None  # torchgc's per-layer plan within this fraction (kind torchgc-auto)
    every_n_layers: int = 1  # > 1: only layers 0, n, 2n, ... checkpointed (transformers' pattern)
    compile: str = "none"  # one of COMPILE_MODES

    @property
    def is_reference(self) -> bool:
        """The run every other run's gradients are compared with: eager, without checkpointing."""
        return self.kind == "none" and self.compile == "none"

    @property
    def name(self) -> str:
        name = self.kind if self.kind == "none" else f"{self.kind}-{'reentrant' if self.use_reentrant else 'nonreentrant'}"
        if self.fused_norm:
            name += "+fused-norm"
        if self.trainable_fraction < 1:
            name += f"+train-bottom-{self.trainable_fraction:g}"
        if self.memory_budget is not None:
            name += f"+budget-{self.memory_budget:g}"
        if self.every_n_layers > 1:
            name += f"+every-{self.every_n_layers}"
        if self.compile != "none":
            name += f"+compile-{self.compile}"
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
    saved_for_backward_bytes: Optional[int]  # None under torch.compile (its module hooks would recompile)
    enabled_with: Optional[str] = None  # the gradient_checkpointing_enable the model resolved
    checkpointed_with: Optional[str] = None  # the function its layers checkpoint with, and its options
    plan_modes: Optional[List[str]] = None  # under a memory budget, each layer's mode in the plan
    other_plan_modes: List[List[str]] = field(default_factory=list)  # plans of later rounds that differ from it
    compile_seconds: Optional[float] = None  # the first step's time less the median step's, under torch.compile
    grad_max_abs_diff: Optional[float] = None
    grads_bitwise_equal: Optional[bool] = None
    loss: float = 0.0
    grads_file: str = field(default="", repr=False)


def default_runs(fused_norm: bool, freeze: bool, memory_budgets: Sequence[float] = (), every_n_layers: Sequence[int] = (),
                 compile_modes: Sequence[str] = ()) -> List[RunConfig]:
    runs = [RunConfig("none")]
    for kind in ("hf", "torchgc-checkpoint", "torchgc-offload"):
        for reentrant in (True, False):
            runs.append(RunConfig(kind, reentrant))
    runs += [RunConfig("torchgc-checkpoint", False, every_n_layers=n) for n in every_n_layers if n > 1]
    runs.append(RunConfig("torchgc-selective", False))  # always non-reentrant
    runs += [RunConfig("torchgc-auto", False, memory_budget=b) for b in memory_budgets]
    if fused_norm:
        runs.append(RunConfig("torchgc-checkpoint", False, fused_norm=True))
    if freeze:
        runs += [RunConfig("hf", False, trainable_fraction=0.25), RunConfig("torchgc-checkpoint", False, trainable_fraction=0.25)]
    for mode in compile_modes:
        if mode != "none":
            runs += [RunConfig(kind, False, compile=mode) for kind in ("none", "hf", "torchgc-checkpoint", "torchgc-offload", "torchgc-selective")]
    return runs
