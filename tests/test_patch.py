"""torchgc.patch(): what the patched gradient_checkpointing_enable sets, undoes and refuses."""

import functools
import inspect
import subprocess
import sys
import types
import warnings

import pytest
import torch
import transformers
from transformers import PreTrainedModel

import torchgc
import torchgc.integrations.transformers as hf_integration
import torchgc.patching as tgc_patch
from patch_helpers import TRANSFORMERS_MAJOR
from tiny_models import TINY_CONFIGS, batch, build
import torchgc.integrations.transformers_layers as hf_layers
from torchgc.integrations.transformers_layers import is_torchgc_function

pytestmark = pytest.mark.usefixtures("clean_patch")

NAMES = (
    "gradient_checkpointing_enable",
    "gradient_checkpointing_disable",
    "activation_checkpointing_enable",
    "activation_checkpointing_disable",
)
HAS_ACTIVATION_API = "activation_checkpointing_enable" in PreTrainedModel.__dict__


def class_functions():
    return {name: PreTrainedModel.__dict__[name] for name in NAMES if name in PreTrainedModel.__dict__}


def flagged(model):
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]


def layer_func(model):
    funcs = {id(m._gradient_checkpointing_func) for m in flagged(model) if m.gradient_checkpointing}
    assert len(funcs) == 1, "every checkpointed module should share one function"
    return next(m._gradient_checkpointing_func for m in flagged(model) if m.gradient_checkpointing)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def forward_backward(model):
    model.zero_grad(set_to_none=True)
    model(**batch()).loss.backward()
    return grads(model)


def test_import_torchgc_does_not_import_transformers():
    code = "import sys, torchgc; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_patch_is_idempotent_and_unpatch_restores_the_original_function_objects():
    before = class_functions()
    attributes_before = set(PreTrainedModel.__dict__)
    torchgc.patch()
    first = class_functions()
    assert all(first[name] is not before[name] for name in before)
    assert first["gradient_checkpointing_enable"] is tgc_patch.gradient_checkpointing_enable
    torchgc.patch(strategy="checkpoint")
    assert class_functions() == first
    torchgc.unpatch()
    after = class_functions()
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert set(PreTrainedModel.__dict__) == attributes_before
    torchgc.unpatch()  # unpatching twice is harmless
    assert all(class_functions()[n] is before[n] for n in before)


def test_patched_context_manager_restores_the_previous_state():
    before = class_functions()
    with torchgc.patched(strategy="offload") as options:
        assert options.strategy == "offload"
        assert class_functions()["gradient_checkpointing_enable"] is tgc_patch.gradient_checkpointing_enable
    assert all(class_functions()[n] is before[n] for n in before)

    torchgc.patch(strategy="checkpoint")
    with torchgc.patched(strategy="offload"):
        assert tgc_patch.current_options().strategy == "offload"
    assert tgc_patch.current_options().strategy == "checkpoint"


def test_models_built_before_and_after_patch_and_peft_wrappers_are_covered():
    import peft

    early = build("llama", layers=2)
    torchgc.patch()
    late = build("qwen2", layers=2)
    wrapped = peft.get_peft_model(build("llama", layers=2), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for model in (early, late, wrapped):
        parameters = inspect.signature(model.gradient_checkpointing_enable).parameters
        assert "gradient_checkpointing_kwargs" in parameters
        model.gradient_checkpointing_enable()
        assert is_torchgc_function(layer_func(model))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_enable_sets_every_flagged_module_and_turns_off_the_cache(name):
    torchgc.patch()
    model = build(name, layers=2)
    model.config.use_cache = True
    layers = [m for m in model.modules() if isinstance(m, transformers.modeling_layers.GradientCheckpointingLayer)]
    assert layers, "the tiny model should use GradientCheckpointingLayer"
    model.gradient_checkpointing_enable()
    assert all(m.gradient_checkpointing for m in flagged(model))
    func = layer_func(model)
    assert is_torchgc_function(func)
    assert all(m._gradient_checkpointing_func is func for m in flagged(model))
    assert model.is_gradient_checkpointing
    assert model.config.use_cache is False


def test_kwargs_by_position_or_keyword_and_none_or_empty_mean_the_defaults():
    torchgc.patch()
    model = build("llama", layers=2)
    model.gradient_checkpointing_enable({"strategy": "offload"})  # TRL passes the dict by position
    assert layer_func(model).keywords["strategy"] == "offload"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"strategy": "checkpoint", "preserve_rng_state": False})
    assert layer_func(model).keywords["strategy"] == "checkpoint"
    assert layer_func(model).keywords["preserve_rng_state"] is False

    for empty in (None, {}):
        fresh = build("llama", layers=2)
        fresh.gradient_checkpointing_enable(empty)
        keywords = layer_func(fresh).keywords
        assert keywords["strategy"] == "auto"
        assert keywords["use_reentrant"] is hf_integration.default_use_reentrant()
        assert keywords["only_trainable"] is True and keywords["prefetch"] is True


def test_default_use_reentrant_follows_the_installed_transformers():
    assert hf_integration.default_use_reentrant() is (TRANSFORMERS_MAJOR < 5)


def test_precedence_kwargs_then_patch_arguments_then_environment(monkeypatch):
    monkeypatch.setenv("TORCHGC_STRATEGY", "offload")
    monkeypatch.setenv("TORCHGC_USE_REENTRANT", "true")
    monkeypatch.setenv("TORCHGC_MIN_OFFLOAD_BYTES", "4096")
    torchgc.patch(strategy="checkpoint")
    model = build("llama", layers=2)
    model.gradient_checkpointing_enable()
    keywords = layer_func(model).keywords
    assert (keywords["strategy"], keywords["use_reentrant"], keywords["min_offload_bytes"]) == ("checkpoint", True, 4096)
    model.gradient_checkpointing_enable({"strategy": "auto", "use_reentrant": False})
    keywords = layer_func(model).keywords
    assert (keywords["strategy"], keywords["use_reentrant"]) == ("auto", False)


def test_checkpointing_goes_through_torchgc_and_gradients_match(checkpoint_calls):
    reference = forward_backward(build("llama", layers=2))
    torchgc.patch()
    model = build("llama", layers=2)
    model.gradient_checkpointing_enable()
    result = forward_backward(model)
    assert len(checkpoint_calls) == 2, "one torchgc.checkpoint call per decoder layer"
    assert reference.keys() == result.keys()
    assert all(torch.equal(reference[n], result[n]) for n in reference)


def test_disable_undoes_enable_and_reenable_without_arguments_keeps_the_configuration():
    torchgc.patch()
    model = build("llama", layers=2)
    model.config.use_cache = True
    model._hf_peft_config_loaded = True  # as transformers' load_adapter sets it: enable adds the input-grad hook
    embeddings = model.get_input_embeddings()
    hooks_before = dict(embeddings._forward_hooks)
    model.gradient_checkpointing_enable({"strategy": "offload", "use_reentrant": True})
    model.gradient_checkpointing_enable({"strategy": "offload", "use_reentrant": True})  # twice is harmless
    assert len(embeddings._forward_hooks) == len(hooks_before) + 1

    model.gradient_checkpointing_disable()
    assert not any(m.gradient_checkpointing for m in flagged(model))
    assert not model.is_gradient_checkpointing
    assert model.config.use_cache is True
    assert dict(embeddings._forward_hooks) == hooks_before

    model.gradient_checkpointing_enable()
    keywords = layer_func(model).keywords
    assert (keywords["strategy"], keywords["use_reentrant"]) == ("offload", True)
    assert model.config.use_cache is False


def test_trl_disable_and_reenable_around_generation_keeps_the_configuration():
    trl_utils = pytest.importorskip("trl.models.utils")
    torchgc.patch()
    model = build("llama", layers=2)
    model.gradient_checkpointing_enable({"strategy": "offload"})
    with trl_utils.disable_gradient_checkpointing(model):
        assert not model.is_gradient_checkpointing
    assert model.is_gradient_checkpointing
    assert layer_func(model).keywords["strategy"] == "offload"


def test_reentrant_with_frozen_embeddings_keeps_every_gradient(checkpoint_calls):
    def frozen(model):
        model.get_input_embeddings().weight.requires_grad_(False)
        return model

    reference = forward_backward(frozen(build("llama", layers=2)))
    torchgc.patch(use_reentrant=True)
    model = frozen(build("llama", layers=2))
    model.gradient_checkpointing_enable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = forward_backward(model)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "requires_grad" in m or "requires grad" in m], messages
    assert checkpoint_calls and all(c["use_reentrant"] is True for c in checkpoint_calls)
    assert reference.keys() == result.keys()
    assert all(torch.equal(reference[n], result[n]) for n in reference)


class _LoopConfig(transformers.PretrainedConfig):
    model_type = "torchgc_loop_test"

    def __init__(self, hidden=32, layers=2, **kwargs):
        self.hidden, self.layers = hidden, layers
        super().__init__(**kwargs)


class _LoopModel(PreTrainedModel):
    """Checkpoints in its own forward loop, as models written before GradientCheckpointingLayer do."""

    config_class = _LoopConfig
    supports_gradient_checkpointing = True

    def __init__(self, config):
        super().__init__(config)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(config.hidden, config.hidden) for _ in range(config.layers))
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, x):
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x)
            else:
                x = layer(x)
            x = torch.tanh(x)
        return x


def _loop_model():
    torch.manual_seed(0)
    return _LoopModel(_LoopConfig()).train()


def _loop_grads(model):
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    model(x).square().sum().backward()
    return grads(model)


def test_models_with_their_own_checkpointing_loop_go_through_torchgc(checkpoint_calls):
    reference = _loop_grads(_loop_model())
    torchgc.patch()
    model = _loop_model()
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing and is_torchgc_function(model._gradient_checkpointing_func)
    result = _loop_grads(model)
    assert len(checkpoint_calls) == 2
    assert reference.keys() == result.keys() and all(torch.equal(reference[n], result[n]) for n in reference)


def test_unsupported_models_raise_like_transformers():
    class Unsupported(_LoopModel):
        supports_gradient_checkpointing = False

    torch.manual_seed(0)
    model = Unsupported(_LoopConfig())
    torchgc.patch()
    with pytest.raises(ValueError, match="Unsupported does not support gradient checkpointing"):
        model.gradient_checkpointing_enable()
    assert not model.gradient_checkpointing


def test_remote_code_overrides_are_respected():
    called = []

    class OwnEnable(_LoopModel):
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            called.append(gradient_checkpointing_kwargs)

    class OldFormat(_LoopModel):
        def _set_gradient_checkpointing(self, module, value=False):
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = value

    torchgc.patch()
    torch.manual_seed(0)
    own = OwnEnable(_LoopConfig())
    own.gradient_checkpointing_enable({"strategy": "offload"})
    assert called == [{"strategy": "offload"}] and not own.gradient_checkpointing

    old = OldFormat(_LoopConfig())
    with pytest.warns(UserWarning, match="pre-4.35"):
        old.gradient_checkpointing_enable()
    assert old.gradient_checkpointing
    old.gradient_checkpointing_disable()
    assert not old.gradient_checkpointing


def test_a_foreign_instance_override_that_bypasses_torchgc_warns_once_naming_it():
    # What another framework does (as LLaMA-Factory 0.9.5 did): its own enable set on the instance
    # with MethodType, hiding torchgc's class-level one and installing a checkpoint function of its
    # own (torch's own checkpoint is routed instead: see the next test).
    def framework_checkpoint(function, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)

    def framework_enable(self, gradient_checkpointing_kwargs=None):
        self._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=framework_checkpoint)

    torchgc.patch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build("llama", layers=2).gradient_checkpointing_enable()  # through torchgc: no warning
        for _ in range(2):
            model = build("llama", layers=2)
            model.gradient_checkpointing_enable = types.MethodType(framework_enable, model)
            model.gradient_checkpointing_enable()
            model.gradient_checkpointing_disable()
    messages = [str(w.message) for w in caught if "past torchgc" in str(w.message)]
    assert len(messages) == 1, messages
    for fragment in ["gradient checkpointing of LlamaForCausalLM was enabled by an instance-level gradient_checkpointing_enable",
                     "framework_enable", "framework_checkpoint", "torchgc's options do not apply"]:
        assert fragment in messages[0], messages[0]


def test_torchs_own_checkpoint_given_to_the_layers_past_torchgc_is_routed_through_it(checkpoint_calls):
    # transformers' own enable captured before patch() (TRL's selective wrapper does that), or a
    # direct call, gives the layers torch's checkpoint: torchgc takes its place, keywords kept.
    original_enable = PreTrainedModel.gradient_checkpointing_enable
    model = build("llama", layers=2)
    model.gradient_checkpointing_enable = functools.partial(original_enable, model)
    torchgc.patch(strategy="checkpoint")
    other = build("llama", layers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True, "preserve_rng_state": False})
        other._set_gradient_checkpointing(enable=True)  # torch's checkpoint by default
    assert not [str(w.message) for w in caught if "past torchgc" in str(w.message)]
    for m in (model, other):
        assert {is_torchgc_function(f) for f in hf_layers.checkpoint_functions(m)} == {True}
    model(**batch()).loss.backward()
    assert len(checkpoint_calls) == 2
    assert all(c["strategy"] == "checkpoint" and c["use_reentrant"] is True and c["preserve_rng_state"] is False for c in checkpoint_calls)


@pytest.mark.skipif(not HAS_ACTIVATION_API, reason="this transformers has no activation_checkpointing_enable")
def test_activation_checkpointing_api_goes_through_torchgc(checkpoint_calls):
    torchgc.patch()
    model = build("llama", layers=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torchgc's replacements are not the deprecated aliases
        model.activation_checkpointing_enable(every_n_layers=2, offload=True)
    layers = model.model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, True, False]
    assert layers[0]._gradient_checkpointing_func.keywords["strategy"] == "offload"
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing


def test_selective_checkpointing_wrapper_of_trl_reaches_torchgc(checkpoint_calls):
    sac = pytest.importorskip("trl.models.selective_activation_checkpointing")
    reference = forward_backward(build("llama", layers=2))
    torchgc.patch()
    model = build("llama", layers=2)
    sac.enable_selective_activation_checkpointing(model)
    model.gradient_checkpointing_enable({"selective": True})
    result = forward_backward(model)
    assert len(checkpoint_calls) == 2 and all("context_fn" in c for c in checkpoint_calls)
    assert all(torch.equal(reference[n], result[n]) for n in reference)


@pytest.mark.parametrize("kwargs", [{"strategy": "selective"}, {"memory_budget": 0.5}])
def test_a_context_fn_beside_torchgcs_own_choice_of_what_to_keep_is_dropped_with_one_warning(kwargs, checkpoint_calls):
    # TRL's {"selective": True} passes a context_fn; strategy selective (torchgc's policy) and a
    # memory budget (which picks selective itself for some layers) choose what each layer keeps.
    context_fn = functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, lambda *a, **k: False)
    torchgc.patch()
    model = build("llama", layers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model.gradient_checkpointing_enable({**kwargs, "context_fn": context_fn, "use_reentrant": False})
    messages = [str(w.message) for w in caught if "context_fn" in str(w.message)]
    assert len(messages) == 1 and "is not used" in messages[0] and "create_selective_checkpoint_contexts" in messages[0], messages
    forward_backward(model)
    assert checkpoint_calls and not any("context_fn" in c for c in checkpoint_calls)


# --- bad configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, fragments",
    [
        (dict(strategy="fast"), ["torchgc.patch()", "argument 'strategy'", "'auto', 'checkpoint', 'offload', 'selective'", "got 'fast'"]),
        (dict(use_reentrant="yes"), ["torchgc.patch()", "argument 'use_reentrant'", "True, False or None", "got 'yes'"]),
        (dict(min_offload_bytes=-1), ["torchgc.patch()", "argument 'min_offload_bytes'", "int >= 0", "got -1"]),
        (dict(max_host_bytes=1.5), ["torchgc.patch()", "argument 'max_host_bytes'", "an int >= 0 or a size such as '8GiB'", "got 1.5"]),
        (dict(max_host_bytes="lots"), ["torchgc.patch()", "argument 'max_host_bytes'", "a size such as '8GiB'", "got 'lots'"]),
        (dict(prefetch=1), ["torchgc.patch()", "argument 'prefetch'", "True or False", "got 1"]),
    ],
)
def test_bad_patch_arguments_raise_and_leave_nothing_applied(arguments, fragments):
    before = class_functions()
    with pytest.raises(ValueError) as error:
        torchgc.patch(**arguments)
    assert all(f in str(error.value) for f in fragments), str(error.value)
    assert all(class_functions()[n] is before[n] for n in before)
    assert not tgc_patch.is_patched()


@pytest.mark.parametrize(
    "variable, value, fragment",
    [
        ("TORCHGC_STRATEGY", "fast", "one of 'auto', 'checkpoint', 'offload', 'selective'"),
        ("TORCHGC_USE_REENTRANT", "maybe", "one of 1, true, yes, on, 0, false, no, off, auto"),
        ("TORCHGC_MIN_OFFLOAD_BYTES", "1 lot", "non-negative integer, a size such as '8GiB', or 'none'"),
        ("TORCHGC_MAX_HOST_BYTES", "1.5", "non-negative integer, a size such as '8GiB', or 'none'"),
        ("TORCHGC_FUSED_NORM", "2", "one of 1, true"),
    ],
)
def test_bad_environment_variables_raise(monkeypatch, variable, value, fragment):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError) as error:
        torchgc.patch()
    message = str(error.value)
    assert "torchgc.patch()" in message and f"environment variable {variable}" in message and fragment in message
    assert f"got {value!r}" in message
    assert not tgc_patch.is_patched()


@pytest.mark.parametrize(
    "text, nbytes",
    [("4096", 4096), ("512MiB", 512 * 2**20), ("8GiB", 8 * 2**30), ("1.5GB", 1_500_000_000), ("2 kib", 2048), ("64B", 64), ("3k", 3000)],
)
def test_byte_options_take_sizes_with_units(monkeypatch, text, nbytes):
    monkeypatch.setenv("TORCHGC_MAX_HOST_BYTES", text)
    assert torchgc.patch().max_host_bytes == nbytes
    assert torchgc.patch(min_offload_bytes=text).min_offload_bytes == nbytes


def test_max_host_bytes_reaches_the_layers_checkpoint_function():
    torchgc.patch(strategy="offload", max_host_bytes="1GiB")
    model = build("llama", layers=2)
    model.gradient_checkpointing_enable()
    assert layer_func(model).keywords["max_host_bytes"] == 2**30
    model.gradient_checkpointing_enable({"max_host_bytes": 0})
    assert layer_func(model).keywords["max_host_bytes"] == 0


def test_environment_values_are_parsed(monkeypatch):
    monkeypatch.setenv("TORCHGC_STRATEGY", " Offload ")
    monkeypatch.setenv("TORCHGC_USE_REENTRANT", "auto")
    monkeypatch.setenv("TORCHGC_PREFETCH", "off")
    monkeypatch.setenv("TORCHGC_ONLY_TRAINABLE", "0")
    options = torchgc.patch()
    assert (options.strategy, options.use_reentrant, options.prefetch, options.only_trainable) == ("offload", None, False, False)


def test_an_unknown_torchgc_variable_warns_once_naming_the_close_match(monkeypatch):
    monkeypatch.setenv("TORCHGC_FUSED_NORMS", "1")
    monkeypatch.setattr(torchgc.config, "_warned_unknown", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torchgc.patch()
        torchgc.patch()
        build("llama", layers=2).gradient_checkpointing_enable()
    messages = [str(w.message) for w in caught if "TORCHGC_FUSED_NORMS" in str(w.message)]
    assert len(messages) == 1, messages
    assert "is not one torchgc reads; did you mean TORCHGC_FUSED_NORM?" in messages[0]


def test_patch_without_transformers_names_it_and_changes_nothing():
    code = (
        "import sys; sys.modules['transformers'] = None  # as if it were not installed\n"
        "import torch, torchgc\n"
        "try:\n"
        "    torchgc.patch(strategy='checkpoint')\n"
        "except ImportError as exc:\n"
        "    message = str(exc)\n"
        "assert 'torchgc.patch(): patching needs transformers' in message and 'pip install transformers' in message, message\n"
        "assert not torchgc.patching.is_patched()\n"
        "torchgc.unpatch()\n"
        "layer = torch.nn.Linear(4, 4)\n"
        "torchgc.checkpoint(layer, torch.randn(2, 4, requires_grad=True), strategy='checkpoint').sum().backward()\n"
        "assert layer.weight.grad is not None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_failed_repatch_keeps_the_previous_options():
    torchgc.patch(strategy="offload")
    with pytest.raises(ValueError):
        torchgc.patch(strategy="bogus")
    assert tgc_patch.current_options().strategy == "offload"


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"strategy": "fast"}, ["gradient_checkpointing_kwargs['strategy']", "one of 'auto', 'checkpoint', 'offload', 'selective'", "got 'fast'"]),
        ({"use_reentrant": "no"}, ["gradient_checkpointing_kwargs['use_reentrant']", "True, False or None", "got 'no'"]),
        ({"colour": "red"}, ["gradient_checkpointing_kwargs has unknown key(s) ['colour']", "valid keys are", "strategy", "context_fn"]),
        (["use_reentrant"], ["gradient_checkpointing_kwargs must be a dict or None", "got ['use_reentrant']"]),
    ],
)
def test_bad_enable_arguments_raise_and_leave_the_model_unchanged(kwargs, fragments):
    torchgc.patch()
    model = build("llama", layers=2)
    model.config.use_cache = True
    with pytest.raises(ValueError) as error:
        model.gradient_checkpointing_enable(kwargs)
    message = str(error.value)
    assert "LlamaForCausalLM.gradient_checkpointing_enable()" in message
    assert all(f in message for f in fragments), message
    assert not any(m.gradient_checkpointing for m in flagged(model))
    assert model.config.use_cache is True
    model.gradient_checkpointing_enable()  # the failed call left no configuration behind
    assert layer_func(model).keywords["strategy"] == "auto"


# --- FSDP2 ----------------------------------------------------------------------------------


def test_accelerate_fsdp2_environment_forces_non_reentrant_with_one_warning(monkeypatch):
    torchgc.patch(use_reentrant=True, strategy="offload")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    fsdp1 = build("llama", layers=2)
    fsdp1.gradient_checkpointing_enable()
    assert layer_func(fsdp1).keywords["use_reentrant"] is True

    monkeypatch.setenv("FSDP_VERSION", "2")
    model = build("llama", layers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.gradient_checkpointing_enable()
        model.gradient_checkpointing_disable()
        model.gradient_checkpointing_enable()
    fsdp_warnings = [w for w in caught if "FSDP2" in str(w.message)]
    assert len(fsdp_warnings) == 1
    keywords = layer_func(model).keywords
    assert (keywords["strategy"], keywords["use_reentrant"]) == ("offload", False)


@pytest.fixture
def gloo_group(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _sharded_llama(mesh):
    from torch.distributed.fsdp import fully_shard

    model = build("llama", layers=2)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def test_fsdp2_modules_force_non_reentrant_and_train_correctly(gloo_group):
    from torchgc.integrations import distributed as fsdp

    reference = build("llama", layers=2)
    assert not fsdp.uses_fsdp2(reference)
    reference_grads = forward_backward(_sharded_llama(gloo_group))

    torchgc.patch(use_reentrant=True)
    model = _sharded_llama(gloo_group)
    assert fsdp.uses_fsdp2(model) and fsdp.uses_fsdp2(torch.compile(model))
    holder = torch.nn.Sequential(torch.compile(model.model.layers[0]))
    assert fsdp.uses_fsdp2(holder)
    with pytest.warns(UserWarning, match="FSDP2 is in use"):
        model.gradient_checkpointing_enable()
    assert layer_func(model).keywords["use_reentrant"] is False
    result = forward_backward(model)
    assert reference_grads.keys() == result.keys()
    for name in reference_grads:
        assert torch.equal(reference_grads[name].full_tensor(), result[name].full_tensor()), name


# --- prepare_model_for_training -------------------------------------------------------------


def test_prepare_model_for_training_enables_on_that_model_only(checkpoint_calls, monkeypatch):
    before = class_functions()
    model = build("llama", layers=2)
    model.config.use_cache = True
    monkeypatch.setenv("TORCHGC_STRATEGY", "checkpoint")
    torchgc.prepare_model_for_training(model, types.SimpleNamespace(use_reentrant_gc=True))  # LLaMA-Factory's signature
    assert all(class_functions()[n] is before[n] for n in before)
    assert "gradient_checkpointing_kwargs" in inspect.signature(model.gradient_checkpointing_enable).parameters
    keywords = layer_func(model).keywords
    assert (keywords["strategy"], keywords["use_reentrant"]) == ("checkpoint", True)
    assert model.config.use_cache is False
    other = build("llama", layers=2)
    other.gradient_checkpointing_enable()
    assert not is_torchgc_function(layer_func(other))
    forward_backward(model)
    assert len(checkpoint_calls) == 2

    model.gradient_checkpointing_disable()
    assert model.config.use_cache is True and not model.is_gradient_checkpointing


def test_prepare_model_for_training_respects_its_flags():
    model = build("llama", layers=2)
    torchgc.prepare_model_for_training(model, disable_gradient_checkpointing=True)
    assert not model.is_gradient_checkpointing

    class Unsupported(_LoopModel):
        supports_gradient_checkpointing = False

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="does not support gradient checkpointing"):
        torchgc.prepare_model_for_training(Unsupported(_LoopConfig()))
    with pytest.raises(ValueError, match=r"prepare_model_for_training\(\): flag 'use_unsloth_gc' must be True or False; got 'yes'"):
        torchgc.prepare_model_for_training(build("llama", layers=2), types.SimpleNamespace(use_unsloth_gc="yes"))
    with pytest.raises(ValueError, match=r"prepare_model_for_training\(\): unknown flag\(s\) \['strategy'\]; LLaMA-Factory's flags are"):
        torchgc.prepare_model_for_training(build("llama", layers=2), strategy="offload")


# --- norm options ---------------------------------------------------------------------------


@pytest.fixture
def recorded_norm(monkeypatch):
    """Stands in for torchgc.norm, recording each transform and whether checkpointing was on at
    the time: these tests check patch's wiring, not the norms themselves."""
    calls = []

    class Handle:
        def __init__(self, name):
            self.name = name

        def remove(self):
            calls.append(("remove", self.name))

    def transform(name):
        def apply(model):
            calls.append((name, model.is_gradient_checkpointing))
            return Handle(name)

        return apply

    module = types.ModuleType("torchgc.norm")
    module.upcast_layernorm = transform("upcast_layernorm")
    module.fuse_norms = transform("fuse_norms")
    module.upcast_lmhead_output = transform("upcast_lmhead_output")
    monkeypatch.setitem(sys.modules, "torchgc.norm", module)
    monkeypatch.setattr(torchgc, "norm", module, raising=False)
    return calls


def test_norm_options_are_applied_once_and_outlive_disable(recorded_norm):
    torchgc.patch(upcast_layernorm=True, fused_norm=True)
    model = build("llama", layers=2)
    model.gradient_checkpointing_enable()
    assert recorded_norm == [("upcast_layernorm", True), ("fuse_norms", True)]
    model.gradient_checkpointing_disable()
    model.gradient_checkpointing_enable()
    model.gradient_checkpointing_enable({"upcast_lmhead_output": True})
    assert recorded_norm == [("upcast_layernorm", True), ("fuse_norms", True), ("upcast_lmhead_output", True)]


def test_prepare_model_for_training_runs_its_steps_in_llamafactory_order(recorded_norm):
    model = build("llama", layers=2)
    torchgc.prepare_model_for_training(model, upcast_layernorm=True, upcast_lmhead_output=True)
    assert recorded_norm == [("upcast_layernorm", False), ("upcast_lmhead_output", True)]
    assert set(hf_integration._state(model).norm_handles) == {"upcast_layernorm", "upcast_lmhead_output"}
    model.gradient_checkpointing_enable()  # applied once: a later enable does not apply them again
    assert len(recorded_norm) == 2


def test_norm_options_without_torchgc_norm_fail_before_changing_anything(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchgc.norm", None)  # makes the import fail
    monkeypatch.delattr(torchgc, "norm", raising=False)
    with pytest.raises(ImportError, match=r"torchgc.patch\(\): the options upcast_layernorm, fused_norm, upcast_lmhead_output need torchgc's norm ops"):
        torchgc.patch(upcast_layernorm=True)
    assert not tgc_patch.is_patched()
    torchgc.patch()
    model = build("llama", layers=2)
    with pytest.raises(ImportError, match="need torchgc's norm ops"):
        model.gradient_checkpointing_enable({"fused_norm": True})
    assert not model.is_gradient_checkpointing


def test_norm_options_with_the_real_torchgc_norm():
    torchgc.patch(upcast_layernorm=True, fused_norm=True, upcast_lmhead_output=True)
    model = build("llama", layers=2, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    norms = [p for n, p in model.named_parameters() if p.ndim == 1 and "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    output = model(**batch())
    assert output.logits.dtype == torch.float32
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
