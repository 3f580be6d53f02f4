"""ComposePress: KVCompose as a kvpress press."""

from __future__ import annotations

import logging
import numbers
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from kvpress import BasePress, ScorerPress
from kvpress.presses.base_press import is_prefilling
from torch import nn
from transformers import PreTrainedModel

from kvpress_compose import attention_lse
from kvpress_compose.allocation import (
    composite_scores,
    compute_n_kept,
    head_budgets,
    kept_positions,
    layer_budgets,
    rank_tokens,
)
from kvpress_compose.attention_scores import (
    AGGREGATIONS,
    attention_statistics,
    finish_scores,
    merge_statistics,
    query_blocks,
    statistics_from_lse,
)
from kvpress_compose.cache_gather import compress_layer, full_cache_bytes, layer_states, mask_evicted_entries
from kvpress_compose.layer_masks import install_layer_mask_hooks
from kvpress_compose.prefill_inputs import PrefillInputs, capture_prefill_inputs
from kvpress_compose.replay import ReplayCache, run_replay

logger = logging.getLogger(__name__)
attention_lse.install()
QUERY_SOURCES = ("prefill", "bidirectional", "replay")
SCORE_BLOCK_FRACTION = 0.1  # scoring works in blocks of about this fraction of the full KV cache size


@dataclass
class ComposePress(BasePress):
    """KVCompose: structured KV cache compression with composite tokens and global layer allocation.

    Every (layer, KV head) scores its context tokens; each head ranks its own tokens and rank j of every head
    forms composite token j, so a layer stays one dense ``(batch, kv_heads, k_l, head_dim)`` tensor. One budget
    for the whole model is spread over layers by a global top-k of composite scores: layers whose tokens draw
    more attention keep more. Based on KVCompose (https://arxiv.org/abs/2509.05165).

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the model's context KV entries to remove, in [0, 1).
    query_source : str, default="replay"
        Which queries score the context. "prefill": the prefill's own queries, causal (no extra pass).
        "bidirectional": the prefill's queries attending to every context key (no extra pass). "replay": the
        paper's, the context re-fed after itself in a second forward pass, whose attention covers three times
        the prefill's (query, key) pairs; the cache never keeps the re-fed tokens. Ignored when ``scorer`` is
        given. On CPU with sdpa, scoring reuses the log-sum-exp of the model's own attention.
    structured : bool, default=True
        False gives the unstructured upper bound: per-(layer, head) budgets applied with kvpress's head-wise
        masking. That saves no memory (evicted entries are masked, not removed) and needs sdpa or flash.
    scorer : ScorerPress, optional
        Any kvpress ScorerPress (SnapKV, ExpectedAttention, Knorm, TOVA, ...) used as the token scores in place
        of attention scores; its own compression_ratio is ignored.
    agg_task, agg_group, agg_head : str, default "max", "mean", "mean"
        Aggregation ("max" or "mean") over query positions, over the query heads of a KV head (GQA), and over
        heads to score a composite token.
    add_v_norm : bool, default=False
        Multiply each token's score by the norm of its value vector.
    add_mean_across_heads : bool, default=True
        Add the mean over KV heads of a token's score to each head's score.
    min_tokens_per_layer : int, default=1
        Composite tokens every layer keeps (per head, when ``structured=False``).
    score_block_size : int, optional
        Queries scored at once where scores come from a softmax (eager, flash-attn, CUDA, windowed replay); by
        default a block of float32 probabilities is about 10% of the full KV cache (at least 16 queries), so
        scoring adds memory O(block x context), never O(context^2). The log-sum-exp path (sdpa on CPU) scores
        in fixed tiles of 256 query columns x 512 keys and does not use it.
    """

    compression_ratio: float = 0.0
    query_source: str = "replay"
    structured: bool = True
    scorer: ScorerPress | None = None
    agg_task: str = "max"
    agg_group: str = "mean"
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    min_tokens_per_layer: int = 1
    score_block_size: int | None = None
    last_budgets: torch.Tensor | None = field(default=None, init=False, repr=False)
    last_scores: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.compression_ratio, bool) or not isinstance(self.compression_ratio, numbers.Real):
            raise TypeError(f"compression_ratio must be a float, got {type(self.compression_ratio).__name__}")
        if not 0 <= self.compression_ratio < 1:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        if self.query_source not in QUERY_SOURCES:
            raise ValueError(f"query_source must be one of {QUERY_SOURCES}, got {self.query_source!r}")
        for name in ("agg_task", "agg_group", "agg_head"):
            if getattr(self, name) not in AGGREGATIONS:
                raise ValueError(f"{name} must be one of {AGGREGATIONS}, got {getattr(self, name)!r}")
        if self.scorer is not None and not isinstance(self.scorer, ScorerPress):
            raise TypeError(f"scorer must be a kvpress ScorerPress, got {type(self.scorer).__name__}")
        if not is_positive_int(self.min_tokens_per_layer):
            raise ValueError(f"min_tokens_per_layer must be an int >= 1, got {self.min_tokens_per_layer!r}")
        if self.score_block_size is not None and not is_positive_int(self.score_block_size):
            raise ValueError(f"score_block_size must be an int >= 1 or None, got {self.score_block_size!r}")
        for name in ("structured", "add_v_norm", "add_mean_across_heads"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._capture_hook = None  # decoder pre-hook capturing prefill inputs, while the press is in use
        self._in_own_context = False  # inside our own `with press(model)` (not only kvpress's ComposedPress)
        self._reset()

    def _reset(self):
        self._inputs: PrefillInputs | None = None  # the prefill's inputs, captured by the decoder pre-hook
        self._statistics: dict[int, torch.Tensor] = {}  # layer -> (batch, kv_heads, group, n) attention stats
        self._scores: dict[int, torch.Tensor] = {}  # layer -> (batch, kv_heads, n) scores from a scorer
        self._replaying = False
        attention_lse.set_capture(getattr(self, "_attention_modules", []), False)

    # -- setting up ---------------------------------------------------------------------------------------

    def post_init_from_model(self, model: PreTrainedModel):
        self._language_model = language_model_of(model)
        self._attention_modules = [layer.self_attn for layer in self._language_model.layers]
        if not self.structured and model.config._attn_implementation == "eager":
            raise ValueError(
                "structured=False relies on kvpress's head-wise masking, which does not patch eager attention: "
                "load the model with attn_implementation='sdpa' (or flash_attention_2)"
            )
        install_layer_mask_hooks(self._language_model, self._attention_modules)
        self._local_span = local_attention_span(model.config.get_text_config())
        self._remove_capture_hook()
        self._capture_hook = self._language_model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)
        if self.scorer is not None:
            self.scorer.post_init_from_model(model)
        self._reset()

    @contextmanager
    def __call__(self, model: PreTrainedModel):
        with super().__call__(model):
            self._in_own_context = True
            try:
                yield
            finally:
                self._in_own_context = False
                self._remove_capture_hook()
                self._reset()

    def _remove_capture_hook(self):
        if self._capture_hook is not None:
            self._capture_hook.remove()
            self._capture_hook = None

    def _capture_inputs(self, module: nn.Module, args: tuple, kwargs: dict):
        """Decoder pre-hook: remember a fresh prefill's inputs (padding, positions, ids for replay)."""
        if not self._replaying:
            inputs = capture_prefill_inputs(module, args, kwargs)
            if inputs is not None:
                if self._local_span is not None and inputs.length >= self._local_span:  # caches keep span - 1
                    raise ValueError(
                        f"context of {inputs.length} tokens does not fit the model's sliding window or attention "
                        f"chunk ({self._local_span} tokens, of which a cache keeps {self._local_span - 1}): "
                        "ComposePress supports full-attention layers only"
                    )
                self._inputs, self._scores, self._statistics = inputs, {}, {}
                uses_lse = self.scorer is None and self.query_source != "replay" and self.compression_ratio > 0
                attention_lse.set_capture(self._attention_modules, uses_lse)

    # -- scoring (forward hook) ---------------------------------------------------------------------------

    def forward_hook(self, module: nn.Module, input: list, kwargs: dict, output: list):
        try:
            with torch.no_grad():  # scoring and compression are never differentiated, even if the forward is
                return self._score_layer(module, kwargs, output)
        except BaseException:  # leave no capture behind (kvpress's ComposedPress does not call our __call__)
            attention_lse.set_capture(self._attention_modules, False)
            if not self._in_own_context:
                self._remove_capture_hook()
            raise

    def _score_layer(self, module: nn.Module, kwargs: dict, output: list):
        hidden_states = kwargs["hidden_states"]
        if self._replaying:
            self._score_replay(module, hidden_states, kwargs)
            return output
        cache = kwargs.get("past_key_values")
        if cache is None:
            raise ValueError("ComposePress needs a cache: call the model with past_key_values=DynamicCache()")
        if not is_prefilling(kwargs["cache_position"], hidden_states.shape[1]):
            return output
        if self.compression_ratio == 0:
            self._finish_prefill(module)
            return output
        if self._inputs is None:
            raise RuntimeError("ComposePress saw a prefill it did not capture: use it as `with press(model):`")
        keys, values = layer_states(cache, module.layer_idx)
        if self.scorer is not None:
            scores = self.scorer.score(module, hidden_states, keys, values, output[1], kwargs)
            self._scores[module.layer_idx] = scores.float()
        elif self.query_source != "replay":
            if self.query_source == "prefill":  # the causal mask needs the keys' original positions
                self._check_unpruned(keys, hidden_states)
            self._statistics[module.layer_idx] = self._prefill_statistics(module, keys, hidden_states, kwargs)
        else:
            self._check_unpruned(keys, hidden_states)
        if module.layer_idx == len(self._attention_modules) - 1:
            self._compress(cache)
        self._finish_prefill(module)
        return output

    def _finish_prefill(self, module: nn.Module):
        """After the last layer: inside kvpress's ComposedPress (not our own context manager), stop capturing."""
        if module.layer_idx == len(self._attention_modules) - 1 and not self._in_own_context:
            self._remove_capture_hook()

    def _check_unpruned(self, keys: torch.Tensor, hidden_states: torch.Tensor):
        if keys.shape[2] != hidden_states.shape[1]:
            raise ValueError(
                f"query_source={self.query_source!r} needs the layer's full context ({hidden_states.shape[1]} "
                f"tokens) but found {keys.shape[2]}: put ComposePress last in ComposedPress, and after presses that "
                "prune tokens use query_source='bidirectional' or a scorer"
            )

    def _prefill_statistics(self, module, keys, hidden_states, kwargs) -> torch.Tensor:
        """Statistics of the prefill's own queries: from what its attention captured, else by softmax. The
        captured queries are released on return, before the next layer runs."""
        causal_offset = 0 if self.query_source == "prefill" else None
        captured = attention_lse.take_lse(module, *hidden_states.shape[:2])
        if captured is None or keys.shape[2] != captured.keys.shape[2]:  # an earlier press pruned this layer
            queries = query_blocks(module, hidden_states, kwargs.get("position_embeddings"))
            valid = self._inputs.valid
            return self._attention_statistics(module, queries, keys, valid, valid, causal_offset)
        lse = captured.lse  # causal; "bidirectional" normalises over every key
        if self.query_source == "bidirectional":
            lse = attention_lse.bidirectional_lse(captured, self._inputs.valid)
        return statistics_from_lse(captured.query_blocks(), lse, captured.keys, self._inputs.valid,
                                   n_scored=self._inputs.length, causal_offset=causal_offset, agg_task=self.agg_task)

    def _attention_statistics(self, module, queries, keys, key_valid, query_valid, causal_offset):
        n_context = self._inputs.length
        if key_valid.shape[1] != keys.shape[2]:  # an earlier press pruned this layer: positions are unknown
            key_valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool)
        n_layers = len(self._attention_modules)
        return attention_statistics(
            queries,
            query_valid.shape[1],
            module.config.num_attention_heads,
            keys,
            key_valid.to(keys.device),
            query_valid.to(keys.device),
            n_scored=min(n_context, keys.shape[2]),
            causal_offset=causal_offset,
            agg_task=self.agg_task,
            block_bytes=int(SCORE_BLOCK_FRACTION * full_cache_bytes(keys[:, :, :n_context], n_layers)),
            block_size=self.score_block_size,
        )

    def _score_replay(self, module, hidden_states, kwargs):
        """Statistics of one chunk of re-fed queries, merged into the layer's."""
        keys = self._replay_cache.attended_keys.pop(module.layer_idx)  # original context, then re-fed tokens
        start, n_context = self._replay_cache.replayed, self._inputs.length
        valid = self._inputs.valid
        end = start + hidden_states.shape[1]
        captured = attention_lse.take_lse(module, *hidden_states.shape[:2])
        if captured is not None:  # normalised over everything the re-fed queries saw; every context key is visible
            chunk = statistics_from_lse(captured.query_blocks(), captured.lse, captured.keys,
                                        valid[:, start:end], n_scored=n_context, causal_offset=None,
                                        agg_task=self.agg_task)
        else:
            queries = query_blocks(module, hidden_states, kwargs.get("position_embeddings"))
            chunk = self._attention_statistics(
                module, queries, keys, torch.cat([valid, valid[:, :end]], dim=1), valid[:, start:end],
                n_context + start
            )
        layer = module.layer_idx
        self._statistics[layer] = merge_statistics(self._statistics.get(layer), chunk, self.agg_task)

    def _layer_scores(self, cache, layer_idx: int) -> torch.Tensor:
        """``(batch, kv_heads, n)`` scores of a layer: finished attention statistics or the scorer's, with the
        value-norm enhancement and padding at -inf (never kept)."""
        scores = self._scores.get(layer_idx)
        if scores is None:
            n_queries = self._inputs.valid.sum(dim=-1)
            scores = finish_scores(self._statistics[layer_idx], n_queries, self.agg_task, self.agg_group)
        if self.add_v_norm:
            _, values = layer_states(cache, layer_idx)
            scores = scores * values[:, :, : scores.shape[2]].float().norm(dim=-1)
        if scores.shape[2] == self._inputs.length:
            scores = scores.masked_fill(~self._inputs.valid[:, None].to(scores.device), float("-inf"))
        return scores

    # -- allocation and compression -----------------------------------------------------------------------

    def _compress(self, cache):
        if self.scorer is None and self.query_source == "replay":
            self._check_cache_lengths(cache, [self._inputs.length] * len(self._attention_modules))
            self._replaying = True
            self._replay_cache = ReplayCache(cache, self._inputs.length)
            # a sliding window or attention chunk may hide context keys from re-fed queries, which scoring
            # assumes they all see
            attention_lse.set_capture(self._attention_modules, self._local_span is None)
            try:
                run_replay(self._language_model, self._inputs, self._replay_cache)
            finally:
                self._replaying = False
                self._replay_cache = None
        scores = self._stacked_scores(cache)
        if self.add_mean_across_heads:
            scores = scores + scores.mean(dim=2, keepdim=True)
        sorted_scores, token_order = rank_tokens(scores)
        self.last_scores = scores
        if self.structured:
            self._compress_structured(cache, sorted_scores, token_order)
        else:
            self._mask_unstructured(sorted_scores, token_order)
        self._inputs, self._scores, self._statistics = None, {}, {}
        attention_lse.set_capture(self._attention_modules, False)

    def _check_cache_lengths(self, cache, scored_lengths: list[int]) -> None:
        """Every layer still holds the entries that were scored: no press after ComposePress pruned them."""
        if any(cache.get_seq_length(i) != length for i, length in enumerate(scored_lengths)):
            raise ValueError(
                "a press after ComposePress changed the cache before ComposePress compressed it: "
                "put ComposePress last in ComposedPress"
            )

    def _stacked_scores(self, cache) -> torch.Tensor:
        """``(layers, batch, kv_heads, n)`` scores on one device; positions a layer lacks are -inf."""
        layer_scores = [self._layer_scores(cache, layer_idx) for layer_idx in range(len(self._attention_modules))]
        device = layer_scores[0].device
        n = max(scores.shape[2] for scores in layer_scores)
        shortest = int(self._inputs.valid.sum(dim=1).min())
        if shortest < self.min_tokens_per_layer:
            raise ValueError(
                f"context has {shortest} tokens, fewer than min_tokens_per_layer={self.min_tokens_per_layer}"
            )
        self._check_cache_lengths(cache, [scores.shape[2] for scores in layer_scores])
        padded = [torch.nn.functional.pad(s.to(device), (0, n - s.shape[2]), value=float("-inf")) for s in layer_scores]
        return torch.stack(padded)

    def _compress_structured(self, cache, sorted_scores, token_order):
        n_layers, _, _, n = sorted_scores.shape
        n_kept = compute_n_kept(n_layers * n, self.compression_ratio)
        if n_layers * self.min_tokens_per_layer > n_kept:
            logger.warning(
                f"min_tokens_per_layer={self.min_tokens_per_layer} over {n_layers} layers keeps "
                f"{n_layers * self.min_tokens_per_layer} composite tokens, more than the {n_kept} that "
                f"compression_ratio={self.compression_ratio} allows"
            )
            n_kept = n_layers * self.min_tokens_per_layer
        budgets = layer_budgets(composite_scores(sorted_scores, self.agg_head), n_kept, self.min_tokens_per_layer)
        if int(budgets.sum()) < n_kept:
            logger.warning(
                f"kept {int(budgets.sum())} composite tokens instead of {n_kept}: batch rows share one length per "
                "layer and padding is never kept, so the shortest row bounds each layer"
            )
        self.last_budgets = budgets.cpu()
        for layer_idx, budget in enumerate(self.last_budgets.tolist()):
            compress_layer(cache, layer_idx, kept_positions(token_order[layer_idx], budget))

    def _mask_unstructured(self, sorted_scores, token_order):
        budgets = head_budgets(sorted_scores, self.compression_ratio, self.min_tokens_per_layer)  # (b, L, H)
        self.last_budgets = budgets.cpu()
        mask_evicted_entries(self._attention_modules, token_order, budgets)


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


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
