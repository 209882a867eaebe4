"""Tiny transformers models built from configs (no downloads), shared by the tests and the demo."""

import torch
import transformers

VOCAB = 96

# Each entry: config class name and the kwargs that make it tiny. dropout is filled in by build().
TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)),
    "gemma": ("GemmaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)),
    "mixtral": ("MixtralConfig", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_head=4, n_positions=128)),
}


def build(name: str, *, layers: int = 3, dropout: float = 0.0, seed: int = 0, dtype=torch.float32):
    class_name, kwargs = TINY_CONFIGS[name]
    config_class = getattr(transformers, class_name)
    if name == "gpt2":
        config = config_class(vocab_size=VOCAB, n_layer=layers, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **kwargs)
    else:
        config = config_class(vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=128, attention_dropout=dropout, **kwargs)
    config.use_cache = False
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()


def batch(batch_size: int = 2, seq_len: int = 16, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def tokenizer():
    """A word-level tokenizer over VOCAB words "<pad>", "<unk>", "<eos>", "w3" ... (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(3, VOCAB)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def token_rows(rows: int = 4, seq_len: int = 16, seed: int = 1):
    """``rows`` lists of ``seq_len`` token ids, none of them special."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, seq_len), generator=generator).tolist()
