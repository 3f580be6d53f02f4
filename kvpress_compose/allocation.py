"""Composite tokens and global budget allocation (steps 2 and 3 of KVCompose).

Scores of all layers are stacked as ``(layers, batch, kv_heads, n)`` (positions a layer does not have, and
padding, are ``-inf``). Each head sorts its own scores; the j-th composite token of a layer is the j-th ranked
token of every head, scored by aggregating those heads' j-th scores. One global top-k over all layers'
composite scores decides how many composite tokens each layer keeps. Ties are broken by (layer, rank), so the
result is deterministic.
"""

from __future__ import annotations

import math

import torch

from kvpress_compose.attention_scores import aggregate


def compute_n_kept(n_total: int, compression_ratio: float) -> int:
    """Number of entries kept out of ``n_total`` at ``compression_ratio`` (floor, robust to float noise)."""
    return math.floor(round(n_total * (1.0 - compression_ratio), 6))


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
    if valid.shape[-1] >= n:
        valid = valid[..., :n].to(scores.device)
    else:
        valid = torch.ones(scores.shape[1], n, dtype=torch.bool, device=scores.device)
    sinks = valid & (valid.long().cumsum(dim=-1) <= n_sink)  # (batch, n) or (layers, batch, n)
    sinks = sinks[None, :, None] if sinks.dim() == 2 else sinks[:, :, None]
    return scores.masked_fill(sinks & (scores > float("-inf")), float("inf"))


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
    singles out is kept by all of them: on Gemma-3-270M only the first full-attention layer's replay picks out a
    needle in prose (docs/gemma3-default-loss.md). Equal scores share the lowest percentile of their run, so a
    (layer, head) that scores every token alike adds nothing. Entries at ``±inf`` stay as they are; the result is
    float32."""
    finite = torch.isfinite(scores)
    masked = scores.masked_fill(~finite, float("-inf")).float().contiguous()
    # equal scores share the lowest rank of their run (a pooled plateau, a constant head: 0 from a constant one)
    ascending = torch.searchsorted(masked.sort(dim=-1).values, masked, side="left")
    n_finite = finite.sum(dim=-1, keepdim=True)
    percentile = (ascending - (scores.shape[-1] - n_finite)).float() / (n_finite - 1).clamp_min(1)
    percentile = percentile.masked_fill(~finite, float("-inf"))
    best = percentile.amax(dim=(0, 2), keepdim=True).expand_as(scores)  # (1, batch, 1, n) -> every layer and head
    return torch.where(finite, best, scores.float())  # float32: half precision would tie thousands of percentiles


def rank_tokens(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's scores sorted descending and the token order; equal scores keep position order."""
    return torch.sort(scores, dim=-1, descending=True, stable=True)


def composite_scores(sorted_scores: torch.Tensor, agg_head: str) -> torch.Tensor:
    """``(layers, n)`` composite scores: ``agg_head`` over heads of the j-th ranked score, then the mean over
    batch rows (rows share one budget per layer). A rank that some row lacks (padding) stays ``-inf``."""
    per_row = aggregate(sorted_scores, agg_head, dim=2)  # (layers, batch, n)
    return per_row.mean(dim=1)


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
    scale. On SmolLM2 a replay's scores differ by layer in scale (upper deciles 10x apart) and some layers put half
    their attention on the sink tokens: raw scores gave two layers most of the budget and starved those
    (docs/real-model-sources.md). ``+inf`` (always kept: sinks) and ``-inf`` (never kept) entries are left as
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


def kept_positions(token_order: torch.Tensor, budget: int) -> torch.Tensor:
    """The top-``budget`` positions of each head, ``(batch, kv_heads, budget)``, in ascending order."""
    return token_order[..., :budget].sort(dim=-1).values
