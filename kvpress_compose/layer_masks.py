"""Attention on a compressed cache: each layer's own mask, and the model's windowed layers.

transformers builds one attention mask for all layers, sized from layer 0's cache length. After ComposePress
each layer keeps its own number of context entries, so that mask is wrong for every other layer (4.57 slices
it from the left and lets question tokens see future tokens; 5.x crashes on the size mismatch).

A forward pre-hook on every attention module rebuilds that layer's mask, right-aligned to its own cache:
all kept context entries are visible, and the tokens that came after the context (question, answer) keep
their causal structure and any padding the original mask gave them. A pre-hook on the decoder first rewrites
a 2D padding mask given at the original length (``generate`` passes one): transformers would read its columns
from the left, so the later tokens' padding is taken from its right end instead. The hooks act only on caches
that ComposePress compressed (their layers carry ``CONTEXT_LENGTH_ATTRIBUTE``), for eager, sdpa and flash.

Positions: a compressed cache holds fewer entries than the positions it processed, so positions counted from its
length (what ``model(...)`` does without ``position_ids``, and ``model.generate`` given the whole conversation) fall
on positions already cached: such a forward is named, with the positions that would be right
(:func:`warn_if_positions_repeat`); assisted generation, which crops a cache by position, is refused
(:func:`refuse_assisted_generation`).

Windowed layers (sliding window or attention chunk) are read from the model's config (:func:`layer_windows`,
:func:`local_attention_span`); a model is hybrid (:func:`is_hybrid`, what ``layer_allocation="auto"`` reads) where
they sit beside full-attention layers. Hybrid models (Gemma 3: five sliding layers to one full; Qwen2
with ``max_window_layers``; Llama 4's chunked layers) mix full-attention layers with windowed ones, whose cache
transformers keeps at most one window long (``DynamicSlidingWindowLayer``: ``window - 1`` entries). ComposePress
compresses the full-attention layers only (:func:`layers_to_compress`) and leaves every windowed layer as the
model's own cache keeps it, as kvpress does on Gemma 3. A model whose every layer is windowed (Mistral's
``sliding_window``) has nothing else to compress: while the context fits the window (the cache holds all of it)
its layers are compressed as full layers, and the entries they keep leave later queries' view as the model's
window moves past them (:func:`window_visible`); a longer context is refused. A hybrid model's windowed layers
are left uncompressed and keep the original indices, so the 2D mask stays as given and the tokens after the context take
their padding and indices from the original context; a windowed layer compressed as a full one gets a per-head
mask that hides each kept entry once the query's window has passed its original index.
"""

from __future__ import annotations

import logging
import sys
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from kvpress_compose.attention_scores import causally_visible
from kvpress_compose.compression import CONTEXT_LENGTH_ATTRIBUTE, ORIGINAL_LENGTH_ATTRIBUTE, processed_positions
from kvpress_compose.prefill_run import fed_tokens

HOOK_ATTRIBUTE = "_compose_layer_mask_hook"
LATER_PADDING_ATTRIBUTE = "compose_later_padding"  # on a partly compressed cache: (batch, later) 2D padding, or None
logger = logging.getLogger(__name__)


def install_layer_mask_hooks(language_model: nn.Module, attention_modules: list[nn.Module]) -> None:
    """Register the mask pre-hooks once per module (they stay: the question pass runs after the press)."""
    hooks = [(language_model, decoder_mask_pre_hook)] + [(module, layer_mask_pre_hook) for module in attention_modules]
    for module, hook in hooks:
        if getattr(module, HOOK_ATTRIBUTE, None) is None:
            setattr(module, HOOK_ATTRIBUTE, module.register_forward_pre_hook(hook, with_kwargs=True))


def compressed_context_length(layers, layer_idx: int) -> int | None:
    """The context entries ComposePress left in cache layer ``layer_idx``, or None where it did not compress
    this cache. A cache cropped (or reset) below any layer's compressed context no longer holds what was
    compressed: every layer's marker is cleared, and the cache is treated as one we never compressed (crop and
    reset act on every layer, so checking the asked one finds it)."""
    if not layers or layer_idx >= len(layers):
        return None
    context_length = getattr(layers[layer_idx], CONTEXT_LENGTH_ATTRIBUTE, None)
    if context_length is not None and layers[layer_idx].get_seq_length() < context_length:
        for layer in layers:
            for name in (CONTEXT_LENGTH_ATTRIBUTE, ORIGINAL_LENGTH_ATTRIBUTE):
                if hasattr(layer, name):
                    delattr(layer, name)
        return None
    return context_length


def decoder_mask_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """On a compressed cache, make a 2D padding mask ``(layer-0 context) + later tokens`` long, its later part
    taken from the right end of the given mask (which may span the original context). On a cache with windowed
    layers, whose masks read the 2D mask at the original indices, see :func:`stash_later_padding` instead."""
    cache = kwargs.get("past_key_values")
    layers = getattr(cache, "layers", None)
    if layers and any(compressed_context_length(layers, layer_idx) is not None for layer_idx in range(len(layers))):
        refuse_assisted_generation("on a cache ComposePress compressed")
    if partly_compressed(cache, layers) or any(hasattr(layer, WINDOW_ATTRIBUTE) for layer in layers or []):
        return stash_later_padding(cache, layers, args, kwargs)
    layer0_context = compressed_context_length(layers, 0)
    if layer0_context is None:
        return None
    warn_if_positions_repeat(cache, layers[0], layer0_context, kwargs)
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return None
    inputs = fed_tokens(kwargs)
    later = layers[0].get_seq_length() - layer0_context + inputs.shape[1]  # tokens after the context, new ones too
    if mask.shape[1] < later:
        raise ValueError(f"attention_mask has {mask.shape[1]} columns, fewer than the {later} tokens after the context")
    context = mask.new_ones(mask.shape[0], layer0_context)  # kept context entries are never padding
    kwargs["attention_mask"] = torch.cat([context, mask[:, mask.shape[1] - later :]], dim=1)
    return args, kwargs


def layer_mask_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    cache = kwargs.get("past_key_values")
    layers = getattr(cache, "layers", None)
    context_length = compressed_context_length(layers, module.layer_idx)
    if context_length is None:
        return None
    cached = layers[module.layer_idx].get_seq_length()
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    q_len = hidden_states.shape[1]
    mask = kwargs.get("attention_mask")
    implementation = module.config._attn_implementation
    if hasattr(layers[module.layer_idx], WINDOW_ATTRIBUTE):  # a windowed layer compressed as a full one
        return windowed_layer_mask(module, args, kwargs, layers, context_length, hidden_states)
    if "flash" in implementation:
        # flash attention aligns the causal mask bottom-right by itself; a 2D padding mask sized for layer 0
        # would not fit, and kept context entries are never padding
        kwargs["attention_mask"] = None
        return args, kwargs
    if mask is None and q_len == 1:
        return None  # a single query sees the whole cache
    layer0_context = getattr(layers[0], CONTEXT_LENGTH_ATTRIBUTE, context_length)
    later_padding = getattr(cache, LATER_PADDING_ATTRIBUTE, None) if partly_compressed(cache, layers) else None
    if later_padding is not None:  # a hybrid model's cache: the 4D mask read the 2D one at other columns
        mask = None
    visible = visible_keys(mask, context_length, layer0_context, cached, q_len, hidden_states)
    if later_padding is not None:  # the later tokens' padding, from the right end of the 2D mask
        visible[..., context_length:] &= later_padding[:, None, None, -(cached - context_length + q_len):]
    kwargs["attention_mask"] = as_implementation_mask(visible, implementation, hidden_states.dtype)
    return args, kwargs


def as_implementation_mask(visible: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """``visible`` (booleans) as the attention implementation takes it: eager adds an additive mask to the
    logits (0 where visible, the dtype's minimum elsewhere); sdpa takes the booleans."""
    if implementation != "eager":
        return visible
    additive = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return additive.masked_fill_(~visible, torch.finfo(dtype).min)


def visible_keys(mask, context_length, layer0_context, cached, q_len, hidden_states) -> torch.Tensor:
    """``(batch, 1, q_len, cached + q_len)`` booleans: which of this layer's keys each new query sees."""
    after_context = cached - context_length  # tokens already cached after the context
    queries = range(after_context, after_context + q_len)
    visible_later = causally_visible(queries, range(after_context + q_len), 0, hidden_states.device)
    batch = hidden_states.shape[0]
    visible_later = visible_later[None, None].expand(batch, 1, -1, -1)
    if mask is not None and mask.dim() == 4 and mask.shape[-1] == layer0_context + after_context + q_len:
        incoming = mask[..., layer0_context:] if mask.dtype == torch.bool else mask[..., layer0_context:] == 0
        visible_later = visible_later & incoming[..., -q_len:, :]
    return torch.cat([visible_later.new_ones(batch, 1, q_len, context_length), visible_later], dim=-1)


def partly_compressed(cache, layers) -> bool:
    """Whether ComposePress compressed some layers of ``cache`` and left others (a hybrid model's windowed
    layers, which keep the original context's indices)."""
    if not layers:
        return False
    compressed = [compressed_context_length(layers, layer_idx) is not None for layer_idx in range(len(layers))]
    return any(compressed) and not all(compressed)


def stash_later_padding(cache, layers, args: tuple, kwargs: dict):
    """On a partly compressed cache, or one with windowed layers, the 2D padding mask stays as given (windowed
    layers' masks read its columns at the original indices), so the tokens after the context take their padding
    from its right end, kept on the cache for :func:`layer_mask_pre_hook`; None where no 2D mask is given.
    Without ``cache_position``, transformers would count the new tokens' indices from layer 0's length, which
    may be compressed: they are counted from the original context instead (windowed masks and, without
    ``position_ids``, positions are computed from them)."""
    inputs = fed_tokens(kwargs)
    inputs = args[0] if inputs is None and args else inputs  # input_ids given positionally
    if kwargs.get("cache_position") is None and inputs is not None:
        seen = original_length(layers)
        kwargs["cache_position"] = torch.arange(seen, seen + inputs.shape[1], device=inputs.device)
    mask = kwargs.get("attention_mask")
    later_padding = None
    if mask is not None and mask.dim() == 2:
        layer_idx = next(i for i in range(len(layers)) if hasattr(layers[i], CONTEXT_LENGTH_ATTRIBUTE))
        later = layers[layer_idx].get_seq_length() - getattr(layers[layer_idx], CONTEXT_LENGTH_ATTRIBUTE)
        later += inputs.shape[1]
        if mask.shape[1] < later:
            raise ValueError(f"attention_mask has {mask.shape[1]} columns, fewer than the {later} tokens after the "
                             "context")
        later_padding = mask[:, mask.shape[1] - later :].bool()
    setattr(cache, LATER_PADDING_ATTRIBUTE, later_padding)
    return args, kwargs


def windowed_layer_mask(module, args, kwargs, layers, context_length: int, hidden_states):
    """The mask of a windowed layer compressed as a full one: per KV head (kept positions differ by head), each
    kept entry visible while the query's window covers its original index."""
    implementation = module.config._attn_implementation
    if "flash" in implementation:
        raise ValueError(
            "a windowed layer compressed by ComposePress needs a per-head mask, which flash attention does not "
            "take: load the model with attn_implementation='sdpa' or 'eager'"
        )
    layer = layers[module.layer_idx]
    q_len = hidden_states.shape[1]
    after = layer.get_seq_length() - context_length  # tokens already cached after the context
    later_visible = causally_visible(range(after, after + q_len), range(after + q_len), 0, hidden_states.device)
    later_visible = later_visible[None, None]
    later_padding = getattr(kwargs.get("past_key_values"), LATER_PADDING_ATTRIBUTE, None)
    if later_padding is not None:
        later_visible = later_visible & later_padding[:, None, None, -(after + q_len):].to(later_visible.device)
    visible = windowed_visible_keys(layer, context_length, q_len, later_visible, hidden_states.device)
    group = module.config.num_attention_heads // visible.shape[1]
    visible = visible.repeat_interleave(group, dim=1)  # (batch, q_heads, q_len, keys)
    kwargs["attention_mask"] = as_implementation_mask(visible, implementation, hidden_states.dtype)
    return args, kwargs


def original_length(layers) -> int:
    """Tokens the cache has seen, the original context's length included: an uncompressed layer's length, else
    (every layer windowed and compressed) the context's recorded length plus the tokens after it."""
    for layer in layers:
        if not hasattr(layer, CONTEXT_LENGTH_ATTRIBUTE):
            return layer.get_seq_length()
    layer = layers[0]
    return getattr(layer, WINDOW_ATTRIBUTE).n_context + layer.get_seq_length() - getattr(layer, CONTEXT_LENGTH_ATTRIBUTE)


# -- positions of the tokens fed after a compressed context ----------------------------------------------------

WARNED: weakref.WeakSet = weakref.WeakSet()  # caches already warned about (once each: every later step repeats it)


def first_position(kwargs: dict, cached: int) -> int:
    """The position of the forward's first token (of its furthest row): from ``position_ids``, else
    ``cache_position``, else counted from the cache's length as transformers does."""
    position_ids, cache_position = kwargs.get("position_ids"), kwargs.get("cache_position")
    if position_ids is not None and position_ids.numel() > 0:
        return int(position_ids[..., 0].max())
    if cache_position is not None and cache_position.numel() > 0:
        return int(cache_position.reshape(-1)[0])
    return cached


def warn_if_positions_repeat(cache, layer0, layer0_context: int, kwargs: dict) -> None:
    """Warn (once per cache) when a forward into a compressed cache starts before the positions it processed."""
    if getattr(layer0, ORIGINAL_LENGTH_ATTRIBUTE, None) is None:
        return
    cached, processed = layer0.get_seq_length(), processed_positions(layer0)
    first = first_position(kwargs, cached)
    if first >= processed:
        return
    try:
        if cache in WARNED:
            return
        WARNED.add(cache)
    except TypeError:  # not weak-referenceable
        pass
    inputs = fed_tokens(kwargs)
    n_new = inputs.shape[1] if inputs is not None else 0
    logger.warning(
        f"ComposePress: {n_new} tokens at positions from {first} into a compressed cache that has already "
        f"processed {processed} positions (layer 0 holds {cached} entries, {layer0_context} of them its compressed "
        f"context): positions counted from the compressed length repeat cached positions, so cached tokens are "
        f"fed again or new tokens get earlier positions. Feed only the new tokens, with position_ids (or "
        f"cache_position) from {processed}; for model.generate on the whole conversation, pass "
        f"cache_position=torch.arange({processed}, {first + n_new})"
    )


def called_from_assisted_generation() -> bool:
    """Whether this forward runs inside transformers' assisted generation (``model.generate`` with
    ``prompt_lookup_num_tokens`` or ``assistant_model``), read from the call stack: a forward is not told."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_assisted_decoding" and "transformers" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def refuse_assisted_generation(where: str) -> None:
    """Assisted generation verifies candidate tokens in one forward, then crops the rejected ones from the cache
    by position (``cache.crop(positions)``). A compressed cache holds fewer entries than the positions it has
    processed, so that crop removes nothing and the rejected candidates stay, changing every later token: refused,
    before the forward, naming the cause (``where``: on a compressed cache, or inside a press's block)."""
    if called_from_assisted_generation():
        raise ValueError(
            f"model.generate with prompt_lookup_num_tokens or assistant_model (assisted generation) {where}: "
            "transformers verifies the candidate tokens in one forward and then crops the rejected ones from the "
            "cache by position, and a compressed cache holds fewer entries than the positions it has processed, so "
            "that crop removes nothing and the rejected candidates would stay in the cache and change the tokens. "
            "Generate without prompt_lookup_num_tokens and assistant_model (greedy or sampling works)"
        )


# -- windowed layers (sliding window or attention chunk): read from the config, whether a model is hybrid, which
# layers ComposePress compresses, and how a windowed layer it compressed hides kept entries once the window has
# passed them ------------------------------------------------------------------------------------------------

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


def is_hybrid(windows: list[LayerWindow | None]) -> bool:
    """Whether full-attention layers sit beside windowed ones (what ``layer_allocation="auto"`` reads)."""
    return any(window is None for window in windows) and any(window is not None for window in windows)


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
