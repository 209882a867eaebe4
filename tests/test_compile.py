"""torchgc under torch.compile with the default (inductor) backend, on CPU: each layer compiled
(regional) in both of its forms, the whole model compiled, and HF Trainer's torch_compile.

Compiled and eager runs cannot agree bitwise: inductor fuses ops and reorders reductions (RMSNorm,
softmax, the matmuls' accumulation). Losses and gradients are compared at rtol 1e-4, atol 1e-6 in
fp32, with dropout 0 (a compiled graph draws its random numbers differently from eager)."""

import warnings

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

import torchgc
from patch_helpers import trainer_step
from tiny_models import batch, build

pytestmark = pytest.mark.usefixtures("clean_patch")

LAYERS = 2
STRATEGIES = ["checkpoint", "offload", "selective"]
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}
# The graph breaks torchgc makes, by strategy, per checkpointed layer call: offload pushes and pops
# its saved-tensor hooks around the compiled layer (torchgc.compiled); nothing else breaks.
BREAKS_PER_LAYER = {"checkpoint": 0, "selective": 0, "offload": 2}


class InductorCountingOps:
    """The inductor backend, recording for each graph dynamo hands it the ops it captured,
    those inside a checkpoint's body included."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(_ops(gm))
        return lookup_backend("inductor")(gm, example_inputs)


def _ops(gm) -> int:
    nodes = [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]
    return sum(1 for n in nodes if (n.op == "call_function" and not _is_plumbing(n.target)) or n.op == "call_method")


def _is_plumbing(target) -> bool:
    return "getitem" in str(target) or isinstance(target, torch._ops.HigherOrderOperator)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compile_layers(model, form: str, backend, dynamic=None) -> None:
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if form == "assigned":  # torchtitan's form
            layers[i] = torch.compile(layer, backend=backend, dynamic=dynamic)
        else:
            layer.compile(backend=backend, dynamic=dynamic)


def train(model, steps: int, seq_lens=(16,)):
    """Runs `steps` steps per sequence length; returns (losses, gradients of the last step, host
    bytes held at the end of each forward)."""
    losses, host = [], []
    for seq_len in seq_lens:
        inputs = batch(seq_len=seq_len)
        for _ in range(steps):
            model.zero_grad()
            before = torchgc.ops.host_pool_stats().in_use_bytes  # the pool is the process's: count this step's only
            loss = model(**inputs).loss
            host.append(torchgc.ops.host_pool_stats().in_use_bytes - before)
            loss.backward()
            losses.append(loss.detach())
    # A compiled module keeps the original in _orig_mod: the same parameters under a longer name.
    return losses, {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters()}, host


_eager = {}


def eager_run(strategy=None, seq_lens=(16,)):
    """The same steps in eager mode (cached): without checkpointing, or with `strategy`."""
    key = (strategy, seq_lens)
    if key not in _eager:
        model = build("llama", layers=LAYERS)
        if strategy:
            with torchgc.patched(strategy=strategy, min_offload_bytes=0):
                model.gradient_checkpointing_enable()
        _eager[key] = train(model, 2, seq_lens)
    return _eager[key]


def layer_ops_compiled_alone() -> int:
    """The ops dynamo captures for one decoder layer compiled without any checkpointing."""
    backend = InductorCountingOps()
    model = build("llama", layers=1)
    compile_layers(model, "method", backend)
    train(model, 1)
    torch._dynamo.reset()
    assert len(backend.graphs) == 1
    return backend.graphs[0]


def assert_matches(expected, actual):
    (eager_losses, eager_grads, _), (losses, grads, _) = expected, actual
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager_losses), **TOLERANCE)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], **TOLERANCE, msg=lambda m: f"{name}: {m}")


def graph_breaks():
    return dict(counters["graph_break"])


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("form", ["assigned", "method"])
def test_regional_compile_runs_each_layer_compiled_whole_and_matches_eager(form, strategy, use_reentrant):
    whole_layer = layer_ops_compiled_alone()
    backend = InductorCountingOps()
    torchgc.patch(strategy=strategy, use_reentrant=use_reentrant, min_offload_bytes=0)
    model = build("llama", layers=LAYERS)
    model.gradient_checkpointing_enable()
    compile_layers(model, form, backend)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = train(model, 1)
    fallback = [w for w in caught if "cannot apply its policy" in str(w.message)]
    # layer.compile() hides the layer's ops from the selective policy: checkpointed whole, with a warning.
    assert bool(fallback) == (form == "method" and strategy == "selective"), [str(w.message) for w in caught]
    graphs_after_first_step = counters["stats"]["unique_graphs"]
    result = train(model, 2)
    assert counters["stats"]["unique_graphs"] == graphs_after_first_step, "recompiled after the first step"
    # Both layers share their graphs, and each holds the whole layer body, not a fragment of it.
    # Eager reentrant checkpoint runs the forward without grad, so `layer.compile()` compiles the
    # body once for that forward and once for the recompute.
    expected = [whole_layer] * (2 if form == "method" and use_reentrant else 1)
    assert backend.graphs == expected, f"graphs compiled: {backend.graphs}; one layer alone: {whole_layer}"
    assert_matches(eager_run(), result)
    if form == "assigned":
        breaks = graph_breaks()
        assert sum(breaks.values()) == BREAKS_PER_LAYER[strategy] * LAYERS, breaks
    if strategy == "offload":
        _, _, eager_host = eager_run("offload")
        assert first[2][0] > 0 and first[2][0] == eager_host[0], "host bytes held at the end of forward differ from eager"
        assert result[2] == eager_host


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_regional_compile_with_dynamic_shapes_does_not_recompile_for_a_new_sequence_length(strategy):
    torchgc.patch(strategy=strategy, min_offload_bytes=0)
    model = build("llama", layers=LAYERS)
    model.gradient_checkpointing_enable()
    compile_layers(model, "assigned", "inductor", dynamic=True)
    # Lengths equal to no other dimension of the model: dynamo gives equal sizes one symbol, and
    # a later length that breaks the equality would recompile for that reason alone.
    train(model, 1, seq_lens=(20,))
    graphs = counters["stats"]["unique_graphs"]
    result = train(model, 2, seq_lens=(20, 28))
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled for the second sequence length"
    assert_matches(eager_run(seq_lens=(20, 28)), result)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_whole_model_compile_trains_and_torchgc_breaks_the_graph_only_where_listed(strategy):
    torchgc.patch(strategy=strategy, min_offload_bytes=0)
    model = build("llama", layers=LAYERS)
    model.gradient_checkpointing_enable()
    # fullgraph where torchgc makes no graph break: the test fails on any break it would make.
    compiled = torch.compile(model, fullgraph=BREAKS_PER_LAYER[strategy] == 0)
    result = train(compiled, 2)
    assert_matches(eager_run(), result)
    if strategy == "offload":
        assert result[2] == eager_run("offload")[2], "host bytes held at the end of forward differ from eager"
    explained = torch._dynamo.explain(model)(**batch())
    assert explained.graph_break_count == BREAKS_PER_LAYER[strategy] * LAYERS, explained.break_reasons
    assert all("torchgc offload" in str(b.reason) for b in explained.break_reasons), explained.break_reasons


def test_fused_norms_compile_inside_a_model_in_one_graph():
    torchgc.patch(strategy="checkpoint", fused_norm=True)
    model = build("llama", layers=LAYERS)
    model.gradient_checkpointing_enable()
    result = train(torch.compile(model, fullgraph=True), 2)
    reference = build("llama", layers=LAYERS)
    with torchgc.patched(strategy="checkpoint", fused_norm=True):
        reference.gradient_checkpointing_enable()
    assert_matches(train(reference, 2), result)


@pytest.mark.parametrize("strategy", ["checkpoint", "offload"])
def test_hf_trainer_with_torch_compile_matches_eager_training(strategy, tmp_path):
    expected = trainer_step(build("llama", layers=LAYERS), tmp_path / "eager", gradient_checkpointing=False)
    torchgc.patch(strategy=strategy, min_offload_bytes=0)
    model = build("llama", layers=LAYERS)
    grads = trainer_step(model, tmp_path / "compiled", gradient_checkpointing=True, torch_compile=True)
    assert counters["stats"]["unique_graphs"] > 0, "Trainer compiled nothing"
    assert torchgc.explain(model)["checkpointing"] == "torchgc"
    assert grads.keys() == expected.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], **TOLERANCE, msg=lambda m: f"{name}: {m}")


def test_a_memory_budget_inside_a_compiled_layer_checkpoints_it_whole_and_warns_once():
    torchgc.patch(memory_budget=0.5)
    model = build("llama", layers=LAYERS)
    model.gradient_checkpointing_enable()
    compile_layers(model, "assigned", "inductor")
    with pytest.warns(UserWarning, match=r"memory_budget.*torch.compile") as caught:
        result = train(model, 2)
    assert len([w for w in caught if "memory_budget" in str(w.message)]) == 1
    assert_matches(eager_run(), result)
    assert torchgc.explain(model)["plans"] == []  # nothing was measured


_fail = {"now": False}


@torch.library.custom_op("torchgc_test::fail_when_told", mutates_args=())
def fail_when_told(x: torch.Tensor) -> torch.Tensor:
    if _fail["now"]:
        raise RuntimeError("failure injected by the test")
    return x.clone()


fail_when_told.register_fake(lambda x: torch.empty_like(x))
fail_when_told.register_autograd(lambda ctx, grad: grad)


def test_an_exception_inside_a_compiled_offload_region_leaves_no_hooks_behind_after_the_next_region():
    weight = torch.randn(8, 8, requires_grad=True)

    def layer(x):
        return fail_when_told(torch.tanh(x @ weight)) * 2

    step = torch.compile(lambda x: torchgc.checkpoint(layer, x, strategy="offload", min_offload_bytes=0))
    x = torch.randn(4, 8, requires_grad=True)
    top = torch._C._autograd._top_saved_tensors_default_hooks
    step(x).sum().backward()
    assert top(True) is None
    _fail["now"] = True
    try:
        with pytest.raises(RuntimeError, match="failure injected"):
            step(x)
    finally:
        _fail["now"] = False
    assert top(True) is not None  # the failed region's hooks, until the next region closes them
    weight.grad, x.grad = None, None
    step(x).sum().backward()
    assert top(True) is None
    compiled_grads = [g.clone() for g in (weight.grad, x.grad)]
    weight.grad, x.grad = None, None
    layer(x).sum().backward()
    for got, want in zip(compiled_grads, (weight.grad, x.grad)):
        torch.testing.assert_close(got, want, **TOLERANCE)
