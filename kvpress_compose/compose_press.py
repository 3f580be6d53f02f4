"""ComposePress: KVCompose as a kvpress press.

The press holds its settings and its last results; while it is in use on a model, its
:class:`~kvpress_compose.model_attachment.DecoderAttachment` holds the decoder hooks and the prefill under way.
A prefill goes: the attachment's pre-hook asks :meth:`ComposePress.prefill_for` for a run and its query source;
each attention layer's kvpress hook (:meth:`ComposePress.forward_hook`) has the source score that layer; when
the decoder call returns, :meth:`ComposePress.compress_prefill` finishes the source (the replay pass) and runs
the algorithm of :mod:`kvpress_compose.compression` on the cache. Every setting is checked whenever it is set
(:data:`SETTINGS`, at the end of this file), and settings that depend on each other together
(:func:`check_combination`).
"""

from __future__ import annotations

import logging
import numbers
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial

import torch
from kvpress import BasePress, ScorerPress
from torch import nn
from transformers import PreTrainedModel

from kvpress_compose.attention_scores import AGGREGATIONS, install_lse_capture
from kvpress_compose.compression import (
    ALLOCATIONS,
    AUTO,
    Compressed,
    CompressionSettings,
    check_cache_unchanged,
    compress,
    compute_n_kept,
    layer_states,
    mask_unstructured,
    resolved_allocation,
)
from kvpress_compose.head_masks import install_head_mask_hooks
from kvpress_compose.layer_masks import (
    install_layer_mask_hooks,
    is_hybrid,
    layers_to_compress,
    record_window,
    refuse_assisted_generation,
)
from kvpress_compose.model_attachment import (
    DecoderAttachment,
    check_context_length,
    check_sinks_fit,
    check_token_ids,
    language_model_of,
    refuse_if_in_use,
    refuse_static_cache,
    refuse_uncompressed_context,
    refuse_unstructured,
)
from kvpress_compose.prefill_run import PREFILL, SCORED, PrefillRun, prefill_inputs
from kvpress_compose.query_sources import QUERY_SOURCES, QuerySource, Scoring, query_source_for, repeat_prompt_from

logger = logging.getLogger(__name__)  # users filter on its name, kvpress_compose.compose_press


@dataclass
class ComposePress(BasePress):
    """KVCompose: structured KV cache compression with composite tokens and global layer allocation.

    Every (layer, KV head) scores its context tokens; each head ranks its own tokens and rank j of every head
    forms composite token j, so a layer stays one dense ``(batch, kv_heads, k_l, head_dim)`` tensor. One budget
    for the whole model is spread over layers by a global top-k of composite scores: layers whose tokens draw
    more attention keep more. Based on KVCompose (https://arxiv.org/abs/2509.05165).

    Example, given a causal LM ``model`` (Llama, Qwen, Mistral, Gemma 3, ...) and its ``tokenizer``:

    >>> import torch
    >>> from transformers import DynamicCache
    >>> press = ComposePress(compression_ratio=0.5)
    >>> context_ids = tokenizer("The secret code is 4711. " * 20, return_tensors="pt").input_ids  # (1, n)
    >>> cache = DynamicCache()
    >>> with torch.no_grad(), press(model):
    ...     _ = model(context_ids, past_key_values=cache)  # compressed when this call returns
    >>> n = context_ids.shape[1]
    >>> question_ids = tokenizer(" What is the secret code?", return_tensors="pt").input_ids
    >>> q = question_ids.shape[1]
    >>> with torch.no_grad():
    ...     logits = model(question_ids, past_key_values=cache, position_ids=torch.arange(n, n + q)[None]).logits

    Later tokens need ``position_ids`` continuing from the ORIGINAL context length ``n``, as kvpress's pipeline
    passes them: the cache is shorter than ``n`` after compression, so positions counted from its length would be
    wrong (a warning says so).
    ``model.generate`` inside ``with press(model):`` and kvpress's ``pipeline("kv-press-text-generation")``
    need nothing more.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the model's context KV entries to remove, in [0, 1); checked whenever it is set.
    query_source : str, default="replay"
        Which queries score the context (:mod:`kvpress_compose.query_sources`; costs and evidence in
        docs/design.md). "replay" (the paper's): the context re-fed after itself in a second pass, about 3x a
        plain prefill on CPU; on real models only the replays keep what later questions ask for. "replay_local":
        KVzip's cheaper chunk attention. "replay_prompted": KVzip's framing, re-fed after "Repeat the previous
        context exactly." in the chat template (use with ``n_sink=4``). "bidirectional", "prefill" and
        "prefill_seen" (needs ``agg_task="mean"``, refused at construction otherwise) use the prefill's own
        queries, no extra pass.
    structured : bool, default=True
        False: the unstructured upper bound, per-(layer, head) budgets as kvpress's head-wise masks (frees no
        memory; sdpa or flash).
    layer_allocation : str, default="auto"
        How one budget is spread over layers; each choice is an allocation object of
        :data:`kvpress_compose.compression.ALLOCATIONS` (how they compare: README, "Findings").
        "auto": chosen from the model's config when the press is attached (``effective_allocation`` says
        which): "shared" with ``score_pooling=9`` on a hybrid model (full-attention layers beside windowed ones:
        Gemma 3), "global" on every other. "global" (the paper's): one top-k over every layer's composite scores. "uniform": every layer keeps
        the same number. "global_normalized": the global top-k over each head's score shares (use with
        ``n_sink``). "shared": every layer and head keeps the same tokens, each token ranked by its best
        within-layer percentile (a token one layer singles out is kept by all), as many per layer; for models
        whose few full-attention layers score on different scales (Gemma 3: docs/gemma3-default-loss.md; use
        with ``score_pooling=9``).
    composite_tokens : bool, default=True
        False (the ablation): one set of positions per layer, ranked by the ``agg_head`` score, for every head.
    scorer : ScorerPress, optional
        A kvpress ScorerPress (SnapKV, Knorm, ...) whose scores replace attention scores (its ratio is ignored).
    agg_task, agg_group, agg_head : str, default "max", "mean", "mean"
        Aggregation ("max" or "mean") over queries, over the query heads of a KV head, and over heads.
    add_v_norm : bool, default=False
        Multiply each token's score by the norm of its value vector.
    add_mean_across_heads : bool, default=True
        Add the mean over KV heads of a token's score to each head's score.
    min_tokens_per_layer : int, default=1
        Composite tokens every layer keeps (per head, when ``structured=False``).
    n_sink : int, default=0
        The first ``n_sink`` tokens of each row are kept everywhere, inside the budget (KVzip keeps 4). Where
        the sinks alone exceed the budget (``n_sink`` x compressed layers > the entries kept), the prefill is
        refused before its forward, naming both numbers.
    layer_floor : float, default=0.0
        Under global allocation, each layer keeps at least this fraction (in [0, 1]) of the uniform budget.
    replay_prompt_ids : sequence of int, optional
        What "replay_prompted" feeds before the re-fed context (default: built from the model's tokenizer); refused
        with any other source, and when an id is outside the vocabulary of the model the press is entered on.
    score_block_size : int, optional
        Queries scored at once where scores come from a softmax (default: a block's probabilities are about
        10% of the KV cache), so scoring never takes O(context^2) memory.
    score_pooling : int, default=1
        Odd window: each score is raised to the best score within ``score_pooling // 2`` positions, so a token
        kept for its score keeps its neighbours too (a needle's other digits, its key's words); 1 leaves scores
        as they are. During decoding (:class:`ComposeDecodingPress`) the neighbours are the nearest entries the
        cache still holds, and ``"shared"`` there assumes the prefill kept one token set too (its own base press
        does; a different prefill press mixes each slot's tokens across heads).

    On a model with sliding-window or chunked-attention layers (Gemma 3, Qwen2 with ``max_window_layers``,
    Llama 4), only the full-attention layers are compressed and ``compression_ratio`` is a fraction of their
    entries. Where every layer is windowed (Mistral), the layers are compressed while the context fits the window
    and a longer context is refused (:mod:`kvpress_compose.layer_masks`).

    After each prefill, ``last_budgets`` holds what each compressed layer kept (``(layers,)`` composite tokens,
    or ``(batch, layers, kv_heads)`` tokens when ``structured=False``), ``last_layers`` which layers those are,
    and ``last_scores`` the scores ranked; they take no part in comparisons. A prefill that compresses nothing
    (``compression_ratio=0``) leaves them None.

    One press serves one ``with`` block at a time, on one model, from one thread: entering it again while it is
    in use raises, and so does a prefill from a second thread while another's is under way. A copy
    (``copy.deepcopy``, ``pickle``) is a fresh, unattached press of the same settings, usable anywhere at once.
    """

    compression_ratio: float = 0.0
    query_source: str = "replay"
    structured: bool = True
    layer_allocation: str = "auto"
    composite_tokens: bool = True
    scorer: ScorerPress | None = None
    agg_task: str = "max"
    agg_group: str = "mean"
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    min_tokens_per_layer: int = 1
    n_sink: int = 0
    layer_floor: float = 0.0
    replay_prompt_ids: tuple[int, ...] | None = None
    score_block_size: int | None = None
    score_pooling: int = 1
    last_budgets: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    last_scores: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    last_layers: list[int] | None = field(default=None, init=False, repr=False, compare=False)

    def __setattr__(self, name, value):
        """Every documented setting is checked (and normalised: numpy numbers become Python ones) whenever it is
        set, at construction or later (kvpress's evaluate.py assigns ``compression_ratio``)."""
        validate = SETTINGS.get(name)
        if validate is None:
            return super().__setattr__(name, value)
        previous = self.__dict__.get(name)
        super().__setattr__(name, validate(name, value))
        if "_attached" in self.__dict__:  # constructed: settings that depend on each other are checked together
            try:
                check_combination(self)
            except ValueError:
                super().__setattr__(name, previous)
                raise

    def __post_init__(self):
        check_combination(self)
        self._attached: DecoderAttachment | None = None  # our decoder hooks, while the press is in use

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``, ``copy.copy``, ``pickle``) is a fresh, unattached press of the same settings,
        whether or not this one is in use: neither the model it is attached to nor its last results go with it."""
        state = {name: value for name, value in self.__dict__.items() if name not in ("_attached", "_hybrid_model")}
        return state | {"last_budgets": None, "last_scores": None, "last_layers": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _attached=None)

    # -- the settings, as the algorithm and the query sources read them -----------------------------------------

    def compression_settings(self) -> CompressionSettings:
        """The settings :mod:`kvpress_compose.compression` reads, from this press's fields, with
        ``layer_allocation="auto"`` resolved for the model it was last attached to (:attr:`effective_allocation`)."""
        values = {setting.name: getattr(self, setting.name) for setting in fields(CompressionSettings)}
        values["layer_allocation"], values["score_pooling"] = self.effective_allocation
        return CompressionSettings(**values)

    @property
    def effective_allocation(self) -> tuple[str, int]:
        """``(layer_allocation, score_pooling)`` as this press compresses: ``"auto"`` resolved by whether the model
        it was last attached to is hybrid (full-attention layers beside windowed ones; "global" before any)."""
        return resolved_allocation(self.layer_allocation, self.score_pooling,
                                   self.__dict__.get("_hybrid_model", False), self.structured)

    def scoring(self) -> Scoring:
        """The aggregation settings the query sources read."""
        return Scoring(self.agg_task, self.agg_group, self.score_block_size)

    def decoding_source(self) -> QuerySource:
        """The source that scores a cache during decoding with this press's settings: its ``scorer``, else the
        recent tokens' queries (:class:`~kvpress_compose.query_sources.RecentQueries`)."""
        return query_source_for("recent", self.scorer, self.scoring())

    # -- being used on a model ----------------------------------------------------------------------------------

    @property
    def _attachment(self) -> DecoderAttachment | None:
        """Our decoder hooks while the press is in use: None once removed (by our block's end, or with the hooks
        of a wrapper that has exited)."""
        attachment = self.__dict__.get("_attached")
        return None if attachment is None or attachment.removed else attachment

    @property
    def in_prefill(self) -> bool:
        """Whether a prefill this press compresses is under way (its replay pass included)."""
        attachment = self._attachment
        return attachment is not None and attachment.run is not None

    def post_init_from_model(self, model: PreTrainedModel):
        self._refuse_if_in_use()
        check_token_ids(self.replay_prompt_ids, model)
        language_model = language_model_of(model)
        attention_modules = [layer.self_attn for layer in language_model.layers]
        if not self.structured:
            refuse_unstructured(model)
        install_lse_capture()
        install_layer_mask_hooks(language_model, attention_modules)
        if not self.structured:
            install_head_mask_hooks(attention_modules)
        self._detach()
        model_path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        self._attached = DecoderAttachment(self, language_model, attention_modules, type(model).__name__, model_path)
        self._hybrid_model = is_hybrid(self._attached.windows)
        if self.scorer is not None:
            self.scorer.post_init_from_model(model)

    @contextmanager
    def __call__(self, model: PreTrainedModel):
        self._refuse_if_in_use()  # before the `try`: the block in use keeps its hooks
        try:
            with super().__call__(model):
                yield
        finally:
            self._detach()

    def _refuse_if_in_use(self):
        """A press entered while a block that uses it (its own or a wrapper's) is still open would take over
        that block's hooks: refused. An attachment left by a wrapper that has exited is dropped."""
        refuse_if_in_use(self._attachment)
        self._detach()

    def _detach(self):
        if self._attachment is not None:
            self._attachment.remove()
        self._attached = None

    # -- one prefill: the attachment starts it, each layer's hook scores it, the decoder's end compresses it ------

    def prefill_for(self, attachment: DecoderAttachment, arguments: dict,
                    fresh: bool) -> tuple[PrefillRun, QuerySource] | None:
        """Called by the attachment's pre-hook for a decoder call that is not nested in a prefill (``fresh``: into
        an empty cache): the prefill's run and query source, or None where nothing is compressed; refuses what
        would leave a context uncompressed or compressed wrongly."""
        if self.compression_ratio > 0 or attachment.hands_later_tokens_to_decoding():
            refuse_assisted_generation("inside a `with press(model)` block that compresses the cache")
        cache = arguments.get("past_key_values")
        if fresh:  # a new prefill: the last one's results go, even where this one compresses nothing
            self.last_budgets = self.last_scores = self.last_layers = None
        if self.compression_ratio == 0:
            return None
        if not fresh:  # later tokens (a question, generated ones): nothing to compress, some to refuse
            refuse_uncompressed_context(attachment, cache, arguments)
            return None
        refuse_static_cache(cache)
        inputs = prefill_inputs(arguments)
        check_context_length(inputs, self.min_tokens_per_layer)
        compressed_layers = layers_to_compress(attachment.windows, inputs.length)  # windowed layers are left
        check_sinks_fit(inputs, self.n_sink, len(compressed_layers), self.compression_ratio)
        if not self.structured:
            refuse_unstructured(None, attachment, compressed_layers)
        repeat_prompt = partial(repeat_prompt_from, self.replay_prompt_ids, attachment.model_path)
        source = query_source_for(self.query_source, self.scorer, self.scoring(), repeat_prompt)
        run = PrefillRun(inputs, attachment.decoder, compressed_layers, captures_lse=source.captures_prefill_lse,
                         cache=cache)
        return run, source

    def forward_hook(self, module: nn.Module, input: list, kwargs: dict, output: list):
        """kvpress's per-layer hook, called after each attention layer's forward: it *scores* that layer's context
        entries (the query source's ``score_layer``) and compresses nothing. Once the last layer is scored the
        prefill is marked scored; the cache is compressed, every layer at once under one global budget, when the
        decoder call returns (:meth:`compress_prefill`), after the prefill's own activations are freed. kvpress's
        ScorerPress, by contrast, compresses each layer in this hook."""
        attachment = self._attachment
        run = attachment.current_run(PREFILL) if attachment is not None else None
        if run is None:
            return output
        cache = kwargs.get("past_key_values")
        if cache is None:
            raise ValueError("ComposePress needs a cache: call the model with past_key_values=DynamicCache()")
        run.cache = cache if run.cache is None else run.cache  # transformers makes one when none is given
        if cache is not run.cache:  # another press's replay pass, nested in this prefill
            return output
        if module.layer_idx in run.compressed_layers:  # a windowed layer of a hybrid model is left as it is
            with torch.no_grad():  # scoring is never differentiated, even if the forward is
                keys, values = layer_states(cache, module.layer_idx)
                attachment.source.score_layer(run, module, keys, values, output[1], kwargs)
        if module.layer_idx == run.n_layers - 1:
            run.close()  # the prefill's captured attention is no longer needed
            run.phase = SCORED  # compressed when the decoder call returns (compress_prefill)
        return output

    def compress_prefill(self, attachment: DecoderAttachment, run: PrefillRun, source: QuerySource) -> None:
        """Called by the attachment when the decoder call of a scored prefill returns: the query source finishes
        (the replay pass runs here), then the cache is compressed at ``compression_ratio``."""
        cache, layers = run.cache, run.compressed_layers
        with torch.no_grad():  # scoring and compression are never differentiated, even if the forward is
            source.finish(run, cache)
            layer_scores = [source.layer_scores(run, layer_idx) for layer_idx in layers]  # step 1
            check_cache_unchanged([cache.get_seq_length(i) for i in layers], [s.shape[2] for s in layer_scores])
            if not self.structured:
                self._record(mask_unstructured(cache, layer_scores, run.inputs.valid, self.compression_ratio, layers,
                                               run.attention_modules, self.compression_settings()))
                return
            n_kept = compute_n_kept(len(layers) * max(s.shape[2] for s in layer_scores), self.compression_ratio)
            result = compress(cache, layer_scores, run.inputs.valid, n_kept, layers, self.compression_settings())
            self._report(result, cache)
        for layer_idx, kept in result.positions.items():  # a windowed layer compressed as a full one (short context)
            if attachment.windows[layer_idx] is not None:
                record_window(cache.layers[layer_idx], attachment.windows[layer_idx], kept, run.inputs.valid)

    # -- the public compression entry point -----------------------------------------------------------------------

    def compress_scored(self, cache, scores, n_kept: int, layer_indices: list[int] | None = None,
                        valid=None) -> dict[int, torch.Tensor]:
        """Keep ``n_kept`` composite tokens over the layers ``layer_indices`` of ``cache`` (default: every layer),
        from their scores (``(layers, batch, kv_heads, n)``, or one ``(batch, kv_heads, n_l)`` tensor per layer;
        ``-inf``: never kept), with this press's post-processing, composite tokens and layer allocation; other
        layers are left as they are. ``valid``: the entries that are not padding, ``(batch, n)`` for every layer
        or one ``(batch, n_l)`` per layer (None: all). :class:`~kvpress_compose.ComposeDecodingPress` calls it
        during decoding. Records ``last_budgets``, ``last_layers`` and ``last_scores``; returns each compressed
        layer's kept positions, ``(batch, kv_heads, k_l)`` ascending."""
        layer_scores = list(scores)
        layer_indices = list(range(len(layer_scores))) if layer_indices is None else list(layer_indices)
        result = compress(cache, layer_scores, valid, n_kept, layer_indices, self.compression_settings())
        self._report(result, cache)
        return result.positions

    def _record(self, result: Compressed) -> None:
        self.last_budgets, self.last_layers, self.last_scores = result.budgets, result.layers, result.scores

    def _report(self, result: Compressed, cache) -> None:
        """Record a structured compression's results and log them (kvpress's pipeline logs layer 0's length
        only, which says little here)."""
        self._record(result)
        for warning in result.warnings:
            logger.warning(warning)
        budgets = result.budgets.tolist()
        logger.info(
            f"ComposePress kept {int(result.budgets.sum())} of {result.n_entries} entries per KV head (budget "
            f"{result.n_kept}, compression_ratio={self.compression_ratio}); per layer: {budgets}"
            + (f" (layers {result.layers}; the others are windowed, left as they are)"
               if len(result.layers) < len(cache.layers) else "")
        )


# -- each setting's check (SETTINGS), run whenever a setting is set: it takes the setting's name (for the error) and
# the value, and returns the value to store (numpy numbers become Python ones) or raises a ValueError / TypeError
# naming the setting and what was expected; then check_combination, for settings that depend on each other ---

def fraction_setting(include_one: bool):
    """A real number in [0, 1) (a compression ratio), or in [0, 1] with ``include_one``."""
    interval = "[0, 1]" if include_one else "[0, 1)"

    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
        if not (0 <= value <= 1 if include_one else 0 <= value < 1):  # NaN fails too
            raise ValueError(f"{name} must be in {interval}, got {value}")
        return value

    return check


ratio_setting = fraction_setting(include_one=False)


def positive_int_setting(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def non_negative_int_setting(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def odd_positive_int_setting(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be an odd int >= 1 (a window centred on each token), got {value!r}")
    return int(value)


def token_ids_setting(name, value):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of token ids (ints) or None, got {type(value).__name__}")
    value = tuple(value)
    if not value or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"{name} must be a non-empty sequence of token ids (ints >= 0), got {value!r}")
    return tuple(int(v) for v in value)


def optional_positive_int_setting(name, value):
    return None if value is None else positive_int_setting(name, value)


def bool_setting(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def choice_setting(choices):
    def check(name, value):
        if value not in choices:
            raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
        return value

    return check


def scorer_setting(name, value):
    if value is not None and not isinstance(value, ScorerPress):
        raise TypeError(f"{name} must be a kvpress ScorerPress, got {type(value).__name__}")
    return value


SETTINGS = {
    "compression_ratio": ratio_setting,
    "query_source": choice_setting(QUERY_SOURCES),
    "structured": bool_setting,
    "layer_allocation": choice_setting((AUTO, *ALLOCATIONS)),
    "composite_tokens": bool_setting,
    "scorer": scorer_setting,
    "agg_task": choice_setting(AGGREGATIONS),
    "agg_group": choice_setting(AGGREGATIONS),
    "agg_head": choice_setting(AGGREGATIONS),
    "add_v_norm": bool_setting,
    "add_mean_across_heads": bool_setting,
    "score_pooling": odd_positive_int_setting,
    "min_tokens_per_layer": positive_int_setting,
    "n_sink": non_negative_int_setting,
    "layer_floor": fraction_setting(include_one=True),
    "replay_prompt_ids": token_ids_setting,
    "score_block_size": optional_positive_int_setting,
}


def check_combination(press) -> None:
    """Settings that depend on each other, checked together once ``press`` is constructed and whenever one of
    them changes."""
    allocation = ALLOCATIONS["global" if press.layer_allocation == AUTO else press.layer_allocation]
    if not press.structured and (not allocation.serves_unstructured or not press.composite_tokens
                                 or press.layer_floor > 0):
        raise ValueError(
            "structured=False ranks every head's tokens on their own, against one budget per layer "
            "(layer_allocation='uniform') or one for the whole model ('global'): layer_allocation="
            "'global_normalized' or 'shared', layer_floor and composite_tokens=False apply to the structured press "
            "only"
        )
    if press.query_source == "prefill_seen" and press.agg_task != "mean":
        raise ValueError(
            "query_source='prefill_seen' averages over the queries that saw each key: it needs agg_task='mean', got "
            f"agg_task={press.agg_task!r} (set agg_task='mean' first when changing both after construction)"
        )
    if press.replay_prompt_ids is not None and (press.query_source != "replay_prompted" or press.scorer is not None):
        using = f"a scorer ({type(press.scorer).__name__})" if press.scorer is not None else \
            f"query_source={press.query_source!r}"
        raise ValueError(
            f"replay_prompt_ids are fed only by query_source='replay_prompted' (without a scorer, which replaces the "
            f"query source), and this press scores with {using}: they would be ignored. Leave replay_prompt_ids unset, "
            "or use query_source='replay_prompted'"
        )
