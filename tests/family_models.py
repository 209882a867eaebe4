"""Tiny models of the families beyond tests/tiny_models.py (2 layers, hidden 64, built from configs,
no downloads), each with a batch for one training step: sdpa attention, MoE with its load-balancing
loss, MLA, hybrid linear attention, an encoder, an encoder-decoder and a vision-language model."""

import torch
import transformers
from transformers.modeling_layers import GradientCheckpointingLayer

import torchgc
from tiny_models import VOCAB, batch

T = transformers
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _built(model_class, config, attention="eager"):
    config.use_cache = False
    config._attn_implementation = attention
    torch.manual_seed(0)
    return model_class(config).train()


def llama_sdpa():
    """The attention users get by default (the other tests use eager)."""
    return _built(T.LlamaForCausalLM, T.LlamaConfig(intermediate_size=128, **SMALL), "sdpa"), batch()


def qwen3_moe():
    """MoE whose loss includes the load-balancing loss, computed from router logits that transformers
    5.x records with forward hooks (LLaMA-Factory sets output_router_logits with moe_aux_loss_coef).
    A large coefficient makes its gradient show above rounding."""
    config = T.Qwen3MoeConfig(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16, output_router_logits=True,
                              router_aux_loss_coef=0.5, **SMALL)
    return _built(T.Qwen3MoeForCausalLM, config), batch()


def deepseek_v3():
    """Multi-head latent attention (low-rank q and kv), a dense first layer, then MoE."""
    config = T.DeepseekV3Config(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                qk_nope_head_dim=16, v_head_dim=16, **{**SMALL, "num_key_value_heads": 4})
    return _built(T.DeepseekV3ForCausalLM, config), batch()


def qwen3_next():
    """Hybrid: a gated delta-net linear attention layer (torch's fallback kernels), then full attention."""
    config = T.Qwen3NextConfig(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                               num_experts_per_tok=2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                               linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"], **SMALL)
    return _built(T.Qwen3NextForCausalLM, config), batch()


def bert():
    config = T.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    inputs = batch()
    inputs["labels"][:, ::2] = -100  # masked-LM loss on half the positions
    return _built(T.BertForMaskedLM, config), inputs


def t5(seq_len=16):
    """Encoder-decoder. With d_kv 16 and 16 tokens, each attention's Q·Kᵀ is no larger than Q and K
    together, so torchgc's selective policy keeps it (as at any length up to 2 * d_kv)."""
    config = T.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                        decoder_start_token_id=0, pad_token_id=0)
    inputs = batch(seq_len=seq_len)
    inputs["labels"] = batch(seq_len=12, seed=2)["input_ids"]
    return _built(T.T5ForConditionalGeneration, config), inputs


IMAGE_TOKEN, VISION_START, VISION_END = 3, 4, 5


def qwen2_5_vl():
    """Vision-language: Qwen2.5-VL, whose vision blocks are checkpointed along with the decoder layers.
    One 16x16 image per row: 4x4 patches of 4x4 pixels, merged 2x2 into 4 image tokens."""
    text = dict(SMALL, intermediate_size=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=1,
                  window_size=16, out_hidden_size=64, fullatt_block_indexes=[1])
    config = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=6,
                                vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    generator = torch.Generator().manual_seed(1)
    ids = batch(seq_len=10)["input_ids"].clamp(min=7)
    image = torch.tensor([VISION_START] + [IMAGE_TOKEN] * 4 + [VISION_END]).expand(2, -1)
    ids = torch.cat([image, ids], dim=1)
    labels = ids.clone()
    labels[:, : image.shape[1]] = -100
    inputs = {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(2 * 16, 3 * 4 * 4, generator=generator),
              "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]])}
    return _built(T.Qwen2_5_VLForConditionalGeneration, config), inputs


FAMILIES = {f.__name__: f for f in (llama_sdpa, qwen3_moe, deepseek_v3, qwen3_next, bert, t5, qwen2_5_vl)}


def step(build, strategy=None, use_reentrant=None):
    """One forward and backward of build()'s model, without checkpointing (strategy None) or through
    torchgc.patched(...) and the model's own gradient_checkpointing_enable(). Returns ({name: grad},
    torchgc.stats(), the class names of the model's checkpointable layers)."""
    model, inputs = build()
    torchgc.reset_stats()
    if strategy is None:
        model(**inputs).loss.backward()
    else:
        with torchgc.patched(strategy, use_reentrant=use_reentrant, min_offload_bytes=0):
            model.gradient_checkpointing_enable()
            model(**inputs).loss.backward()
    layers = [type(m).__name__ for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return {name: p.grad for name, p in model.named_parameters()}, torchgc.stats(), layers
