"""KVCompose's algorithm in one place, top to bottom: from each layer's scores to a compressed cache.

1. **Scores per layer**: ``(batch, kv_heads, n_l)`` for each compressed layer, from a query source
   (:mod:`kvpress_compose.query_sources`); ``-inf`` means "never kept".
2. **Post-processing** (:func:`post_processed`): value norms, padding, sinks, the mean over heads, pooling, the
   allocation's own ranking, one ranking per layer; the result is stacked ``(layers, batch, kv_heads, n)``.
3. **Composite tokens** (:func:`rank_tokens`, :func:`composite_scores`): each head ranks its own tokens; rank j of
   every head forms composite token j of the layer, scored by ``agg_head`` over the heads' j-th scores.
4. **Allocation** (:data:`ALLOCATIONS`): how many composite tokens each layer keeps of one budget ``n_kept``;
   one :class:`Allocation` object per ``layer_allocation`` setting.
5. **Kept positions** (:func:`kept_positions`): each head's top ``budget`` positions, ascending.
6. **Gather** (:func:`compress_layer`): the kept keys and values, one dense ``(batch, kv_heads, k_l, head_dim)``
   tensor per layer, so memory really shrinks; each layer's kept context length is recorded on its cache layer
   for :mod:`kvpress_compose.layer_masks`, which builds that layer's mask from it for later tokens.

:func:`compress` runs steps 2 to 6 (ComposePress after a prefill, ComposeDecodingPress during decoding);
:func:`mask_unstructured` is ``structured=False``: steps 2 to 4 per head, then kvpress's head-wise masks. The
settings they read are one :class:`CompressionSettings`, which the press builds from its own fields. Nothing
here logs: what the press should report comes back in :class:`Compressed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from kvpress.utils import extract_keys_and_values
from torch import nn
from transformers import Cache, QuantizedCache

from kvpress_compose.attention_scores import aggregate
from kvpress_compose.head_masks import remember_masks


@dataclass(frozen=True)
class CompressionSettings:
    """The settings the algorithm reads: ComposePress's fields of the same names (documented there)."""

    layer_allocation: str = "global"
    composite_tokens: bool = True
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    score_pooling: int = 1
    min_tokens_per_layer: int = 1
    n_sink: int = 0
    layer_floor: float = 0.0

    @property
    def allocation(self) -> Allocation:
        return ALLOCATIONS[self.layer_allocation]


@dataclass
class Compressed:
    """What one compression did: ``budgets`` ``(layers,)`` composite tokens kept per layer (``(batch, layers,
    kv_heads)`` tokens when unstructured), ``layers`` their indices, ``scores`` the post-processed scores that
    were ranked, ``positions`` each compressed layer's kept positions ``(batch, kv_heads, k_l)`` (structured only),
    ``n_kept`` the budget and ``n_entries`` the entries per KV head it was taken from, and ``warnings`` for the
    press to log."""

    budgets: torch.Tensor
    layers: list[int]
    scores: torch.Tensor
    positions: dict[int, torch.Tensor] = field(default_factory=dict)
    n_kept: int = 0
    n_entries: int = 0
    warnings: list[str] = field(default_factory=list)


def compute_n_kept(n_total: int, compression_ratio: float) -> int:
    """Number of entries kept out of ``n_total`` at ``compression_ratio`` (floor, robust to float noise)."""
    return math.floor(round(n_total * (1.0 - compression_ratio), 6))


# -- steps 2 to 6 ---------------------------------------------------------------------------------------------


def compress(cache, layer_scores: list[torch.Tensor], valid, n_kept: int, layer_indices: list[int],
             settings: CompressionSettings) -> Compressed:
    """Keep ``n_kept`` composite tokens over the layers ``layer_indices`` of ``cache``, from their scores (one
    ``(batch, kv_heads, n_l)`` tensor per layer; ``valid``: see :func:`post_processed`); other layers are left as
    they are."""
    scores = post_processed(layer_scores, cache, layer_indices, valid, settings)  # step 2
    sorted_scores, token_order = rank_tokens(scores)  # step 3: each head's ranking
    n_layers, n = sorted_scores.shape[0], sorted_scores.shape[-1]
    warnings = []
    minimum = settings.min_tokens_per_layer
    if n_layers * minimum > n_kept:
        warnings.append(
            f"min_tokens_per_layer={minimum} over {n_layers} layers keeps {n_layers * minimum} composite tokens, "
            f"more than the {n_kept} that the budget allows"
        )
        n_kept = n_layers * minimum
    allocation = settings.allocation
    budgets = allocation.layer_budgets(sorted_scores, n_kept, settings)  # steps 3 (composite scores) and 4
    if not allocation.equal_budgets and int(budgets.sum()) < n_kept:
        warnings.append(
            f"kept {int(budgets.sum())} composite tokens instead of {n_kept}: only that many have a finite score "
            "in every head and batch row (padding and a scorer's -inf scores are never kept, and batch rows "
            "share one length per layer, so the shortest row bounds each layer)"
        )
    budgets = budgets.cpu()
    positions = {}
    for row, (layer_idx, budget) in enumerate(zip(layer_indices, budgets.tolist())):
        positions[layer_idx] = kept_positions(token_order[row], budget)  # step 5
        compress_layer(cache, layer_idx, positions[layer_idx])  # step 6
    return Compressed(budgets, list(layer_indices), scores, positions, n_kept, n_layers * n, warnings)


def mask_unstructured(cache, layer_scores: list[torch.Tensor], valid, compression_ratio: float,
                      layer_indices: list[int], attention_modules: list[nn.Module],
                      settings: CompressionSettings) -> Compressed:
    """``structured=False``: every (layer, head) keeps its own top tokens of one budget (per layer with
    ``"uniform"``), hidden from attention by kvpress's head-wise masks; the cache keeps every entry."""
    scores = post_processed(layer_scores, cache, layer_indices, valid, settings)
    sorted_scores, token_order = rank_tokens(scores)
    budgets = settings.allocation.head_budgets(sorted_scores, compression_ratio, settings.min_tokens_per_layer)
    mask_evicted_entries([attention_modules[i] for i in layer_indices], token_order, budgets)
    remember_masks(cache, attention_modules)
    return Compressed(budgets.cpu(), list(layer_indices), scores)


def check_cache_unchanged(lengths: list[int], scored_lengths: list[int]) -> None:
    """Every layer still holds the entries that were scored: no press acting after ComposePress pruned them."""
    if lengths != scored_lengths:
        raise ValueError(
            f"another press changed the cache after ComposePress scored it (layer lengths {lengths}, scored "
            f"{scored_lengths}): ComposePress compresses every layer at the last one, so it must act last: put it "
            "last in a ComposedPress, or innermost of nested `with press(model)` blocks"
        )


# -- step 2: post-processing ------------------------------------------------------------------------------------


def post_processed(layer_scores: list[torch.Tensor], cache, layer_indices: list[int], valid,
                   settings: CompressionSettings) -> torch.Tensor:
    """Every post-processing of the scores, in order, as ``(layers, batch, kv_heads, n)`` on one device.

    ``valid`` says which entries are real (not padding): one ``(batch, n)`` tensor for every layer (a prefill), a
    list of each layer's own ``(batch, n_l)`` (decoding, where layers hold different entries), or None (all)."""
    per_layer = valid if isinstance(valid, (list, tuple)) else [valid] * len(layer_scores)
    scores = stack_layer_scores([
        with_value_norms_and_padding(scores, cache, layer_idx, layer_valid, settings.add_v_norm)
        for scores, layer_idx, layer_valid in zip(layer_scores, layer_indices, per_layer)
    ])
    sink_valid = valid if isinstance(valid, torch.Tensor) else each_layers_valid(per_layer, layer_scores, scores)
    scores = with_sinks_kept(scores, sink_valid, settings.n_sink)
    if settings.add_mean_across_heads:
        # a never-kept (-inf) entry stays so, whatever the other heads hold
        scores = torch.where(scores > float("-inf"), scores + mean_of_finite(scores, dim=2), scores)
    scores = pooled_scores(scores, settings.score_pooling)
    scores = settings.allocation.ranking(scores)
    if not settings.composite_tokens:  # one ranking per layer, shared by every head
        scores = aggregate(scores, settings.agg_head, dim=2)[:, :, None].expand_as(scores).contiguous()
    return scores


def with_value_norms_and_padding(scores: torch.Tensor, cache, layer_idx: int, valid: torch.Tensor | None,
                                 add_v_norm: bool) -> torch.Tensor:
    """``(batch, kv_heads, n)`` scores of a layer times its value norms (``add_v_norm``), ``-inf`` where ``valid``
    ``(batch, n)`` is False (padding)."""
    if add_v_norm:
        _, values = layer_states(cache, layer_idx)
        scores = scores * values[:, :, : scores.shape[2]].float().norm(dim=-1)
    if valid is not None and scores.shape[2] == valid.shape[1]:
        scores = scores.masked_fill(~valid[:, None].to(scores.device), float("-inf"))
    return scores


def each_layers_valid(per_layer: list[torch.Tensor | None], layer_scores: list[torch.Tensor],
                      scores: torch.Tensor) -> torch.Tensor:
    """``(layers, batch, n)``: each layer's valid entries, for the sinks; a layer whose ``valid`` does not match
    its scores (a QuantizedCache may count other entries than it holds) takes every scored entry as valid."""
    valid = torch.zeros(scores.shape[0], scores.shape[1], scores.shape[-1], dtype=torch.bool, device=scores.device)
    for row, (layer_valid, scored) in enumerate(zip(per_layer, layer_scores)):
        n_scored = scored.shape[2]
        matches = layer_valid is not None and layer_valid.shape[1] == n_scored
        valid[row, :, :n_scored] = layer_valid.to(scores.device) if matches else True
    return valid


def stack_layer_scores(layer_scores: list[torch.Tensor]) -> torch.Tensor:
    """``(layers, batch, kv_heads, n)`` from each layer's ``(batch, kv_heads, n_l)`` scores, on the first one's
    device, ``n`` the longest layer's length: positions a layer lacks are ``-inf`` (never kept)."""
    device = layer_scores[0].device
    n = max(scores.shape[2] for scores in layer_scores)
    pad = torch.nn.functional.pad
    return torch.stack([pad(scores.to(device), (0, n - scores.shape[2]), value=float("-inf"))
                        for scores in layer_scores])


def with_sinks_kept(scores: torch.Tensor, valid: torch.Tensor, n_sink: int) -> torch.Tensor:
    """``scores`` ``(layers, batch, kv_heads, n)`` with ``+inf`` at the first ``n_sink`` valid positions of each row
    (``valid`` ``(batch, n)``, every layer's, or ``(layers, batch, n)``, each layer's own, as during decoding where
    layers hold different entries; the first entries where a layer holds fewer): the attention sinks, which every
    head keeps and which do not compete for the budget (KVzip keeps them the same way). Padding is never a sink:
    a left-padded row's sinks are its first real tokens."""
    if n_sink == 0:
        return scores
    n = scores.shape[-1]
    if valid is not None and valid.shape[-1] >= n:
        valid = valid[..., :n].to(scores.device)
    else:
        valid = torch.ones(scores.shape[1], n, dtype=torch.bool, device=scores.device)
    sinks = valid & (valid.long().cumsum(dim=-1) <= n_sink)  # (batch, n) or (layers, batch, n)
    sinks = sinks[None, :, None] if sinks.dim() == 2 else sinks[:, :, None]
    return scores.masked_fill(sinks & (scores > float("-inf")), float("inf"))


def mean_of_finite(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean over ``dim`` (kept) of the scores above ``-inf``: a head's ``-inf`` (never kept) leaves the other
    heads' scores alone, a ``+inf`` (always kept: a sink) stays ``+inf``; ``-inf`` where every score is."""
    kept = scores > float("-inf")
    if bool(kept.all()):
        return scores.mean(dim=dim, keepdim=True)
    count = kept.sum(dim=dim, keepdim=True)
    total = scores.masked_fill(~kept, 0.0).sum(dim=dim, keepdim=True)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("-inf")))


def pooled_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Each finite score raised to the largest finite score within ``kernel // 2`` positions of it (``kernel``
    odd), so a token that scores high keeps its neighbours in the ranking: a needle's other digits, the words
    of its key. ``+inf`` (always kept: sinks) and ``-inf`` (never kept: padding, positions a layer lacks) stay as
    they are and lend nothing to their neighbours. ``scores``: ``(..., n)``."""
    if kernel == 1:
        return scores
    finite = torch.isfinite(scores)
    rows = scores.masked_fill(~finite, float("-inf")).reshape(-1, 1, scores.shape[-1])  # (rows, 1, n)
    pooled = torch.nn.functional.max_pool1d(rows, kernel, stride=1, padding=kernel // 2).view_as(scores)
    return torch.where(finite, pooled, scores)


def shared_ranking(scores: torch.Tensor) -> torch.Tensor:
    """One ranking for every layer and head, ``(layers, batch, kv_heads, n)`` like ``scores``: each token's best
    percentile among the finite scores of any (layer, head) of its batch row, in [0, 1]. A token that one layer
    singles out is kept by all of them (why: docs/gemma3-default-loss.md). Equal scores share the lowest
    percentile of their run, so a (layer, head) that scores every token alike adds nothing. Entries at ``±inf``
    stay as they are; the result is float32."""
    finite = torch.isfinite(scores)
    masked = scores.masked_fill(~finite, float("-inf")).float().contiguous()
    # equal scores share the lowest rank of their run (a pooled plateau, a constant head: 0 from a constant one)
    ascending = torch.searchsorted(masked.sort(dim=-1).values, masked, side="left")
    n_finite = finite.sum(dim=-1, keepdim=True)
    percentile = (ascending - (scores.shape[-1] - n_finite)).float() / (n_finite - 1).clamp_min(1)
    percentile = percentile.masked_fill(~finite, float("-inf"))
    best = percentile.amax(dim=(0, 2), keepdim=True).expand_as(scores)  # (1, batch, 1, n) -> every layer and head
    return torch.where(finite, best, scores.float())  # float32: half precision would tie thousands of percentiles


# -- step 3: composite tokens -----------------------------------------------------------------------------------


def rank_tokens(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's scores sorted descending and the token order; equal scores keep position order."""
    return torch.sort(scores, dim=-1, descending=True, stable=True)


def composite_scores(sorted_scores: torch.Tensor, agg_head: str) -> torch.Tensor:
    """``(layers, n)`` composite scores: ``agg_head`` over heads of the j-th ranked score, then the mean over
    batch rows (rows share one budget per layer). A rank that some row lacks (padding) stays ``-inf``."""
    per_row = aggregate(sorted_scores, agg_head, dim=2)  # (layers, batch, n)
    return per_row.mean(dim=1)


# -- step 4: allocation -----------------------------------------------------------------------------------------


class Allocation:
    """How one budget of composite tokens is spread over the layers (a ``layer_allocation`` setting). Adding an
    allocation is one subclass and one entry of :data:`ALLOCATIONS`."""

    equal_budgets = False  # every layer keeps the same number (no "kept fewer than the budget" warning)
    serves_unstructured = False  # whether structured=False (per-head budgets) may use it

    def ranking(self, scores: torch.Tensor) -> torch.Tensor:
        """The post-processing step this allocation adds to the scores before ranking (none by default)."""
        return scores

    def layer_budgets(self, sorted_scores: torch.Tensor, n_kept: int, settings: CompressionSettings) -> torch.Tensor:
        """``(layers,)`` composite tokens kept per layer from each head's sorted scores ``(layers, batch, kv_heads,
        n)``."""
        raise NotImplementedError

    def head_budgets(self, sorted_scores: torch.Tensor, compression_ratio: float, min_per_head: int) -> torch.Tensor:
        """``structured=False``: tokens kept per (row, layer, head), ``(batch, layers, kv_heads)``."""
        raise NotImplementedError


class GlobalAllocation(Allocation):
    """``"global"``, the paper's: one top-k over every layer's composite scores, so layers whose tokens draw more
    attention keep more; each layer keeps at least ``layer_floor`` of the uniform budget and
    ``min_tokens_per_layer``. Unstructured: one top-k per row over every head's scores."""

    serves_unstructured = True

    def layer_budgets(self, sorted_scores, n_kept, settings):
        floor = floor_per_layer(n_kept, sorted_scores.shape[0], settings.layer_floor, settings.min_tokens_per_layer)
        return layer_budgets(composite_scores(sorted_scores, settings.agg_head), n_kept, floor)

    def head_budgets(self, sorted_scores, compression_ratio, min_per_head):
        return head_budgets(sorted_scores, compression_ratio, min_per_head, per_layer=False)


class UniformAllocation(Allocation):
    """``"uniform"``, the ablation: every layer keeps the same number of composite tokens. Unstructured: one
    top-k per row and layer, its heads competing for it."""

    equal_budgets = True
    serves_unstructured = True

    def layer_budgets(self, sorted_scores, n_kept, settings):
        return uniform_budgets(composite_scores(sorted_scores, settings.agg_head), n_kept,
                               settings.min_tokens_per_layer)

    def head_budgets(self, sorted_scores, compression_ratio, min_per_head):
        return head_budgets(sorted_scores, compression_ratio, min_per_head, per_layer=True)


class NormalizedGlobalAllocation(GlobalAllocation):
    """``"global_normalized"``: the global top-k over each head's score shares (:func:`per_head_shares`), so
    layers compete by how their scores are spread, not by their scale (use with ``n_sink``). Structured only."""

    serves_unstructured = False

    def layer_budgets(self, sorted_scores, n_kept, settings):
        return super().layer_budgets(per_head_shares(sorted_scores), n_kept, settings)


class SharedAllocation(UniformAllocation):
    """``"shared"``: every layer and head keeps the same tokens, each token ranked by its best within-layer
    percentile (:func:`shared_ranking`: a token one layer singles out is kept by all), as many per layer; for
    models whose few full-attention layers score on different scales (Gemma 3, with ``score_pooling=9``).
    Structured only."""

    serves_unstructured = False

    def ranking(self, scores):
        return shared_ranking(scores)


ALLOCATIONS: dict[str, Allocation] = {
    "global": GlobalAllocation(),
    "uniform": UniformAllocation(),
    "global_normalized": NormalizedGlobalAllocation(),
    "shared": SharedAllocation(),
}

# ``layer_allocation="auto"`` (the default) picks one of ALLOCATIONS from the model's own config: a hybrid model
# (full-attention layers beside sliding-window or chunked ones, e.g. Gemma 3) gets "shared" with this pooling,
# every other model "global" (the evidence: README, "Results on real models")
AUTO = "auto"
HYBRID_POOLING = 9


def resolved_allocation(layer_allocation: str, score_pooling: int, hybrid: bool,
                        structured: bool = True) -> tuple[str, int]:
    """``(layer_allocation, score_pooling)`` as compressed: an explicit allocation as it is; ``"auto"`` becomes
    ``"shared"`` with ``score_pooling`` :data:`HYBRID_POOLING` (unless set above 1) on a ``hybrid`` model, and
    ``"global"`` elsewhere, or wherever ``structured=False`` (``"shared"`` is structured only)."""
    if layer_allocation != AUTO:
        return layer_allocation, score_pooling
    if hybrid and structured:
        return "shared", score_pooling if score_pooling > 1 else HYBRID_POOLING
    return "global", score_pooling


def top_entries(scores: torch.Tensor, n_kept: int, n_forced: int) -> torch.Tensor:
    """Entries kept per group, ``(rows, groups)``, when each row keeps its global top ``n_kept`` of
    ``scores`` ``(rows, groups, n)`` (every group non-increasing along n), the first ``n_forced`` of every group
    always kept, before anything else competes: ``+inf`` entries (sinks) never take a group's forced entries
    from it, so every group keeps at least ``n_forced`` (more than ``n_kept`` in all where they exceed it).
    Other ``-inf`` entries (padding, missing positions) are never kept, so a row may keep fewer."""
    rows, groups, n = scores.shape
    n_forced = min(n_forced, n)
    counts = torch.full((rows, groups), n_forced, dtype=torch.long, device=scores.device)
    rest = scores[..., n_forced:].flatten(1)  # what competes for the rest of the budget, group by group
    n_rest = min(n_kept - groups * n_forced, rest.shape[1])
    if n_rest <= 0:
        return counts
    flat_order = torch.sort(rest, dim=-1, descending=True, stable=True).indices[:, :n_rest]
    keep = torch.gather(rest, 1, flat_order) > float("-inf")  # (rows, n_rest)
    return counts.scatter_add_(1, flat_order // (n - n_forced), keep.long())


def layer_budgets(composite: torch.Tensor, n_kept: int, min_per_layer: int) -> torch.Tensor:
    """Composite tokens kept per layer, ``(layers,)``: global top ``n_kept`` with ``min_per_layer`` each."""
    return top_entries(composite[None], n_kept, min_per_layer)[0]


def per_head_shares(sorted_scores: torch.Tensor) -> torch.Tensor:
    """Each head's finite scores divided by their sum, ``(layers, batch, kv_heads, n)``: a share of what the head
    spreads over the tokens that compete, so that layers compete by how their scores are spread, not by their
    scale (raw scores of layers on different scales give a few layers most of the budget:
    docs/real-model-sources.md). ``+inf`` (always kept: sinks) and ``-inf`` (never kept) entries are left as
    they are and count for nothing; the order within a head is unchanged."""
    finite = torch.isfinite(sorted_scores)
    total = sorted_scores.masked_fill(~finite, 0.0).sum(dim=-1, keepdim=True)
    shares = sorted_scores / total.clamp_min(torch.finfo(sorted_scores.dtype).tiny)
    return torch.where(finite, shares, sorted_scores)


def floor_per_layer(n_kept: int, n_layers: int, floor: float, min_per_layer: int) -> int:
    """Composite tokens every layer keeps whatever the global ranking says: ``floor`` of the uniform budget
    ``n_kept // n_layers``, and at least ``min_per_layer``."""
    return max(min_per_layer, math.floor(floor * (n_kept // n_layers)))


def uniform_budgets(composite: torch.Tensor, n_kept: int, min_per_layer: int) -> torch.Tensor:
    """The ablation of :func:`layer_budgets`: every layer keeps ``n_kept // layers`` composite tokens (at least
    ``min_per_layer``), fewer only where a layer has fewer (padding is never kept), ``(layers,)``."""
    available = (composite > float("-inf")).sum(dim=1)
    per_layer = max(min_per_layer, n_kept // composite.shape[0])
    return available.clamp(max=per_layer).clamp(min=min_per_layer)


def head_budgets(sorted_scores: torch.Tensor, compression_ratio: float, min_per_head: int,
                 per_layer: bool = False) -> torch.Tensor:
    """Unstructured variant: tokens kept per (row, layer, head), ``(batch, layers, kv_heads)``, from one global
    top-k per row over every head's sorted scores, or with ``per_layer`` one top-k per row and layer (every layer
    keeps the same number; its heads compete for it)."""
    layers, batch, heads, n = sorted_scores.shape
    if per_layer:
        n_kept = compute_n_kept(heads * n, compression_ratio)
        return torch.stack([top_entries(sorted_scores[layer], n_kept, min_per_head) for layer in range(layers)], 1)
    per_row = sorted_scores.permute(1, 0, 2, 3).reshape(batch, layers * heads, n)
    n_kept = compute_n_kept(layers * heads * n, compression_ratio)
    return top_entries(per_row, n_kept, min_per_head).view(batch, layers, heads)


# -- step 5: kept positions -------------------------------------------------------------------------------------


def kept_positions(token_order: torch.Tensor, budget: int) -> torch.Tensor:
    """The top-``budget`` positions of each head, ``(batch, kv_heads, budget)``, in ascending order."""
    return token_order[..., :budget].sort(dim=-1).values


# -- step 6: the gather: kept entries written back into the cache (DynamicCache, or QuantizedCache re-quantized),
# one dense (batch, kv_heads, k_l, head_dim) tensor per layer, and the context length each layer kept recorded for
# kvpress_compose.layer_masks; with the cache readers the query sources share (layer_states, full_cache_bytes) -----

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


# -- structured=False: kvpress's head-wise masks instead of the gather --------------------------------------------


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
