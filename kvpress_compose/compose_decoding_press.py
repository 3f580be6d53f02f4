"""ComposeDecodingPress: KVCompose during decoding, composite tokens and one budget over layers."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from kvpress import DecodingPress
from kvpress.presses.base_press import is_prefilling
from torch import nn
from transformers import DynamicCache, PreTrainedModel, QuantizedCache

from kvpress_compose.compose_press import ComposePress, positive_int_setting
from kvpress_compose.layer_masks import layer_windows
from kvpress_compose.model_attachment import language_model_of
from kvpress_compose.query_sources import QuerySource
from kvpress_compose.replay import ReplayCache


@dataclass
class DecodingRun:
    """One generation's decoding state, from its first decoded token to the end of the press's ``with`` block
    (or the next prefill): per layer, the recent tokens' attention inputs and which cached entries are valid."""

    hidden_states: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [(batch, t, hidden)]
    position_embeddings: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per step (cos, sin)
    key_valid: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, cached) of the last step
    steps: int = 0  # tokens decoded since the last compression

    def keep_last(self, n_tokens: int) -> None:
        """Forget all but the last ``n_tokens`` buffered tokens (0: all)."""
        def last(chunks):
            joined = torch.cat(chunks, dim=1) if chunks else None
            return [] if joined is None or n_tokens == 0 else [joined[:, -n_tokens:]]

        self.hidden_states = {layer: last(chunks) for layer, chunks in self.hidden_states.items()}
        cos, sin = ([p[i] for p in self.position_embeddings] for i in (0, 1))
        self.position_embeddings = list(zip(last(cos), last(sin)))

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Row ``i`` becomes row ``beam_idx[i]``, as beam search reorders the cache."""
        def rows(states: torch.Tensor) -> torch.Tensor:
            return states.index_select(0, beam_idx.to(states.device))

        self.hidden_states = {layer: [rows(chunk) for chunk in chunks] for layer, chunks in self.hidden_states.items()}
        self.position_embeddings = [(rows(cos), rows(sin)) for cos, sin in self.position_embeddings]
        self.key_valid = {layer: rows(valid) for layer, valid in self.key_valid.items()}


class FollowReordering:
    """A cache's ``reorder_cache`` (beam search calls it with the beams kept) that reorders a generation's
    buffered rows too; it holds the generation weakly."""

    def __init__(self, reorder_cache, run: DecodingRun):
        self.reorder_cache, self.run = reorder_cache, weakref.ref(run)

    def __call__(self, beam_idx: torch.Tensor):
        self.reorder_cache(beam_idx)
        run = self.run()
        if run is not None:
            run.reorder(beam_idx)


def follow_reordering(cache, run: DecodingRun) -> None:
    """Make ``cache.reorder_cache`` reorder ``run``'s buffered rows as well (replacing an earlier generation's)."""
    current = cache.reorder_cache
    cache.reorder_cache = FollowReordering(getattr(current, "reorder_cache", current), run)


@dataclass
class ComposeDecodingPress(DecodingPress):
    """KVCompose during decoding: every ``compression_interval`` generated tokens, every layer's cache is
    compressed so that the layers together keep ``n_layers x target_size`` entries per KV head, with composite
    tokens and the layer allocation of ``base_press`` (its settings apply, ``n_sink`` included), in dense ``(batch, kv_heads, k_l, head_dim)``
    tensors. Between compressions the cache grows as usual. On a model with sliding-window or chunked layers only
    the full-attention ones are compressed (``n_layers`` counts them), and windowed ones are left as their cache
    keeps them; a model whose every layer is windowed is refused. Shaped like kvpress's ``DecodingPress``; the
    prefill is compressed by ``base_press`` where its ``compression_ratio`` is above 0.
    Based on KVCompose (https://arxiv.org/abs/2509.05165).

    Example, given a causal LM ``model`` and ``input_ids`` ``(1, n)``:

    >>> press = ComposeDecodingPress(base_press=ComposePress(0.5), compression_interval=16, target_size=32,
    ...                              hidden_states_buffer_size=8)
    >>> with press(model):
    ...     out = model.generate(input_ids, max_new_tokens=40, do_sample=False)  # re-compressed every 16 tokens

    ``generate`` passes positions itself. Feeding tokens by hand instead, give them ``position_ids`` continuing
    from the ORIGINAL number of tokens processed (context plus tokens decoded since), not from the cache's
    compressed length, as kvpress's pipeline does.

    Scores come from the queries that exist during decoding: the last ``hidden_states_buffer_size`` generated
    tokens' queries (recomputed from their buffered attention inputs with the model's own projection and RoPE),
    each attending causally to the layer's cache, aggregated as ``base_press``'s ``agg_*`` settings say
    (``base_press.decoding_source()``, a query source like the prefill's). They are the queries closest to what
    comes next, which is what eviction should protect; with ``base_press.scorer`` set, that kvpress scorer
    scores from the same buffered states instead. The scores go to ``base_press.compress_scored``.

    It is a kvpress ``DecodingPress`` (without that class's ScorerPress requirement), so kvpress's pipeline and
    ``evaluate.py`` run it during decoding as theirs; the pipeline then runs the prefill outside the press, so
    there the prefill is compressed only inside kvpress's ``PrefillDecodingPress(prefilling_press=ComposePress(...),
    decoding_press=ComposeDecodingPress(...))``. With ``model.generate`` inside ``with press(model):`` the
    prefill goes through ``base_press``.

    Parameters
    ----------
    base_press : ComposePress
        Its composite-token, allocation and aggregation settings apply (``structured=True`` only); its
        ``compression_ratio`` compresses the prefill (0: the prefill is kept whole).
    compression_interval : int, default=512
        Generated tokens between compressions.
    target_size : int, default=2048
        Entries per layer and KV head on average after a compression (the total is ``n_layers x target_size``);
        at least ``base_press.n_sink`` (checked at construction and when the press is entered).
    hidden_states_buffer_size : int, default=256
        Recent generated tokens whose queries score the cache (at most those since the last compression).

    Settings are checked whenever they are set, at construction or later. Beam search works: when ``generate``
    reorders the cache's rows (``cache.reorder_cache``), the buffered tokens are reordered with them.
    """

    base_press: ComposePress = field(default_factory=ComposePress)
    compression_interval: int = 512
    target_size: int = 2048
    hidden_states_buffer_size: int = 256

    def __setattr__(self, name, value):
        """Every setting is checked (and normalised: numpy ints become Python ones) whenever it is set."""
        validate = DECODING_SETTINGS.get(name)
        previous = self.__dict__.get(name)
        super().__setattr__(name, value if validate is None else validate(name, value))
        if name in ("base_press", "target_size") and "_generation" in self.__dict__:  # constructed
            try:
                check_sinks_fit_target(self)
            except ValueError:
                super().__setattr__(name, previous)
                raise

    def __post_init__(self):
        check_sinks_fit_target(self)
        self._generation: DecodingRun | None = None

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``, ``pickle``) is a fresh, unattached press of the same settings (its
        ``base_press`` copied as such): the model it is used on and the generation under way stay behind."""
        runtime = ("_generation", "_language_model", "_full_layers")
        return {name: value for name, value in self.__dict__.items() if name not in runtime}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _generation=None)

    @property
    def compression_ratio(self) -> float:
        return self.base_press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value) -> None:
        self.base_press.compression_ratio = value

    def post_init_from_model(self, model: PreTrainedModel):
        check_sinks_fit_target(self)  # base_press.n_sink may have changed since construction
        self._language_model = language_model_of(model)
        windows = layer_windows(self._language_model.config.get_text_config(), len(self._language_model.layers))
        self._full_layers = [layer_idx for layer_idx, window in enumerate(windows) if window is None]
        if not self._full_layers:
            raise ValueError(
                "ComposeDecodingPress compresses full-attention layers, and every layer of this model has a sliding "
                "window or attention chunk: decoding runs past the window, whose cache already bounds each layer"
            )
        self.base_press.post_init_from_model(model)

    def reset(self):
        """Called by DecodingPress's context manager on exit: the generation's state goes (base_press's hooks go
        with this press's, see ComposePress's DecoderAttachment)."""
        self._generation = None

    def forward_hook(self, module: nn.Module, input: list, kwargs: dict, output: list):
        """kvpress's per-layer hook, called after each attention layer's forward. During the prefill it hands over
        to ``base_press``'s hook (which scores; see ComposePress.forward_hook). During decoding it buffers the new
        tokens' attention inputs of each full-attention layer, and at the last layer, once
        ``compression_interval`` tokens were decoded since the last compression, re-scores and compresses every
        layer's cache at once under one global budget (``n_layers x target_size`` entries per KV head)."""
        hidden_states = kwargs["hidden_states"]
        cache = kwargs["past_key_values"]
        if isinstance(cache, ReplayCache):  # a replay pass (base_press's, or another ComposePress's): not decoding
            return output
        if is_prefilling(kwargs["cache_position"], hidden_states.shape[1]):  # a new sequence
            self._generation = None
            return self.base_press.forward_hook(module, input, kwargs, output)  # it scores where it compresses
        check_compressible(cache, self._full_layers)
        n_layers = len(self._language_model.layers)
        if self._generation is None:
            self._generation = DecodingRun()
            follow_reordering(cache, self._generation)
        run = self._generation
        with torch.no_grad():
            if module.layer_idx in self._full_layers:  # windowed layers are never compressed
                self._buffer(run, module, kwargs)
            if module.layer_idx == n_layers - 1:
                run.steps += hidden_states.shape[1]
                if run.steps >= self.compression_interval:
                    self._compress(run, cache)
                    run.steps = 0
                    run.keep_last(0)  # the cache changed: earlier queries saw entries that are gone
                else:
                    run.keep_last(self.hidden_states_buffer_size)
        return output

    def _buffer(self, run: DecodingRun, module: nn.Module, kwargs: dict) -> None:
        layer = module.layer_idx
        run.hidden_states.setdefault(layer, []).append(kwargs["hidden_states"].detach())
        if layer == self._full_layers[0]:  # the full layers share the step's rotary embedding
            batch = kwargs["hidden_states"].shape[0]
            cos, sin = kwargs["position_embeddings"]
            run.position_embeddings.append((cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)))
        n_cached = kwargs["past_key_values"].get_seq_length(layer)
        run.key_valid[layer] = visible_to_last_query(kwargs.get("attention_mask"), n_cached,
                                                     kwargs["hidden_states"].shape[0])

    def _compress(self, run: DecodingRun, cache) -> None:
        """Compress the full-attention layers (a hybrid model's windowed ones are left as their cache keeps them)
        to ``target_size`` entries each on average."""
        layers = [self._language_model.layers[layer_idx] for layer_idx in self._full_layers]
        n_kept = len(layers) * self.target_size
        lengths = [cache.get_seq_length(i) for i in self._full_layers]
        if sum(lengths) <= n_kept:
            return
        check_sinks_fit_target(self)
        source = self.base_press.decoding_source()
        layer_scores = [self._layer_scores(run, source, layer.self_attn, cache) for layer in layers]
        # each layer's valid entries (not padding): its sinks are its first ones (layers' lengths differ)
        valid = [run.key_valid[layer_idx] for layer_idx in self._full_layers]
        self.base_press.compress_scored(cache, layer_scores, n_kept, self._full_layers, valid)

    def _layer_scores(self, run: DecodingRun, source: QuerySource, module: nn.Module, cache) -> torch.Tensor:
        """``(batch, kv_heads, cached)`` scores: the recent queries' attention to each of the layer's entries."""
        layer = module.layer_idx
        hidden_states = torch.cat(run.hidden_states[layer][-self.hidden_states_buffer_size :], dim=1)
        n_queries = hidden_states.shape[1]
        cos = torch.cat([p[0] for p in run.position_embeddings], dim=1)[:, -n_queries:]
        sin = torch.cat([p[1] for p in run.position_embeddings], dim=1)[:, -n_queries:]
        return source.cache_scores(module, hidden_states, (cos, sin), cache, run.key_valid[layer],
                                   len(self._language_model.layers))


def check_sinks_fit_target(press: ComposeDecodingPress) -> None:
    """``base_press``'s sinks fit in what each layer keeps on average: ``n_sink`` <= ``target_size`` (else the
    budget would go to the first layers' sinks and leave later layers none)."""
    n_sink = press.base_press.n_sink
    if n_sink > press.target_size:
        raise ValueError(
            f"base_press.n_sink={n_sink} keeps {n_sink} entries in every compressed layer, more than "
            f"target_size={press.target_size} (the entries each layer keeps on average after a decoding "
            "compression): lower n_sink or raise target_size"
        )


def check_compressible(cache, full_layers: list[int]) -> None:
    """Dense per-layer caches only: a DynamicCache or QuantizedCache whose ``full_layers`` are full-attention
    ones (a hybrid model's windowed layers may be sliding: they are not compressed)."""
    if not isinstance(cache, (DynamicCache, QuantizedCache)) or any(
        type(cache.layers[i]).__name__ != "DynamicLayer" and not isinstance(cache, QuantizedCache) for i in full_layers
    ):
        raise ValueError(
            f"ComposeDecodingPress compresses a DynamicCache or QuantizedCache of full-attention layers, got a "
            f"{type(cache).__name__} with {sorted({type(layer).__name__ for layer in getattr(cache, 'layers', [])})}"
        )


def visible_to_last_query(attention_mask, n_cached: int, batch: int) -> torch.Tensor:
    """``(batch, n_cached)`` booleans: the cached entries the step's last query may see (False: padding), read
    from the layer's 4D mask (boolean, or additive with 0 where visible); all of them without a mask."""
    if attention_mask is None or attention_mask.dim() != 4:
        return torch.ones(batch, n_cached, dtype=torch.bool)
    last_row = attention_mask[:, 0, -1, :n_cached]
    visible = last_row if last_row.dtype == torch.bool else last_row == 0
    return visible.expand(batch, n_cached).cpu()


def base_press_setting(name, value):
    if not isinstance(value, ComposePress):
        raise TypeError(f"{name} must be a ComposePress, got {type(value).__name__}")
    if not value.structured:
        raise ValueError(f"{name} must be structured (structured=False masks entries and frees no memory)")
    return value


DECODING_SETTINGS = {
    "base_press": base_press_setting,
    "compression_interval": positive_int_setting,
    "target_size": positive_int_setting,
    "hidden_states_buffer_size": positive_int_setting,
}
