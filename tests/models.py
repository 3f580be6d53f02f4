"""Tiny random-weight models of every family kvpress supports, built from configs in code (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from evaluation.metrics.fidelity import prefill  # noqa: F401 - the tests' prefill is the evaluation's

VOCAB = 97
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
}


def tiny_model(family="llama", attn="sdpa", layers=3, heads=4, kv_heads=2, dtype=torch.float32, seed=0, vocab=VOCAB):
    config_class, model_class = FAMILIES[family]
    extra = {"sliding_window": None} if family in ("mistral", "qwen2") else {}
    config = config_class(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=attn,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval().to(dtype)
    # random init gives near-uniform attention; sharpen it so that scores and allocation are informative
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            projection = attention.qkv_proj if family == "phi3" else attention.q_proj
            projection.weight.mul_(4.0)
    return model


def random_ids(batch, length, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def quantized_cache(model):
    """A 4-bit quanto QuantizedCache small enough that short test contexts spill out of its residual."""
    from transformers import QuantizedCache

    return QuantizedCache(backend="quanto", config=model.config, nbits=4, q_group_size=16, residual_length=8)


def cache_layer_lengths(cache):
    return [cache.get_seq_length(layer) for layer in range(len(cache.layers))]
