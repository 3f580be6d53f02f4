"""How ComposePress attaches to a model: the decoder stack it hooks, the hooks themselves, and the uses it refuses.

:func:`language_model_of` finds the decoder stack; :class:`DecoderAttachment` holds ComposePress's hooks on it
while the press is in use; :func:`wraps_press` tells whether a kvpress press holds ours (a ``ComposedPress``,
``PrefillDecodingPress``, ...); the ``refuse_*`` and ``check_*`` functions raise, naming the cause, where a
forward would otherwise leave a context uncompressed or compressed wrongly in silence.
"""

from __future__ import annotations

import dataclasses
import weakref

from kvpress import BasePress, DecodingPress, PrefillDecodingPress
from torch import nn
from transformers import DynamicCache, PreTrainedModel, QuantizedCache

from kvpress_compose.allocation import compute_n_kept
from kvpress_compose.windowed_layers import layer_windows


class DecoderAttachment:
    """ComposePress's hooks on a decoder stack (``press``, the ComposePress they call): a pre-hook that starts a
    :class:`PrefillRun` for a fresh prefill, a forward hook that finishes and compresses it when the forward
    returns, and one run however the forward ends that drops it.

    They last while the press's kvpress forward hooks are registered: the press's own ``with press(model):``
    removes them on exit. A wrapper (kvpress's ``ComposedPress``, ``PrefillDecodingPress``, ...) never tells its
    presses that it exited, so at its first forward the pre-hook watches the wrapper's forward hook and removes
    ours when that hook goes (a finalizer on it); if the block saw no forward, the pre-hook removes ours at the
    next forward, which it leaves untouched."""

    def __init__(self, press: BasePress, language_model: nn.Module, attention_modules: list[nn.Module],
                 model_name: str = "model", model_path: str | None = None):
        self.press, self.language_model, self.attention_modules = press, language_model, attention_modules
        self.model_name = model_name  # the class of the model the press was entered on, for errors
        self.model_path = model_path  # its name_or_path, where a tokenizer can be loaded from
        config = language_model.config.get_text_config()
        self.local_span = local_attention_span(config)
        self.windows = layer_windows(config, len(attention_modules))  # None: full attention
        self.compressed = weakref.WeakSet()  # caches this press compressed while attached
        self.watched: set[int] = set()  # ids of the kvpress hooks whose removal removes ours
        self.handles = [
            language_model.register_forward_pre_hook(press._start_prefill, with_kwargs=True),
            language_model.register_forward_hook(press._finish_prefill, with_kwargs=True),
            language_model.register_forward_hook(press._end_prefill, with_kwargs=True, always_call=True),
        ]

    def press_is_hooked(self) -> bool:
        """Whether a kvpress forward hook that reaches the press (itself, or a press wrapping it) is registered
        on the attention modules; the wrappers' hooks are watched so that their removal removes ours."""
        hooks = [hook for module in self.attention_modules for hook in module._forward_hooks.values()
                 if wraps_press(getattr(hook, "__self__", None), self.press)]
        for hook in hooks:
            if getattr(hook, "__self__", None) is not self.press and id(hook) not in self.watched:
                self.watched.add(id(hook))
                weakref.finalize(hook, self.press._detach_from, self)
        return bool(hooks)

    def hands_later_tokens_to_decoding(self) -> bool:
        """Whether the press is reached through a kvpress ``PrefillDecodingPress`` or ``DecodingPress``, which
        hand forwards into a non-empty cache (a question, generated tokens) to their decoding press."""
        return any(isinstance(getattr(hook, "__self__", None), (PrefillDecodingPress, DecodingPress))
                   and wraps_press(hook.__self__, self.press)
                   for module in self.attention_modules for hook in module._forward_hooks.values())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def wraps_press(outer, press: BasePress) -> bool:
    """Whether ``outer`` is ``press`` or a kvpress press holding it in any field, however deep (``presses`` of a
    ComposedPress, ``press``, ``base_press``, ``prefilling_press``, ``decoding_press``, ...)."""
    if outer is press:
        return True
    if not isinstance(outer, BasePress) or not dataclasses.is_dataclass(outer):
        return False
    for field_ in dataclasses.fields(outer):
        value = getattr(outer, field_.name, None)
        for child in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(child, BasePress) and wraps_press(child, press):
                return True
    return False


def refuse_if_in_use(attachment: DecoderAttachment | None) -> None:
    """A press entered while a block that uses it (its own or a wrapper's) is still open would take over that
    block's hooks: refused."""
    if attachment is not None and attachment.press_is_hooked():
        raise RuntimeError(
            f"this ComposePress is already in use on a {attachment.model_name} (a `with press(model)` block, or "
            "the block of a press wrapping it, has not exited): a press serves one block on one model at a "
            "time. Exit that block first, or use another press (copy.deepcopy(press)) for the other model, "
            "block or thread"
        )


def refuse_unstructured(model: PreTrainedModel, attachment: DecoderAttachment | None = None,
                        compressed_layers: list[int] = ()) -> None:
    """``structured=False`` masks through kvpress's head-wise masking: it does not patch eager attention, and it
    indexes a layer's stored keys, which a sliding cache shifts once tokens pass the window."""
    if model is not None and model.config._attn_implementation == "eager":
        raise ValueError(
            "structured=False relies on kvpress's head-wise masking, which does not patch eager attention: "
            "load the model with attn_implementation='sdpa' (or flash_attention_2)"
        )
    if attachment is not None and any(attachment.windows[layer_idx] for layer_idx in compressed_layers):
        raise ValueError(
            "structured=False on a model whose every layer is windowed: kvpress's head-wise masking indexes a "
            "layer's stored keys, which a sliding cache shifts once tokens pass the window. Use structured=True"
        )


def refuse_uncompressed_context(attachment: DecoderAttachment, cache, arguments: dict) -> None:
    """A forward into a non-empty cache is a question or generated tokens, never compressed: what would leave
    context uncompressed (a second chunk of it, or a prefill into a filled cache) is refused."""
    refuse_more_context(attachment, cache, arguments)
    if not attachment.hands_later_tokens_to_decoding():
        refuse_non_empty_cache(cache, arguments)


def refuse_more_context(attachment: DecoderAttachment, cache, arguments: dict) -> None:
    """A forward of several tokens into a cache this press compressed while attached would be a second chunk of
    the context (a chunked prefill): ComposePress scored and compressed only the first."""
    reference = arguments.get("input_ids")
    reference = reference if reference is not None else arguments.get("inputs_embeds")
    if reference is not None and reference.shape[1] > 1 and cache in attachment.compressed:
        raise ValueError(
            f"a forward of {reference.shape[1]} tokens into a cache ComposePress has compressed, while the press is "
            "in use: ComposePress compresses the context of one prefill forward, so a context fed in chunks would "
            "be compressed only up to its first chunk. Feed the whole context in one forward; run later tokens "
            "(a question) after the `with press(model)` block, or one at a time"
        )


def refuse_non_empty_cache(cache, arguments: dict) -> None:
    """A prefill of several tokens into a cache that already holds some would not be compressed (as with kvpress's
    presses, only a prefill into an empty cache is): refused, rather than left uncompressed in silence."""
    reference = arguments.get("input_ids")
    reference = reference if reference is not None else arguments.get("inputs_embeds")
    if reference is not None and reference.shape[1] > 1:
        raise ValueError(
            f"a forward of {reference.shape[1]} tokens into a cache that already holds {cache.get_seq_length()} "
            "tokens, inside `with press(model)`: ComposePress compresses a prefill into an empty cache, so neither "
            "these tokens nor the cached ones would be compressed. Prefill the whole context in one forward into "
            "an empty cache (DynamicCache()) inside the block; run later tokens (a question, a next turn) after the "
            "block, with positions continuing from the original length"
        )


def refuse_static_cache(cache) -> None:
    """Compression writes each layer's kept entries as a shorter tensor: a cache of fixed-size layers cannot hold
    them."""
    if cache is None or isinstance(cache, (DynamicCache, QuantizedCache)):
        return
    layer_types = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
    if any("Static" in name for name in layer_types) or "Static" in type(cache).__name__:
        raise ValueError(
            f"ComposePress compresses a DynamicCache or QuantizedCache, got a {type(cache).__name__} (layers "
            f"{layer_types}), whose layers have a fixed length: pass past_key_values=DynamicCache() (with "
            "model.generate, leave cache_implementation unset)"
        )


def check_context_length(inputs, min_tokens_per_layer: int) -> None:
    """Every layer keeps at least ``min_tokens_per_layer`` tokens of every row: refused before the forward when
    a row's context is shorter, worded by its cause (a short context, or a row that is mostly padding)."""
    row_lengths = inputs.valid.sum(dim=1)
    short_row = int(row_lengths.argmin())
    n_tokens = int(row_lengths[short_row])
    if n_tokens >= min_tokens_per_layer:
        return
    if n_tokens == inputs.length:
        raise ValueError(
            f"the context has {n_tokens} tokens, fewer than min_tokens_per_layer={min_tokens_per_layer} that every "
            "layer keeps: lower min_tokens_per_layer or give a longer context"
        )
    raise ValueError(
        f"row {short_row} of the batch has {n_tokens} context tokens (the rest is padding), fewer than "
        f"min_tokens_per_layer={min_tokens_per_layer}"
    )


def check_sinks_fit(inputs, n_sink: int, n_layers: int, compression_ratio: float) -> None:
    """The sinks (the first ``n_sink`` tokens of each row, kept in every head of every compressed layer) fit in
    the budget ``compression_ratio`` leaves of the ``n_layers`` compressed layers: refused before the forward
    where they alone exceed it (the budget would go to the first layers' sinks and leave later layers none)."""
    if n_sink == 0:
        return
    sinks = int(inputs.valid.sum(dim=1).clamp(max=n_sink).max())  # per layer and head: a row keeps its own
    budget = compute_n_kept(n_layers * inputs.length, compression_ratio)
    if n_layers * sinks > budget:
        raise ValueError(
            f"n_sink={n_sink} keeps {n_layers * sinks} entries per KV head ({sinks} in each of the {n_layers} "
            f"compressed layers), more than the budget of {budget} that compression_ratio={compression_ratio} "
            f"leaves of {n_layers} x {inputs.length} context entries: lower n_sink or compression_ratio, or give a "
            "longer context"
        )


def check_token_ids(replay_prompt_ids: tuple[int, ...] | None, model: PreTrainedModel) -> None:
    """``replay_prompt_ids`` are token ids of ``model``'s vocabulary: refused when the press is entered, before
    any forward (an id past the embedding table fails deep inside torch)."""
    if replay_prompt_ids is None:
        return
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocabulary = getattr(embeddings, "num_embeddings", None) or model.config.get_text_config().vocab_size
    outside = sorted({token for token in replay_prompt_ids if token >= vocabulary})
    if outside:
        raise ValueError(
            f"replay_prompt_ids hold {outside}, outside the model's vocabulary of {vocabulary} token ids (0 to "
            f"{vocabulary - 1}): give ids of this model's tokenizer"
        )


def language_model_of(model: PreTrainedModel) -> nn.Module:
    """The decoder stack whose layers have ``self_attn`` modules, with a rotary embedding; clear error if none."""
    inner = getattr(model, "model", None)
    language_model = getattr(inner, "language_model", inner)
    layers = getattr(language_model, "layers", None)
    if inner is None and getattr(model, "layers", None) is not None:
        raise ValueError(
            f"pass the whole model (e.g. LlamaForCausalLM), not its decoder stack {type(model).__name__}: "
            "use `with press(model):` around `model.model(...)`"
        )
    if layers is None or len(layers) == 0 or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(
            f"{type(model).__name__} is not supported: ComposePress needs a RoPE decoder whose layers have "
            "self_attn (Llama, Mistral, Qwen2, Qwen3, Phi3)"
        )
    if getattr(language_model, "rotary_emb", None) is None:
        raise ValueError(f"{type(model).__name__} is not supported: ComposePress needs a rotary (RoPE) model")
    return language_model


def local_attention_span(config) -> int | None:
    """The most keys back a query can see where attention is local: the sliding window (Mistral, Qwen2) or
    the attention chunk (Llama 4), whichever is set and smaller; None for full attention."""
    spans = [getattr(config, name, None) for name in ("sliding_window", "attention_chunk_size")]
    spans = [span for span in spans if span]
    return min(spans) if spans else None

