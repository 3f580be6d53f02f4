"""How ComposePress attaches to a model: the decoder stack it hooks, the hooks themselves, and the uses it refuses.

:func:`language_model_of` finds the decoder stack; :class:`DecoderAttachment` holds ComposePress's hooks on it
while the press is in use, and the prefill under way; :func:`wraps_press` tells whether a kvpress press holds ours
(a ``ComposedPress``, ``PrefillDecodingPress``, ...); the ``refuse_*`` and ``check_*`` functions raise, naming the
cause, where a forward would otherwise leave a context uncompressed or compressed wrongly in silence.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Protocol

from kvpress import BasePress, DecodingPress, PrefillDecodingPress
from torch import nn
from transformers import DynamicCache, PreTrainedModel, QuantizedCache

from kvpress_compose.compression import compute_n_kept
from kvpress_compose.layer_masks import layer_windows, local_attention_span
from kvpress_compose.prefill_run import SCORED, Decoder, PrefillRun, decoder_arguments, fed_tokens
from kvpress_compose.query_sources import QuerySource

START_LOCK = threading.Lock()  # one thread at a time checks for, and starts, a prefill


class PrefillPress(Protocol):
    """What the attachment asks of the press it serves (ComposePress)."""

    def prefill_for(self, attachment: DecoderAttachment, arguments: dict,
                    fresh: bool) -> tuple[PrefillRun, QuerySource] | None:
        """The run and source of a prefill starting with the decoder call ``arguments`` (``fresh``: into an empty
        cache), or None where nothing is to be compressed; raises where the call is refused."""

    def compress_prefill(self, attachment: DecoderAttachment, run: PrefillRun, source: QuerySource) -> None:
        """Compress the cache of ``run``, every layer of which has been scored."""


class DecoderAttachment:
    """ComposePress's hooks on a decoder stack while the press is in use, and the prefill under way.

    A pre-hook starts a :class:`PrefillRun` (and its query source) for a fresh prefill, a forward hook has the
    press compress it when the decoder call returns, and one hook run however the forward ends drops it. The
    replay pass re-enters the decoder inside the prefill's call: :meth:`current_run` is the one guard against
    that re-entry and against another thread, which every hook, the press's per-layer one included, goes through.

    The hooks last while the press's kvpress forward hooks are registered: the press's own ``with press(model):``
    removes them on exit. A wrapper (kvpress's ``ComposedPress``, ``PrefillDecodingPress``, ...) never tells its
    presses that it exited, so at its first forward the pre-hook watches the wrapper's forward hook and removes
    ours when that hook goes (a finalizer on it); if the block saw no forward, the pre-hook removes ours at the
    next forward, which it leaves untouched. A removed attachment says so (``removed``); the press drops it."""

    def __init__(self, press: PrefillPress, language_model: nn.Module, attention_modules: list[nn.Module],
                 model_name: str = "model", model_path: str | None = None):
        self.press = press
        self.model_name = model_name  # the class of the model the press was entered on, for errors
        self.model_path = model_path  # its name_or_path, where a tokenizer can be loaded from
        config = language_model.config.get_text_config()
        self.decoder = Decoder(language_model, attention_modules, local_attention_span(config))
        self.windows = layer_windows(config, len(attention_modules))  # None: full attention
        self.compressed = weakref.WeakSet()  # caches this press compressed while attached
        self.watched: set[int] = set()  # ids of the kvpress hooks whose removal removes ours
        self.removed = False
        self.run: PrefillRun | None = None  # the prefill under way
        self.source: QuerySource | None = None  # the query source scoring it
        self.nested_calls = 0  # decoder calls nested in the prefill's own (replay passes) not yet ended
        self.handles = [
            language_model.register_forward_pre_hook(self.before_forward, with_kwargs=True),
            language_model.register_forward_hook(self.after_forward, with_kwargs=True),
            language_model.register_forward_hook(self.forward_ended, with_kwargs=True, always_call=True),
        ]

    # -- the prefill under way ---------------------------------------------------------------------------------

    def current_run(self, phase: str | None = None) -> PrefillRun | None:
        """The prefill under way, if this thread's, not inside a nested decoder call (the replay's), and in
        ``phase`` where one is given; else None."""
        run = self.run
        if run is None or run.thread != threading.get_ident() or self.nested_calls > 0:
            return None
        return run if phase is None or run.phase == phase else None

    def end_run(self) -> None:
        if self.run is not None:
            self.run.close()
        self.run = self.source = None
        self.nested_calls = 0

    def before_forward(self, decoder: nn.Module, args: tuple, kwargs: dict) -> None:
        """Decoder pre-hook: a fresh prefill starts a run (the press decides whether, and what it refuses)."""
        if not self.press_is_hooked():  # the press was used by a wrapper that has exited
            self.remove()
            return
        with START_LOCK:
            arguments = decoder_arguments(decoder, args, kwargs)
            if self.run is not None and self.run.thread != threading.get_ident():
                raise RuntimeError(
                    "this ComposePress is compressing a prefill in another thread: a press serves one forward at a "
                    "time. Give each thread its own model and press (copy.deepcopy), or run the forwards one after "
                    "another"
                )
            cache = arguments.get("past_key_values")
            fresh = cache is None or cache.get_seq_length() == 0
            if self.run is not None:
                if not fresh:  # a replay pass (ours or an outer press's) re-entering the decoder
                    self.nested_calls += 1
                    return
                self.end_run()  # left by a forward that ended without its hooks (KeyboardInterrupt)
            started = self.press.prefill_for(self, arguments, fresh)
            if started is not None:
                self.run, self.source = started

    def after_forward(self, decoder: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Decoder forward hook, run only when the decoder call returns normally: when the call that started the
        prefill has every layer scored, the press compresses it (the replay pass runs then, once the prefill's
        own activations are freed)."""
        run = self.current_run(SCORED)
        if run is not None:
            self.press.compress_prefill(self, run, self.source)
            self.compressed.add(run.cache)

    def forward_ended(self, decoder: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Decoder forward hook, run however the forward ends (``always_call``): the prefill's state goes when
        the decoder call that started it ends."""
        if self.run is None or self.run.thread != threading.get_ident():  # nothing here (another thread's)
            return
        if self.nested_calls > 0:  # a replay pass's nested call
            self.nested_calls -= 1
            return
        self.end_run()

    # -- the press's hooks, and the wrappers holding it --------------------------------------------------------

    def press_is_hooked(self) -> bool:
        """Whether a kvpress forward hook that reaches the press (itself, or a press wrapping it) is registered
        on the attention modules; the wrappers' hooks are watched so that their removal removes ours."""
        hooks = [hook for module in self.decoder.attention_modules for hook in module._forward_hooks.values()
                 if wraps_press(getattr(hook, "__self__", None), self.press)]
        for hook in hooks:
            if getattr(hook, "__self__", None) is not self.press and id(hook) not in self.watched:
                self.watched.add(id(hook))
                weakref.finalize(hook, self.remove)
        return bool(hooks)

    def hands_later_tokens_to_decoding(self) -> bool:
        """Whether the press is reached through a kvpress ``PrefillDecodingPress`` or ``DecodingPress``, which
        hand forwards into a non-empty cache (a question, generated tokens) to their decoding press."""
        return any(isinstance(getattr(hook, "__self__", None), (PrefillDecodingPress, DecodingPress))
                   and wraps_press(hook.__self__, self.press)
                   for module in self.decoder.attention_modules for hook in module._forward_hooks.values())

    def remove(self) -> None:
        """Remove our hooks and drop the prefill under way; the press drops this attachment."""
        self.end_run()
        for handle in self.handles:
            handle.remove()
        self.removed = True


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
    reference = fed_tokens(arguments)
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
    reference = fed_tokens(arguments)
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

