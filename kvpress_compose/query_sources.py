"""Where the queries that score the context come from: one class per query source, behind one interface.

ComposePress calls a :class:`QuerySource` three ways during a prefill: :attr:`~QuerySource.captures_prefill_lse`
(whether the prefill's attention should leave its log-sum-exp), :meth:`~QuerySource.score_layer` (in each
layer's forward hook) and :meth:`~QuerySource.finish` (once the last layer has run, before allocation); then
:meth:`~QuerySource.layer_scores` gives each layer's ``(batch, kv_heads, n)`` scores. Adding a source means
writing one class and, for a string name, one entry of :data:`QUERY_SOURCES`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from kvpress import ScorerPress
from torch import nn

from kvpress_compose import attention_lse
from kvpress_compose.attention_lse import LseCapture
from kvpress_compose.attention_scores import (
    attention_statistics,
    finish_scores,
    merge_statistics,
    query_blocks,
    statistics_from_lse,
)
from kvpress_compose.cache_gather import full_cache_bytes
from kvpress_compose.prefill_run import REPLAY, PrefillRun
from kvpress_compose.replay import ReplayCache, run_replay

SCORE_BLOCK_FRACTION = 0.1  # softmax scoring works in blocks of about this fraction of the full KV cache size


class QuerySource:
    """The interface ComposePress scores through (the default methods suit attention-based sources)."""

    captures_prefill_lse = False  # whether the prefill's own attention should leave its log-sum-exp

    def score_layer(self, run: PrefillRun, module: nn.Module, keys, values, attentions, kwargs: dict) -> None:
        """Called in each layer's forward hook during the prefill, with the layer's cached keys and values."""

    def finish(self, run: PrefillRun, cache) -> None:
        """Called once the prefill's last layer has been scored, before the budgets are allocated."""

    def layer_scores(self, run: PrefillRun, layer_idx: int) -> torch.Tensor:
        """``(batch, kv_heads, n)`` scores of one layer, from the statistics the source gathered."""
        n_queries = run.inputs.valid.sum(dim=-1)
        return finish_scores(run.statistics[layer_idx], n_queries, run.agg_task, run.agg_group)


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
            run.statistics[module.layer_idx] = softmax_statistics(run, module, queries, keys, valid, valid,
                                                                  self.causal_offset)
            return
        run.statistics[module.layer_idx] = statistics_from_lse(
            captured.query_blocks(), self.log_sum_exp(captured, run), captured.keys, run.inputs.valid,
            n_scored=run.inputs.length, causal_offset=self.causal_offset, agg_task=run.agg_task,
        )

    def log_sum_exp(self, captured, run) -> torch.Tensor:
        return captured.lse


class BidirectionalPrefill(CausalPrefill):
    """``"bidirectional"``: the prefill's queries attending to every context key (no extra pass); works after
    presses that pruned the layer, whose kept keys' positions are unknown."""

    causal_offset = None

    def log_sum_exp(self, captured, run) -> torch.Tensor:
        return attention_lse.bidirectional_lse(captured, run.inputs.valid)


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
        hooks = [module.register_forward_hook(self.refed_hook(run, replay_cache, capture), with_kwargs=True)
                 for module in scored_modules]
        phase, run.phase = run.phase, REPLAY
        try:
            with capture if capture is not None else nullcontext():
                run_replay(run.language_model, run.inputs, replay_cache, capture)
        finally:
            run.phase = phase
            for hook in hooks:
                hook.remove()

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
        end = start + hidden_states.shape[1]
        captured = capture.take(module, *hidden_states.shape[:2]) if capture is not None else None
        if captured is not None:  # normalised over everything the re-fed queries saw; every context key is visible
            chunk = statistics_from_lse(captured.query_blocks(), captured.lse, captured.keys, valid[:, start:end],
                                        n_scored=n_context, causal_offset=None, agg_task=run.agg_task)
        else:
            queries = query_blocks(module, hidden_states, kwargs.get("position_embeddings"))
            refed_start = start if self.chunk_local else 0  # the first re-fed token the keys hold
            chunk = softmax_statistics(run, module, queries, keys, torch.cat([valid, valid[:, refed_start:end]], dim=1),
                                       valid[:, start:end], n_context + start - refed_start)
        layer = module.layer_idx
        run.statistics[layer] = merge_statistics(run.statistics.get(layer), chunk, run.agg_task)


class LocalReplay(Replay):
    """``"replay_local"``: the replay with KVzip's cheaper attention: each re-fed chunk attends to the context
    and its own tokens only, not to earlier chunks (about n^2 + n c / 2 pairs for chunks of c, against 1.5 n^2)."""

    chunk_local = True


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


def checked_scorer_scores(scorer: ScorerPress, module: nn.Module, *args) -> torch.Tensor:
    """``scorer.score(module, *args)`` in float32, refused by name where it is NaN or ``+inf`` (``-inf`` means
    "never kept"; NaN would spread through the layer's scale and empty the cache)."""
    scores = scorer.score(module, *args).float()
    bad = scores.isnan() | (scores == float("inf"))
    if bool(bad.any()):
        raise ValueError(
            f"{type(scorer).__name__}.score gave {int(bad.sum())} NaN or +inf scores (of {scores.numel()}) in layer "
            f"{module.layer_idx}: a scorer's scores must be finite, or -inf for tokens never kept"
        )
    return scores


QUERY_SOURCES: dict[str, type[QuerySource]] = {
    "prefill": CausalPrefill,
    "bidirectional": BidirectionalPrefill,
    "replay": Replay,
    "replay_local": LocalReplay,
}


def query_source_for(query_source: str, scorer: ScorerPress | None) -> QuerySource:
    """The source a press's ``query_source`` name (or ``scorer``, which takes precedence) stands for."""
    return Scorer(scorer) if scorer is not None else QUERY_SOURCES[query_source]()


def softmax_statistics(run: PrefillRun, module, queries, keys, key_valid, query_valid, causal_offset):
    """:func:`attention_statistics` of ``queries`` against a layer's keys, in blocks sized from the cache."""
    if key_valid.shape[1] != keys.shape[2]:  # an earlier press pruned this layer: positions are unknown
        key_valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool)
    n_context = run.inputs.length
    return attention_statistics(
        queries,
        query_valid.shape[1],
        module.config.num_attention_heads,
        keys,
        key_valid.to(keys.device),
        query_valid.to(keys.device),
        n_scored=min(n_context, keys.shape[2]),
        causal_offset=causal_offset,
        agg_task=run.agg_task,
        block_bytes=int(SCORE_BLOCK_FRACTION * full_cache_bytes(keys[:, :, :n_context], run.n_layers)),
        block_size=run.score_block_size,
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


def check_cache_unchanged(lengths: list[int], scored_lengths: list[int]) -> None:
    """Every layer still holds the entries that were scored: no press acting after ComposePress pruned them."""
    if lengths != scored_lengths:
        raise ValueError(
            f"another press changed the cache after ComposePress scored it (layer lengths {lengths}, scored "
            f"{scored_lengths}): ComposePress compresses every layer at the last one, so it must act last: put it "
            "last in a ComposedPress, or innermost of nested `with press(model)` blocks"
        )

