"""Layers whose attention is local (sliding window or attention chunk), and which layers ComposePress compresses.

Hybrid models (Gemma 3: five sliding layers to one full; Qwen2 with ``max_window_layers``; Llama 4's chunked
layers) mix full-attention layers with windowed ones, whose cache transformers keeps at most one window long
(``DynamicSlidingWindowLayer``: ``window - 1`` entries). ComposePress compresses the full-attention layers only
and leaves every windowed layer as the model's own cache keeps it, as kvpress does on Gemma 3. A model whose
every layer is windowed (Mistral's ``sliding_window``) has nothing else to compress: while the context fits the
window (the cache holds all of it) its layers are compressed as full layers, and the entries they keep leave
later queries' view as the model's window moves past them (:func:`window_visible`); a longer context is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SLIDING, CHUNKED = "sliding_attention", "chunked_attention"


@dataclass(frozen=True)
class LayerWindow:
    """A windowed layer's attention: ``kind`` SLIDING (a query at index q sees keys j with ``q - span < j <= q``)
    or CHUNKED (keys in the query's chunk of ``span``, counted from each row's first token)."""

    kind: str
    span: int


def configured_spans(config) -> tuple[int | None, int | None]:
    """The model's ``sliding_window`` and ``attention_chunk_size`` (None where unset): the one place the window
    is read from the config."""
    return getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None)


def local_attention_span(config) -> int | None:
    """The most keys back a query can see where attention is local: the sliding window (Mistral, Qwen2) or
    the attention chunk (Llama 4), whichever is set and smaller; None for full attention."""
    spans = [span for span in configured_spans(config) if span]
    return min(spans) if spans else None


def layer_windows(config, n_layers: int) -> list[LayerWindow | None]:
    """Each layer's window, None for full attention: from ``config.layer_types`` where the config has them, else
    every layer windowed where ``sliding_window`` or ``attention_chunk_size`` is set (as transformers'
    ``DynamicCache(config=...)`` reads them)."""
    sliding, chunk = configured_spans(config)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        if sliding:
            return [LayerWindow(SLIDING, sliding)] * n_layers
        return [LayerWindow(CHUNKED, chunk)] * n_layers if chunk else [None] * n_layers
    windows = []
    for layer_type in list(layer_types)[:n_layers]:
        if layer_type == SLIDING and sliding:
            windows.append(LayerWindow(SLIDING, sliding))
        elif layer_type == CHUNKED and (chunk or sliding):
            windows.append(LayerWindow(CHUNKED, chunk or sliding))
        else:
            windows.append(None)
    return windows


def layers_to_compress(windows: list[LayerWindow | None], context_length: int) -> list[int]:
    """The layers ComposePress compresses for a context of ``context_length`` tokens (padding included): the
    full-attention ones; where every layer is windowed, all of them while the context fits the smallest window
    (``span - 1`` tokens, what a sliding cache layer holds), else a clear error."""
    full = [layer_idx for layer_idx, window in enumerate(windows) if window is None]
    if full:
        return full
    span = min(window.span for window in windows)
    if context_length >= span:
        kind = "sliding window" if windows[0].kind == SLIDING else "attention chunk"
        raise ValueError(
            f"context of {context_length} tokens does not fit the model's {kind} ({span} tokens, of which a cache "
            f"keeps {span - 1}), and every layer of this model is windowed: ComposePress compresses full-attention "
            "layers, and a layer compressed as one while the context fits its window. A longer context leaves "
            "nothing to compress: its layers attend to the last window only, which their cache already bounds "
            "(use a shorter context, or no press)"
        )
    return list(range(len(windows)))


def window_visible(window: LayerWindow, query_index: torch.Tensor, key_index: torch.Tensor,
                   row_start: torch.Tensor) -> torch.Tensor:
    """Where a query at sequence index ``query_index`` may see a key at ``key_index`` under ``window``
    (broadcast together; indices count padding, as transformers' masks do), causality aside. ``row_start``
    (broadcastable): each row's first real token, from which CHUNKED counts its chunks."""
    if window.kind == SLIDING:
        return key_index > query_index - window.span
    return torch.div(key_index - row_start, window.span, rounding_mode="floor") == torch.div(
        query_index - row_start, window.span, rounding_mode="floor")


WINDOW_ATTRIBUTE = "compose_window"  # on a windowed cache layer ComposePress compressed: its CompressedWindow


@dataclass
class CompressedWindow:
    """What the masks of a windowed layer compressed as a full one need: its ``window``, the original sequence
    index of each kept entry ``kept`` ``(batch, kv_heads, k)`` (ascending), each row's first real token
    ``row_start`` ``(batch,)`` and the original context's length ``n_context`` (padding included)."""

    window: LayerWindow
    kept: torch.Tensor
    row_start: torch.Tensor
    n_context: int


def record_window(cache_layer, window: LayerWindow, kept: torch.Tensor, valid: torch.Tensor) -> None:
    """Record on a windowed cache layer ComposePress compressed its window, the sequence index of each kept entry
    ``kept`` ``(batch, kv_heads, k)`` (ascending) and each row's first real token, from the prefill's ``valid``
    ``(batch, n)``: :mod:`kvpress_compose.layer_masks` hides each kept entry from the queries whose window has
    passed it. Kept entries ascend, so the ones a sliding cache layer drops first (its oldest slots) are always
    out of every later query's window."""
    row_start = valid.int().argmax(dim=1)  # (batch,) left padding
    setattr(cache_layer, WINDOW_ATTRIBUTE, CompressedWindow(window, kept.cpu(), row_start.cpu(), valid.shape[1]))


def windowed_visible_keys(cache_layer, context_length: int, q_len: int, later_visible: torch.Tensor,
                          device) -> torch.Tensor:
    """``(batch, kv_heads, q_len, keys)`` booleans for the queries of a forward into a compressed windowed cache
    layer, before its update: which of the keys attention will get (the layer's stored entries, then the new
    ones) each query sees. A stored slot is a kept context entry (its original index) or a token after the
    context; a sliding cache layer has dropped its oldest slots once more than ``window - 1`` are stored.

    ``context_length`` is the kept entries per head; ``later_visible`` ``(batch or 1, 1, q_len, after + q_len)``
    the causal and padding rule of the tokens after the context (``after`` of them already cached)."""
    compressed: CompressedWindow = getattr(cache_layer, WINDOW_ATTRIBUTE)
    window, n_context = compressed.window, compressed.n_context
    kept, row_start = compressed.kept.to(device), compressed.row_start.to(device)
    batch, kv_heads, _ = kept.shape
    slots = cache_layer.get_seq_length()  # kept entries + tokens after the context, dropped ones included
    after = slots - context_length
    stored = cache_layer.keys.shape[2] if getattr(cache_layer, "is_sliding", False) else slots
    first = slots - stored  # slots a sliding layer dropped
    later_index = torch.arange(n_context, n_context + after + q_len, device=device)
    key_index = torch.cat([kept, later_index.expand(batch, kv_heads, -1)], dim=-1)[..., first:]
    query_index = torch.arange(n_context + after, n_context + after + q_len, device=device)
    visible = window_visible(window, query_index[None, None, :, None], key_index[:, :, None, :],
                             row_start[:, None, None, None])
    visible = visible & (key_index[:, :, None, :] <= query_index[None, None, :, None])
    context_visible = later_visible.new_ones(later_visible.shape[0], 1, q_len, context_length)
    return visible & torch.cat([context_visible, later_visible], dim=-1)[..., first:]  # the later tokens' padding
