"""Where the queries that score the context come from: one class per query source, behind one interface.

ComposePress calls a :class:`QuerySource` three ways during a prefill: :attr:`~QuerySource.captures_prefill_lse`
(whether the prefill's attention should leave its log-sum-exp), :meth:`~QuerySource.score_layer` (in each
layer's forward hook) and :meth:`~QuerySource.finish` (once the last layer has run, before allocation); then
:meth:`~QuerySource.layer_scores` gives each layer's ``(batch, kv_heads, n)`` scores (step 1 of
:mod:`kvpress_compose.compression`). Adding a source means writing one class and, for a string name, one entry
of :data:`QUERY_SOURCES`. During decoding, :class:`RecentQueries` (or a :class:`Scorer`) scores a layer's cache
through :meth:`~QuerySource.cache_scores`. Each source is given the press's aggregation settings as one
:class:`Scoring` (:func:`query_source_for`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache

import torch
from kvpress import ScorerPress
from torch import nn
from transformers import AutoTokenizer

from kvpress_compose.attention_scores import (
    LseCapture,
    aggregate,
    attention_statistics,
    bidirectional_lse,
    finish_scores,
    merge_statistics,
    query_blocks,
    statistics_from_lse,
)
from kvpress_compose.compression import check_cache_unchanged, full_cache_bytes, layer_states
from kvpress_compose.prefill_run import PrefillInputs, PrefillRun
from kvpress_compose.replay import ReplayCache, run_replay

SCORE_BLOCK_FRACTION = 0.1  # softmax scoring works in blocks of about this fraction of the full KV cache size


@dataclass(frozen=True)
class Scoring:
    """How attention becomes scores: ComposePress's ``agg_task`` (over queries), ``agg_group`` (over the query
    heads of a KV head) and ``score_block_size`` (queries scored at once; None: sized from the cache)."""

    agg_task: str = "max"
    agg_group: str = "mean"
    block_size: int | None = None


class QuerySource:
    """The interface ComposePress scores through (the default methods suit attention-based sources)."""

    captures_prefill_lse = False  # whether the prefill's own attention should leave its log-sum-exp
    scoring = Scoring()  # the press's aggregation settings, given by query_source_for

    def score_layer(self, run: PrefillRun, module: nn.Module, keys, values, attentions, kwargs: dict) -> None:
        """Called in each layer's forward hook during the prefill, with the layer's cached keys and values."""

    def finish(self, run: PrefillRun, cache) -> None:
        """Called once the prefill's last layer has been scored, before the budgets are allocated."""

    def layer_scores(self, run: PrefillRun, layer_idx: int) -> torch.Tensor:
        """``(batch, kv_heads, n)`` scores of one layer, from the statistics the source gathered."""
        n_queries = run.inputs.valid.sum(dim=-1)
        return finish_scores(run.statistics[layer_idx], n_queries, self.scoring.agg_task, self.scoring.agg_group)

    def cache_scores(self, module: nn.Module, hidden_states: torch.Tensor, position_embeddings, cache,
                     key_valid: torch.Tensor, n_layers: int) -> torch.Tensor:
        """During decoding: ``(batch, kv_heads, cached)`` scores of the entries ``cache`` holds for ``module``'s
        layer, from the recent tokens' attention inputs ``hidden_states`` ``(batch, t, hidden)``."""
        raise ValueError(f"{type(self).__name__} scores a prefill only; during decoding the recent queries "
                         "(RecentQueries) or a scorer score the cache")


class CausalPrefill(QuerySource):
    """``"prefill"``: the prefill's own queries, causal, so no extra pass; taken from the log-sum-exp the
    prefill's attention left where it could, else scored by softmax."""

    captures_prefill_lse = True
    causal_offset: int | None = 0  # the causal rule needs the keys' original positions

    def score_layer(self, run, module, keys, values, attentions, kwargs):
        hidden_states = kwargs["hidden_states"]
        if self.causal_offset is not None:
            check_unpruned("prefill", keys, hidden_states)
        captured = run.capture.take(module, *hidden_states.shape[:2]) if run.capture is not None else None
        if captured is None or keys.shape[2] != captured.keys.shape[2]:  # an earlier press pruned this layer
            queries = query_blocks(module, hidden_states, kwargs.get("position_embeddings"))
            valid = run.inputs.valid
            run.statistics[module.layer_idx] = softmax_statistics(self.scoring, module, queries, keys, valid, valid,
                                                                  self.causal_offset, run.inputs.length,
                                                                  run.n_layers)
            return
        run.statistics[module.layer_idx] = statistics_from_lse(
            captured.query_blocks(), self.log_sum_exp(captured, run), captured.keys, run.inputs.valid,
            n_scored=run.inputs.length, causal_offset=self.causal_offset, agg_task=self.scoring.agg_task,
        )

    def log_sum_exp(self, captured, run) -> torch.Tensor:
        return captured.lse


class CausalPrefillSeen(CausalPrefill):
    """``"prefill_seen"``: the prefill's own causal attention averaged over the queries that could see each key
    (``agg_task="mean"`` only): key j of n is seen by the n - j queries from j on, so a plain mean over all n
    queries favours early keys by their position alone. No extra pass."""

    def layer_scores(self, run, layer_idx):
        if self.scoring.agg_task != "mean":
            raise ValueError(f"query_source='prefill_seen' averages over the queries that saw each key: it needs "
                             f"agg_task='mean', got {self.scoring.agg_task!r}")
        stat = run.statistics[layer_idx]  # (batch, kv_heads, group, n): summed over queries
        valid = run.inputs.valid.to(stat.device)
        seen_by = valid.flip(-1).long().cumsum(dim=-1).flip(-1)  # (batch, n) valid queries at or after each key
        return aggregate(stat / seen_by.clamp(min=1)[:, None, None], self.scoring.agg_group, dim=2)


class BidirectionalPrefill(CausalPrefill):
    """``"bidirectional"``: the prefill's queries attending to every context key (no extra pass); works after
    presses that pruned the layer, whose kept keys' positions are unknown."""

    causal_offset = None

    def log_sum_exp(self, captured, run) -> torch.Tensor:
        return bidirectional_lse(captured, run.inputs.valid)


class Replay(QuerySource):
    """``"replay"``: the paper's. The context is re-fed after itself in a second forward pass (the cache never
    keeps the re-fed tokens) and the re-fed queries, which see the whole context, score it; its attention
    covers three times the prefill's (query, key) pairs."""

    chunk_local = False  # re-fed chunks attend to the context and every earlier re-fed token

    def score_layer(self, run, module, keys, values, attentions, kwargs):
        check_unpruned("replay", keys, kwargs["hidden_states"])

    def finish(self, run, cache):
        lengths = [cache.get_seq_length(layer_idx) for layer_idx in run.compressed_layers]
        check_cache_unchanged(lengths, [run.inputs.length] * len(lengths))
        replay_cache = ReplayCache(cache, run.inputs.length, chunk_local=self.chunk_local)
        replay_cache.scored_layers = set(run.compressed_layers)  # a hybrid model's windowed layers only run
        # a sliding window or attention chunk may hide context keys from re-fed queries, which scoring assumes
        # they all see, and the unmasked split would not apply the window: there, scores come from a softmax over
        # every context key, and the model's own masks (windowed layers included) apply to the re-fed tokens
        capture = LseCapture(run.attention_modules) if run.local_span is None else None
        scored_modules = [run.attention_modules[layer_idx] for layer_idx in run.compressed_layers]
        self.refed = self.refed_inputs(run)
        hooks = [module.register_forward_hook(self.refed_hook(run, replay_cache, capture), with_kwargs=True)
                 for module in scored_modules]
        try:
            with capture if capture is not None else nullcontext():
                run_replay(run.language_model, run.inputs, replay_cache, capture,
                           None if self.refed is run.inputs else self.refed)
        finally:
            for hook in hooks:
                hook.remove()

    def refed_inputs(self, run: PrefillRun) -> PrefillInputs:
        """What the second pass feeds: the context itself."""
        return run.inputs

    def refed_hook(self, run: PrefillRun, replay_cache: ReplayCache, capture: LseCapture | None):
        def score_refed_chunk(module, args, kwargs, output):
            """Statistics of one chunk of re-fed queries, merged into the layer's."""
            with torch.no_grad():
                self.score_chunk(run, replay_cache, capture, module, kwargs)

        return score_refed_chunk

    def score_chunk(self, run, replay_cache, capture, module, kwargs):
        hidden_states = kwargs["hidden_states"]
        keys = replay_cache.attended_keys.pop(module.layer_idx)  # original context, then re-fed tokens
        start, n_context, valid = replay_cache.replayed, run.inputs.length, run.inputs.valid
        refed_valid = self.refed.valid  # (batch, re-fed tokens): the context's own, unless prompted
        end = start + hidden_states.shape[1]
        captured = capture.take(module, *hidden_states.shape[:2]) if capture is not None else None
        if captured is not None:  # normalised over everything the re-fed queries saw; every context key is visible
            chunk = statistics_from_lse(captured.query_blocks(), captured.lse, captured.keys,
                                        refed_valid[:, start:end], n_scored=n_context, causal_offset=None,
                                        agg_task=self.scoring.agg_task)
        else:
            queries = query_blocks(module, hidden_states, kwargs.get("position_embeddings"))
            refed_start = start if self.chunk_local else 0  # the first re-fed token the keys hold
            key_valid = torch.cat([valid, refed_valid[:, refed_start:end]], dim=1)
            chunk = softmax_statistics(self.scoring, module, queries, keys, key_valid, refed_valid[:, start:end],
                                       n_context + start - refed_start, n_context, run.n_layers)
        layer = module.layer_idx
        run.statistics[layer] = merge_statistics(run.statistics.get(layer), chunk, self.scoring.agg_task)


class LocalReplay(Replay):
    """``"replay_local"``: the replay with KVzip's cheaper attention: each re-fed chunk attends to the context
    and its own tokens only, not to earlier chunks (about n^2 + n c / 2 pairs for chunks of c, against 1.5 n^2)."""

    chunk_local = True


REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly."  # KVzip's (https://arxiv.org/abs/2505.23416)
TEMPLATE_MARK = "<<compose-context>>"  # stands for the user's message when a chat template is rendered


@dataclass(frozen=True)
class RepeatPrompt:
    """What ``"replay_prompted"`` feeds in its second pass besides the context.

    Parameters
    ----------
    ids : the tokens fed before the re-fed context: the repeat instruction, closing the user's turn and opening
        the assistant's where the model has a chat template.
    template_prefix : the chat template's opening (system turn, user header): where every row of the context
        starts with these tokens, they are not re-fed (the assistant repeats the user's message, not the template).
    """

    ids: tuple[int, ...]
    template_prefix: tuple[int, ...] = ()


def repeat_prompt_for(tokenizer) -> RepeatPrompt:
    """The repeat instruction as ``tokenizer``'s chat template frames a user's turn and opens the assistant's
    reply (the instruction and a newline where it has no template)."""
    if getattr(tokenizer, "chat_template", None) is None:
        prefix, suffix = "", "\n"
    else:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": TEMPLATE_MARK}], tokenize=False,
                                                 add_generation_prompt=True)
        if rendered.count(TEMPLATE_MARK) != 1:
            raise ValueError("the tokenizer's chat template does not render the user's message once: give "
                             "replay_prompt_ids")
        prefix, suffix = rendered.split(TEMPLATE_MARK)

    def encode(text):
        return tuple(tokenizer.encode(text, add_special_tokens=False)) if text else ()

    return RepeatPrompt(ids=encode(REPEAT_INSTRUCTION) + encode(suffix), template_prefix=encode(prefix))


def repeat_prompt_from(prompt_ids: Sequence[int] | None, model_path: str | None) -> RepeatPrompt:
    """A press's ``replay_prompt_ids`` as a prompt, else the prompt built from the tokenizer at ``model_path``
    (the model's ``name_or_path``)."""
    if prompt_ids is not None:
        return RepeatPrompt(ids=tuple(prompt_ids))
    return tokenizer_repeat_prompt(model_path)


@lru_cache(maxsize=8)
def tokenizer_repeat_prompt(model_path: str | None) -> RepeatPrompt:
    """:func:`repeat_prompt_for` the tokenizer at ``model_path`` (a hub id or folder), loaded once per path and
    process: a folder whose tokenizer is rewritten meanwhile keeps the first prompt (give ``replay_prompt_ids``)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as error:
        raise ValueError(
            f"query_source='replay_prompted' builds its repeat prompt with the model's tokenizer, which could not be "
            f"loaded from the model's name_or_path {model_path!r} ({type(error).__name__}: {error}): give "
            "replay_prompt_ids (the tokens fed before the re-fed context)"
        ) from error
    return repeat_prompt_for(tokenizer)


class PromptedReplay(Replay):
    """``"replay_prompted"``: the replay as an instruct model reads a repeat request, KVzip's framing: after the
    context, the repeat instruction in the model's chat template (:class:`RepeatPrompt`), then the context
    re-fed as the assistant's answer (without the template's opening where the context starts with it). The
    instruction's and the re-fed tokens' queries score the context's keys only; the cache keeps the context
    only. KVzip also keeps 4 sink tokens: use it with ``n_sink=4``."""

    needs_prompt = True

    def __init__(self, prompt: RepeatPrompt):
        self.prompt = prompt

    def refed_inputs(self, run: PrefillRun) -> PrefillInputs:
        inputs = run.inputs
        if inputs.input_ids is None:
            raise ValueError("query_source='replay_prompted' needs the context as input_ids (it feeds the repeat "
                             "prompt as tokens), got inputs_embeds: use query_source='replay'")
        ids, batch, device = inputs.input_ids, inputs.input_ids.shape[0], inputs.input_ids.device
        prefix = torch.tensor(self.prompt.template_prefix, dtype=ids.dtype, device=device)
        skip = len(prefix) if 0 < len(prefix) < ids.shape[1] and bool((ids[:, :len(prefix)] == prefix).all()) else 0
        prompt = torch.tensor(self.prompt.ids, dtype=ids.dtype, device=device)[None].expand(batch, -1)
        n_prompt = prompt.shape[1]
        prompt_valid = torch.ones(batch, n_prompt, dtype=torch.bool, device=device)
        first = inputs.position_ids.amax(dim=-1, keepdim=True) + 1  # each row's re-fed tokens follow its context
        prompt_positions = first + torch.arange(n_prompt, device=device)[None]
        context_positions = inputs.position_ids[:, skip:] - skip + first + n_prompt
        mask = inputs.attention_mask
        return PrefillInputs(
            input_ids=torch.cat([prompt, ids[:, skip:]], dim=1),
            inputs_embeds=None,
            attention_mask=None if mask is None else torch.cat([prompt_valid.to(mask.dtype), mask[:, skip:]], dim=1),
            position_ids=torch.cat([prompt_positions, context_positions], dim=1),
            valid=torch.cat([prompt_valid, inputs.valid[:, skip:]], dim=1),
        )


class Scorer(QuerySource):
    """Any kvpress ``ScorerPress`` (SnapKV, ExpectedAttention, Knorm, TOVA, ...) as the token scores, put on
    one scale in every layer (:func:`on_one_scale`) so that global allocation can compare layers."""

    def __init__(self, scorer: ScorerPress):
        self.scorer = scorer

    def score_layer(self, run, module, keys, values, attentions, kwargs):
        scores = checked_scorer_scores(self.scorer, module, kwargs["hidden_states"], keys, values, attentions, kwargs)
        run.scores[module.layer_idx] = on_one_scale(scores, run.inputs.valid)

    def layer_scores(self, run, layer_idx):
        return run.scores[layer_idx]

    def cache_scores(self, module, hidden_states, position_embeddings, cache, key_valid, n_layers):
        keys, values = layer_states(cache, module.layer_idx)
        kwargs = {"hidden_states": hidden_states, "position_embeddings": position_embeddings, "past_key_values": cache}
        scores = checked_scorer_scores(self.scorer, module, hidden_states, keys, values, None, kwargs)
        return on_one_scale(scores, key_valid)


class RecentQueries(QuerySource):
    """During decoding (:class:`~kvpress_compose.ComposeDecodingPress`): the last generated tokens' queries,
    recomputed from their buffered attention inputs with the model's own projection and RoPE, each attending
    causally to the layer's cache; the closest queries to what comes next, which eviction should protect."""

    def cache_scores(self, module, hidden_states, position_embeddings, cache, key_valid, n_layers):
        keys, _ = layer_states(cache, module.layer_idx)
        n_queries, n_cached = hidden_states.shape[1], keys.shape[2]
        queries = query_blocks(module, hidden_states, position_embeddings)
        query_valid = torch.ones(keys.shape[0], n_queries, dtype=torch.bool, device=keys.device)
        statistics = softmax_statistics(self.scoring, module, queries, keys, key_valid, query_valid,
                                        n_cached - n_queries, n_cached, n_layers)
        return finish_scores(statistics, query_valid.sum(dim=-1), self.scoring.agg_task, self.scoring.agg_group)


def on_one_scale(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(batch, kv_heads, n)`` scores shifted to a minimum of 0 and scaled to sum to 1 over each row's valid
    tokens, per head: a share of the head's total, as attention probabilities are. A scorer's scale may differ by
    layer (ExpectedAttention multiplies by value norms, Knorm is a negative norm), and global allocation compares
    layers, so a scale alone must not move budgets between them. It does not make every scorer suit global
    allocation: a layer whose scores sit on a few tokens still loses the rest (README, "Findings"). The order
    within a head is unchanged. A ``-inf`` score (never kept) stays ``-inf``; the rest are scaled without it."""
    if valid.shape[1] == scores.shape[2]:
        valid = valid[:, None].to(scores.device)  # (batch, 1, n)
    else:  # an earlier press pruned this layer: its positions are unknown, every entry counts
        valid = torch.ones_like(scores, dtype=torch.bool)
    scored = valid & (scores > float("-inf"))  # (batch, heads, n)
    lowest = scores.masked_fill(~scored, float("inf")).amin(dim=-1, keepdim=True)
    shifted = (scores - lowest).masked_fill(~scored, 0.0)
    scaled = shifted / shifted.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(shifted.dtype).tiny)
    return scaled.masked_fill(valid & ~scored, float("-inf"))


def checked_scorer_scores(scorer: ScorerPress, module: nn.Module, hidden_states, keys, *args) -> torch.Tensor:
    """``scorer.score(module, hidden_states, keys, *args)`` in float32, checked: a floating-point tensor of shape
    ``(batch, kv_heads, n)``, one score per KV head and cached entry (``keys``' first three dimensions), refused
    by name otherwise; and refused where it is NaN or ``+inf`` (``-inf`` means "never kept"; NaN would spread
    through the layer's scale and empty the cache)."""
    scores = scorer.score(module, hidden_states, keys, *args)
    expected = tuple(keys.shape[:3])
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or tuple(scores.shape) != expected:
        got = (f"a {scores.dtype} tensor of shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor)
               else f"a {type(scores).__name__}")
        error = ValueError if isinstance(scores, torch.Tensor) else TypeError
        raise error(
            f"{type(scorer).__name__}.score gave {got} in layer {module.layer_idx}; expected a floating-point tensor "
            f"of shape (batch, kv_heads, n) = {expected}: one score per KV head and cached entry"
        )
    scores = scores.float()
    bad = scores.isnan() | (scores == float("inf"))
    if bool(bad.any()):
        raise ValueError(
            f"{type(scorer).__name__}.score gave {int(bad.sum())} NaN or +inf scores (of {scores.numel()}) in layer "
            f"{module.layer_idx}: a scorer's scores must be finite, or -inf for tokens never kept"
        )
    return scores


QUERY_SOURCES: dict[str, type[QuerySource]] = {
    "prefill": CausalPrefill,
    "prefill_seen": CausalPrefillSeen,
    "bidirectional": BidirectionalPrefill,
    "replay": Replay,
    "replay_local": LocalReplay,
    "replay_prompted": PromptedReplay,
}


def query_source_for(query_source: str, scorer: ScorerPress | None, scoring: Scoring = Scoring(),
                     repeat_prompt: Callable[[], RepeatPrompt] | None = None) -> QuerySource:
    """The source a press's ``query_source`` name (or ``scorer``, which takes precedence; ``"recent"``: the
    decoding queries) stands for, scoring as ``scoring`` says; a source that ``needs_prompt`` is given
    ``repeat_prompt()``."""
    if scorer is not None:
        source = Scorer(scorer)
    elif query_source == "recent":
        source = RecentQueries()
    else:
        source_class = QUERY_SOURCES[query_source]
        if getattr(source_class, "needs_prompt", False):
            if repeat_prompt is None:
                raise ValueError(f"query_source={query_source!r} needs a repeat prompt")
            source = source_class(repeat_prompt())
        else:
            source = source_class()
    source.scoring = scoring
    return source


def softmax_statistics(scoring: Scoring, module, queries, keys, key_valid, query_valid, causal_offset,
                       n_context: int, n_layers: int):
    """:func:`attention_statistics` of ``queries`` against a layer's keys (the first ``n_context`` scored), in
    blocks sized from a cache of ``n_layers`` such layers."""
    if key_valid.shape[1] != keys.shape[2]:  # an earlier press pruned this layer: positions are unknown
        key_valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool)
    return attention_statistics(
        queries,
        query_valid.shape[1],
        module.config.num_attention_heads,
        keys,
        key_valid.to(keys.device),
        query_valid.to(keys.device),
        n_scored=min(n_context, keys.shape[2]),
        causal_offset=causal_offset,
        agg_task=scoring.agg_task,
        block_bytes=int(SCORE_BLOCK_FRACTION * full_cache_bytes(keys[:, :, :n_context], n_layers)),
        block_size=scoring.block_size,
    )


def check_unpruned(query_source: str, keys: torch.Tensor, hidden_states: torch.Tensor) -> None:
    """The layer still holds every context token: no press before ComposePress pruned it."""
    if keys.shape[2] != hidden_states.shape[1]:
        raise ValueError(
            f"query_source={query_source!r} needs the layer's full context ({hidden_states.shape[1]} tokens), but "
            f"another press left {keys.shape[2]} in the cache before ComposePress scored it (presses act in the "
            "order their hooks were registered: a ComposedPress's list order, the outer of nested `with press"
            "(model)` blocks first): after a press that prunes tokens, use query_source='bidirectional' or a scorer"
        )

