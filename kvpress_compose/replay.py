"""The paper's query source: the context re-fed after itself, scored against the original keys.

:class:`ReplayCache` stands in for the real cache during the second pass: each layer attends to the
original context entries plus the re-fed tokens seen so far, which only the replay cache holds, so the real
cache never keeps them. The context is re-fed in chunks, and the re-fed keys and values of earlier chunks (as
large as the cache, by the last chunk) are kept for the later ones. Where attention is sure to run as the
unmasked split of :mod:`kvpress_compose.attention_scores` (sdpa on CPU, no padding), no mask is built (a zero-size
placeholder stands in for transformers' own), so a chunk is bounded by one layer's activations over it, not by
its O(chunk x context) mask: fewer, larger chunks, each of which re-copies the context keys. Where moreover the
KV cache outweighs one layer's activations (:func:`single_pass_saves_memory`), the context is re-fed in one
pass, and each layer's re-fed keys and values are dropped as soon as that layer has attended, so the replay
adds one layer's forward over the context instead. Either way each forward stops once the last layer's
attention has run (:class:`ReplayScored`): what follows it (that layer's output projection is part of the
attention module, but its MLP, and the final norm) is never read.
"""

from __future__ import annotations

from contextlib import contextmanager, suppress

import torch
from torch import nn
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from kvpress_compose.attention_scores import LseCapture
from kvpress_compose.compression import full_cache_bytes, layer_states
from kvpress_compose.prefill_run import PrefillInputs

MIN_REPLAY_CHUNK, MAX_REPLAY_CHUNK = 256, 2048  # fewer chunks: each re-copies the context keys


class ReplayCache(DynamicCache):
    """Serves ``source``'s first ``context_length`` entries, then the re-fed tokens so far, as the past of the
    replay pass. The re-fed tokens are stored here only, never in ``source``.

    The keys each layer attended to are kept in ``attended_keys`` until the scoring hook pops them, and
    ``replayed`` counts the re-fed tokens of the chunks already done. With ``chunk_local`` each chunk attends to
    the context and its own tokens only (KVzip's form): no earlier chunk is kept or counted.
    """

    def __init__(self, source: Cache, context_length: int, chunk_local: bool = False):
        super().__init__()
        self.chunk_local = chunk_local
        self.layers = [DynamicLayer() for _ in source.layers]  # empty: other presses' hooks index them
        self.source = source
        self.context_length = context_length
        self.replayed = 0
        self.keep_refed = not chunk_local  # False for a single pass too: no later chunk attends to them
        self.attended_keys: dict[int, torch.Tensor] = {}
        self.scored_layers = set(range(len(source.layers)))  # the layers whose attended keys are kept for scoring
        self._refed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if layer_idx in self._refed:
            past_keys, past_values = self._refed[layer_idx]
            key_states = torch.cat([past_keys, key_states], dim=2)
            value_states = torch.cat([past_values, value_states], dim=2)
        if self.keep_refed:
            self._refed[layer_idx] = (key_states, value_states)
        keys, values = (context_entries(states, self.context_length) for states in layer_states(self.source, layer_idx))
        keys = torch.cat([keys, key_states], dim=2)
        values = torch.cat([values, value_states], dim=2)
        if layer_idx in self.scored_layers:
            self.attended_keys[layer_idx] = keys
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.context_length + (0 if self.chunk_local else self.replayed)

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length() + cache_position.shape[0], 0


def context_entries(states: torch.Tensor, context_length: int) -> torch.Tensor:
    """A layer's first ``context_length`` entries ``(batch, kv_heads, context_length, head_dim)``. A sliding cache
    layer holds only the last ``window - 1`` of a longer context: the ones it dropped are zeros here, at their
    indices, which no re-fed query's window reaches (the model's sliding or chunked mask hides them)."""
    missing = context_length - states.shape[2]
    if missing <= 0:
        return states[:, :, :context_length]
    return torch.cat([states.new_zeros(*states.shape[:2], missing, states.shape[3]), states], dim=2)


class ReplayScored(Exception):
    """Raised by the hook that :func:`run_replay` puts on the last attention module, after every other hook on it
    (the scoring ones) has run: the rest of the replay forward (the last MLP, the final norm) is never read."""


def stop_replay_forward(module, args, output):
    raise ReplayScored


@contextmanager
def stopped_after(last_attention: nn.Module):
    """While open, a forward ends with :class:`ReplayScored` once ``last_attention`` and the hooks registered on it
    before (the scoring ones) have run."""
    handle = last_attention.register_forward_hook(stop_replay_forward)
    try:
        yield
    finally:
        handle.remove()


def refed_attention_mask(inputs: PrefillInputs, start: int, end: int, refed_start: int, mask_unread: bool,
                         refed: PrefillInputs | None = None):
    """The mask of re-fed tokens ``[start, end)`` (of ``refed``, by default the context itself), which attend to
    the context and the re-fed tokens from ``refed_start``: a placeholder where attention never reads it, else the
    context's own (2D) mask extended over them, or None."""
    refed = inputs if refed is None else refed
    if mask_unread:  # (batch, 1, chunk, keys) of one stored element: transformers uses a 4D mask as it is
        batch = inputs.position_ids.shape[0]
        placeholder = torch.ones((), dtype=torch.bool, device=inputs.position_ids.device)
        return placeholder.expand(batch, 1, end - start, inputs.length + end - refed_start)
    if inputs.attention_mask is None and refed.attention_mask is None:
        return None
    context_mask = inputs.attention_mask if inputs.attention_mask is not None else inputs.valid.long()
    refed_mask = refed.attention_mask if refed.attention_mask is not None else refed.valid.long()
    return torch.cat([context_mask, refed_mask[:, refed_start:end].to(context_mask.dtype)], dim=-1)


def replay_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Positions of the re-fed context: each row continues right after its own last position."""
    return position_ids + position_ids.amax(dim=-1, keepdim=True) + 1


def activation_values_per_token(config) -> int | None:
    """Values one layer's forward holds per token (about ``3 x intermediate + 4 x hidden``: the MLP and the
    hidden states), or None where the config does not say."""
    intermediate, hidden = getattr(config, "intermediate_size", None), getattr(config, "hidden_size", None)
    if not isinstance(intermediate, int) or not isinstance(hidden, int):
        return None
    return 3 * intermediate + 4 * hidden


def replay_chunk_size(cache_bytes: int, context_length: int, activation_bytes_per_token: int | None = None) -> int:
    """Re-fed tokens per chunk, so that what a chunk adds stays near a quarter of the cache (``cache_bytes``,
    one batch row's): its (chunk x 2 context) attention mask where one is built (``activation_bytes_per_token``
    None), else one layer's activations over it."""
    mask_bytes_per_token = 5 * 2 * context_length  # boolean mask, and the float copy attention may make of it
    bytes_per_token = activation_bytes_per_token or mask_bytes_per_token
    return max(MIN_REPLAY_CHUNK, min(MAX_REPLAY_CHUNK, cache_bytes // (4 * bytes_per_token)))


def single_pass_saves_memory(config, kv_values_per_token: int) -> bool:
    """One pass holds one layer's activations over the whole re-fed context; chunks hold every layer's re-fed
    keys and values (``kv_values_per_token``, the cache's size by the last chunk). One pass wins where the KV
    cache is heavier: Llama-3.1-8B (65536 against 59392), MHA models; not the tiny or medium benchmark models."""
    activation_values = activation_values_per_token(config)
    return activation_values is not None and kv_values_per_token > activation_values


@contextmanager
def preserved_state(module: nn.Module):
    """Restore ``module``'s buffers and attributes on exit, dropping attributes set meanwhile. A dynamic RoPE
    embedding (``rope_type="dynamic"``) rescales its frequencies in place for positions past
    ``max_position_embeddings``, which the re-fed positions may reach: without this, later forwards would run
    at the replay's frequencies."""
    buffers = {name: buffer.clone() for name, buffer in module.named_buffers(recurse=False)}
    attributes = {name: value for name, value in vars(module).items() if not name.startswith("_")}
    try:
        yield
    finally:
        for name, buffer in buffers.items():
            setattr(module, name, buffer)
        for name in [name for name in vars(module) if not name.startswith("_") and name not in attributes]:
            delattr(module, name)
        vars(module).update(attributes)


@contextmanager
def prefill_frequencies(rotary_emb: nn.Module):
    """While open, the rotary embedding gives every position the frequencies it had when the block was entered
    (the prefill's), as the cached keys were rotated with. A dynamic or LongRoPE embedding switches frequencies
    once positions pass a threshold, which the re-fed positions (up to twice the context) may do: the re-fed
    queries would then be rotated unlike the keys they score. Its output is recomputed (the standard
    ``cat(freqs, freqs)`` layout of Llama-family embeddings) only when its frequencies changed."""
    if getattr(rotary_emb, "inv_freq", None) is None:  # frequencies per layer type (Gemma 3): not pinned
        yield
        return
    inv_freq, scaling = rotary_emb.inv_freq.clone(), rotary_emb.attention_scaling

    def pin(module, args, kwargs, output):
        if torch.equal(module.inv_freq, inv_freq) and module.attention_scaling == scaling:
            return output
        x = args[0] if args else kwargs["x"]
        position_ids = args[1] if len(args) > 1 else kwargs["position_ids"]
        freqs = position_ids[:, :, None].float() * inv_freq.to(position_ids.device).float()  # (batch, n, dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * scaling).to(x.dtype), (angles.sin() * scaling).to(x.dtype)

    handle = rotary_emb.register_forward_hook(pin, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def run_replay(language_model, inputs: PrefillInputs, replay_cache: ReplayCache, capture: LseCapture | None,
               refed: PrefillInputs | None = None) -> None:
    """Feed the captured context again over the replay cache: in one pass without a mask where every layer is
    sure to take the unmasked split of ``capture`` (sdpa on CPU, no padding) and that saves memory, else in
    chunks (each attending to the context and only its own tokens where the replay cache is ``chunk_local``).
    ``refed``, when given, is fed instead of the context itself, at its own positions (the prompted replay: a
    repeat instruction, then the context). The re-fed positions are rotated with the prefill's frequencies, and
    the model's rotary embedding is left as it was before."""
    positions = replay_position_ids(inputs.position_ids) if refed is None else refed.position_ids
    refed = inputs if refed is None else refed
    attention_modules = [layer.self_attn for layer in language_model.layers]
    keys = layer_states(replay_cache.source, 0)[0]  # (batch, kv_heads, n, head_dim)
    unpadded = bool(inputs.valid.all()) and bool(refed.valid.all())
    mask_unread = unpadded and capture is not None and all(map(capture.split_possible, attention_modules))
    kv_values_per_token = 2 * len(attention_modules) * keys.shape[1] * keys.shape[3]
    single_pass = (mask_unread and not replay_cache.chunk_local
                   and single_pass_saves_memory(language_model.config, kv_values_per_token))
    replay_cache.keep_refed = not (single_pass or replay_cache.chunk_local)
    if single_pass:
        chunk_size = refed.length
    else:
        activation_values = activation_values_per_token(language_model.config) if mask_unread else None
        activation_bytes = activation_values * keys.element_size() if activation_values else None
        row_cache_bytes = full_cache_bytes(keys, len(attention_modules)) // keys.shape[0]
        chunk_size = replay_chunk_size(row_cache_bytes, inputs.length, activation_bytes)
    rotary_emb = language_model.rotary_emb
    with (torch.no_grad(), preserved_state(rotary_emb), prefill_frequencies(rotary_emb),
          stopped_after(attention_modules[-1])):
        for start in range(0, refed.length, chunk_size):
            end = min(start + chunk_size, refed.length)
            # every re-fed query sees the whole context and the re-fed tokens before its chunk (none when local)
            refed_start = start if replay_cache.chunk_local else 0
            if capture is not None:
                capture.declare_visible_prefix(inputs.length + start - refed_start if unpadded else None,
                                               mask_ignored=mask_unread)
            with suppress(ReplayScored):
                language_model(
                    input_ids=None if refed.input_ids is None else refed.input_ids[:, start:end],
                    inputs_embeds=None if refed.inputs_embeds is None else refed.inputs_embeds[:, start:end],
                    attention_mask=refed_attention_mask(inputs, start, end, refed_start, mask_unread, refed),
                    position_ids=positions[:, start:end],
                    past_key_values=replay_cache,
                    use_cache=True,
                    # nothing captured: transformers 4.57 restores capture wrappers only on a normal return
                    output_attentions=False,
                    output_hidden_states=False,
                )
            replay_cache.replayed = end
