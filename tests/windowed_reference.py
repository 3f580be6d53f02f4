"""Reference computation for models with windowed layers: the uncompressed model (a plain DynamicCache holding
every entry) with a 4D mask per layer hiding exactly the evicted entries, the model's own window and padding."""

from __future__ import annotations

import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig

from tests.models import VOCAB
from tests.reference import decoded_under

SLIDING, FULL = "sliding_attention", "full_attention"


def tiny_gemma3(attn="sdpa", layer_types=(SLIDING, FULL, SLIDING, FULL), window=8, seed=0):
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=4096, sliding_window=window, layer_types=list(layer_types),
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the near-uniform attention of random weights, as tests/models.py does
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model


def windows_of(model) -> list[int | None]:
    """Each layer's sliding window, None for full attention (the model's own view, not the press's)."""
    config = model.config
    layer_types = getattr(config, "layer_types", None) or [SLIDING if config.sliding_window else FULL] * len(
        model.model.layers)
    return [config.sliding_window if layer_type == SLIDING else None for layer_type in layer_types]


def kept_entries(full_cache, compressed_cache, valid: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, ``(batch, kv_heads, n)`` booleans: which context entries of the full cache the compressed cache
    holds (matched by key; RoPE makes each distinct), padding never (an uncompressed layer keeps its padding
    entries: zero keys, or NaN past the first layer)."""
    kept = []
    for full_layer, compressed_layer in zip(full_cache.layers, compressed_cache.layers):
        full, compressed = full_layer.keys, compressed_layer.keys
        matches = (compressed[:, :, :, None, :] == full[:, :, None, :, :]).all(dim=-1)  # (b, h, k, n)
        valid_matches = matches & valid[:, None, None, :]
        # a padding entry an uncompressed layer holds: NaN past the first layer, or a copy of padding keys only
        padding = ~torch.isfinite(compressed).all(dim=-1) | (matches.any(dim=-1) & ~valid_matches.any(dim=-1))
        assert ((valid_matches.sum(dim=-1) == 1) | padding).all(), "every kept key must be a copy of one context key"
        kept.append(valid_matches.any(dim=2))
    return kept


def install_windowed_reference_masks(model, kept: list[torch.Tensor], n_context: int):
    """Pre-hooks giving each attention layer the mask: kept context entries and the tokens after the context,
    causal, within the layer's window (sequence indices, padding counted, as transformers counts them)."""
    handles = []
    for layer_idx, (layer, window) in enumerate(zip(model.model.layers, windows_of(model))):

        def hook(module, args, kwargs, layer_kept=kept[layer_idx], window=window):
            hidden = kwargs["hidden_states"]
            q_len = hidden.shape[1]
            cached = kwargs["past_key_values"].get_seq_length(module.layer_idx)
            group = module.config.num_attention_heads // layer_kept.shape[1]
            key_index = torch.arange(cached + q_len)
            query_index = torch.arange(cached, cached + q_len)[:, None]
            visible = key_index[None, :] <= query_index
            if window is not None:
                visible = visible & (key_index[None, :] > query_index - window)
            later = torch.ones(*layer_kept.shape[:2], cached + q_len - n_context, dtype=torch.bool)
            stored = torch.cat([layer_kept, later], dim=-1).repeat_interleave(group, dim=1)  # (b, heads, keys)
            visible = stored[:, :, None, :] & visible[None, None]
            if module.config._attn_implementation == "eager":
                mask = torch.zeros(visible.shape, dtype=hidden.dtype)
                visible = mask.masked_fill_(~visible, torch.finfo(hidden.dtype).min)
            kwargs["attention_mask"] = visible
            return args, kwargs

        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@torch.no_grad()
def question_and_decode(model, cache, question_ids, context_mask, decode_steps, forced_tokens=None):
    """Logits of the question pass and of greedy decode steps, positions continuing from the context, with the 2D
    padding mask spanning the context and every later token (as ``generate`` passes it)."""
    batch, q_len = question_ids.shape
    n_context = context_mask.shape[1]
    mask = torch.cat([context_mask, torch.ones(batch, q_len, dtype=context_mask.dtype)], dim=1)
    positions = torch.arange(n_context, n_context + q_len)[None].expand(batch, -1)
    logits = [model(input_ids=question_ids, attention_mask=mask, past_key_values=cache, position_ids=positions).logits]
    tokens = []
    for step in range(decode_steps):
        token = logits[-1][:, -1:].argmax(-1) if forced_tokens is None else forced_tokens[step]
        tokens.append(token)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        position = torch.full_like(token, n_context + q_len + step)
        logits.append(model(input_ids=token, attention_mask=mask, past_key_values=cache, position_ids=position).logits)
    return logits, tokens


def windowed_compressed_vs_reference(model, ids, context_mask, press, question_ids, decode_steps, cache):
    """(compressed logits, reference logits, kept masks): ``press`` compresses the context into ``cache``; the
    reference is the uncompressed model, every entry in a plain DynamicCache, masked as the compression says."""
    n_context = ids.shape[1]
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, attention_mask=context_mask, past_key_values=cache)
    full_cache = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, attention_mask=context_mask, past_key_values=full_cache)
    kept = kept_entries(full_cache, cache, context_mask.bool())
    compressed, tokens = question_and_decode(model, cache, question_ids, context_mask, decode_steps)
    reference = decoded_under(install_windowed_reference_masks(model, kept, n_context), question_and_decode, model,
                              full_cache, question_ids, context_mask, decode_steps, tokens)
    return compressed, reference, kept
