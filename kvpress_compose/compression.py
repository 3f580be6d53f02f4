"""How ComposePress turns scored layers into a compressed cache: composite tokens, the layer allocation, and the
gather (or, with ``structured=False``, per-head masks).

:class:`CompositeCompression` holds these steps as methods of the press (ComposePress inherits them), reading its
settings; ComposeDecodingPress calls :meth:`CompositeCompression.compress_scored` of its ``base_press`` during
decoding. Log lines go to ComposePress's logger, ``kvpress_compose.compose_press``.
"""

from __future__ import annotations

import logging

import torch

from kvpress_compose.allocation import (
    composite_scores,
    compute_n_kept,
    floor_per_layer,
    head_budgets,
    kept_positions,
    layer_budgets,
    rank_tokens,
    stack_layer_scores,
    per_head_shares,
    pooled_scores,
    shared_ranking,
    uniform_budgets,
    with_sinks_kept,
)
from kvpress_compose.attention_scores import aggregate
from kvpress_compose.cache_gather import compress_layer, layer_states, mask_evicted_entries
from kvpress_compose.head_masks import remember_masks
from kvpress_compose.model_attachment import check_context_length
from kvpress_compose.prefill_run import PrefillRun
from kvpress_compose.query_sources import check_cache_unchanged
from kvpress_compose.windowed_layers import LayerWindow, record_window

logger = logging.getLogger("kvpress_compose.compose_press")  # the press's logger: users filter on its name


class CompositeCompression:
    """ComposePress's allocation and compression steps, from ``(layers, batch, kv_heads, n)`` scores; they read
    the press's settings (``compression_ratio``, ``structured``, ``layer_allocation``, ``composite_tokens``,
    ``agg_head``, ``add_v_norm``, ``add_mean_across_heads``, ``score_pooling``, ``min_tokens_per_layer``,
    ``n_sink``) and record
    ``last_budgets``, ``last_layers`` and ``last_scores``."""

    def _ranked(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's scores, enhanced as the settings say, sorted, with the token order (``rank_tokens``)."""
        if self.add_mean_across_heads:
            # a never-kept (-inf) entry stays so, whatever the other heads hold
            scores = torch.where(scores > float("-inf"), scores + mean_of_finite(scores, dim=2), scores)
        scores = pooled_scores(scores, self.score_pooling)
        if self.layer_allocation == "shared":  # one ranking for every layer and head
            scores = shared_ranking(scores)
        if not self.composite_tokens:  # one ranking per layer, shared by every head
            scores = aggregate(scores, self.agg_head, dim=2)[:, :, None].expand_as(scores).contiguous()
        self.last_scores = scores
        return rank_tokens(scores)

    def compress_run(self, run: PrefillRun, cache, windows: list[LayerWindow | None]) -> None:
        """Compress ``cache`` after the prefill ``run`` has scored it, at ``compression_ratio`` (``windows``: each
        layer's attention window, None for full attention)."""
        scores = with_sinks_kept(self._stacked_scores(run, cache), run.inputs.valid, self.n_sink)  # compressed layers'
        if not self.structured:
            self._mask_unstructured(run, *self._ranked(scores))
            return
        n_kept = compute_n_kept(scores.shape[0] * scores.shape[-1], self.compression_ratio)
        positions = self.compress_scored(cache, scores, n_kept, run.compressed_layers)
        for layer_idx, kept in positions.items():  # a windowed layer compressed as a full one (short context)
            if windows[layer_idx] is not None:
                record_window(cache.layers[layer_idx], windows[layer_idx], kept, run.inputs.valid)

    def compress_scored(self, cache, scores: torch.Tensor, n_kept: int,
                        layer_indices: list[int] | None = None) -> dict[int, torch.Tensor]:
        """Keep ``n_kept`` composite tokens over the layers ``layer_indices`` of ``cache`` (default: every layer),
        from their ``(layers, batch, kv_heads, n)`` scores (``-inf``: never kept): composite tokens and the layer
        allocation as the settings say; other layers are left as they are. The prefill uses it at
        ``compression_ratio``; :class:`~kvpress_compose.ComposeDecodingPress` during decoding. Returns each
        compressed layer's kept positions, ``(batch, kv_heads, k_l)`` ascending."""
        sorted_scores, token_order = self._ranked(scores)
        layer_indices = list(range(scores.shape[0])) if layer_indices is None else list(layer_indices)
        return self._compress_structured(cache, sorted_scores, token_order, n_kept, layer_indices)

    def layer_scores_enhanced(self, scores: torch.Tensor, cache, layer_idx: int, valid: torch.Tensor) -> torch.Tensor:
        """``(batch, kv_heads, n)`` scores of a layer with the value-norm enhancement, and -inf where ``valid``
        ``(batch, n)`` is False (padding)."""
        if self.add_v_norm:
            _, values = layer_states(cache, layer_idx)
            scores = scores * values[:, :, : scores.shape[2]].float().norm(dim=-1)
        if scores.shape[2] == valid.shape[1]:
            scores = scores.masked_fill(~valid[:, None].to(scores.device), float("-inf"))
        return scores

    def _stacked_scores(self, run: PrefillRun, cache) -> torch.Tensor:
        """``(layers, batch, kv_heads, n)`` scores on one device; positions a layer lacks are -inf."""
        check_context_length(run.inputs, self.min_tokens_per_layer)
        layer_scores = [self.layer_scores_enhanced(run.source.layer_scores(run, layer_idx), cache, layer_idx,
                                                   run.inputs.valid) for layer_idx in run.compressed_layers]
        check_cache_unchanged([cache.get_seq_length(i) for i in run.compressed_layers],
                              [scores.shape[2] for scores in layer_scores])
        return stack_layer_scores(layer_scores)

    def _compress_structured(self, cache, sorted_scores, token_order, n_kept: int, layer_indices: list[int]):
        n_layers, _, _, n = sorted_scores.shape
        if n_layers * self.min_tokens_per_layer > n_kept:
            logger.warning(
                f"min_tokens_per_layer={self.min_tokens_per_layer} over {n_layers} layers keeps "
                f"{n_layers * self.min_tokens_per_layer} composite tokens, more than the {n_kept} that "
                f"the budget allows"
            )
            n_kept = n_layers * self.min_tokens_per_layer
        if self.layer_allocation == "global_normalized":
            sorted_scores = per_head_shares(sorted_scores)
        composite = composite_scores(sorted_scores, self.agg_head)
        equal_budgets = self.layer_allocation in ("uniform", "shared")  # every layer keeps the same number
        if equal_budgets:
            budgets = uniform_budgets(composite, n_kept, self.min_tokens_per_layer)
        else:
            floor = floor_per_layer(n_kept, n_layers, self.layer_floor, self.min_tokens_per_layer)
            budgets = layer_budgets(composite, n_kept, floor)
        if not equal_budgets and int(budgets.sum()) < n_kept:
            logger.warning(
                f"kept {int(budgets.sum())} composite tokens instead of {n_kept}: only that many have a finite score "
                "in every head and batch row (padding and a scorer's -inf scores are never kept, and batch rows "
                "share one length per layer, so the shortest row bounds each layer)"
            )
        self.last_budgets = budgets.cpu()
        self.last_layers = layer_indices
        positions = {}
        for row, (layer_idx, budget) in enumerate(zip(layer_indices, self.last_budgets.tolist())):
            positions[layer_idx] = kept_positions(token_order[row], budget)
            compress_layer(cache, layer_idx, positions[layer_idx])
        logger.info(  # kvpress's pipeline logs layer 0's length only, which says little here
            f"ComposePress kept {int(budgets.sum())} of {n_layers * n} entries per KV head (budget {n_kept}, "
            f"compression_ratio={self.compression_ratio}); per layer: {self.last_budgets.tolist()}"
            + (f" (layers {layer_indices}; the others are windowed, left as they are)"
               if len(layer_indices) < len(cache.layers) else "")
        )
        return positions

    def _mask_unstructured(self, run: PrefillRun, sorted_scores, token_order):
        budgets = head_budgets(sorted_scores, self.compression_ratio, self.min_tokens_per_layer,
                               per_layer=self.layer_allocation == "uniform")  # (b, L, H)
        self.last_budgets = budgets.cpu()
        self.last_layers = run.compressed_layers
        mask_evicted_entries([run.attention_modules[i] for i in run.compressed_layers], token_order, budgets)
        remember_masks(run.cache, run.attention_modules)


def mean_of_finite(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean over ``dim`` (kept) of the scores above ``-inf``: a head's ``-inf`` (never kept) leaves the other
    heads' scores alone, a ``+inf`` (always kept: a sink) stays ``+inf``; ``-inf`` where every score is."""
    kept = scores > float("-inf")
    if bool(kept.all()):
        return scores.mean(dim=dim, keepdim=True)
    count = kept.sum(dim=dim, keepdim=True)
    total = scores.masked_fill(~kept, 0.0).sum(dim=dim, keepdim=True)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("-inf")))
