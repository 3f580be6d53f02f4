"""Reference computation: the uncompressed model with a 4D mask hiding exactly the evicted entries."""

from __future__ import annotations

import torch

from tests.models import prefill


def kept_from_cache(full_cache, compressed_cache) -> list[torch.Tensor]:
    """Per layer, ``(batch, kv_heads, n)`` booleans: which full-cache entries the compressed cache holds.

    Recovered by matching stored keys (RoPE makes every position's key distinct), independently of the press.
    """
    kept = []
    for full_layer, compressed_layer in zip(full_cache.layers, compressed_cache.layers):
        full, compressed = full_layer.keys, compressed_layer.keys
        matches = (compressed[:, :, :, None, :] == full[:, :, None, :, :]).all(dim=-1)  # (b, h, k, n)
        assert (matches.sum(dim=-1) == 1).all(), "every kept key must be an exact copy of one context key"
        kept.append(matches.any(dim=2))
    return kept


def install_reference_masks(model, kept: list[torch.Tensor], n_context: int):
    """Pre-hooks giving each attention layer the mask 'kept context entries + causal after the context'."""
    handles = []
    for layer_idx, layer in enumerate(model.model.layers):
        attention = layer.self_attn

        def hook(module, args, kwargs, layer_kept=kept[layer_idx]):
            hidden = kwargs["hidden_states"]
            q_len = hidden.shape[1]
            cached = kwargs["past_key_values"].get_seq_length(module.layer_idx)
            after = cached - n_context
            group = module.config.num_attention_heads // layer_kept.shape[1]
            context = layer_kept.repeat_interleave(group, dim=1)[:, :, None, :].expand(-1, -1, q_len, -1)
            query = torch.arange(q_len)[:, None] + after
            later = (torch.arange(after + q_len)[None, :] <= query).expand(*context.shape[:2], -1, -1)
            visible = torch.cat([context, later], dim=-1)
            if module.config._attn_implementation == "eager":
                mask = torch.zeros(visible.shape, dtype=hidden.dtype)
                visible = mask.masked_fill_(~visible, torch.finfo(hidden.dtype).min)
            kwargs["attention_mask"] = visible
            return args, kwargs

        handles.append(attention.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@torch.no_grad()
def question_and_decode(model, cache, question_ids, n_context, decode_steps, forced_tokens=None):
    """Logits of the question pass and of greedy decode steps, positions continuing from ``n_context``."""
    q_len = question_ids.shape[1]
    positions = torch.arange(n_context, n_context + q_len)[None].expand(question_ids.shape[0], -1)
    logits = [model(input_ids=question_ids, past_key_values=cache, position_ids=positions).logits]
    tokens = []
    for step in range(decode_steps):
        token = logits[-1][:, -1:].argmax(-1) if forced_tokens is None else forced_tokens[step]
        tokens.append(token)
        position = torch.full_like(token, n_context + q_len + step)
        logits.append(model(input_ids=token, past_key_values=cache, position_ids=position).logits)
    return logits, tokens


def compressed_vs_reference(model, ids, press, question_ids, decode_steps=4):
    """(compressed logits, reference logits, kept masks) for one context, question and greedy decode."""
    n_context = ids.shape[1]
    compressed_cache = prefill(model, ids, press)
    full_cache = prefill(model, ids)
    kept = kept_from_cache(full_cache, compressed_cache)
    compressed, tokens = question_and_decode(model, compressed_cache, question_ids, n_context, decode_steps)
    reference = decoded_under(install_reference_masks(model, kept, n_context), question_and_decode, model, full_cache,
                              question_ids, n_context, decode_steps, tokens)
    return compressed, reference, kept


def decoded_under(handles, decode, *args):
    """The logits ``decode(*args)`` gives while the reference mask hooks ``handles`` are on; they are removed
    afterwards."""
    try:
        return decode(*args)[0]
    finally:
        for handle in handles:
            handle.remove()
