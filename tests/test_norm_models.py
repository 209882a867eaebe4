"""Model surgery of torchgc.norm on tiny transformers models built from configs (no downloads)."""

import copy

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from torchgc import norm, norm_modules

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=97, max_position_embeddings=64)


def tiny(name):
    torch.manual_seed(0)
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False))
    elif name == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**SMALL, head_dim=16))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=16, sliding_window=16))
    # Gemma initialises norm weights to zero (offset 1): give every norm weight distinct values so
    # the offset and the weight gradient are exercised.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (LlamaRMSNorm, GemmaRMSNorm)) or type(module).__name__.endswith("RMSNorm"):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
    model.config._attn_implementation = "eager"
    return model.to(torch.bfloat16)


def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 24), generator=gen)
    return ids


def train(model, steps=3):
    """A few SGD steps; returns the losses and the gradients of every parameter at the first step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ids = batch()
    losses, first_grads = [], None
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
        losses.append(loss.item())
        opt.step()
    return losses, first_grads


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", ["llama", "gemma", "gemma2"])
def test_upcast_layernorm_trains_like_eager(name):
    base = tiny(name)
    eager = copy.deepcopy(base)
    fused = copy.deepcopy(base)
    handle = norm.upcast_layernorm(fused)
    n_norms = sum(type(m).__name__.endswith("RMSNorm") for m in base.modules())
    assert len(handle.fused) == n_norms and not handle.skipped
    reference = copy.deepcopy(base).double()

    losses_e, grads_e = train(eager)
    losses_f, grads_f = train(fused)
    _, grads_r = train(reference, steps=1)

    # Losses: a few bf16 steps; both runs round at the same places except inside the norms.
    for le, lf in zip(losses_e, losses_f):
        assert abs(le - lf) <= 2e-2 * abs(le), (losses_e, losses_f)
    assert set(grads_f) == set(grads_e)
    for pname in grads_e:
        ge, gf, gr = grads_e[pname], grads_f[pname], grads_r[pname]
        # Tolerance: bf16 keeps 8 bits of mantissa (rounding 2^-9, 0.2%) and every matmul of
        # forward and backward rounds its output, so the eager bf16 run itself is about 1% (in
        # norm) from the float64 model. The two runs differ only inside the norms, so they must
        # agree within 3% per parameter, and the fused run must be no further from float64 than
        # 1.25x the eager run's distance plus 0.5%. (Measured: at most 0.7% apart; a wrong
        # Gemma offset gives over 100%.)
        assert rel_err(gf, ge) <= 3e-2, (pname, rel_err(gf, ge))
        assert rel_err(gf, gr) <= 1.25 * rel_err(ge, gr) + 5e-3, (pname, rel_err(gf, gr), rel_err(ge, gr))
    # The upcast norm weights really are fp32 and got fp32 gradients.
    for name_, module in fused.named_modules():
        if type(module).__name__.endswith("RMSNorm"):
            assert module.weight.dtype == torch.float32 and module.weight.grad.dtype == torch.float32, name_
    handle.remove()


def test_forward_of_fused_llama_is_bit_close_to_eager():
    model = tiny("llama")
    ids = batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        handle = norm.fuse_norms(model)
        got = model(input_ids=ids).logits
    handle.remove()
    # Same rounding steps as HF's LlamaRMSNorm (casting "llama"); only rstd's last bit may differ.
    assert (got == expected).float().mean() > 0.98
    assert (got.float() - expected.float()).abs().max() <= 0.05 * expected.float().abs().max()


def test_specs_detected_by_what_the_module_computes():
    llama, gemma = tiny("llama"), tiny("gemma")
    fused_l = norm.fuse_norms(llama)
    fused_g = norm.fuse_norms(gemma)
    spec_l = llama.model.norm._torchgc_norm.spec
    spec_g = gemma.model.norm._torchgc_norm.spec
    assert (spec_l.offset, spec_l.casting) == (0.0, "llama")
    assert (spec_g.offset, spec_g.casting) == (1.0, "fp32")
    fused_l.remove()
    fused_g.remove()


def test_remove_restores_dtypes_and_forward_exactly_and_calls_are_idempotent():
    model = tiny("llama")
    ids = batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    first = norm.upcast_layernorm(model)
    second = norm.upcast_layernorm(model)  # nothing left to do
    assert first.fused and first.upcast and not second.fused and not second.upcast
    assert model.model.norm.weight.dtype == torch.float32
    assert "forward" in model.model.norm.__dict__
    second.remove()
    assert model.model.norm.weight.dtype == torch.float32  # the second handle owns nothing
    first.remove()
    first.remove()
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes
    assert all("forward" not in m.__dict__ and not hasattr(m, "_torchgc_norm") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_fuse_norms_keeps_weight_dtypes():
    model = tiny("gemma")
    handle = norm.fuse_norms(model)
    assert handle.fused and not handle.upcast
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    handle.remove()


def test_modules_are_picked_by_type_not_by_name():
    class OddRMSNorm(nn.Module):  # an RMSNorm name whose math differs: left alone
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))
            self.eps = 1e-6

        def forward(self, x):
            return x * self.weight / (x.abs().mean(-1, keepdim=True) + self.eps)

    model = nn.ModuleDict({
        "norm": nn.Linear(8, 8),             # named "norm", not a norm
        "ln_f": nn.Linear(8, 8),             # LLaMA-Factory's rule would upcast it
        "block": LlamaRMSNorm(8),            # a norm with an unhelpful name
        "emb_layer": nn.LayerNorm(8),
        "no_affine": nn.LayerNorm(8, elementwise_affine=False),
        "odd": OddRMSNorm(),
    }).to(torch.bfloat16)
    handle = norm.upcast_layernorm(model)
    assert sorted(handle.fused) == ["block", "emb_layer"]
    assert "odd" in handle.skipped
    assert model["norm"].weight.dtype == torch.bfloat16 and model["ln_f"].weight.dtype == torch.bfloat16
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = model["emb_layer"](x)
    assert y.dtype == torch.bfloat16
    handle.remove()


def test_norms_inside_peft_modules_to_save_wrapper_are_fused():
    peft = pytest.importorskip("peft")
    model = tiny("llama")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"])
    model = peft.get_peft_model(model, config)
    wrapper = model.base_model.model.model.norm
    assert isinstance(wrapper, peft.utils.other.ModulesToSaveWrapper)
    handle = norm.upcast_layernorm(model)
    saved = wrapper.modules_to_save["default"]
    assert hasattr(saved, "_torchgc_norm") and saved.weight.dtype == torch.float32
    ids = batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert saved.weight.grad is not None and saved.weight.grad.abs().sum() > 0
    handle.remove()
    assert saved.weight.dtype == torch.bfloat16


def test_fused_forward_falls_back_for_calls_it_does_not_cover():
    module = LlamaRMSNorm(8).to(torch.bfloat16)
    handle = norm.upcast_layernorm(module)
    x64 = torch.randn(2, 8, dtype=torch.float64)
    # float64 activations with an fp32 weight: not a fused case, HF's forward runs.
    assert torch.allclose(module(x64).double(), LlamaRMSNorm.forward(module, x64).double())
    handle.remove()


def test_upcast_lmhead_output_gives_fp32_logits_and_is_removable():
    model = tiny("llama")
    ids = batch()
    handle = norm.upcast_lmhead_output(model)
    assert handle.hooked
    assert norm.upcast_lmhead_output(model).hooked == []  # idempotent
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32
    handle.remove()
    assert model(input_ids=ids).logits.dtype == torch.bfloat16
    assert norm.upcast_lmhead_output(model.float()).hooked == []  # already fp32: nothing to do


# --- copies and pickles of a model with torchgc's norms (TRL's reference model and EMA copies are
# deep copies) ------------------------------------------------------------------------------------

NORM_OPTIONS = ["fused_norm", "upcast_layernorm", "upcast_lmhead_output"]
OPTION_SETS = [[option] for option in NORM_OPTIONS] + [NORM_OPTIONS]


def enabled_through_patch(name, options):
    import torchgc

    model = tiny(name)
    with torchgc.patched(strategy="checkpoint", **{option: True for option in options}):
        model.gradient_checkpointing_enable()
    return model.train()


def fused_norm_count(model):
    return sum(isinstance(m.__dict__.get("forward"), norm_modules._FusedForward) for m in model.modules())


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("options", OPTION_SETS, ids="+".join)
def test_a_deep_copy_computes_with_and_trains_its_own_weights(options):
    from torchgc.integrations import transformers as hf_integration

    model = enabled_through_patch("gemma", options)
    ids = batch()
    expected = logits(model, ids)
    clone = copy.deepcopy(model)
    assert fused_norm_count(clone) == fused_norm_count(model)
    assert torch.equal(logits(clone, ids), expected)

    clone(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.parameters()), "the copy's backward reached the original"
    assert all(p.grad is not None for p in clone.parameters())
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.mul_(1.5)
    assert not torch.equal(logits(clone, ids), expected), "the copy's norms still compute with the original's weights"
    assert torch.equal(logits(model, ids), expected)

    # Undoing torchgc's changes on the copy undoes them there only.
    for handle in hf_integration._state(clone).norm_handles.values():
        handle.remove()
    assert fused_norm_count(clone) == 0 and not hasattr(clone.get_output_embeddings(), "_torchgc_fp32_logits")
    assert fused_norm_count(model) == (0 if options == ["upcast_lmhead_output"] else 5)
    assert logits(model, ids).dtype == (torch.float32 if "upcast_lmhead_output" in options else torch.bfloat16)


@pytest.mark.parametrize("options", OPTION_SETS, ids="+".join)
def test_a_pickled_model_loads_and_computes_the_same(options, tmp_path):
    model = enabled_through_patch("llama", options)
    ids = batch()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert fused_norm_count(loaded) == fused_norm_count(model)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    loaded(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in loaded.parameters())
