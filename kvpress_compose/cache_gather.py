"""Write compressed keys and values back into a transformers cache (step 6 of KVCompose, the gather: see kvpress_compose.compression).

Each layer keeps one dense ``(batch, kv_heads, k_l, head_dim)`` tensor: every head's kept positions are
gathered into it, so memory really shrinks. The number of context entries each layer kept is recorded on the
cache layer (``CONTEXT_LENGTH_ATTRIBUTE``) for :mod:`kvpress_compose.layer_masks`, which builds each layer's
attention mask from it when later tokens are processed.
"""

from __future__ import annotations

import torch
from kvpress.utils import extract_keys_and_values
from transformers import Cache, QuantizedCache

CONTEXT_LENGTH_ATTRIBUTE = "compose_context_length"
ORIGINAL_LENGTH_ATTRIBUTE = "compose_original_length"  # positions the layer had processed when last compressed


def processed_positions(layer) -> int:
    """Positions a cache layer has processed: its length, plus what ComposePress removed from it."""
    length = layer.get_seq_length()
    context, original = (getattr(layer, name, None) for name in (CONTEXT_LENGTH_ATTRIBUTE, ORIGINAL_LENGTH_ATTRIBUTE))
    return length if context is None or original is None else original + length - context


def gather_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``states[b, h, positions[b, h, j]]`` for every (b, h, j): ``(batch, kv_heads, k, head_dim)``."""
    index = positions.to(states.device)[..., None].expand(-1, -1, -1, states.shape[-1])
    return states.gather(2, index).contiguous()


def layer_states(cache: Cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer, dequantized for a QuantizedCache."""
    return extract_keys_and_values(cache, layer_idx)


def full_cache_bytes(layer_keys: torch.Tensor, n_layers: int) -> int:
    """Bytes of the keys and values of ``n_layers`` layers shaped like ``layer_keys``."""
    return n_layers * 2 * layer_keys.nbytes


def write_layer(cache: Cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace a layer's cache content by ``keys``/``values`` and record its context length."""
    layer = cache.layers[layer_idx]
    processed = processed_positions(layer)
    if isinstance(cache, QuantizedCache):
        layer._quantized_keys = layer._quantize(keys.contiguous(), axis=layer.axis_key)
        layer._quantized_values = layer._quantize(values.contiguous(), axis=layer.axis_value)
        layer.keys = keys.new_zeros(0)  # the un-quantized residual is empty right after compression
        layer.values = values.new_zeros(0)
        layer.cumulative_length = keys.shape[2]
    else:
        layer.keys, layer.values = keys, values
        if hasattr(layer, "cumulative_length"):  # sliding-window layers count their length separately
            layer.cumulative_length = keys.shape[2]
    mark_compressed(layer, keys.shape[2], processed)


def mark_compressed(layer, context_length: int, processed: int) -> None:
    """Record on a cache layer that it now holds ``context_length`` context entries of the ``processed`` positions
    it had seen (what :mod:`kvpress_compose.layer_masks` builds its mask from)."""
    setattr(layer, CONTEXT_LENGTH_ATTRIBUTE, context_length)
    setattr(layer, ORIGINAL_LENGTH_ATTRIBUTE, processed)


def compress_layer(cache: Cache, layer_idx: int, positions: torch.Tensor) -> None:
    """Keep only ``positions`` ``(batch, kv_heads, k)`` of a layer's context entries."""
    keys, values = layer_states(cache, layer_idx)
    write_layer(cache, layer_idx, gather_positions(keys, positions), gather_positions(values, positions))


def mask_evicted_entries(attention_modules, token_order: torch.Tensor, budgets: torch.Tensor) -> None:
    """Unstructured variant: hide every (row, head, position) beyond its head's budget with kvpress's head-wise
    masking (``masked_key_indices``); the cache keeps every entry, so no memory is saved.

    ``token_order`` is ``(layers, batch, kv_heads, n)`` (each head's positions by descending score) and
    ``budgets`` ``(batch, layers, kv_heads)``."""
    ranks = torch.arange(token_order.shape[-1], device=token_order.device)
    for layer_idx, module in enumerate(attention_modules):
        order = token_order[layer_idx]  # (batch, kv_heads, n)
        kept_by_rank = ranks < budgets[:, layer_idx, :, None].to(order.device)
        kept = torch.zeros_like(kept_by_rank).scatter_(-1, order, kept_by_rank)
        device = next(module.parameters()).device
        module.masked_key_indices = tuple(index.to(device) for index in (~kept).nonzero(as_tuple=True))
